"""Preparing a data set: files that cannot be used are skipped and listed, never opened where
opening would hang; validation images are checked against training; thin classes are warned about."""

from __future__ import annotations

import numpy as np
import pytest

from bakeoff.data.images import load_rgb
from bakeoff.data.prepare import prepare_data
from bakeoff.errors import BakeoffError
from conftest import make_colour_folder


def test_validation_class_unknown_to_training(tmp_path):
    train = make_colour_folder(tmp_path / "train", 3, classes={"a": (1, 1, 1), "b": (2, 2, 2)})
    val = make_colour_folder(tmp_path / "val", 2, classes={"a": (1, 1, 1), "c": (3, 3, 3)})
    with pytest.raises(BakeoffError, match="classes the training data lacks: c"):
        prepare_data(train, val, cache_dir=tmp_path / "cache")


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
