"""Decode one image file into correct 8-bit RGB, whatever its mode or orientation."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager, nullcontext

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["load_rgb", "open_regular", "square_resize", "square_resize_tensor", "INTERPOLATION"]

INTERPOLATION = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (and 32-bit int) grey: PIL's convert("L") would clip at 255, so scale instead.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Transparent pixels carry arbitrary colour: composite on white as viewers show them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def open_regular(path):
    """Open ``path`` for reading if it is a regular file; raise OSError for anything else.

    A named pipe called ``x.jpg`` would block a plain ``open`` forever: it is opened without
    blocking and checked on the open descriptor, so it cannot be swapped in after a check.
    File objects (already open) pass through unchanged.
    """
    if not isinstance(path, (str, os.PathLike)):
        return nullcontext(path)
    f = open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK))
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise OSError(f"{os.fspath(path)} is not a regular file")
    os.set_blocking(f.fileno(), True)
    return f


@contextmanager
def _named(path):
    """PIL names an open file object by its repr: say which file instead, as for a path."""
    try:
        yield
    except UnidentifiedImageError:
        if not isinstance(path, (str, os.PathLike)):
            raise
        raise UnidentifiedImageError(f"cannot identify image file {os.fspath(path)!r}") from None


def load_rgb(path, draft_size: int | None = None) -> Image.Image:
    """Open ``path`` and return an upright RGB image; raises OSError/ValueError if unreadable.

    ``draft_size`` lets the JPEG decoder skip work when the image will be shrunk anyway.
    """
    with open_regular(path) as f, _named(path), Image.open(f) as img:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()  # truncated or corrupt data fails here, not later
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)


def square_resize(img: Image.Image, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Resize the shorter side to ``size`` and centre-crop a ``size`` x ``size`` uint8 array."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), INTERPOLATION.get(interpolation, Image.Resampling.BILINEAR))
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def square_resize_tensor(images, side: int, interpolation: str = "bilinear"):
    """N x 3 x H x W uint8 (one size) -> N x side x side x 3 uint8: ``square_resize`` for a
    batch of tensors, on their device."""
    import torch
    import torch.nn.functional as F

    h, w = images.shape[-2:]
    scale = side / min(h, w)
    nh, nw = max(side, round(h * scale)), max(side, round(w * scale))
    x = images
    if (nh, nw) != (h, w):
        mode = interpolation if interpolation in ("bilinear", "bicubic") else "nearest"
        smooth = {"antialias": True, "align_corners": False} if mode != "nearest" else {}
        x = F.interpolate(images.float(), size=(nh, nw), mode=mode, **smooth).round_().clamp_(0, 255)
        x = x.to(torch.uint8)
    top, left = (nh - side) // 2, (nw - side) // 2
    return x[:, :, top:top + side, left:left + side].permute(0, 2, 3, 1)
