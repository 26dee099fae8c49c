"""Fit, evaluate and time a PyTorch model on batches from the decoded cache: the epoch loop
(its training step: ``step``; its kernels: ``kernels``; top-only fits: ``top_only``)."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from bakeoff.data.batches import Batcher
from bakeoff.engines.torch.compile import compile_model
from bakeoff.engines.torch.kernels import Kernels
from bakeoff.engines.torch.step import Pace, Step, autocast_for, make_optimizer, one_shape, sync_fn, uses_bf16
from bakeoff.engines.torch.top_only import fit_top_only
from bakeoff.gpu_share import GpuShare, LoneGate
from bakeoff.job import FitResult, RunAlone
from bakeoff.measure import epoch_record
from bakeoff.protocol import Protocol
from bakeoff.timing import WINDOW_SKIP, WINDOW_STEPS, Clock, Solo, settle_heap, window

# autocast_for, uses_bf16 and sync_fn are the step's (step.py), named here too for the engines
# that fit, predict and serve with them.
__all__ = ["fit", "predict_probs", "resolve_device", "sync_fn", "autocast_for", "uses_bf16"]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from bakeoff.errors import BakeoffError

        raise BakeoffError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    return torch.device(device)



# How often (in steps) a trial waiting for its compiled kernels looks whether they are ready.
SWITCH_CHECK = 50
# The longest a trial waits for its background compile before its last epoch (a cold compile
# of the largest models takes minutes); past it, it ends on eager kernels and says so.
COMPILE_WAIT_S = 900.0


def fit(model: nn.Module, batcher: Batcher, train_idx: np.ndarray, labels: np.ndarray, val_idx: np.ndarray,
        protocol: Protocol, device: torch.device, on_step: Callable[[int, int, int, float], None] | None = None,
        compile_ready: Callable[[], bool] | None = None, compile_fn: Callable = compile_model,
        compile_settled: Callable[[], bool] | None = None, compile_wait_s: float = COMPILE_WAIT_S,
        head_name: str | None = None, gate: GpuShare | None = None) -> FitResult | RunAlone:
    """Train with the protocol; return per-epoch history and the training time (``bakeoff.timing``:
    each epoch times a window of steps alone, the figure comes from the windows on the kernels
    the trial ends with). Evaluation, capture and compiling are timed apart.

    ``gate``: how the trial shares its GPU (``gpu_share``; alone when None). A step that cannot
    be captured beside other trials sends the trial back (``RunAlone``). ``compile_ready`` /
    ``compile_settled``: its background compile (``kernels.Kernels``); the trial switches to
    the compiled kernels after a window, and waits for them (up to ``compile_wait_s``) before
    its last epoch. ``head_name``: the classifier a top-only fit trains (``spec.classifier``).
    """
    gate = gate if gate is not None else LoneGate()
    if protocol.train_only_top_layer:
        return fit_top_only(model, batcher, train_idx, labels, val_idx, protocol, device, on_step, head_name, gate)
    sync = sync_fn(device)
    graphs = device.type == "cuda" and protocol.cuda_graphs
    opt = make_optimizer(protocol, [p for p in model.parameters() if p.requires_grad], capturable=graphs)
    gen = torch.Generator().manual_seed(protocol.seed)
    rng = np.random.default_rng(protocol.seed)
    bs = protocol.batch_size
    model.train()
    t_capture = time.perf_counter()
    kernels = Kernels(model, compile_fn, compile_ready, compile_settled, sync)
    last = len(train_idx) % bs
    step = Step(model, opt, protocol, device, (min(bs, len(train_idx)), 3, batcher.input_size, batcher.input_size),
                batcher.channels_last, last_batch=last if last >= 2 else None, fwd=kernels.first(), gate=gate)
    if step.needs_alone:
        return RunAlone(step.needs_alone)
    sync()
    kernels.built(step)
    capture_s = time.perf_counter() - t_capture - step.compile_s
    with gate.shared():
        y_all = torch.from_numpy(labels).to(device)
    loop = _Loop(step, batcher, y_all, protocol, device, gate, kernels, on_step)
    history, eval_time = [], 0.0
    with gate.pacing() as keep_pace:
        for epoch in range(protocol.epochs):
            settle_heap()
            if epoch == protocol.epochs - 1:
                kernels.before_last_epoch(epoch, compile_wait_s)
            waited = gate.waited()
            model.train()
            record, seen = loop.epoch(epoch, rng.permutation(train_idx), gen, keep_pace)
            t_eval, train_waited = time.perf_counter(), gate.waited() - waited
            scored = protocol.validates(epoch)
            if scored:
                val_probs = predict_probs(model, batcher, val_idx, protocol, device, gate=gate)
            record["eval_time_s"] = time.perf_counter() - t_eval
            eval_time += record["eval_time_s"]
            if gate.concurrent:  # where a shared epoch's wall time went
                record |= {"wait_s": train_waited, "eval_wait_s": gate.waited() - waited - train_waited}
            history.append(epoch_record(epoch, float(step.loss_sum) / seen, float(step.correct) / seen,
                                        val_probs if scored else None, labels[val_idx], record["epoch_wall_s"],
                                        seen) | record)
            if epoch + 1 < protocol.epochs:
                kernels.switch_if_ready(epoch + 2)
    kernels.finish()
    return FitResult(history=history, **loop.clock.figures(kernels.name), eval_time_s=eval_time,
                     final_val_probs=val_probs, data_time_s=loop.data_time, step_mode=step.mode,
                     capture_time_s=capture_s, capture_error=step.capture_error, train_wall_s=loop.wall_time,
                     compiled_from_epoch=kernels.compiled_from, compile_time_s=kernels.seconds,
                     compile_error=kernels.error, compile_wait_s=kernels.waited)


class _Loop:
    """One trial's training steps, an epoch at a time: each epoch's window timed alone
    (``timing.Solo``), then the stream priority of the training left (``GpuShare.prioritize``);
    a pace of a few queued steps beside neighbours (``Pace``); after the window, a switch to
    compiled kernels when they are ready, with a window of its own."""

    def __init__(self, step: Step, batcher: Batcher, y_all, protocol: Protocol, device, gate: GpuShare,
                 kernels: Kernels, on_step) -> None:
        self.step, self.batcher, self.y_all, self.protocol, self.device = step, batcher, y_all, protocol, device
        self.gate, self.kernels, self.on_step, self.sync = gate, kernels, on_step, sync_fn(device)
        self.pace = Pace() if gate.concurrent and device.type == "cuda" else None
        self.clock = Clock()
        self.priority, self.step_s = 0, None  # the stream priority; seconds per step, alone
        self.data_time = self.wall_time = 0.0

    def epoch(self, epoch: int, order: np.ndarray, gen: torch.Generator, keep_pace) -> tuple[dict, int]:
        """Train one epoch in ``order``: (its record, images seen)."""
        step, batcher, protocol, gate, device = self.step, self.batcher, self.protocol, self.gate, self.device
        bs, steps = protocol.batch_size, int(np.ceil(len(order) / protocol.batch_size))
        with gate.shared():
            step.reset_counts()
            theta = batcher.crop_params(len(order), gen).to(device, non_blocking=True)
            order_dev = torch.from_numpy(order).to(device, non_blocking=True)
            pos = batcher.positions(order)
        self.sync()
        t_epoch = time.perf_counter()
        win, solo, opened_at = window(steps), Solo(gate, self.sync, device, "window"), 0
        seen, ran, paced, solos, switch_s, switched_at = 0, 0, 0.0, [], 0.0, None
        try:
            for i in range(steps):
                lo, hi = i * bs, min((i + 1) * bs, len(order))
                if hi - lo < 2 < len(order):
                    continue  # a lone last image breaks batch-norm in training mode
                if win is not None and i == win[0]:
                    solo.start()
                    opened_at = ran
                with gate.shared():
                    t_data = time.perf_counter()
                    x = batcher.train_batch(order[lo:hi], augment=protocol.augment, theta=theta[lo:hi],
                                            pos=None if pos is None else pos[lo:hi])
                    y = self.y_all[order_dev[lo:hi]]
                    self.data_time += time.perf_counter() - t_data  # on CUDA: the host's share (launches) only
                    step(x, y)
                if self.pace is not None:
                    self.pace()
                seen += hi - lo
                ran += 1
                left = steps * (protocol.epochs - epoch) - i - 1  # steps of the run still to go
                if solo.running and i == win[1] - 1:
                    solos.append(self._close(solo, ran - opened_at, left, win == (0, steps)))
                    win = None
                paced += keep_pace(left, self.step_s)
                if self.on_step is not None and (i % 50 == 0 or i == steps - 1):
                    self.on_step(epoch, i + 1, steps, time.perf_counter() - t_epoch - switch_s)
                if ((i + 1) % SWITCH_CHECK == 0 and win is None and steps - i - 1 >= WINDOW_SKIP + WINDOW_STEPS
                        and self.kernels.pending()):  # after the epoch's window, with room for one on the new kernels
                    switched, seconds = self.kernels.switch_if_ready(epoch + 1)
                    switch_s += seconds
                    if switched:
                        switched_at, win = i + 2, window(steps, start=i + 1)
            if solo.running:  # the window's last step was a skipped lone image
                solos.append(self._close(solo, ran - opened_at, steps * (protocol.epochs - epoch - 1),
                                         win == (0, steps)))
        finally:
            solo.release()
        self.sync()
        self.clock.steps += ran
        epoch_wall = time.perf_counter() - t_epoch - switch_s
        self.wall_time += epoch_wall
        record = {"epoch_wall_s": epoch_wall, "solo_step_s": solos, "kernels": self.kernels.name}
        if gate.concurrent:
            record |= {"stream_priority": self.priority, "pace_wait_s": paced}
        if switched_at is not None:
            record |= {"kernels": "eager, then compiled", "compiled_from_step": switched_at}
        return record, seen

    def _close(self, solo: Solo, steps: int, steps_left: int, whole_epoch: bool) -> float:
        """End a window: seconds per step, read before the neighbours resume; then the stream
        priority for the ``steps_left`` the trial still has to train (its stream is idle now)."""
        per_step = solo.stop() / max(1, steps)
        self.priority = self.gate.prioritize(per_step * steps_left)
        self.clock.add(self.kernels.name, per_step * steps, steps, whole_epoch)
        self.step_s = per_step
        return per_step


@torch.no_grad()
def predict_probs(model: nn.Module, batcher: Batcher, idx: np.ndarray, protocol: Protocol,
                  device: torch.device, batch_size: int = 128, gate: GpuShare | None = None) -> np.ndarray:
    """Class probabilities for ``idx``. The pass never waits for the GPU until its end: the
    images' positions cross to the device once (a copy from pageable memory waits for the
    stream), and the probabilities stay there until the last batch. Beside other trials, each
    wait would also wait for whatever they had queued ahead of it."""
    gate = gate if gate is not None else LoneGate()
    model.eval()
    out = []
    n, idx = len(idx), one_shape(idx, batch_size, device)
    with gate.shared():
        pos = batcher.positions(idx)
    for start in range(0, len(idx), batch_size):
        part = idx[start:start + batch_size]
        with gate.shared(), autocast_for(protocol, device):
            logits = model(batcher.eval_batch(part, None if pos is None else pos[start:start + batch_size]))
            out.append(torch.softmax(logits.float(), dim=1))
    sync_fn(device)()
    with gate.shared():
        return torch.cat(out).cpu().numpy()[:n]
