"""The frozen protocol: the compile switch and the trial keys it leaves alone; the study's
preset, which names its models and baseline and says where it differs from the study (printed at
the run's start and stored with the run, so report.md and report.html show it)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from bakeoff.cli import app
from bakeoff.protocol import PRESETS, Protocol, apply_preset
from bakeoff.store import Store
from bakeoff.zoo import resolve

MODEL = "timm/test_resnet"


def test_the_study_preset_names_each_difference():
    preset = PRESETS["jumpstart-blog"]
    said = " ".join(preset.differences)
    for what in ("IMAGENET1K_V1", "Keras Applications", "TF-Hub", "random-resized-crop", "bf16", "fp32",
                 "--endpoint-latency", "zero weights", "--compile off"):
        assert what in said, what
    assert preset.notice("jumpstart-blog").count("\n  - ") == len(preset.differences) >= 6


def test_a_preset_run_prints_its_differences_and_its_report_shows_them(tmp_path, shared_colour_folder):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(shared_colour_folder), "--preset", "jumpstart-blog",
                                      "--models", MODEL, "--baseline", MODEL, "--epochs", "1", "--image-size", "32",
                                      "--no-pretrained", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    differences = PRESETS["jumpstart-blog"].differences
    head = result.output.split("preset jumpstart-blog:")[1]
    assert all(d in " ".join(head.split()) for d in differences)  # rich may wrap the lines
    stored = Store(out / "bakeoff.db").latest_run()["protocol"]
    assert stored["preset"] == "jumpstart-blog" and stored["differences_from_study"] == "; ".join(differences)
    assert stored["epochs"] == 1  # the protocol itself is stored as before, beside the preset
    md = (out / "report.md").read_text()
    assert "preset=jumpstart-blog" in md and differences[1] in md
    html = out / "report.html"
    if html.exists():
        text = html.read_text()
        assert "differences_from_study" in text and "IMAGENET1K_V1" in text


def test_the_compile_switch_is_checked_and_keeps_stored_keys():
    from bakeoff.errors import BakeoffError

    with pytest.raises(BakeoffError, match="--compile must be one of auto, off"):
        Protocol(compile="always")
    # On by default; off keys a trial as every run before compiled steps existed was keyed.
    assert Protocol().compile == "auto"
    assert Protocol().key() == Protocol(compile="auto").key() != Protocol(compile="off").key()


def test_jumpstart_preset_has_the_study_s_15_models_and_baseline():
    preset = apply_preset("jumpstart-blog")
    specs = [resolve(m) for m in preset.models]
    assert len(specs) == 15 and sum(s.framework == "tensorflow" for s in specs) == 8
    assert resolve(preset.baseline).architecture == "InceptionV3" and preset.baseline in preset.models
