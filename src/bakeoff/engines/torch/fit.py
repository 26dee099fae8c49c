"""Fit, evaluate and time a PyTorch model on batches from the decoded cache (its training step:
``step``)."""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from bakeoff.data.batches import Batcher
from bakeoff.engines.torch.build import find_head
from bakeoff.engines.torch.compile import compile_model
from bakeoff.engines.torch.step import Pace, Step, autocast_for, make_optimizer, uses_bf16
from bakeoff.gpu_share import share, stream_sync
from bakeoff.job import FitResult
from bakeoff.measure import epoch_record
from bakeoff.protocol import Protocol
from bakeoff.timing import MEASURED, TOP_ONLY_BASIS, WINDOW_SKIP, WINDOW_STEPS, Clock, settle_heap, window

# autocast_for and uses_bf16 are the step's (step.py), named here too for the engines that
# fit, predict and serve with them.
__all__ = ["fit", "predict_probs", "resolve_device", "sync_fn", "autocast_for", "uses_bf16"]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from bakeoff.errors import BakeoffError

        raise BakeoffError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    return torch.device(device)


def sync_fn(device: torch.device) -> Callable[[], None]:
    """Wait for this trial's own GPU work (its thread's stream), not for its neighbours'."""
    if device.type == "cuda":
        return lambda: stream_sync(device)
    return lambda: None


# How often (in steps) a trial waiting for its compiled kernels looks whether they are ready.
SWITCH_CHECK = 50
# The longest a trial waits for its background compile before its last epoch (a cold compile
# of the largest models takes minutes); past it, it ends on eager kernels and says so.
COMPILE_WAIT_S = 900.0


def fit(model: nn.Module, batcher: Batcher, train_idx: np.ndarray, labels: np.ndarray, val_idx: np.ndarray,
        protocol: Protocol, device: torch.device, on_step: Callable[[int, int, int, float], None] | None = None,
        compile_ready: Callable[[], bool] | None = None, compile_fn: Callable = compile_model,
        compile_settled: Callable[[], bool] | None = None, compile_wait_s: float = COMPILE_WAIT_S,
        head_name: str | None = None) -> FitResult:
    """Train with the protocol; return per-epoch history and the training time (``bakeoff.timing``:
    each epoch times a window of steps alone, the figure comes from the windows on the kernels
    the trial ends with). Evaluation, capture and compiling are timed apart.

    When other trials share the GPU (``gpu_share``) a trial also keeps few steps queued
    (``Pace``), moves to the stream priority of the training it has left after each window
    (``GpuShare.prioritize``) and keeps pace with the trial that has the most training left
    (``GpuShare.pacing``); each epoch records its waits.

    ``compile_ready`` (``compile``): whether the step's compiled kernels can be loaded now.
    If so at the start, the step is compiled (``compile_fn``) before its first epoch; else it
    is asked every ``SWITCH_CHECK`` steps after the epoch's window and after each epoch, and the
    step switches to them there (``Step.adopt``); a switch mid-epoch gets a window of its own.
    ``compile_settled`` (the background compile ended, ready or failed): a trial whose kernels
    are still pending when its last epoch begins waits for them (up to ``compile_wait_s``,
    ``compile_wait_s`` in the result), so it ends on the same kernels whether the compile cache
    was cold or warm. ``head_name``: the classifier a top-only fit trains (the zoo's
    ``spec.classifier``); found in the model when None.
    """
    if protocol.train_only_top_layer:
        return fit_top_only(model, batcher, train_idx, labels, val_idx, protocol, device, on_step, head_name)
    gate = share()
    sync = sync_fn(device)
    graphs = device.type == "cuda" and protocol.cuda_graphs
    opt = make_optimizer(protocol, [p for p in model.parameters() if p.requires_grad], capturable=graphs)
    gen = torch.Generator().manual_seed(protocol.seed)
    rng = np.random.default_rng(protocol.seed)
    with gate.shared():
        y_all = torch.from_numpy(labels).to(device)
    bs = protocol.batch_size
    model.train()
    t_capture = time.perf_counter()
    last = len(train_idx) % bs
    compiled_from, compile_error = None, None
    early = compile_ready is not None and compile_ready()  # compiled by an earlier run: from the first epoch
    fwd = compile_fn(model) if early else None
    step = Step(model, opt, protocol, device, (min(bs, len(train_idx)), 3, batcher.input_size, batcher.input_size),
                 batcher.channels_last, last_batch=last if last >= 2 else None, fwd=fwd)
    sync()
    compile_s = step.compile_s
    capture_s = time.perf_counter() - t_capture - compile_s
    if early:
        compile_error = step.compile_error
        compiled_from = 1 if compile_error is None else None
    steps_per_epoch = int(np.ceil(len(train_idx) / bs))

    def pending() -> bool:  # waiting for compiled kernels: neither switched nor failed yet
        return compile_ready is not None and compiled_from is None and compile_error is None

    def kernels() -> str:
        return "compiled" if compiled_from is not None else "eager"

    pace = Pace() if gate.concurrent and device.type == "cuda" else None
    clock = Clock()
    priority, step_s, compile_waited = 0, None, 0.0
    history, wall_time, eval_time, data_time = [], 0.0, 0.0, 0.0
    with gate.pacing() as keep_pace:
        for epoch in range(protocol.epochs):
            settle_heap()
            if epoch == protocol.epochs - 1 and pending() and compile_settled is not None:
                waited_s = _wait_for(compile_settled, compile_wait_s)
                compile_waited += waited_s
                if compile_ready():
                    compile_error, seconds = _switch(step, compile_fn, model, sync)
                    compile_s += seconds
                    compiled_from = epoch + 1 if compile_error is None else None
                elif not compile_settled():
                    compile_error = f"its compiled kernels were not ready after waiting {waited_s:.0f} s"
            waited = gate.waited()
            model.train()
            order = rng.permutation(train_idx)
            with gate.shared():
                step.reset_counts()
                theta = batcher.crop_params(len(order), gen).to(device, non_blocking=True)
                order_dev = torch.from_numpy(order).to(device, non_blocking=True)
                pos = batcher.positions(order)
            sync()
            t_epoch = time.perf_counter()
            win = window(steps_per_epoch)
            opened, seen, ran, paced, solos = None, 0, 0, 0.0, []
            switch_s, switched_at = 0.0, None
            alone = contextlib.ExitStack()

            def close(steps_left: int) -> None:
                nonlocal priority, step_s, opened
                t_solo, ran_before = opened
                solo, priority = _close_window(alone, sync, t_solo, ran - ran_before, steps_left)
                clock.add(kernels(), solo * (ran - ran_before), ran - ran_before, win == (0, steps_per_epoch))
                solos.append(solo)
                step_s, opened = solo, None

            try:
                for i in range(steps_per_epoch):
                    lo, hi = i * bs, min((i + 1) * bs, len(order))
                    if hi - lo < 2 < len(order):
                        continue  # a lone last image breaks batch-norm in training mode
                    if win is not None and i == win[0]:
                        alone.enter_context(gate.exclusive(device, "window"))
                        sync()
                        opened = (time.perf_counter(), ran)
                    with gate.shared():
                        t_data = time.perf_counter()
                        x = batcher.train_batch(order[lo:hi], augment=protocol.augment, theta=theta[lo:hi],
                                                pos=None if pos is None else pos[lo:hi])
                        y = y_all[order_dev[lo:hi]]
                        data_time += time.perf_counter() - t_data  # on CUDA: the host's share (launches) only
                        step(x, y)
                    if pace is not None:
                        pace()
                    seen += hi - lo
                    ran += 1
                    left = steps_per_epoch * (protocol.epochs - epoch) - i - 1  # steps of the run still to go
                    if opened is not None and i == win[1] - 1:
                        close(left)
                        win = None
                    paced += keep_pace(left, step_s)
                    if on_step is not None and (i % 50 == 0 or i == steps_per_epoch - 1):
                        on_step(epoch, i + 1, steps_per_epoch, time.perf_counter() - t_epoch - switch_s)
                    if ((i + 1) % SWITCH_CHECK == 0 and pending() and win is None
                            and steps_per_epoch - i - 1 >= WINDOW_SKIP + WINDOW_STEPS and compile_ready()):
                        # after the epoch's window, with room for one on the new kernels
                        compile_error, seconds = _switch(step, compile_fn, model, sync)
                        switch_s += seconds
                        if compile_error is None:
                            compiled_from, switched_at = epoch + 1, i + 2
                            win = window(steps_per_epoch, start=i + 1)
                if opened is not None:  # the window's last step was a skipped lone image
                    close(steps_per_epoch * (protocol.epochs - epoch - 1))
            finally:
                alone.close()
            sync()
            clock.steps += ran
            compile_s += switch_s
            epoch_wall = time.perf_counter() - t_epoch - switch_s
            wall_time += epoch_wall
            t_eval, train_waited = time.perf_counter(), gate.waited() - waited
            scored = protocol.validates(epoch)
            if scored:
                val_probs = predict_probs(model, batcher, val_idx, protocol, device)
            epoch_eval = time.perf_counter() - t_eval
            eval_time += epoch_eval
            record = {"epoch_wall_s": epoch_wall, "eval_time_s": epoch_eval, "solo_step_s": solos}
            if gate.concurrent:  # where a shared epoch's wall time went
                record |= {"wait_s": train_waited, "eval_wait_s": gate.waited() - waited - train_waited,
                           "stream_priority": priority, "pace_wait_s": paced}
            record["kernels"] = kernels()
            if switched_at is not None:
                record |= {"kernels": "eager, then compiled", "compiled_from_step": switched_at}
            history.append(epoch_record(epoch, float(step.loss_sum) / seen, float(step.correct) / seen,
                                         val_probs if scored else None, labels[val_idx], epoch_wall, seen) | record)
            if pending() and epoch + 1 < protocol.epochs and compile_ready():
                compile_error, seconds = _switch(step, compile_fn, model, sync)
                compile_s += seconds
                compiled_from = epoch + 2 if compile_error is None else None
    if pending():
        compile_error = "its compiled kernels were not ready before the last epoch began"
    return FitResult(history=history, **clock.figures(kernels()), eval_time_s=eval_time, final_val_probs=val_probs,
                     data_time_s=data_time, step_mode=step.mode, capture_time_s=capture_s,
                     capture_error=step.capture_error, train_wall_s=wall_time,
                     compiled_from_epoch=compiled_from, compile_time_s=compile_s, compile_error=compile_error,
                     compile_wait_s=compile_waited)


def _wait_for(settled: Callable[[], bool], limit_s: float) -> float:
    """Seconds spent waiting until ``settled()``, at most ``limit_s``."""
    t0 = time.perf_counter()
    while not settled() and time.perf_counter() - t0 < limit_s:
        time.sleep(0.25)
    return time.perf_counter() - t0


def _switch(step: Step, compile_fn: Callable, model: nn.Module, sync) -> tuple[str | None, float]:
    """``step`` switched to compiled kernels now (``Step.adopt``): why that failed (None if it
    did not) and the seconds it took, the GPU work included."""
    t0 = time.perf_counter()
    why = step.adopt(compile_fn(model))
    sync()
    return why, time.perf_counter() - t0


def _close_window(alone: contextlib.ExitStack, sync, t_start: float, steps: int,
                  steps_left: int) -> tuple[float, int]:
    """End a solo window: seconds per step, measured before the neighbours resume, and the
    stream priority the trial moves to for the ``steps_left`` it still has to train (its
    stream is idle now: just synchronised)."""
    sync()
    per_step = (time.perf_counter() - t_start) / max(1, steps)
    alone.close()
    return per_step, share().prioritize(per_step * steps_left)




def _one_shape(idx: np.ndarray, batch: int, device) -> np.ndarray:
    """``idx`` filled up to whole batches on a GPU (repeats of its last image, whose outputs
    the caller drops): one batch shape for a whole pass, since the first call at a new shape
    can cost seconds there (channels-last depthwise convolutions: bench/first_call.py)."""
    if device.type != "cuda" or len(idx) % batch == 0:
        return idx
    return np.concatenate([idx, np.repeat(idx[-1:], batch - len(idx) % batch)])


@torch.no_grad()
def _features(model: nn.Module, batcher: Batcher, idx: np.ndarray, protocol: Protocol, device, head: nn.Module):
    """The classifier's inputs for ``idx`` (centre crops), captured with a forward hook."""
    captured = []
    hook = head.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].float().flatten(1)))
    batch, n = 256, len(idx)
    try:
        model.eval()
        for _, x in batcher.eval_batches(_one_shape(idx, batch, device), batch):
            with autocast_for(protocol, device):
                model(x)
    finally:
        hook.remove()
    return torch.cat(captured)[:n]


# Steps per head-graph replay: 5 epochs at batch 16 of a PlantVillage-sized set are 14k steps of
# a few microseconds of arithmetic each, so one replay per step would be all launch overhead.
HEAD_STEPS_PER_REPLAY = 64


def fit_top_only(model, batcher, train_idx, labels, val_idx, protocol, device, on_step=None,
                 head_name: str | None = None) -> FitResult:
    """--train-only-top-layer: run the frozen backbone once over every image, then train the
    classifier on the cached features (the backbone's output cannot change, so computing it
    every epoch would be waste). Features come from centre crops: no augmentation.

    Both parts run alone on the GPU even when other trials share it: the feature pass already
    fills the GPU and the head is short, so their times stay measured, not projected; what the
    neighbours overlap is the rest of the trial (building, loading, saving)."""
    gate = share()
    sync = sync_fn(device)
    head = model.get_submodule(head_name) if head_name else find_head(model)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"--train-only-top-layer needs a linear classifier, found {type(head).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    # The training images' features are training work (timed alone); the validation images'
    # are evaluation, timed apart as every engine's evaluation is.
    with gate.exclusive(device, "top-only"):
        t0 = time.perf_counter()
        f_train = _features(model, batcher, train_idx, protocol, device, head)
        sync()
        feature_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with gate.shared():
        f_val = _features(model, batcher, val_idx, protocol, device, head)
    sync()
    val_feature_s = time.perf_counter() - t0
    for p in head.parameters():
        p.requires_grad_(True)
    graphs = device.type == "cuda" and protocol.cuda_graphs
    opt = make_optimizer(protocol, list(head.parameters()), capturable=graphs)
    gen = torch.Generator().manual_seed(protocol.seed)
    bs, n = protocol.batch_size, len(train_idx)
    with gate.shared():
        y_train = torch.from_numpy(labels[train_idx]).to(device)
    full = n // bs
    k = max(1, min(HEAD_STEPS_PER_REPLAY, full))
    shape = (min(bs, n), f_train.shape[1])
    many = Step(head, opt, protocol, device, shape, False, source=(f_train, y_train), steps=k)
    one = Step(head, opt, protocol, device, shape, False, source=(f_train, y_train), steps=1)
    steps = int(np.ceil(n / bs))
    history, train_time = [], feature_s
    for epoch in range(protocol.epochs):
        with gate.exclusive(device, "top-only"):
            for st in (many, one):
                st.reset_counts()
            sync()
            t_epoch = time.perf_counter()
            perm = torch.randperm(n, generator=gen).to(device)
            for start in range(0, full - full % k, k):  # whole replays of k steps
                many.gathered(perm[start * bs:(start + k) * bs])
                if on_step is not None and start % 512 < k:
                    on_step(epoch, start + k, steps, time.perf_counter() - t_epoch)
            for start in range(full - full % k, steps):  # the rest, one step at a time
                one.gathered(perm[start * bs:(start + 1) * bs])
            sync()
            epoch_time = time.perf_counter() - t_epoch
        if on_step is not None:
            on_step(epoch, steps, steps, epoch_time)
        train_time += epoch_time
        scored = protocol.validates(epoch)
        with torch.no_grad(), gate.shared():
            if scored:
                val_probs = torch.softmax(head(f_val.to(head.weight.dtype)).float(), 1).cpu().numpy()
            loss_sum, correct = float(many.loss_sum + one.loss_sum), float(many.correct + one.correct)
        history.append(epoch_record(epoch, loss_sum / n, correct / n, val_probs if scored else None,
                                     labels[val_idx], epoch_time, n))
    return FitResult(history=history, train_time_s=train_time, eval_time_s=val_feature_s,
                     final_val_probs=val_probs, data_time_s=0.0,
                     step_mode=f"cached-features, {many.mode}, {k} steps per replay", feature_time_s=feature_s,
                     capture_time_s=0.0, capture_error=many.capture_error, train_time_kind=MEASURED,
                     train_time_basis=TOP_ONLY_BASIS,
                     train_wall_s=train_time)


@torch.no_grad()
def predict_probs(model: nn.Module, batcher: Batcher, idx: np.ndarray, protocol: Protocol,
                  device: torch.device, batch_size: int = 128) -> np.ndarray:
    """Class probabilities for ``idx``. The pass never waits for the GPU until its end: the
    images' positions cross to the device once (a copy from pageable memory waits for the
    stream), and the probabilities stay there until the last batch. Beside other trials, each
    wait would also wait for whatever they had queued ahead of it."""
    model.eval()
    out = []
    n, idx = len(idx), _one_shape(idx, batch_size, device)
    with share().shared():
        pos = batcher.positions(idx)
    for start in range(0, len(idx), batch_size):
        part = idx[start:start + batch_size]
        with share().shared(), autocast_for(protocol, device):
            logits = model(batcher.eval_batch(part, None if pos is None else pos[start:start + batch_size]))
            out.append(torch.softmax(logits.float(), dim=1))
    sync_fn(device)()
    with share().shared():
        return torch.cat(out).cpu().numpy()[:n]
