"""Batches from the decoded uint8 cache, augmented and normalised as batched tensor ops.

Images stay uint8 until the batch is on the device; random-resized-crop and flip are one
``affine_grid`` + ``grid_sample`` per batch, so the same code runs on CPU and GPU.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bakeoff.data.images import square_resize_tensor
from bakeoff.gpu_share import GpuShare, LoneGate, stream_sync

__all__ = ["Batcher", "release_kept"]

RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)

# The resident images kept by a long-lived trial worker between trials on the same data: later
# trials of a run then skip the load (10 GB for a PlantVillage-sized set) and start at once.
# Trials running at once in one worker share an entry; an entry nobody uses is dropped when a
# trial needs room for other images. key -> {"tensor", "index", "users"}.
_KEPT: dict = {}
_KEPT_LOCK = threading.Lock()


def _kept_key(images, needed: np.ndarray, side: int, device) -> tuple:
    digest = hashlib.blake2b(np.sort(needed).astype(np.int64).tobytes(), digest_size=16).hexdigest()
    return (str(getattr(images, "filename", id(images))), images.shape, side, str(device), digest)


# Where a model wanting another image size resizes kept images instead of reading the file again
# (on a CPU both cost about the same, and RAM is scarcer).
DERIVE_ON = {"cuda"}

# Share of the free memory (GPU memory, or RAM under any container limit) the images may take;
# the rest is the model's, its activations' and the other processes'.
RESIDENT_SHARE = 0.4


def resident_budget(device) -> int:
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * RESIDENT_SHARE)
    from bakeoff.machine import available_memory_bytes

    return int(available_memory_bytes() * RESIDENT_SHARE)


def release_kept(unused_only: bool = False, spare=None, gate: GpuShare | None = None) -> None:
    """Drop the images kept between trials (only those no running trial uses, with
    ``unused_only``; never ``spare``) and give their device memory back, alone on the GPU
    that ``gate`` shares out."""
    dropped = [key for key in _KEPT if key != spare and (not unused_only or _KEPT[key]["users"] == 0)]
    if not dropped:
        return
    on_gpu = any(_KEPT[key]["tensor"].is_cuda for key in dropped)
    # alone on the GPU: no other trial's kernels may read memory the allocator hands out again
    gate = gate if gate is not None else LoneGate()
    with gate.exclusive(torch.device("cuda") if on_gpu else None, "release"):
        for key in dropped:
            del _KEPT[key]
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """N x S0 x S0 x 3 uint8 -> N x side x side x 3 uint8 (antialiased when shrinking)."""
    return square_resize_tensor(x.permute(0, 3, 1, 2), side).contiguous()


def _filled(n: int, side: int, device, part, budget, gate: GpuShare) -> torch.Tensor | None:
    """``n`` images at ``side`` as one uint8 tensor on ``device``, built 1,024 at a time from
    ``part(slice)`` (N x S x S x 3 uint8, anywhere) and resized on the device; None when they
    would not fit in ``budget`` (bytes, "auto" or None for no limit)."""
    if budget == "auto":
        budget = resident_budget(device)
    if budget is not None and n * side * side * 3 > budget:
        return None
    with gate.shared():
        out = torch.empty((n, side, side, 3), dtype=torch.uint8, device=device)
    for i in range(0, n, 1024):
        with gate.shared():
            out[i:i + 1024] = _resize(part(slice(i, i + 1024)).to(device), side)
    stream_sync(device)  # written before a trial on another stream may read it
    return out


class _PinnedRows:
    """Rows ``first...`` of the memory-mapped cache, read with plain file reads into two pinned
    buffers in turn and copied to the GPU asynchronously: the next chunk is read while the last
    one crosses to the device. (Gathering through the memory map faults every 4 KiB page in and
    copies twice: seconds for a PlantVillage-sized set.)"""

    def __init__(self, images: np.memmap, first: int, count: int, device, rows: int = 1024) -> None:
        self.row_shape, self.row_bytes = images.shape[1:], int(np.prod(images.shape[1:]))
        self.start, self.count, self.rows = images.offset + first * self.row_bytes, count, rows
        self.filename, self.device = images.filename, torch.device(device)
        self.pinned = self.device.type == "cuda"
        self.file = None
        self.buffers: list[torch.Tensor] = []
        self.copied: list = [None, None]
        self.turn = 0

    def __call__(self, s: slice) -> torch.Tensor:
        if self.file is None:  # opened on first use: nothing is held when the images do not fit
            self.file = open(self.filename, "rb", buffering=0)
            self.buffers = [torch.empty((self.rows, *self.row_shape), dtype=torch.uint8, pin_memory=self.pinned)
                            for _ in range(2)]
        k, self.turn = self.turn, 1 - self.turn
        if self.copied[k] is not None:
            self.copied[k].synchronize()  # its last chunk has reached the device
        want = min(self.rows, s.stop - s.start, self.count - s.start)
        buf = self.buffers[k][:want]
        view = memoryview(buf.numpy()).cast("B")
        self.file.seek(self.start + s.start * self.row_bytes)
        n = 0
        while n < len(view):
            got = self.file.readinto(view[n:])
            if not got:
                raise OSError(f"{self.filename}: the cache file ends early")
            n += got
        if not self.pinned:
            return buf.clone()
        x = buf.to(self.device, non_blocking=True)
        self.copied[k] = torch.cuda.Event()
        self.copied[k].record()
        return x

    def close(self) -> None:
        for event in self.copied:
            if event is not None:
                event.synchronize()
        if self.file is not None:
            self.file.close()


def _from_file(images, needed: np.ndarray, side: int, device, budget,
               gate: GpuShare) -> tuple[torch.Tensor, np.ndarray] | None:
    """The ``needed`` images read from the cache file: (tensor, position of each image in it)."""
    order = np.sort(needed)
    if (torch.device(device).type == "cuda" and isinstance(images, np.memmap) and len(order)
            and order[-1] - order[0] == len(order) - 1):  # one run of rows: straight from the file
        part = _PinnedRows(images, int(order[0]), len(order), device)
    else:
        part = lambda s: torch.from_numpy(np.ascontiguousarray(images[order[s]]))  # noqa: E731
    try:
        tensor = _filled(len(order), side, device, part, budget, gate)
    finally:
        if isinstance(part, _PinnedRows):
            part.close()
    if tensor is None:
        return None
    index = np.full(len(images), -1, dtype=np.int64)
    index[order] = np.arange(len(order))
    return tensor, index


def _resized(kept: dict, side: int, device, budget, gate: GpuShare) -> tuple[torch.Tensor, np.ndarray] | None:
    """Kept images at another size, resized on the device (same positions)."""
    tensor = _filled(len(kept["tensor"]), side, device, lambda s: kept["tensor"][s], budget, gate)
    return None if tensor is None else (tensor, kept["index"])


@dataclass
class Batcher:
    """Serves normalised batches of ``images[idx]`` (N x S x S x 3 uint8) for one model."""

    images: np.ndarray
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    channels_last: bool = False
    resident: torch.Tensor | None = None  # the images as one tensor, on ``device`` when it fits
    resident_index: np.ndarray | None = None
    side: int | None = None  # the stored square this model wants; the cache may hold another size
    reused: bool = False  # the resident images were kept from an earlier trial of this process

    def __post_init__(self) -> None:
        self._mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1) * 255.0

    @classmethod
    def create(cls, images, needed: np.ndarray, input_size, mean, std, device, channels_last=False,
               max_resident_bytes=None, side: int | None = None, keep: bool = False,
               gate: GpuShare | None = None) -> "Batcher":
        """Keep the ``needed`` images as one tensor on ``device`` when they fit in
        ``max_resident_bytes`` (a number, or "auto": a share of the device's free memory, taken
        once kept images are released); otherwise read each batch from the memory-mapped file.

        ``side``: the square each image should be before cropping (the model's resize size);
        images cached at another size are resized once on the device, not decoded again.
        ``keep``: hold the resident tensor after this trial, for the next trial on the same data.
        ``gate``: the trials' that share the device (alone when None).
        """
        gate = gate if gate is not None else LoneGate()
        side = side or images.shape[1]
        b = cls(images, input_size, tuple(mean), tuple(std), device, channels_last, side=side)
        if not keep:
            b.resident, b.resident_index = _from_file(images, needed, side, device, max_resident_bytes,
                                                      gate) or (None, None)
            return b
        key = _kept_key(images, needed, side, device)
        with _KEPT_LOCK:  # a trial loading these images makes the others that want them wait, then share
            if key in _KEPT:
                b.reused = True
            else:
                stored = images.shape[1]
                # On a GPU the images at their stored size are kept too when a model wants another
                # size: every later size is a resize on the device, not another pass over the file
                # (about 4 s for a 10 GB set).
                via = _kept_key(images, needed, stored, device) \
                    if side != stored and torch.device(device).type in DERIVE_ON else None
                release_kept(unused_only=True, spare=via, gate=gate)
                if via is not None and via not in _KEPT:
                    held = _from_file(images, needed, stored, device, max_resident_bytes, gate)
                    if held is not None:
                        _KEPT[via] = {"tensor": held[0], "index": held[1], "users": 0}
                held = _resized(_KEPT[via], side, device, max_resident_bytes, gate) if via in _KEPT else None
                held = held or _from_file(images, needed, side, device, max_resident_bytes, gate)
                if held is None:
                    return b
                _KEPT[key] = {"tensor": held[0], "index": held[1], "users": 0}
            entry = _KEPT[key]
            entry["users"] += 1
            b.resident, b.resident_index, b._kept_key = entry["tensor"], entry["index"], key
        return b

    def close(self) -> None:
        """This trial is done with the images: kept ones stay for the next trial."""
        key = getattr(self, "_kept_key", None)
        if key is not None:
            with _KEPT_LOCK:
                if key in _KEPT:
                    _KEPT[key]["users"] -= 1
            self._kept_key = None

    @property
    def residence(self) -> str:
        """Where batches come from: "device" (GPU memory), "ram" or "memory-mapped file"."""
        if self.resident is None:
            return "memory-mapped file"
        return "ram" if self.resident.device.type == "cpu" else "device"

    def positions(self, idx: np.ndarray) -> torch.Tensor | None:
        """Where ``idx`` sit in the resident tensor, as one device tensor (None when the images
        are read from the file): fetched once per epoch, so a step needs no host-to-device copy."""
        if self.resident is None:
            return None
        return torch.from_numpy(self.resident_index[idx]).to(self.device)

    def _fetch(self, idx: np.ndarray, pos: torch.Tensor | None = None) -> torch.Tensor:
        if self.resident is not None:
            if pos is None:
                pos = torch.from_numpy(self.resident_index[idx]).to(self.device)
            return self.resident.index_select(0, pos)
        order = np.argsort(idx)  # sorted reads are kinder to a memory-mapped file
        arr = np.empty((len(idx),) + self.images.shape[1:], dtype=np.uint8)
        arr[order] = self.images[idx[order]]
        return _resize(torch.from_numpy(arr).to(self.device, non_blocking=True), self.side)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self._mean) / self._std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def crop_params(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """``n`` random-resized-crop + flip transforms as affine matrices (n x 2 x 3), drawn on the
        CPU generator so a seed gives the same crops on any device."""
        area = torch.empty(n).uniform_(*RRC_SCALE, generator=gen)
        log_r = torch.empty(n).uniform_(math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]), generator=gen)
        ratio = torch.exp(log_r)
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)
        cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        return theta

    def train_batch(self, idx: np.ndarray, gen: torch.Generator | None = None, augment: str = "rrc-flip",
                    theta: torch.Tensor | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:
        """An augmented, normalised batch; ``theta`` (on the device) are precomputed crops and
        ``pos`` the images' resident positions (see ``positions``)."""
        x = self._fetch(idx, pos).permute(0, 3, 1, 2).float()
        if augment == "none":
            return self._finish(self._center(x))
        if theta is None:
            theta = self.crop_params(len(idx), gen).to(x.device)
        grid = F.affine_grid(theta, [len(idx), 3, self.input_size, self.input_size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return self._finish(x)

    def _center(self, x: torch.Tensor) -> torch.Tensor:
        side, t = x.shape[-1], self.input_size
        off = (side - t) // 2
        return x[..., off:off + t, off:off + t]

    def eval_batch(self, idx: np.ndarray, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Centre crop of the stored square: the usual resize-then-centre-crop evaluation;
        ``pos`` as in ``train_batch``."""
        return self._finish(self._center(self._fetch(idx, pos).permute(0, 3, 1, 2).float()))

    def eval_batches(self, idx: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for start in range(0, len(idx), batch_size):
            part = idx[start:start + batch_size]
            yield part, self.eval_batch(part)
