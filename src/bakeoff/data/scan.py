"""Scan an image folder (one sub-folder per class), validate it, and split it."""

from __future__ import annotations

import hashlib
import json
import os
import stat
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
    reals = {cls: os.path.realpath(root / cls) for cls in subdirs}
    _refuse_overlapping_classes(root, reals, what)
    index = {c: i for i, c in enumerate(classes)}
    walk = _Walk(root, set(reals.values()))
    paths, labels = [], []
    for cls in subdirs:
        found = 0
        for rel in walk.files(cls):
            if Path(rel).suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(rel)
                labels.append(index[cls])
                found += 1
            else:
                walk.skipped.append({"path": rel, "reason": "not an image file (by its extension)"})
        if found == 0:
            raise BakeoffError(
                f"class folder {root / cls} holds no images: add images to it or remove the folder"
            )
    return ImageFolder(root, list(classes), paths, np.asarray(labels, dtype=np.int64), walk.skipped)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _refuse_overlapping_classes(root: Path, reals: dict[str, str], what: str) -> None:
    """A class folder that is (a link to) the data folder, an ancestor of it, or another class's
    folder would label one image as two classes."""
    top = os.path.realpath(root)
    for cls, real in reals.items():
        if _within(top, real):
            raise BakeoffError(f"class folder {root / cls} leads back to the {what} itself (a link to {real}): "
                               f"remove it")
    owner: dict[str, str] = {}
    for cls, real in reals.items():
        owner.setdefault(real, cls)
    for cls, real in reals.items():  # by parents, not pairs: data sets have thousands of classes
        for inside in (real, *map(str, Path(real).parents)):
            other = owner.get(inside, cls)
            if other != cls:
                raise BakeoffError(f"class folders {root / other} and {root / cls} hold the same files "
                                   f"(one leads into the other): remove one of them")


_SPECIAL = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
            (stat.S_ISBLK, "a device"))


class _Walk:
    """Depth-first listing of the class folders that follows links but lists each real file once.

    Links are followed (a class folder often links to images kept elsewhere), so every folder
    and file is keyed by (st_dev, st_ino): a link loop (``daisy/loop -> ..``) or a second path to
    the same files would otherwise list them many times, and put copies of one image in both the
    training and the validation split. A link into a class folder is not followed (its files
    are listed where they really are). Only regular files are listed: opening a named pipe
    blocks forever. Everything left out goes to ``skipped`` with its reason.
    """

    def __init__(self, root: Path, class_reals: set[str]):
        self.root, self.class_reals = root, class_reals
        self.top = os.path.realpath(root)
        self.seen_dirs: set[tuple[int, int]] = set()
        self.seen_files: dict[tuple[int, int], str] = {}
        self.skipped: list[dict] = []

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append({"path": os.path.relpath(path, self.root), "reason": reason})

    def files(self, cls: str):
        """Relative paths of the regular files under ``root/cls``: files of a folder first (sorted
        by name), then each sub-folder in name order, as ``os.walk`` lists them (the data set's
        fingerprint hashes this order)."""
        folder = str(self.root / cls)
        try:
            st = os.stat(folder)
        except OSError as exc:
            self.skip(folder, f"unreadable folder: {exc.strerror}")
            return
        self.seen_dirs.add((st.st_dev, st.st_ino))
        yield from self._folder(folder)

    def _folder(self, folder: str):
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not _is_hidden(e.name)), key=lambda e: e.name)
        except OSError as exc:
            self.skip(folder, f"unreadable folder: {exc.strerror}")
            return
        subfolders = []
        for entry in entries:
            try:
                st = entry.stat()  # follows a link; a dangling or looping link raises
            except OSError as exc:
                target = os.readlink(entry.path) if entry.is_symlink() else ""
                self.skip(entry.path, f"a link to nothing ({target}): {exc.strerror}" if target
                          else f"unreadable: {exc.strerror}")
                continue
            if stat.S_ISDIR(st.st_mode):
                subfolders.append((entry, st))
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in self.seen_files:
                    self.skip(entry.path, f"the same file as {self.seen_files[key]} (a link): listed once")
                else:
                    rel = os.path.relpath(entry.path, self.root)
                    self.seen_files[key] = rel
                    yield rel
            else:
                kind = next((name for test, name in _SPECIAL if test(st.st_mode)), "a special file")
                self.skip(entry.path, f"not a regular file ({kind})")
        for entry, st in subfolders:
            key = (st.st_dev, st.st_ino)
            if entry.is_symlink():
                real = os.path.realpath(entry.path)
                if _within(self.top, real):
                    self.skip(entry.path, f"a link to a folder that holds the data folder ({real}): a loop")
                    continue
                if any(_within(real, c) for c in self.class_reals):
                    self.skip(entry.path, f"a link back into a class folder ({real}): "
                                          "its files are listed once, where they are")
                    continue
            if key in self.seen_dirs:
                self.skip(entry.path, "a folder listed already (through a link): listed once")
                continue
            self.seen_dirs.add(key)
            yield from self._folder(entry.path)


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
