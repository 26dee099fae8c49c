"""Decoding awkward image files: modes, bit depths, transparency, EXIF rotation."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from bakeoff.data.images import load_rgb


def _encode(img: Image.Image, fmt: str, **kw) -> io.BytesIO:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    buf.seek(0)
    return buf


def test_awkward_modes_load_as_correct_rgb():
    grey = load_rgb(_encode(Image.new("L", (4, 4), 100), "PNG"))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (100, 100, 100)

    pal = Image.new("P", (4, 4))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((1, 1), 1)
    assert load_rgb(_encode(pal, "PNG")).getpixel((1, 1)) == (10, 200, 30)

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red shows as white
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = load_rgb(_encode(rgba, "PNG"))
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)

    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    r, g, b = load_rgb(_encode(cmyk, "JPEG", quality=95)).getpixel((2, 2))
    assert r > 200 and g < 50 and b < 50

    sixteen = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))  # half of 16-bit full scale
    assert sixteen.mode.startswith("I")
    v = load_rgb(_encode(sixteen, "PNG")).getpixel((0, 0))
    assert v[0] == v[1] == v[2] and 120 <= v[0] <= 135  # scaled, not clipped to 255


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (8, 4), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 4, 4))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was rotated: display rotated 90 degrees clockwise
    out = load_rgb(_encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (4, 8)
    assert out.getpixel((2, 1))[0] > 200 and out.getpixel((2, 6))[0] < 50  # white half now on top
