"""Decode the cache's JPEGs in batches with torchvision: on a GPU through nvJPEG (many times
PIL's rate on the CPU cores; figures in docs/results.md).

Same result as the PIL path within JPEG decoder tolerance: RGB, shorter side resized to
``side`` (antialiased) and centre-cropped. The batched decoder cannot do everything PIL does
(on a GPU it ignores EXIF orientation), so only plain RGB or grey JPEGs standing upright go
through it; the rest, and batches it refuses (a corrupt file among them), go through the PIL
path one by one, which also records why a file cannot be read.
"""

from __future__ import annotations

import io
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from bakeoff.data.images import open_regular, square_resize_tensor

__all__ = ["decode_batched", "batchable"]

JPEG_MAGIC = b"\xff\xd8"


def batchable(data: bytes | None) -> bool:
    """Whether the batched decoder gives these bytes the PIL path's picture: a JPEG in RGB or
    grey whose EXIF orientation (if any) is upright. Reads the header only."""
    if data is None or data[:2] != JPEG_MAGIC:
        return False
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            upright = b"Exif\x00\x00" not in data[:65536] or img.getexif().get(0x0112, 1) == 1
            return img.format == "JPEG" and img.mode in ("RGB", "L") and upright
    except Exception:
        return False  # PIL will say what is wrong with it


def _read(path: str) -> tuple[bytes | None, bool]:
    try:
        with open_regular(path) as f:  # a named pipe would block the reader forever
            data = f.read()
    except OSError:
        return None, False  # the PIL path reports the error
    return data, batchable(data)


def _runs(rows: list[int]) -> list[tuple[int, int, int]]:
    """(first row, position in ``rows``, length) of each run of consecutive rows."""
    runs, k = [], 0
    while k < len(rows):
        j = k
        while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
            j += 1
        runs.append((rows[k], k, j - k + 1))
        k = j + 1
    return runs


class _Writer:
    """Writes decoded rows into ``out``. A memory-mapped ``.npy`` is written through the file
    (``pwrite``): the kernel copies into its page cache, where writing through the map takes a
    page fault per 4 KiB of a fresh file, seconds for a PlantVillage-sized set."""

    def __init__(self, out: np.ndarray) -> None:
        self.out = out
        self.fd = os.open(out.filename, os.O_WRONLY) if isinstance(out, np.memmap) and out.filename else None
        self.row_bytes = int(np.prod(out.shape[1:]))

    def put(self, rows: list[int], arr: np.ndarray) -> None:
        for first, k, n in _runs(rows):
            if self.fd is None:
                self.out[first:first + n] = arr[k:k + n]
            else:
                data = memoryview(np.ascontiguousarray(arr[k:k + n])).cast("B")
                done = 0
                while done < len(data):
                    done += os.pwrite(self.fd, data[done:], self.out.offset + first * self.row_bytes + done)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


def decode_batched(out: np.ndarray, files: list[str], side: int, interpolation: str, device,
                   decode_one: Callable, progress: Callable[[int, int], None] | None = None,
                   batch: int = 256, read_threads: int = 8, write_threads: int = 4) -> dict[int, str]:
    """Fill ``out[i]`` (N x side x side x 3 uint8) with ``files[i]``; returns {index: error} for
    the files that could not be read. ``decode_one(path) -> (array, error)`` is the PIL path.

    Three stages overlap: threads read the next batch's files while the device decodes this
    one, and other threads write the decoded rows into ``out`` (see ``_Writer``)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    errors: dict[int, str] = {}
    writing: deque = deque()
    writer = _Writer(out)
    # Decoded batches cross to the host into a few pinned buffers, used in turn: copies into
    # fresh pageable memory fault every page in, a fraction of the decoder's speed.
    buffers = [torch.empty((batch, side, side, 3), dtype=torch.uint8, pin_memory=device.type == "cuda")
               for _ in range(write_threads + 2)]
    free = deque(buffers)

    def write(rows: list[int], arr, buffer=None) -> None:
        writing.append((writers.submit(writer.put, rows, arr), buffer))
        while len(writing) > write_threads + 1:  # bounded: decoded batches wait in memory
            done()

    def done() -> None:
        future, buffer = writing.popleft()
        future.result()
        if buffer is not None:
            free.append(buffer)

    def by_pil(rows):
        for i in rows:
            arr, err = decode_one(files[i])
            if err is None:
                write([i], arr[None])
            else:
                errors[i] = err

    starts = list(range(0, len(files), batch))

    def reading(start):  # the next batch's files are read while this one decodes
        return [readers.submit(_read, files[i]) for i in range(start, min(start + batch, len(files)))]

    try:
        with ThreadPoolExecutor(read_threads) as readers, ThreadPoolExecutor(write_threads) as writers:
            ahead = reading(starts[0]) if starts else []
            for n, start in enumerate(starts):
                rows = list(range(start, min(start + batch, len(files))))
                read = [f.result() for f in ahead]
                ahead = reading(starts[n + 1]) if n + 1 < len(starts) else []
                jpeg = [(i, d) for i, (d, ok) in zip(rows, read) if ok]
                by_pil([i for i, (_, ok) in zip(rows, read) if not ok])
                if jpeg:
                    try:
                        decoded = decode_jpeg([torch.frombuffer(bytearray(d), dtype=torch.uint8) for _, d in jpeg],
                                              mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
                    except Exception:  # one bad file fails the batch: let PIL sort them out
                        by_pil([i for i, _ in jpeg])
                    else:
                        shapes: dict[tuple[int, int], list[int]] = {}
                        for k, img in enumerate(decoded):
                            shapes.setdefault(tuple(img.shape[-2:]), []).append(k)
                        for ks in shapes.values():
                            squares = square_resize_tensor(torch.stack([decoded[k] for k in ks]), side,
                                                           interpolation)
                            while not free:
                                done()
                            buffer = free.popleft()
                            host = buffer[:len(ks)]
                            host.copy_(squares)
                            write([jpeg[k][0] for k in ks], host.numpy(), buffer)
                if progress:
                    progress(rows[-1] + 1, len(files))
            while writing:
                done()
    finally:
        writer.close()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the run's trials want this memory
    return errors
