"""The decode-once cache: built once and reused, the same from threads or processes, decoded
again when its file was cut short."""

from __future__ import annotations

import numpy as np
import pytest

from bakeoff.data.cache import build_cache
from conftest import make_colour_folder


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


def test_a_truncated_cache_file_is_decoded_again(tmp_path, colour_folder, capfd):
    files = sorted(str(p) for p in colour_folder.rglob("*.png"))[:6]
    first = build_cache(files, tmp_path, "k", 16)
    expected = first.array().copy()
    with open(first.path, "r+b") as f:  # cut off halfway through the images
        f.truncate(first.path.stat().st_size // 2)
    again = build_cache(files, tmp_path, "k", 16)
    assert np.array_equal(again.array(), expected)
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "damaged" in lines[0] and "decoding the images again" in lines[0], lines
    assert not list((tmp_path / "k").glob(".*.tmp"))  # its own temporaries renamed into place
