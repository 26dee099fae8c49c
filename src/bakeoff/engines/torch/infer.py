"""Batch-1 latency and throughput of a PyTorch model, by the rule every engine follows: its
compiled form (a CUDA graph on a GPU, TorchScript on the CPU), input already on the device."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from bakeoff.data.batches import Batcher
from bakeoff.engines.torch.step import autocast_for, first_way, graph_of, sync_fn, uses_bf16
from bakeoff.gpu_share import GpuShare, LoneGate
from bakeoff.measure import summarize_ms, time_calls
from bakeoff.protocol import Protocol
from bakeoff.timing import Solo

__all__ = ["time_inference"]


@torch.no_grad()
def time_inference(model: nn.Module, batcher: Batcher, idx: np.ndarray, protocol: Protocol,
                   device: torch.device, gate: GpuShare | None = None) -> dict:
    """Batch-1 latency on a real validation image, by the rule every engine follows
    (``bakeoff.timing``'s neighbour for inference): the model's compiled form, input already on
    the device, median and p95 of >= 50 synchronised runs after warm-up (``latency_ms_*``). On
    CUDA the compiled form is the forward pass replayed from a CUDA graph; on the CPU, the
    traced and frozen TorchScript module. The eager call is timed too (``latency_eager_ms_*``),
    and throughput at ``protocol.throughput_batch``. Timed with the GPU to itself (``timing.Solo``):
    trials sharing it through ``gate`` wait meanwhile."""
    model.eval()
    sync = sync_fn(device)

    def run(x):
        with autocast_for(protocol, device):
            model(x)

    gate = gate if gate is not None else LoneGate()
    with Solo(gate, sync, device, "latency"):
        one = batcher.eval_batch(idx[:1])
        reps = int(np.ceil(protocol.throughput_batch / len(idx)))
        big = batcher.eval_batch(np.tile(idx, reps)[:protocol.throughput_batch])
        lat = summarize_ms(time_calls(lambda: run(one), sync, protocol.latency_warmup, protocol.latency_runs))
        thr_ms = time_calls(lambda: run(big), sync, 2, 7)
        compiled = _graphed_latency(model, one, protocol, device, gate) if device.type == "cuda" else \
            _scripted_latency(model, one, protocol)
    figures = {
        "latency_eager_ms_p50": lat["p50"], "latency_eager_ms_p95": lat["p95"], "latency_runs": lat["n"],
        "throughput_img_s": protocol.throughput_batch / (float(np.median(thr_ms)) / 1000.0),
        "throughput_batch": protocol.throughput_batch, "throughput_kind": "eager",
    }
    if "error" in compiled:  # no compiled form: the eager figure stands in, and says so
        return figures | {"latency_ms_p50": lat["p50"], "latency_ms_p95": lat["p95"], "latency_kind": "eager",
                          "latency_form": f"eager (no compiled form: {compiled['error']})"}
    return figures | {"latency_ms_p50": compiled["p50"], "latency_ms_p95": compiled["p95"],
                      "latency_kind": "compiled", "latency_form": compiled["form"]}


def _graphed_latency(model, one, protocol, device, gate: GpuShare) -> dict:
    """Batch-1 latency with the forward pass replayed from a CUDA graph (input in the graph's
    static buffer on the device): no per-kernel launch cost, as a compiled deployment."""
    static = one.clone()

    def forward():
        with autocast_for(protocol, device, cache_enabled=False):
            model(static)

    def timed(way: str) -> dict:
        graph = graph_of(forward, device, way, gate=gate)
        return summarize_ms(time_calls(graph.replay, sync_fn(device), protocol.latency_warmup, protocol.latency_runs))

    figures, failed = first_way(timed, gate.concurrent)
    if figures is None:
        return {"error": "; ".join(failed)}
    return figures | {"form": f"CUDA graph replay{', bf16 autocast' if uses_bf16(protocol, device) else ''}"}


def _scripted_latency(model, one, protocol) -> dict:
    """Batch-1 latency of the model traced, frozen and optimised for inference by TorchScript:
    PyTorch's compiled form on the CPU that needs no compiler toolchain at run time."""
    try:
        with warnings.catch_warnings():  # TorchScript says it is deprecated; it still serves CPU deployments
            warnings.simplefilter("ignore")
            scripted = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, one,
                                                                                         check_trace=False)))
            scripted(one)
    except Exception as exc:  # some models do not trace: the eager figure stands in
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
    figures = summarize_ms(time_calls(lambda: scripted(one), lambda: None, protocol.latency_warmup,
                                      protocol.latency_runs))
    return figures | {"form": "TorchScript (traced, frozen)"}
