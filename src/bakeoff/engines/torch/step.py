"""One training step of a PyTorch model, eager or replayed from a captured CUDA graph: its
optimizer, precision, kernel choice, and how it is captured beside other trials."""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from bakeoff.gpu_share import GpuShare, LoneGate, stream_sync
from bakeoff.protocol import Protocol

__all__ = ["Step", "Pace", "sync_fn", "one_shape", "make_optimizer", "graph_of", "first_way", "failure_reason", "uses_bf16", "autocast_for", "tuned",
           "capture_ways", "AUTOTUNE"]


def sync_fn(device: torch.device) -> Callable[[], None]:
    """Wait for this trial's own GPU work (its thread's stream), not for its neighbours'."""
    if device.type == "cuda":
        return lambda: stream_sync(device)
    return lambda: None


def one_shape(idx: np.ndarray, batch: int, device) -> np.ndarray:
    """``idx`` filled up to whole batches on a GPU (repeats of its last image, whose outputs
    the caller drops): one batch shape for a whole pass, since the first call at a new shape
    can cost seconds there (channels-last depthwise convolutions: bench/first_call.py)."""
    if device.type != "cuda" or len(idx) % batch == 0:
        return idx
    return np.concatenate([idx, np.repeat(idx[-1:], batch - len(idx) % batch)])


def uses_bf16(protocol: Protocol, device: torch.device) -> bool:
    return protocol.precision == "bf16" or (protocol.precision == "auto" and device.type == "cuda")


def autocast_for(protocol: Protocol, device: torch.device, cache_enabled: bool = True):
    """bf16 autocast where the protocol asks for it; graphs need the cast cache off."""
    if uses_bf16(protocol, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return contextlib.nullcontext()


# Whether a training step's convolutions are autotuned (cuDNN builds and times candidate kernels
# for each shape and keeps the fastest) or take cuDNN's heuristics. Off: in the speed benchmark
# autotuning made no step faster and cost minutes of host work at capture, time in which every
# trial sharing the GPU waits (bench/tuning.py; figures in docs/results.md).
AUTOTUNE = False


def tuned(gate: GpuShare, device: torch.device, reason: str, autotune: bool | None = None):
    """A training step's kernels picked with no trial training or measuring beside it (other
    trials may be picking theirs too: ``GpuShare.tuning``): a graph capture, or an eager step's
    first call. cuDNN autotunes the shapes met inside when ``autotune`` (``AUTOTUNE`` unless
    given); cuDNN looks up its plan cache before it looks at the flag, so they stay tuned after.
    Every other pass (an epoch's last, smaller batch, evaluation, latency) takes cuDNN's
    heuristics, as a served model does by default."""
    return gate.tuning(device, reason, autotune=AUTOTUNE if autotune is None else autotune)


def make_optimizer(protocol: Protocol, params, capturable: bool = False) -> torch.optim.Optimizer:
    params = list(params)
    # On a GPU, the fused Adam updates every parameter in one kernel instead of a dozen
    # per-tensor-group launches: the same update, and at batch 16 a visible share of the step.
    fused = bool(params) and all(p.is_cuda for p in params)
    if protocol.optimizer == "adam":
        return torch.optim.Adam(params, lr=protocol.lr, capturable=capturable, fused=fused or None)
    if protocol.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=protocol.lr, capturable=capturable, fused=fused or None)
    return torch.optim.SGD(params, lr=protocol.lr, momentum=0.9)


class Step:
    """One training step, eager or replayed from a captured CUDA graph.

    At batch 16 a big GPU spends most of an eager step launching kernels; replaying the whole
    step (forward, backward, optimizer) as one graph removes that overhead without changing
    the arithmetic. Capture needs static input buffers and a capturable optimizer.

    With ``source`` = (inputs, labels) already on the device, a call takes the indices of
    ``steps`` batches and runs them all: one replay then stands for many tiny steps (a
    classifier head on cached features), which is where launching each step costs most.
    """

    def __init__(self, model, opt, protocol, device, batch_shape, channels_last, source=None, steps: int = 1,
                 last_batch: int | None = None, capture: bool = True, fwd=None, gate: GpuShare | None = None):
        self.gate = gate = gate if gate is not None else LoneGate()
        self.model, self.opt, self.protocol, self.device = model, opt, protocol, device
        self.fwd = model  # what the full-batch step calls: the model, or the model compiled (``adopt``)
        self.loss_fn = nn.CrossEntropyLoss()
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.source, self.steps, self.batch = source, steps if source is not None else 1, batch_shape[0]
        self.batch_shape, self.channels_last = batch_shape, channels_last
        self.static_x = self.static_y = self.static_idx = None  # made once, by ``_static``
        self.graph = None
        self.graph_mode = "eager"  # or "cuda-graph", with the capture's way if it was not the first
        self.capture_error: str | None = None
        self.needs_alone: str | None = None  # why it cannot train beside other trials (then it is not ready)
        self.compile_error: str | None = None
        self.compile_s = 0.0  # seconds spent compiling (first calls of the compiled step)
        if fwd is not None:  # compiled first, so the capture's warm-up only loads it
            self.compile_error = self._compile(fwd)
        if device.type == "cuda" and protocol.cuda_graphs and capture:
            with tuned(gate, device, "capture"):  # the warm-up meets the step's shapes first
                with gate.warming():
                    self._static()
                captured, failed = first_way(self._capture, gate.concurrent)
            if captured is not None:  # else some models cannot be captured: they train eagerly
                self._take(captured, failed)
            self.capture_error = "; ".join(failed) or None
            if self.graph is None and gate.concurrent:
                # Eager steps beside graphed neighbours would crawl (one autograd thread, one
                # interpreter for all); the same capture succeeds in a process of its own.
                self.needs_alone = self.capture_error or "its training step could not be captured"
                return
        if device.type == "cuda" and self.graph is None:
            with tuned(gate, device, "tune"), gate.warming():  # an eager step's kernels, picked before training
                self._static()
                self._undone(self._static_step)
        if device.type == "cuda" and source is None and last_batch and last_batch != batch_shape[0]:
            # The epoch's last, smaller batch is a new shape: its first call can take seconds on
            # the host (cuDNN's heuristics build a plan per convolution), which would count as
            # training time. Met here, it counts as capture time, like the full batch's first call.
            with gate.shared():
                self._undone(lambda: self(*_random_batch(last_batch, batch_shape, channels_last, device)))

    def _compile(self, fwd) -> str | None:
        """Make ``fwd`` (the model compiled) this step's: its first call compiles it, seconds of
        host work that run beside the neighbours' training (``GpuShare.compiling``). Returns
        why it failed (the step then keeps the model as it was), else None."""
        before, t0 = self.fwd, time.perf_counter()
        try:
            with self.gate.compiling():
                self._static()
                self.fwd = fwd
                self._undone(self._static_step)
        except Exception as exc:  # any failure: the step stays eager
            self.fwd = before
            return failure_reason(exc)
        finally:
            self.compile_s += time.perf_counter() - t0
        return None

    def adopt(self, fwd) -> str | None:
        """Train on with ``fwd`` (this step's model, compiled) from the next step, on weights
        and optimizer state as they are: compiled (``_compile``), then captured in a new graph
        that replaces the old one. On any failure the step goes on as it was; returns why."""
        self.model.train()  # a graph bakes in the mode it was captured in: after an evaluation, it would be eval
        counts = self.loss_sum.clone(), self.correct.clone()  # mid-epoch, the epoch's running figures go on
        why = self._compile(fwd)
        if why is None and self.graph is not None:
            with tuned(self.gate, self.device, "capture"):
                captured, failed = first_way(self._capture, self.gate.concurrent)
            if captured is None:
                self.fwd = self.model
                why = "; ".join(failed)
            else:
                self._take(captured, failed)
        self.loss_sum.copy_(counts[0])
        self.correct.copy_(counts[1])
        self.compile_error = why
        return why

    def _take(self, captured: tuple[torch.cuda.CUDAGraph, str], failed: list[str]) -> None:
        """Replay ``captured`` (a graph and its capture's way) from now on."""
        self.graph, way = captured
        self.graph_mode = f"cuda-graph ({way})" if failed else "cuda-graph"

    @property
    def mode(self) -> str:
        """How the step runs: eager or replayed from a graph, with compiled kernels or not."""
        return self.graph_mode + (", compiled" if self.fwd is not self.model else "")

    def _undone(self, run: Callable[[], None]) -> None:
        """``run`` (a step), then weights, optimizer state and running counts put back."""
        restore = self._snapshot()
        try:
            run()
        finally:
            restore()
            self.reset_counts()

    def _body(self, x, y, fwd):
        with autocast_for(self.protocol, self.device, cache_enabled=not self.protocol.cuda_graphs):
            out = fwd(x)
            loss = self.loss_fn(out.float(), y)
        loss.backward()
        self.opt.step()
        self.loss_sum.add_(loss.detach() * y.shape[0])
        self.correct.add_((out.argmax(1) == y).sum())

    def _gathered(self, idx):
        xs, ys = self.source
        for lo in range(0, len(idx), self.batch):
            sel = idx[lo:lo + self.batch]
            self.opt.zero_grad(set_to_none=True)  # in a graph of several steps: each assigns its gradient
            self._body(xs.index_select(0, sel), ys.index_select(0, sel), self.fwd)

    def _run_static(self):
        if self.source is not None:
            self._gathered(self.static_idx)
        else:
            self._body(self.static_x, self.static_y, self.fwd)

    def _static_step(self):
        """One step on the static inputs: a warm-up, or the body of the captured graph."""
        self.opt.zero_grad(set_to_none=True)  # outside a graph: gradients are assigned inside
        self._run_static()

    def reset_counts(self) -> None:
        """Zero the running loss sum and correct count (each epoch, and after warm-ups)."""
        self.loss_sum.zero_()
        self.correct.zero_()

    def _static(self) -> None:
        """The static inputs a captured step reads (random: warm-up and capture only), made
        once: a graph captured again reads the same ones."""
        if self.static_x is not None or self.static_idx is not None:
            return
        if self.source is not None:
            self.static_idx = torch.randint(0, len(self.source[1]), (self.steps * self.batch,), device=self.device)
        else:
            self.static_x, self.static_y = _random_batch(self.batch, self.batch_shape, self.channels_last, self.device)

    def _snapshot(self) -> Callable[[], None]:
        """Warm-up steps change weights and optimizer state: a function that puts both back in
        place (same addresses, so a graph captured after it starts from the model as it was).
        Optimizer state made after the snapshot (a first step's) goes back to zero, Adam's
        starting state."""
        params = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        kept = {id(t): (t, t.detach().clone()) for state in self.opt.state.values()
                for t in state.values() if torch.is_tensor(t)}

        def restore():
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    v.copy_(params[k])
                for state in self.opt.state.values():
                    for t in state.values():
                        if torch.is_tensor(t):
                            before = kept.get(id(t))
                            if before is not None and before[0] is t:
                                t.copy_(before[1])
                            else:
                                t.zero_()

        return restore

    def _capture(self, way: str) -> tuple[torch.cuda.CUDAGraph, str]:
        with self.gate.warming():
            restore = self._snapshot()
        graph = graph_of(self._static_step, self.device, way, restore, self.gate)
        with self.gate.warming():
            self.reset_counts()
        return graph, way

    def __call__(self, x, y):
        full = self.static_x is not None and x.shape == self.static_x.shape
        if self.graph is not None and full:
            self.static_x.copy_(x)
            self.static_y.copy_(y)
            self.graph.replay()
        else:  # eager, or the last partial batch of a graphed epoch (never compiled: a new shape)
            self.opt.zero_grad(set_to_none=self.graph is None)
            self._body(x, y, self.fwd if full else self.model)

    def gathered(self, idx: torch.Tensor) -> None:
        """One step per ``batch`` indices of ``idx`` into ``source``, in order; replayed from the
        graph when ``idx`` holds exactly ``steps`` full batches."""
        if self.graph is not None and len(idx) == len(self.static_idx):
            self.static_idx.copy_(idx)
            self.graph.replay()
        else:
            self._gathered(idx)


def _random_batch(n: int, batch_shape, channels_last: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random images shaped like ``batch_shape``'s, in the step's memory format, and labels 0."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn((n, *batch_shape[1:]), device=device).contiguous(memory_format=fmt)
    return x, torch.zeros(n, dtype=torch.long, device=device)


class Pace:
    """Keeps at most ``depth`` of a trial's steps queued on its stream while it shares the GPU.

    Unchecked, a trial's host loop runs far ahead of its GPU work (a graph replay takes
    microseconds to launch and milliseconds to run), until thousands of steps are queued. A
    neighbour that must wait for the GPU to run alone then waits for all of them, and the
    trials advance in lockstep, one step each in turn, instead of each at its own pace."""

    def __init__(self, depth: int = 4) -> None:
        self.events = [torch.cuda.Event() for _ in range(depth)]
        self.n = 0

    def __call__(self) -> None:
        event = self.events[self.n % len(self.events)]
        if self.n >= len(self.events):
            event.synchronize()  # the step ``depth`` before this one has finished
        event.record()
        self.n += 1


def capture_ways(concurrent: bool) -> list[str]:
    """How to capture a training step, in order of preference. Each graph wants a capture
    stream of its own: library workspaces (cuBLAS) are kept per stream and baked into the
    graph, so graphs captured on one shared stream share scratch memory and corrupt each other
    when replayed at once on different streams; the shared stream is only a fallback for a
    trial alone on its GPU. "thread-local": neighbours' threads may call CUDA meanwhile."""
    ways = ["own stream, thread-local", "own stream, global"]
    return ways if concurrent else ways + ["shared stream, global"]


def graph_of(run: Callable[[], None], device: torch.device, way: str,
             reset: Callable[[], None] | None = None, gate: GpuShare | None = None) -> torch.cuda.CUDAGraph:
    """``run`` captured as a CUDA graph in one of ``capture_ways``, after three warm-up calls on
    a side stream (where kernels settle their algorithms and workspaces); ``reset`` undoes what
    the warm-up changed before the capture; ``gate``: the trials' it is captured among."""
    gate = gate if gate is not None else LoneGate()
    with gate.warming():  # beside other tuners' warm-ups, if they tune together
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
    with gate.capturing():  # one capture at a time
        if reset is not None:
            reset()
        graph = torch.cuda.CUDAGraph()
        own = way.startswith("own stream")
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(device) if own else None,
                              capture_error_mode="thread_local" if way.endswith("thread-local") else "global"):
            run()
    return graph


def first_way(attempt: Callable[[str], object], concurrent: bool = False) -> tuple[object | None, list[str]]:
    """``attempt(way)`` for each of ``capture_ways(concurrent)`` in turn until one succeeds:
    (what it returned, or None when none did; why the others failed)."""
    failed = []
    for way in capture_ways(concurrent):
        try:
            return attempt(way), failed
        except Exception as exc:  # any failure: the next way, or none
            failed.append(f"{way}: {failure_reason(exc)}")
    return None, failed


def failure_reason(exc: Exception) -> str:
    """An exception in one line: its type and the first line of its message."""
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
