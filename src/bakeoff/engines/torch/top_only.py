"""--train-only-top-layer for PyTorch models: the frozen backbone's features computed once per
image, then the classifier trained on them, many steps per graph replay."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from bakeoff.data.batches import Batcher
from bakeoff.engines.torch.build import find_head
from bakeoff.engines.torch.step import Step, autocast_for, make_optimizer, one_shape, sync_fn
from bakeoff.gpu_share import GpuShare, LoneGate
from bakeoff.job import FitResult, RunAlone
from bakeoff.measure import epoch_record
from bakeoff.protocol import Protocol
from bakeoff.timing import MEASURED, TOP_ONLY_BASIS, Solo

__all__ = ["fit_top_only", "features", "HEAD_STEPS_PER_REPLAY"]


@torch.no_grad()
def features(model: nn.Module, batcher: Batcher, idx: np.ndarray, protocol: Protocol, device, head: nn.Module):
    """The classifier's inputs for ``idx`` (centre crops), captured with a forward hook."""
    captured = []
    hook = head.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].float().flatten(1)))
    batch, n = 256, len(idx)
    try:
        model.eval()
        for _, x in batcher.eval_batches(one_shape(idx, batch, device), batch):
            with autocast_for(protocol, device):
                model(x)
    finally:
        hook.remove()
    return torch.cat(captured)[:n]


# Steps per head-graph replay: 5 epochs at batch 16 of a PlantVillage-sized set are 14k steps of
# a few microseconds of arithmetic each, so one replay per step would be all launch overhead.
HEAD_STEPS_PER_REPLAY = 64


def fit_top_only(model, batcher, train_idx, labels, val_idx, protocol, device, on_step=None,
                 head_name: str | None = None, gate: GpuShare | None = None) -> FitResult | RunAlone:
    """--train-only-top-layer: run the frozen backbone once over every image, then train the
    classifier on the cached features (the backbone's output cannot change, so computing it
    every epoch would be waste). Features come from centre crops: no augmentation.

    Both parts run alone on the GPU even when other trials share it: the feature pass already
    fills the GPU and the head is short, so their times stay measured, not projected; what the
    neighbours overlap is the rest of the trial (building, loading, saving)."""
    gate = gate if gate is not None else LoneGate()
    sync = sync_fn(device)
    head = model.get_submodule(head_name) if head_name else find_head(model)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"--train-only-top-layer needs a linear classifier, found {type(head).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    # The training images' features are training work (timed alone); the validation images'
    # are evaluation, timed apart as every engine's evaluation is.
    with Solo(gate, sync, device, "top-only") as solo:
        f_train = features(model, batcher, train_idx, protocol, device, head)
    feature_s = solo.seconds
    t0 = time.perf_counter()
    with gate.shared():
        f_val = features(model, batcher, val_idx, protocol, device, head)
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
    many = Step(head, opt, protocol, device, shape, False, source=(f_train, y_train), steps=k, gate=gate)
    if many.needs_alone:
        return RunAlone(many.needs_alone)
    one = Step(head, opt, protocol, device, shape, False, source=(f_train, y_train), steps=1, gate=gate)
    if one.needs_alone:
        return RunAlone(one.needs_alone)
    steps = int(np.ceil(n / bs))
    history, train_time = [], feature_s
    for epoch in range(protocol.epochs):
        with gate.shared():
            for st in (many, one):
                st.reset_counts()
        with Solo(gate, sync, device, "top-only") as solo:
            t_epoch = time.perf_counter()
            perm = torch.randperm(n, generator=gen).to(device)
            for start in range(0, full - full % k, k):  # whole replays of k steps
                many.gathered(perm[start * bs:(start + k) * bs])
                if on_step is not None and start % 512 < k:
                    on_step(epoch, start + k, steps, time.perf_counter() - t_epoch)
            for start in range(full - full % k, steps):  # the rest, one step at a time
                one.gathered(perm[start * bs:(start + 1) * bs])
        epoch_time = solo.seconds
        if on_step is not None:
            on_step(epoch, steps, steps, epoch_time)
        train_time += epoch_time
        scored = protocol.validates(epoch)
        t_eval = time.perf_counter()
        with torch.no_grad(), gate.shared():
            if scored:
                val_probs = torch.softmax(head(f_val.to(head.weight.dtype)).float(), 1).cpu().numpy()
            loss_sum, correct = float(many.loss_sum + one.loss_sum), float(many.correct + one.correct)
        # the epoch runs alone: its wall time is its time
        history.append(epoch_record(epoch, loss_sum / n, correct / n, val_probs if scored else None,
                                    labels[val_idx], epoch_time, n)
                       | {"epoch_wall_s": epoch_time, "eval_time_s": time.perf_counter() - t_eval})
    return FitResult(history=history, train_time_s=train_time, eval_time_s=val_feature_s,
                     final_val_probs=val_probs, data_time_s=0.0,
                     step_mode=f"cached-features, {many.mode}, {k} steps per replay", feature_time_s=feature_s,
                     capture_time_s=0.0, capture_error=many.capture_error, train_time_kind=MEASURED,
                     train_time_basis=TOP_ONLY_BASIS,
                     train_wall_s=train_time)


