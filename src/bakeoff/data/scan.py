"""Scan an image folder (one sub-folder per class), validate it, and split it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bakeoff.errors import BakeoffError

__all__ = ["ImageFolder", "scan_folder", "stratified_split", "CLASS_MAP_FILE"]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif"}
# The managed service's name for the class map; kept so its clients read ours unchanged.
CLASS_MAP_FILE = "class_label_to_prediction_index.json"


@dataclass
class ImageFolder:
    """The files of one image folder: paths relative to ``root``, labels, class names."""

    root: Path
    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}

    @property
    def class_to_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def fingerprint(self) -> str:
        """Hash of class names, relative paths, sizes and modification times."""
        h = hashlib.sha256(json.dumps(self.classes).encode())
        for rel in self.paths:
            st = (self.root / rel).stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def counts(self) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)}


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def scan_folder(root, classes: list[str] | None = None, what: str = "data folder") -> ImageFolder:
    """List the images of ``root``; ``classes`` fixes the class index (for a validation folder).

    Raises BakeoffError with the path and the fix for every folder a run cannot use.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise BakeoffError(f"{what} {root} does not exist: pass a folder with one sub-folder per class")
    if not root.is_dir():
        raise BakeoffError(f"{what} {root} is a file, not a folder: pass a folder with one sub-folder per class")
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not _is_hidden(d.name))
    if not subdirs:
        loose = [p.name for p in root.iterdir() if p.is_file() and not _is_hidden(p.name)]
        hint = " (it holds loose files: move each image into a folder named after its class)" if loose else ""
        raise BakeoffError(f"{what} {root} has no class sub-folders{hint}: put each class's images in root/<class>/")
    if classes is None:
        if len(subdirs) < 2:
            raise BakeoffError(
                f"{what} {root} has only one class folder ({subdirs[0]}): a classifier needs at least 2 classes"
            )
        classes = subdirs
    else:
        unknown = [d for d in subdirs if d not in classes]
        if unknown:
            raise BakeoffError(
                f"{what} {root} has classes the training data lacks: {', '.join(unknown)}; "
                f"rename or remove them (training classes: {', '.join(classes)})"
            )
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, skipped = [], [], []
    for cls in subdirs:
        found = 0
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            for name in sorted(filenames):
                if _is_hidden(name):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    paths.append(rel)
                    labels.append(index[cls])
                    found += 1
                else:
                    skipped.append({"path": rel, "reason": "not an image file (by its extension)"})
        if found == 0:
            raise BakeoffError(
                f"class folder {root / cls} holds no images: add images to it or remove the folder"
            )
    return ImageFolder(root, list(classes), paths, np.asarray(labels, dtype=np.int64), skipped)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: every class with 2+ images gets at least one in each part."""
    if not 0.0 < val_fraction < 1.0:
        raise BakeoffError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(val, dtype=np.int64))
