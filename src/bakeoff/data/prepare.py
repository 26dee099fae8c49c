"""From folders to a ready data set: scan, decode once per resolution, drop bad files, split."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bakeoff.data.cache import DecodedImages, build_cache
from bakeoff.data.scan import CLASS_MAP_FILE, scan_folder, stratified_split
from bakeoff.errors import BakeoffError

__all__ = ["PreparedData", "prepare_data"]

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    classes: list[str]
    files: list[str]  # absolute paths, training folder first, then the validation folder
    labels: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    fingerprint: str
    cache_dir: Path
    skipped: list[dict] = field(default_factory=list)
    caches: dict[tuple[int, str], DecodedImages] = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    decode_device: str | None = None  # a GPU that decodes the JPEGs, or None for the CPU
    timings: dict = field(default_factory=dict)  # seconds: scanning, decoding (0 when cached)
    warnings: list[str] = field(default_factory=list)  # what the run can use but measures poorly

    def cache_for(self, side: int, interpolation: str, progress: Callable | None = None) -> DecodedImages:
        """The decoded images at ``side`` (built on first use, then shared)."""
        k = (side, interpolation)
        if k not in self.caches:
            self.caches[k] = build_cache(self.files, self.cache_dir, self.fingerprint, side, interpolation,
                                         progress=progress, decode_device=self.decode_device)
        return self.caches[k]

    def summary(self) -> dict:
        counts = {c: int((self.labels[self.train_idx] == i).sum()) for i, c in enumerate(self.classes)}
        val_counts = {c: int((self.labels[self.val_idx] == i).sum()) for i, c in enumerate(self.classes)}
        return {**self.source, "fingerprint": self.fingerprint, "classes": self.classes,
                "n_train": int(len(self.train_idx)), "n_val": int(len(self.val_idx)),
                "train_counts": counts, "val_counts": val_counts,
                "n_skipped": len(self.skipped), "skipped": self.skipped, "warnings": self.warnings,
                **{f"{k}_time_s": round(v, 3) for k, v in self.timings.items()}}


def prepare_data(data_dir, val_dir=None, val_fraction: float = 0.2, seed: int = 0, cache_dir=None,
                 first_side: tuple[int, str] = (256, "bilinear"), progress: Callable | None = None,
                 decode_device: str | None = None, scanned: tuple | None = None) -> PreparedData:
    """Scan and validate the folders, decode every image once at ``first_side`` (which also finds
    the unreadable files), drop those, and split. Every refusal is a one-line BakeoffError.
    ``decode_device``: a GPU to decode the JPEGs on. ``scanned``: (training folder, validation
    folder or None, seconds it took) from a caller that has scanned them with ``scan_folder``
    already (a large folder's scan takes a while; it is not repeated)."""
    t0 = time.perf_counter()
    if scanned is not None:
        train, val, scan_s = scanned
        t0 -= scan_s
    else:
        train = scan_folder(data_dir, what="data folder")
        val = scan_folder(val_dir, classes=train.classes, what="validation folder") if val_dir is not None else None
    root = train.root.resolve()  # once: resolving 55k paths one by one took about a second
    files = [str(root / p) for p in train.paths]
    labels = list(train.labels)
    is_val = [False] * len(files)
    skipped = [{"path": str(train.root / s["path"]), "reason": s["reason"]} for s in train.skipped]
    fp = hashlib.sha256(train.fingerprint().encode())
    n_shared = 0
    if val is not None:
        val_root = val.root.resolve()
        skipped += [{"path": str(val.root / s["path"]), "reason": s["reason"]} for s in val.skipped]
        in_train = {_identity(f) for f in files}
        for p, label in zip(val.paths, val.labels):
            path = str(val_root / p)
            if _identity(path) in in_train:  # scored on an image it trained on: not a validation
                skipped.append({"path": path, "reason": "the same file is in the training folder"})
                n_shared += 1
                continue
            files.append(path)
            labels.append(label)
            is_val.append(True)
        fp.update(val.fingerprint().encode())
        if n_shared:  # the cache holds the other files only (keys unchanged otherwise)
            fp.update(f"without {n_shared} shared".encode())
    fingerprint = fp.hexdigest()[:16]
    cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "bakeoff"
    labels = np.asarray(labels, dtype=np.int64)
    is_val = np.asarray(is_val)
    data = PreparedData(train.classes, files, labels, np.empty(0, np.int64), np.empty(0, np.int64),
                        fingerprint, cache_dir, skipped,
                        source={"data_dir": str(Path(data_dir).expanduser().resolve()),
                                "val_dir": str(Path(val_dir).expanduser().resolve()) if val_dir else None,
                                "val_fraction": None if val_dir else val_fraction, "split_seed": seed},
                        decode_device=decode_device)
    t1 = time.perf_counter()
    decoded = data.cache_for(*first_side, progress=progress)
    data.timings = {"scan": t1 - t0, "decode": time.perf_counter() - t1}
    for i, err in sorted(decoded.errors.items()):
        skipped.append({"path": files[i], "reason": f"unreadable: {err}"})
    ok = decoded.ok
    for i, cls in enumerate(train.classes):
        if not (ok & (labels == i) & ~is_val).any():
            raise BakeoffError(
                f"class folder {Path(data_dir) / cls} has no readable images: add images to it or remove it"
            )
    if val_dir is not None:
        data.train_idx = np.flatnonzero(ok & ~is_val)
        data.val_idx = np.flatnonzero(ok & is_val)
        if len(data.val_idx) == 0:
            if n_shared == len(val.paths):
                raise BakeoffError(f"validation folder {val_dir} holds only files of the training folder "
                                   f"{data_dir}: pass a folder of other images as --val-dir")
            raise BakeoffError(f"validation folder {val_dir} has no readable images: add images to it")
    else:
        usable = np.flatnonzero(ok)
        tr, va = stratified_split(labels[usable], val_fraction, seed)
        data.train_idx, data.val_idx = usable[tr], usable[va]
        if len(data.val_idx) == 0:
            raise BakeoffError(f"data folder {data_dir} is too small to hold out a validation split: "
                               f"add images, raise --val-fraction or pass --val-dir")
    data.warnings = split_warnings(data, data_dir, val_dir)
    for w in data.warnings:
        log.warning(w)
    return data


def _identity(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError:  # gone since the scan: the decoder reports it
        return (path,)
    return st.st_dev, st.st_ino


def split_warnings(data: PreparedData, data_dir, val_dir) -> list[str]:
    """Classes the run trains on but measures poorly: one with fewer than 2 usable images, and
    one with no validation image (its accuracy is not measured at all)."""
    out = []
    train = np.bincount(data.labels[data.train_idx], minlength=len(data.classes))
    val = np.bincount(data.labels[data.val_idx], minlength=len(data.classes))
    for i, cls in enumerate(data.classes):
        n = int(train[i] + (0 if val_dir else val[i]))
        if n < 2:
            held = "" if val_dir else ", so none is held out for validation"
            out.append(f"class {cls} has only {n} usable image in {data_dir}{held}: add images to it")
        if val[i] == 0 and (val_dir or n >= 2):
            where = f"{val_dir} has no readable image of class {cls}" if val_dir else \
                f"the validation split has no image of class {cls}"
            out.append(f"{where}: its accuracy is not measured; add images to it")
    return out


def typical_side(files: list[str], sample: int = 64, seed: int = 0) -> int:
    """The median shorter side of a sample of the images (headers only, nothing decoded)."""
    from PIL import Image

    from bakeoff.data.images import open_regular

    rng = np.random.default_rng(seed)
    sides = []
    for i in rng.choice(len(files), size=min(sample, len(files)), replace=False):
        try:
            with open_regular(files[i]) as f, Image.open(f) as img:
                sides.append(min(img.size))
        except Exception:
            continue
    return int(np.median(sides)) if sides else 0


def storage_side(needed: list[int], files: list[str]) -> int:
    """One cache size serves every model of a run: the largest size any model resizes to, but
    no larger than the images themselves (upsampling adds bytes, not information), and no
    smaller than the smallest size a model needs. Models resize from it on the device."""
    native = typical_side(files)
    return max(min(needed), min(max(needed), native or max(needed)))


def write_class_map(classes: list[str], out_dir: Path) -> Path:
    path = Path(out_dir) / CLASS_MAP_FILE
    path.write_text(json.dumps({c: i for i, c in enumerate(classes)}, indent=2))
    return path
