"""`bakeoff export`: ONNX and TorchScript files that agree with the original model, and the ONNX
model's CPU latency stored where `bakeoff report` finds it."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from bakeoff.errors import BakeoffError
from bakeoff.serve import export as export_mod
from bakeoff.serve.export import export_model
from bakeoff.serve.predictor import load_predictor
from conftest import SERVED_COLOURS as COLOURS, SERVED_MODEL as MODEL, colour_image, trained_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = trained_run(tmp_path_factory)
    copy = tmp_path_factory.mktemp("export-copy") / "run"  # exports write into the run: keep tests apart
    shutil.copytree(out, copy)
    return copy


def fresh_batch(predictor):
    return np.stack([predictor.preprocess(colour_image(rgb, (45, 70), seed=300 + i))
                     for i, rgb in enumerate(COLOURS.values())])


def test_onnx_export_agrees_and_its_cpu_latency_is_reported(run_dir):
    ort = pytest.importorskip("onnxruntime")
    from bakeoff.compare.outputs import write_outputs

    r = export_model(run_dir, MODEL, "onnx")
    path = run_dir / "models" / "timm__test_resnet" / "model.onnx"
    assert r.path == path and path.is_file()
    assert r.n_images == 9 and r.max_abs_diff <= r.tolerance == 1e-4  # the run's whole validation split
    assert 0 < r.latency_ms_p50 <= r.latency_ms_p95 and r.latency_runs >= 50 and r.stored
    # Any batch size works, and the exported model predicts what the original predicts on new images.
    predictor = load_predictor(run_dir, MODEL, "cpu")
    x = fresh_batch(predictor)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    np.testing.assert_allclose(probs, predictor.predict(x), atol=1e-4)
    assert [predictor.classes[i] for i in probs.argmax(1)] == list(COLOURS)
    comparison = write_outputs(run_dir, inference="onnx-cpu")
    row = pd.read_csv(run_dir / "results.csv").iloc[0]
    assert row["onnx_cpu_latency_ms_p50"] == pytest.approx(r.latency_ms_p50)
    assert row["onnx_cpu_latency_ms_p95"] == pytest.approx(r.latency_ms_p95)
    assert comparison.relative["relative_inference_time"].tolist() == [1.0]
    # The printed table shows the latency the relative figures use, and says which it is.
    from typer.testing import CliRunner

    from bakeoff.cli import app

    result = CliRunner().invoke(app, ["report", str(run_dir), "--inference", "onnx-cpu"])
    assert result.exit_code == 0, result.output
    assert "(onnx-cpu)" in result.output and f"{r.latency_ms_p50:.2f}" in result.output


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_through_the_cli(run_dir):
    from typer.testing import CliRunner

    from bakeoff.cli import app

    result = CliRunner().invoke(app, ["export", str(run_dir), "--model", MODEL, "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "tolerance 1e-04" in result.output
    path = run_dir / "models" / "timm__test_resnet" / "model.ts"
    loaded = torch.jit.load(str(path))
    predictor = load_predictor(run_dir, MODEL, "cpu")
    x = fresh_batch(predictor)
    with torch.no_grad():
        probs = torch.softmax(loaded(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(probs, predictor.predict(x), atol=1e-4)


def test_export_refuses_bad_input_and_a_failed_check(run_dir, monkeypatch):
    with pytest.raises(BakeoffError, match="--format must be one of onnx, torchscript"):
        export_model(run_dir, MODEL, "tflite")
    with pytest.raises(BakeoffError, match="no saved model"):
        export_model(run_dir, "timm/resnet50", "torchscript")
    monkeypatch.setattr(export_mod, "TOLERANCE", -1.0)  # no export can pass: the file must not stay
    (run_dir / "models" / "timm__test_resnet" / "model.ts").unlink(missing_ok=True)
    with pytest.raises(BakeoffError, match="disagrees with the original model"):
        export_model(run_dir, MODEL, "torchscript")
    assert not (run_dir / "models" / "timm__test_resnet" / "model.ts").exists()
