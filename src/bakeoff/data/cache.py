"""Decode once: every image is decoded and resized a single time into a uint8 ``.npy`` file
(memory-mapped, so a set larger than RAM still runs) that every trial and every re-run shares."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bakeoff.data.images import load_rgb, square_resize
from bakeoff.lifetime import die_with_parent, temp_path

__all__ = ["DecodedImages", "build_cache", "cache_side"]


def cache_side(input_size: int, crop_pct: float) -> int:
    """The stored square side: the eval resize before the centre crop (224 at 0.875 -> 256)."""
    return int(round(input_size / crop_pct))


@dataclass
class DecodedImages:
    """N x S x S x 3 uint8 images (memory-mapped) and which of the N files decoded."""

    path: Path
    side: int
    ok: np.ndarray  # bool, False where the file could not be decoded
    errors: dict[int, str]

    def array(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")


def _decode_one(path: str, side: int, interpolation: str):
    try:
        return square_resize(load_rgb(path, draft_size=side), side, interpolation), None
    except Exception as exc:  # any decoder failure means "skip this file", never a crash
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def _decode_into(npy_path: str, start: int, paths: list[str], side: int, interpolation: str) -> dict[int, str]:
    """Decode ``paths`` into rows ``start...`` of the memory-mapped ``.npy`` (run in a worker
    process: decoding is CPU-bound Python and C that threads of one process do not scale)."""
    out = np.load(npy_path, mmap_mode="r+")
    errors = {}
    for i, p in enumerate(paths):
        arr, err = _decode_one(p, side, interpolation)
        if err is None:
            out[start + i] = arr
        else:
            errors[start + i] = err
    out.flush()
    return errors


def _decode_in_processes(tmp: Path, files: list[str], side: int, interpolation: str, workers: int,
                         progress: Callable[[int, int], None] | None) -> dict[int, str]:
    chunk, done, errors = 512, 0, {}
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_decode_into, str(tmp), start, files[start:start + chunk], side, interpolation):
                   len(files[start:start + chunk]) for start in range(0, len(files), chunk)}
        for fut in as_completed(futures):
            errors.update(fut.result())
            done += futures[fut]
            if progress:
                progress(done, len(files))
    return errors


def _decode_in_threads(out: np.ndarray, files: list[str], side: int, interpolation: str, workers: int,
                       progress: Callable[[int, int], None] | None) -> dict[int, str]:
    chunk, errors = 256, {}
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(files), chunk):
            batch = files[start:start + chunk]
            for i, (arr, err) in enumerate(pool.map(lambda p: _decode_one(p, side, interpolation), batch)):
                if err is None:
                    out[start + i] = arr
                else:
                    errors[start + i] = err
            if progress:
                progress(min(start + chunk, len(files)), len(files))
    out.flush()
    return errors


# Below this many files a process pool costs more to start than it saves.
PROCESS_POOL_MIN_FILES = 4096


def build_cache(
    files: list[str],
    cache_dir: Path,
    key: str,
    side: int,
    interpolation: str = "bilinear",
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    decode_device=None,
) -> DecodedImages:
    """Decode ``files`` to ``cache_dir/<key>/s<side>-<interpolation>.npy`` unless it exists.

    ``key`` must identify the exact file list (the data set fingerprint). The file appears
    atomically, so a run killed while building leaves no half-written cache behind.
    ``decode_device`` (a GPU): decode JPEGs there in batches (see ``gpu_decode``); anything
    that goes wrong there falls back to decoding on the CPU.
    """
    folder = Path(cache_dir) / key
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"s{side}-{interpolation}"
    npy, meta = folder / f"{stem}.npy", folder / f"{stem}.json"
    if npy.exists() and meta.exists():
        found = _read_entry(npy, meta, len(files), side)
        if found is not None:
            if progress:
                progress(len(files), len(files))
            return DecodedImages(npy, side, *_ok_mask(len(files), found))
    tmp = temp_path(npy)  # names its writer: a later run removes it if this one is killed
    # The file with its .npy header; the decoders fill its rows in place.
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), side, side, 3)).flush()
    workers = workers or min(32, os.cpu_count() or 1)
    errors, decoder = None, "pil"
    if decode_device is not None:
        try:
            from bakeoff.data.gpu_decode import decode_batched

            errors = decode_batched(np.load(tmp, mmap_mode="r+"), files, side, interpolation, decode_device,
                                    lambda p: _decode_one(p, side, interpolation), progress)
            decoder = f"torchvision ({decode_device})"
        except Exception:  # no nvJPEG, out of memory, ...: the CPU path below does it all again
            errors = None
    if errors is None and workers > 1 and len(files) >= PROCESS_POOL_MIN_FILES:
        try:
            errors = _decode_in_processes(tmp, files, side, interpolation, workers, progress)
        except (BrokenProcessPool, OSError, RuntimeError):
            pass  # workers could not start (e.g. a script fed on stdin, whose main module a fresh
            # interpreter cannot import again): decode with threads instead
    if errors is None:
        errors = _decode_in_threads(np.load(tmp, mmap_mode="r+"), files, side, interpolation, workers, progress)
    os.replace(tmp, npy)
    meta_tmp = temp_path(meta)  # renamed into place too: a reader never sees half of it
    meta_tmp.write_text(json.dumps({"n": len(files), "side": side, "interpolation": interpolation,
                                    "decoder": decoder, "errors": {str(k): v for k, v in errors.items()}}))
    os.replace(meta_tmp, meta)
    return DecodedImages(npy, side, *_ok_mask(len(files), errors))


def _ok_mask(n: int, errors: dict[int, str]) -> tuple[np.ndarray, dict[int, str]]:
    ok = np.ones(n, dtype=bool)
    ok[list(errors)] = False
    return ok, errors


def _read_entry(npy: Path, meta: Path, n: int, side: int) -> dict[int, str] | None:
    """The decode errors of a complete cache entry for ``n`` images; None where it is for
    another file list, or damaged (a truncated or unreadable file, say from a full disk or an
    older version that wrote in place): then it is decoded again, with a one-line warning."""
    try:
        info = json.loads(meta.read_text())
        if info.get("n") != n:
            return None
        errors = {int(k): v for k, v in info["errors"].items()}
        images = np.load(npy, mmap_mode="r")  # a file shorter than its header says fails here
        expected = (n, side, side, 3)
        if images.shape != expected or images.dtype != np.uint8:
            raise ValueError(f"holds {images.shape} {images.dtype}, not {expected} uint8")
        return errors
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        print(f"warning: decoded-image cache {npy.parent / npy.stem}.* is damaged ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''}): decoding the images again", file=sys.stderr)
        return None
