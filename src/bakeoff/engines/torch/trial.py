"""The PyTorch engine's trial: build, fit on the decoded cache, measure, save; and load back."""

from __future__ import annotations

import threading
import json
import time
from pathlib import Path

import numpy as np

from bakeoff.engines.saved import read_model_dir, save_model_dir
from bakeoff.gpu_share import GpuShare, LoneGate
from bakeoff.job import RunAlone, TrialJob, result_row
from bakeoff.machine import device_name, peak_rss, reset_peak_rss
from bakeoff.protocol import Protocol
from bakeoff.timing import background_pids
from bakeoff.zoo.spec import ModelSpec

__all__ = ["run_trial", "save_model", "load_saved", "load_predict", "GraphedForward"]

# Building draws the initial weights from the process's global generator: trials building at
# the same time in one process would interleave their draws and lose the seed's meaning.
_BUILD_LOCK = threading.Lock()


def save_model(model, spec: ModelSpec, classes: list[str], protocol: Protocol, out_dir: Path,
               input_size: int, weights: str) -> Path:
    """OUT/models/<model>/: weights.pt (state dict), spec.json, the class map, protocol.json."""
    import torch

    return save_model_dir(spec, classes, protocol, out_dir, "weights.pt",
                          lambda tmp: torch.save(model.state_dict(), tmp),
                          {"input_size": input_size, "start_weights": weights})


def run_trial(job: TrialJob, on_step=None, gate: GpuShare | None = None) -> dict | RunAlone:
    """Train and measure one PyTorch model; returns the result row (figures and provenance), or
    ``RunAlone`` when it cannot share the GPU its ``gate`` shares out."""
    import torch

    from bakeoff.data.batches import Batcher
    from bakeoff.engines.torch.build import build_model, find_head_name, upsample_to_minimum
    from bakeoff.engines.torch.fit import fit, resolve_device, uses_bf16
    from bakeoff.engines.torch.infer import time_inference
    from bakeoff.measure import classification_metrics

    spec, protocol = ModelSpec.from_dict(job.spec), Protocol(**job.protocol)
    device = resolve_device(job.device)
    gate = gate if gate is not None else LoneGate()
    since = gate.waited(), gate.alone()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.empty(1, device=device)  # the allocator must exist before its statistics can be reset
        if not gate.concurrent:  # one process-wide peak: per trial only when the trial is alone
            torch.cuda.reset_peak_memory_stats(device)
        # cuDNN autotuning stays off (PyTorch's default; step.AUTOTUNE says why).
    else:
        rss_reset = reset_peak_rss()  # the worker may have run other trials before this one
    bf16 = uses_bf16(protocol, device)
    channels_last = device.type == "cuda" and bf16

    t_build = time.perf_counter()
    # Every stretch of work runs inside the gate (CPU work too: a neighbour building a model
    # would hold the interpreter while a trial times its eager latency); the lock comes first,
    # so a trial waiting for it holds no place in the gate.
    with _BUILD_LOCK, gate.shared():
        torch.manual_seed(protocol.seed)
        np.random.seed(protocol.seed)
        model, weights = build_model(spec, len(job.classes), protocol.pretrained, job.weights_dir)
        upsampled = upsample_to_minimum(model, spec, job.input_size)
        head_name = find_head_name(model, spec)  # the zoo's classifier, for a top-only fit
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    build_s = time.perf_counter() - t_build

    images = np.load(job.cache_path, mmap_mode="r")
    needed = np.concatenate([job.train_idx, job.val_idx])
    t_load = time.perf_counter()
    batcher = Batcher.create(images, needed, job.input_size, spec.mean, spec.std, device, channels_last, "auto",
                             side=job.side, keep=job.keep_data, gate=gate)
    load_s = time.perf_counter() - t_load

    from bakeoff.engines.torch.compile import marker_for, use_cache

    marker = marker_for(job.compile, device)  # a background compile's (``compile``)
    if marker is not None:
        use_cache(marker.folder)
    # The run's background compiles stop while a trial of this process times steps alone.
    with gate.keeping_out(background_pids(job.background, job.compile)):
        try:
            fitted = fit(model, batcher, job.train_idx, job.labels, job.val_idx, protocol, device, on_step,
                         compile_ready=marker.ready if marker is not None else None,
                         compile_settled=(lambda: marker.read() is not None) if marker is not None else None,
                         head_name=head_name, gate=gate)
            if isinstance(fitted, RunAlone):
                return fitted
            with gate.shared():
                metrics = classification_metrics(job.labels[job.val_idx], fitted.final_val_probs, job.classes)
            t_measure = time.perf_counter()
            timing = time_inference(model, batcher, job.val_idx, protocol, device, gate)
            measure_s = time.perf_counter() - t_measure
        finally:
            batcher.close()
    t_save = time.perf_counter()
    with gate.shared():
        weights_path = save_model(model, spec, job.classes, protocol, Path(job.out_dir), job.input_size, weights)
    save_s = time.perf_counter() - t_save

    if device.type == "cuda":
        peak_mb, peak_kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
        if gate.concurrent:
            peak_kind += f" (one process, {gate.trials} trials at once: not this model's alone)"
    else:
        peak_mb, peak_kind = peak_rss(rss_reset)
    return result_row(
        spec, job, protocol, metrics, fitted, timing, build_s=build_s, load_s=load_s,
        params=sum(p.numel() for p in model.parameters()), model_path=weights_path, peak=(peak_mb, peak_kind),
        weights=weights, step_mode=fitted.step_mode, capture_time_s=fitted.capture_time_s,
        capture_error=fitted.capture_error, feature_time_s=fitted.feature_time_s,
        train_wall_s=fitted.train_wall_s, compile_wait_s=fitted.compile_wait_s,
        setup_time_s=build_s + load_s + (fitted.capture_time_s or 0.0) + (fitted.compile_time_s or 0.0),
        compiled_from_epoch=fitted.compiled_from_epoch, compile_time_s=fitted.compile_time_s,
        compile_error=(marker.error() if marker is not None else None) or fitted.compile_error,
        shared_gpu_error=job.shared_gpu_error, measure_time_s=measure_s, save_time_s=save_s,
        **gate.shared_figures(since),
        precision="bf16-autocast" if bf16 else "fp32", channels_last=channels_last, device=device.type,
        device_name=device_name(device), input_upsampled_to=upsampled,
        data_resident=batcher.residence, data_reused=batcher.reused,
    )


def load_saved(model_dir, device: str = "cpu"):
    """Load ``OUT/models/<model>/`` back: returns (model in eval mode, spec dict, class names).

    >>> model, meta, classes = load_saved("bakeoff-out/models/pytorch-ic-resnet34")  # doctest: +SKIP
    """
    import torch

    from bakeoff.engines.torch.build import create_model, upsample_to_minimum

    folder, meta, classes = read_model_dir(model_dir, "weights.pt")
    spec = ModelSpec.from_dict({k: v for k, v in meta.items() if k in ModelSpec.__dataclass_fields__})
    model = create_model(spec, len(classes))
    model.load_state_dict(torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    upsample_to_minimum(model, spec, meta["input_size"])  # as it was trained
    return model.to(device).eval(), meta, classes


def load_predict(model_dir: Path, device: str):
    """A saved model for serving: (predict(N x 3 x S x S float32) -> probabilities, spec dict, class names, device)."""
    import torch

    from bakeoff.engines.torch.fit import autocast_for, resolve_device, uses_bf16

    dev = resolve_device(device)
    model, meta, classes = load_saved(model_dir, dev)
    # Serve at the precision the model was trained and timed with (bf16 autocast on CUDA by default).
    saved = model_dir / "protocol.json"
    protocol = Protocol(**json.loads(saved.read_text())) if saved.is_file() else Protocol(precision="fp32")
    channels_last = dev.type == "cuda" and uses_bf16(protocol, dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def forward(x):
        with autocast_for(protocol, dev, cache_enabled=dev.type != "cuda"):
            return model(x)

    # On a GPU, the compiled form its latency was measured in: the forward replayed from a graph
    forward_at = GraphedForward(forward, dev) if dev.type == "cuda" else forward

    @torch.no_grad()
    def predict(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(dev, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.softmax(forward_at(x).float(), dim=1).cpu().numpy()

    return predict, meta, classes, str(dev)


class GraphedForward:
    """A served model's forward pass replayed from a CUDA graph, one graph per batch size rounded
    up to a power of two (a batch is padded to it; the padding's outputs are dropped), so a
    micro-batch costs one launch rather than one per kernel. A size whose capture fails runs
    eagerly, its reason kept in ``errors``. Called from one thread (the server's device thread)."""

    def __init__(self, forward, device) -> None:
        import torch

        self.forward, self.device, self.channels_last = forward, device, torch.channels_last
        self.graphs: dict[tuple, tuple] = {}  # (bucket, shape, memory format) -> (graph, input, output)
        self.errors: dict[tuple, str] = {}  # the same keys -> why no graph could be captured

    def __call__(self, x):
        n = len(x)
        bucket = 1 << max(0, n - 1).bit_length()
        key = (bucket, tuple(x.shape[1:]), x.is_contiguous(memory_format=self.channels_last))
        if key not in self.graphs and key not in self.errors:
            self._capture(key, x)
        if key not in self.graphs:  # no graph for this size: it runs eagerly
            return self.forward(x)
        graph, static_in, static_out = self.graphs[key]
        static_in[:n].copy_(x)
        graph.replay()
        return static_out[:n]

    def _capture(self, key: tuple, x) -> None:
        import torch

        from bakeoff.engines.torch.step import first_way, graph_of

        static_in = torch.zeros((key[0], *x.shape[1:]), dtype=x.dtype, device=self.device)
        if key[2]:
            static_in = static_in.contiguous(memory_format=self.channels_last)
        held = {}
        graph, failed = first_way(lambda way: graph_of(lambda: held.update(out=self.forward(static_in)),
                                                       self.device, way))
        if graph is not None:
            self.graphs[key] = (graph, static_in, held["out"])
        else:
            self.errors[key] = "; ".join(failed)
