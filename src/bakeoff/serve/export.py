"""Export a saved PyTorch model to ONNX or TorchScript, check it against the original on real
validation images, and time the ONNX model at batch 1 on ONNX Runtime on the CPU."""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bakeoff.engines import ENGINES
from bakeoff.errors import BakeoffError
from bakeoff.measure import summarize_ms, time_calls
from bakeoff.serve.endpoint_latency import validation_sample
from bakeoff.measure import softmax
from bakeoff.serve.predictor import Preprocess, describe, find_model_dir, require_serve
from bakeoff.store import Store

__all__ = ["export_model", "ExportResult", "FORMATS", "TOLERANCE"]

FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
# fp32 on both sides; only the order of floating-point sums differs (typically ~1e-7 on probabilities).
TOLERANCE = 1e-4
LATENCY_WARMUP, LATENCY_RUNS = 10, 100


@dataclass
class ExportResult:
    model: str
    format: str
    path: Path
    exporter: str
    n_images: int
    max_abs_diff: float
    tolerance: float
    latency_ms_p50: float | None = None  # ONNX Runtime, CPU, batch 1
    latency_ms_p95: float | None = None
    latency_runs: int | None = None
    stored: bool = False  # figures merged into the trial's result in bakeoff.db

    def to_dict(self) -> dict:
        return asdict(self) | {"path": str(self.path)}


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and deprecation notes; keep the user's terminal clean."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _export_onnx(model, example, path: Path) -> str:
    import torch

    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30  # protobuf's 2 GiB cap
    errors = []
    try:
        import onnxscript  # noqa: F401  (torch's default exporter needs it)

        with _quiet():
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["input"],
                              output_names=["logits"], dynamic_shapes=({0: batch},), external_data=big)
        return "torch.export"
    except Exception as exc:  # some models do not trace with torch.export: try the older exporter
        errors.append(f"torch.export: {describe(exc)}")
    try:
        with _quiet():
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=17)
        return "torchscript-based"
    except Exception as exc:
        errors.append(f"torchscript-based: {describe(exc)}")
    raise BakeoffError(f"ONNX export failed ({'; '.join(errors)})")


def _onnx_runner(path: Path):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _torchscript_runner(model, example, path: Path):
    import torch

    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model, example)
        traced.save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x):
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()

    return run


def _store_figures(out_dir: Path, model_id: str, figures: dict) -> bool:
    db = out_dir / "bakeoff.db"
    if not db.is_file():
        return False
    store = Store(db)
    run = store.latest_run() or {}
    key = run.get("trial_keys", {}).get(model_id)
    if key is None:  # exported from an earlier run of the same folder
        ok = [t for t in store.trials() if t["model"] == model_id and t["status"] == "ok"]
        key = ok[-1]["key"] if ok else None
    if key is None:
        return False
    store.update_result(key, figures)
    return True


def export_model(out_dir, model_id: str, fmt: str = "onnx", n_check: int = 32, seed: int = 0) -> ExportResult:
    """Write ``OUT/models/<model>/model.onnx`` (or ``model.ts``), checked on up to ``n_check``
    validation images: the exported model's probabilities must match the original's within
    ``TOLERANCE``, or the file is removed and a BakeoffError raised. For ONNX, batch-1 latency
    on ONNX Runtime (CPU) is stored in the trial's result as ``onnx_cpu_latency_ms_p50/_p95``.
    """
    if fmt not in FORMATS:
        raise BakeoffError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out_dir = Path(out_dir).expanduser()
    folder = find_model_dir(out_dir, model_id)
    meta = json.loads((folder / "spec.json").read_text()) if (folder / "spec.json").is_file() else {}
    framework = meta.get("framework", "pytorch")
    if framework not in ENGINES or not ENGINES[framework].exports:
        raise BakeoffError(f"{meta.get('id', model_id)} is a {meta['framework']} model; export handles PyTorch "
                           f"models (serve Keras models with `bakeoff serve`)")
    if fmt == "onnx":
        require_serve("onnx", "onnxruntime")
    import torch

    from bakeoff.engines.torch.trial import load_saved

    model, meta, _ = load_saved(folder, "cpu")
    pre = Preprocess.from_meta(meta)
    x = np.stack([pre(f) for f in validation_sample(out_dir, n_check, seed, repeat=False)])
    with torch.no_grad():
        ref = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    path = folder / FORMATS[fmt]
    example = torch.from_numpy(np.concatenate([x, x])[:2])  # batch 2: a batch of 1 may get specialised
    try:
        if fmt == "onnx":
            exporter = _export_onnx(model, example, path)
            run = _onnx_runner(path)
        else:
            exporter, run = "torch.jit.trace", _torchscript_runner(model, example, path)
        got = softmax(run(x))
        one = softmax(run(x[:1]))
    except BakeoffError:
        _remove(path)
        raise
    except Exception as exc:
        _remove(path)
        raise BakeoffError(f"{fmt} export of {meta['id']} failed: {describe(exc)}")
    diff = float(max(np.abs(got - ref).max(), np.abs(one - ref[:1]).max()))
    if not diff <= TOLERANCE:
        _remove(path)
        raise BakeoffError(f"the {fmt} export of {meta['id']} disagrees with the original model: max abs difference "
                           f"of probabilities {diff:.2e} > {TOLERANCE:.0e} on {len(x)} validation images; not written")
    result = ExportResult(meta["id"], fmt, path, exporter, len(x), diff, TOLERANCE)
    figures = {f"{fmt}_max_abs_diff": diff, f"{fmt}_path": str(path.relative_to(out_dir))}
    if fmt == "onnx":
        import onnxruntime as ort

        s = summarize_ms(time_calls(lambda: run(x[:1]), lambda: None, LATENCY_WARMUP, LATENCY_RUNS))
        result.latency_ms_p50, result.latency_ms_p95, result.latency_runs = s["p50"], s["p95"], s["n"]
        figures |= {"onnx_cpu_latency_ms_p50": s["p50"], "onnx_cpu_latency_ms_p95": s["p95"],
                    "onnx_cpu_latency_runs": s["n"], "onnx_cpu_cores": os.cpu_count(),
                    "onnxruntime_version": ort.__version__, "onnx_exporter": exporter}
    result.stored = _store_figures(out_dir, meta["id"], figures)
    return result


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)
