"""Scanning a data folder: classes from folder names, one-line errors for bad folders, each real
file once whatever links lead to it, the stratified split."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_stratified_split_is_deterministic_and_keeps_every_class():
    labels = np.repeat([0, 1, 2], [50, 10, 2])
    tr1, va1 = stratified_split(labels, 0.2, seed=3)
    tr2, va2 = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(va1, va2) and np.array_equal(tr1, tr2)
    assert not set(tr1) & set(va1) and len(tr1) + len(va1) == len(labels)
    assert [int((labels[va1] == c).sum()) for c in range(3)] == [10, 2, 1]
    _, va3 = stratified_split(labels, 0.2, seed=4)
    assert not np.array_equal(va1, va3)


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
