"""Scanning, validation errors, decoding of awkward image files, the split, the cache."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bakeoff.data.cache import build_cache
from bakeoff.data.images import load_rgb
from bakeoff.data.prepare import prepare_data
from bakeoff.data.scan import scan_folder, stratified_split
from bakeoff.errors import BakeoffError
from conftest import make_colour_folder


def test_classes_are_sorted_folder_names(tmp_path):
    make_colour_folder(tmp_path, per_class=2, classes={"zebra": (0, 0, 0), "apple": (9, 9, 9), "mango": (5, 5, 5)})
    folder = scan_folder(tmp_path)
    assert folder.classes == ["apple", "mango", "zebra"]
    assert folder.counts() == {"apple": 2, "mango": 2, "zebra": 2}


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "nope", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "has no class sub-folders"),
    (lambda p: make_colour_folder(p / "one", 2, classes={"a": (1, 1, 1)}), "only one class"),
    (lambda p: (make_colour_folder(p / "d", 2, classes={"a": (1, 1, 1), "b": (2, 2, 2)}),
                (p / "d" / "c").mkdir())[0], "holds no images"),
])
def test_bad_folders_get_one_line_errors(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(BakeoffError, match=message) as err:
        scan_folder(path)
    assert "\n" not in str(err.value)
    assert str(path) in str(err.value)


def test_a_file_instead_of_a_folder(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hi")
    with pytest.raises(BakeoffError, match="is a file"):
        scan_folder(f)


def test_validation_class_unknown_to_training(tmp_path):
    train = make_colour_folder(tmp_path / "train", 3, classes={"a": (1, 1, 1), "b": (2, 2, 2)})
    val = make_colour_folder(tmp_path / "val", 2, classes={"a": (1, 1, 1), "c": (3, 3, 3)})
    with pytest.raises(BakeoffError, match="classes the training data lacks: c"):
        prepare_data(train, val, cache_dir=tmp_path / "cache")


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


def test_unreadable_truncated_and_non_images_are_skipped_and_listed(tmp_path):
    data = make_colour_folder(tmp_path / "d", 6, classes={"a": (200, 0, 0), "b": (0, 0, 200)})
    (data / "a" / "notes.txt").write_text("not an image")
    (data / "a" / "broken.jpg").write_bytes(b"this is not a jpeg")
    whole = (data / "b" / "b_000.png").read_bytes()
    (data / "b" / "cut.png").write_bytes(whole[: len(whole) // 2])
    prepared = prepare_data(data, cache_dir=tmp_path / "cache")
    reasons = {p.split("/")[-1]: r for p, r in ((s["path"], s["reason"]) for s in prepared.skipped)}
    assert set(reasons) == {"notes.txt", "broken.jpg", "cut.png"}
    assert "not an image" in reasons["notes.txt"] and reasons["broken.jpg"].startswith("unreadable")
    assert prepared.summary()["n_skipped"] == 3
    used = {prepared.files[i].split("/")[-1] for i in np.concatenate([prepared.train_idx, prepared.val_idx])}
    assert "broken.jpg" not in used and "cut.png" not in used and len(used) == 12


def test_stratified_split_is_deterministic_and_keeps_every_class():
    labels = np.repeat([0, 1, 2], [50, 10, 2])
    tr1, va1 = stratified_split(labels, 0.2, seed=3)
    tr2, va2 = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(va1, va2) and np.array_equal(tr1, tr2)
    assert not set(tr1) & set(va1) and len(tr1) + len(va1) == len(labels)
    assert [int((labels[va1] == c).sum()) for c in range(3)] == [10, 2, 1]
    _, va3 = stratified_split(labels, 0.2, seed=4)
    assert not np.array_equal(va1, va3)


def test_cache_is_built_once_and_reused(tmp_path, monkeypatch):
    data = make_colour_folder(tmp_path / "d", 3, classes={"a": (200, 0, 0), "b": (0, 0, 200)})
    files = [str(p) for p in sorted(data.rglob("*.png"))]
    first = build_cache(files, tmp_path / "cache", "fp", 24)
    arr = first.array()
    assert arr.shape == (6, 24, 24, 3) and arr.dtype == np.uint8 and arr[:3, ..., 0].mean() > 150
    import bakeoff.data.cache as cache_mod

    monkeypatch.setattr(cache_mod, "_decode_one", lambda *a: pytest.fail("decoded a second time"))
    again = build_cache(files, tmp_path / "cache", "fp", 24)
    assert np.array_equal(again.array(), arr)


def test_process_pool_decoding_writes_the_same_cache_as_threads(tmp_path, monkeypatch):
    import bakeoff.data.cache as cache_mod

    data = make_colour_folder(tmp_path / "d", 4, classes={"a": (200, 0, 0), "b": (0, 0, 200)})
    files = [str(p) for p in sorted(data.rglob("*.png"))]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    files.insert(3, str(tmp_path / "broken.jpg"))
    threads = build_cache(files, tmp_path / "c1", "fp", 24, workers=2)
    monkeypatch.setattr(cache_mod, "PROCESS_POOL_MIN_FILES", 0)
    seen = []
    procs = build_cache(files, tmp_path / "c2", "fp", 24, workers=2, progress=lambda d, n: seen.append((d, n)))
    assert np.array_equal(procs.array(), threads.array())
    assert list(procs.errors) == [3] == list(threads.errors) and not procs.ok[3] and procs.ok.sum() == 8
    assert seen[-1] == (9, 9)

    class NoProcesses:  # e.g. a script fed on stdin: spawned workers cannot import its main module
        def __init__(self, *a, **k):
            from concurrent.futures.process import BrokenProcessPool

            raise BrokenProcessPool("a worker died while starting")

    monkeypatch.setattr(cache_mod, "ProcessPoolExecutor", NoProcesses)
    fallback = build_cache(files, tmp_path / "c3", "fp", 24, workers=2)
    assert np.array_equal(fallback.array(), threads.array()) and list(fallback.errors) == [3]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_available_memory_respects_the_control_group_limit(tmp_path, version):
    from bakeoff.machine import available_memory_bytes

    proc, cg = tmp_path / "proc", tmp_path / "cg"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 33554432 kB\nMemAvailable: 16777216 kB\n")  # 16 GiB free
    if version == "v1":
        (proc / "self" / "cgroup").write_text("5:cpu:/\n4:memory:/box/one\n0::/\n")
        folder, limit, used = cg / "memory" / "box" / "one", "memory.limit_in_bytes", "memory.usage_in_bytes"
    else:
        (proc / "self" / "cgroup").write_text("0::/box/one\n")
        folder, limit, used = cg / "box" / "one", "memory.max", "memory.current"
    folder.mkdir(parents=True)
    (folder / limit).write_text(str(3 * 2**30))
    (folder / used).write_text(str(2**30))
    assert available_memory_bytes(proc, cg) == 2 * 2**30  # the container's 2 GiB left, not the host's 16
    (folder / limit).write_text("max\n" if version == "v2" else "9223372036854771712\n")
    assert available_memory_bytes(proc, cg) == 16 * 2**30
    (proc / "self" / "cgroup").unlink()
    assert available_memory_bytes(proc, cg) == 16 * 2**30


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


@pytest.mark.timeout(30)
def test_link_loops_and_second_paths_list_each_real_file_once(tmp_path):
    data = make_colour_folder(tmp_path / "d", 6, classes={"daisy": (200, 0, 0), "rose": (0, 0, 200)})
    (data / "daisy" / "loop").symlink_to("..")  # the data folder again, so rose inside daisy
    (data / "rose" / "self").symlink_to(".")
    (data / "rose" / "sub").mkdir()
    (data / "rose" / "sub" / "up").symlink_to("../..")
    (data / "rose" / "twin.png").symlink_to("rose_000.png")
    (data / "rose" / "hard.png").hardlink_to(data / "rose" / "rose_001.png")
    outside = make_colour_folder(tmp_path / "elsewhere", 2, classes={"more": (0, 0, 190)}) / "more"
    (data / "rose" / "ext").symlink_to(outside)  # images kept elsewhere: followed, once
    (data / "rose" / "ext2").symlink_to(outside)
    folder = scan_folder(data)
    assert folder.counts() == {"daisy": 6, "rose": 8}
    assert len(set(folder.paths)) == len(folder.paths) == 14
    assert "rose/ext/more_000.png" in folder.paths
    reasons = {s["path"]: s["reason"] for s in folder.skipped}
    # hard.png comes first by name, so its twin is the one left out
    assert set(reasons) == {"daisy/loop", "rose/self", "rose/sub/up", "rose/twin.png", "rose/rose_001.png", "rose/ext2"}
    assert "loop" in reasons["daisy/loop"] and "rose/rose_000.png" in reasons["rose/twin.png"]
    assert "rose/hard.png" in reasons["rose/rose_001.png"]

    prepared = prepare_data(data, cache_dir=tmp_path / "cache")
    train = {prepared.files[i] for i in prepared.train_idx}
    val = {prepared.files[i] for i in prepared.val_idx}
    assert not train & val and len(train) + len(val) == 14


def test_a_class_folder_that_leads_back_to_the_data_folder_is_refused(tmp_path):
    data = make_colour_folder(tmp_path / "d", 2, classes={"a": (200, 0, 0), "b": (0, 0, 200)})
    (data / "c").symlink_to(".")
    with pytest.raises(BakeoffError, match=r"class folder .*/c leads back to the data folder"):
        scan_folder(data)
    for target in ("a", "a/sub"):  # the same folder, or one inside it
        (data / "a" / "sub").mkdir(exist_ok=True)
        (data / "c").unlink()
        (data / "c").symlink_to(target)
        with pytest.raises(BakeoffError, match=r"class folders .*/a and .*/c hold the same files"):
            scan_folder(data)


@pytest.mark.timeout(30)
def test_a_named_pipe_and_dangling_links_are_skipped_and_listed_never_opened(tmp_path):
    import json
    import os

    data = make_colour_folder(tmp_path / "d", 4, classes={"a": (200, 0, 0), "b": (0, 0, 200)})
    os.mkfifo(data / "a" / "x.jpg")  # opening it would wait for a writer forever
    (data / "b" / "gone.jpg").symlink_to("nowhere.jpg")
    (data / "b" / "ouroboros.jpg").symlink_to("ouroboros.jpg")
    prepared = prepare_data(data, cache_dir=tmp_path / "cache")
    reasons = {s["path"].split("/")[-1]: s["reason"] for s in prepared.skipped}
    assert reasons["x.jpg"] == "not a regular file (a named pipe)"
    assert reasons["gone.jpg"].startswith("a link to nothing (nowhere.jpg)")
    assert set(reasons) == {"x.jpg", "gone.jpg", "ouroboros.jpg"}
    assert len(prepared.train_idx) + len(prepared.val_idx) == 8
    assert json.loads(json.dumps(prepared.summary()))["n_skipped"] == 3
    with pytest.raises(OSError, match="not a regular file"):
        load_rgb(data / "a" / "x.jpg")


def test_a_validation_file_that_is_also_a_training_file_is_not_scored(tmp_path):
    train = make_colour_folder(tmp_path / "train", 3, classes={"a": (200, 0, 0), "b": (0, 0, 200)})
    val = make_colour_folder(tmp_path / "val", 2, seed=1, classes={"a": (200, 0, 0), "b": (0, 0, 200)})
    (val / "a" / "copy.png").symlink_to(train / "a" / "a_000.png")
    prepared = prepare_data(train, val, cache_dir=tmp_path / "cache")
    assert [s["reason"] for s in prepared.skipped] == ["the same file is in the training folder"]
    assert len(prepared.val_idx) == 4 and len(prepared.train_idx) == 6
    with pytest.raises(BakeoffError, match="holds only files of the training folder"):
        prepare_data(train, train, cache_dir=tmp_path / "cache")


def test_thin_classes_are_warned_about_in_the_dataset_info(tmp_path, caplog):
    data = make_colour_folder(tmp_path / "d", 5, classes={"a": (200, 0, 0), "b": (0, 0, 200)})
    make_colour_folder(data, 1, classes={"lone": (0, 200, 0)})
    with caplog.at_level("WARNING", logger="bakeoff"):
        prepared = prepare_data(data, cache_dir=tmp_path / "cache")
    warnings = prepared.summary()["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("class lone has only 1 usable image")
    assert "none is held out for validation" in warnings[0]
    assert [r.getMessage() for r in caplog.records] == warnings

    val = make_colour_folder(tmp_path / "v", 2, classes={"a": (200, 0, 0), "b": (0, 0, 200)})
    (val / "b" / "b_000.png").write_bytes(b"not a png")
    (val / "b" / "b_001.png").unlink()
    (val / "lone").mkdir()
    (val / "lone" / "bad.png").write_bytes(b"broken")
    warnings = prepare_data(data, val, cache_dir=tmp_path / "cache").summary()["warnings"]
    assert any(w.startswith("class lone has only 1 usable image") for w in warnings)
    assert sum("no readable image of class" in w for w in warnings) == 2  # b and lone
