"""Batched (GPU) JPEG decoding: the same pixels and failures as the PIL path, and only for the
files it can decode upright."""

from __future__ import annotations

import numpy as np


def _jpeg_folder(root):
    """JPEGs of several sizes (one turned by its EXIF tag), a PNG and a corrupt JPEG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir()
    paths = []
    for i, (w, h) in enumerate([(48, 48), (64, 40), (40, 70), (48, 48), (30, 90)]):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 4 % 256, yy * 3 % 256, (xx + yy + 20 * i) % 256], -1).astype(np.uint8)
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        path = root / f"img{i}.jpg"
        exif = Image.Exif()
        if i == 2:
            exif[0x0112] = 6  # stored sideways: viewers turn it upright
        Image.fromarray(img).save(path, quality=95, exif=exif)
        paths.append(str(path))
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(root / "flat.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    return paths + [str(root / "flat.png"), str(root / "broken.jpg")]


def test_batched_decoding_matches_the_pil_path_and_reports_the_same_failures(tmp_path):
    from bakeoff.data.cache import _decode_one
    from bakeoff.data.gpu_decode import decode_batched

    files = _jpeg_folder(tmp_path / "imgs")
    out = np.zeros((len(files), 32, 32, 3), np.uint8)
    # batch 4: the corrupt file fails its batch, whose other files then go through PIL
    errors = decode_batched(out, files, 32, "bilinear", "cpu", lambda p: _decode_one(p, 32, "bilinear"), batch=4)
    for i, path in enumerate(files[:-1]):
        ref, err = _decode_one(path, 32, "bilinear")
        assert err is None
        diff = np.abs(out[i].astype(int) - ref.astype(int))
        assert diff.mean() < 1.5 and diff.max() <= 24, (path, diff.mean(), diff.max())
    _, ref_err = _decode_one(files[-1], 32, "bilinear")
    assert errors == {len(files) - 1: ref_err}


def test_a_cache_decoded_in_batches_says_so_and_serves_the_same_run(tmp_path):
    import json

    from bakeoff.data.cache import build_cache

    files = _jpeg_folder(tmp_path / "imgs")
    cpu = build_cache(files, tmp_path / "c1", "k", 32)
    batched = build_cache(files, tmp_path / "c2", "k", 32, decode_device="cpu")
    assert cpu.errors == batched.errors and list(batched.errors) == [len(files) - 1]
    assert np.abs(cpu.array().astype(int) - batched.array().astype(int)).mean() < 1.5
    meta = json.loads((tmp_path / "c2" / "k" / "s32-bilinear.json").read_text())
    assert meta["decoder"] == "torchvision (cpu)"
    assert json.loads((tmp_path / "c1" / "k" / "s32-bilinear.json").read_text())["decoder"] == "pil"


def test_only_upright_rgb_or_grey_jpegs_go_to_the_batched_decoder(tmp_path):
    import io

    from PIL import Image

    from bakeoff.data.gpu_decode import batchable

    def encoded(mode, fmt="JPEG", orientation=None):
        buf, exif = io.BytesIO(), Image.Exif()
        if orientation:
            exif[0x0112] = orientation
        Image.new(mode, (16, 12), 100).save(buf, fmt, exif=exif)
        return buf.getvalue()

    assert batchable(encoded("RGB")) and batchable(encoded("L")) and batchable(encoded("RGB", orientation=1))
    assert not batchable(encoded("RGB", orientation=6))  # a GPU decoder would leave it sideways
    assert not batchable(encoded("CMYK")) and not batchable(encoded("RGB", "PNG"))
    assert not batchable(b"\xff\xd8 not really") and not batchable(None)
