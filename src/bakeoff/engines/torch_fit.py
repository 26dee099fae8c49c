"""Fit, evaluate and time a PyTorch model on batches from the decoded cache."""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from bakeoff.data.batches import Batcher
from bakeoff.engines.torch_build import find_head
from bakeoff.measure import summarize_ms, time_calls
from bakeoff.protocol import Protocol

__all__ = ["fit", "predict_probs", "time_inference", "resolve_device", "sync_fn", "autocast_for"]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from bakeoff.errors import BakeoffError

        raise BakeoffError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    return torch.device(device)


def sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def uses_bf16(protocol: Protocol, device: torch.device) -> bool:
    return protocol.precision == "bf16" or (protocol.precision == "auto" and device.type == "cuda")


def autocast_for(protocol: Protocol, device: torch.device):
    if uses_bf16(protocol, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _optimizer(protocol: Protocol, params) -> torch.optim.Optimizer:
    if protocol.optimizer == "adam":
        return torch.optim.Adam(params, lr=protocol.lr)
    if protocol.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=protocol.lr)
    return torch.optim.SGD(params, lr=protocol.lr, momentum=0.9)


def fit(model: nn.Module, batcher: Batcher, train_idx: np.ndarray, labels: np.ndarray, val_idx: np.ndarray,
        protocol: Protocol, device: torch.device, on_step: Callable[[int, int, int, float], None] | None = None
        ) -> dict:
    """Train with the protocol; return per-epoch history and the training-loop time.

    Training time counts only the training loop, synchronised at each epoch's ends; the
    per-epoch validation pass (for the training curve) is timed apart and excluded.
    """
    sync = sync_fn(device)
    if protocol.train_only_top_layer:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in find_head(model).parameters():
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(protocol, params)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(protocol.seed)
    rng = np.random.default_rng(protocol.seed)
    y_all = torch.from_numpy(labels).to(device)
    steps_per_epoch = int(np.ceil(len(train_idx) / protocol.batch_size))
    history, train_time, data_time, eval_time = [], 0.0, 0.0, 0.0
    for epoch in range(protocol.epochs):
        # Top-layer-only keeps the backbone's batch-norm statistics frozen, as feature extraction does.
        model.train(not protocol.train_only_top_layer)
        order = rng.permutation(train_idx)
        total_loss = torch.zeros((), device=device)
        total_correct = torch.zeros((), device=device, dtype=torch.long)
        sync()
        t_epoch = time.perf_counter()
        for step in range(steps_per_epoch):
            idx = order[step * protocol.batch_size:(step + 1) * protocol.batch_size]
            if len(idx) < 2 < len(order):
                continue  # a lone last image breaks batch-norm in training mode
            t_data = time.perf_counter()
            x = batcher.train_batch(idx, gen, protocol.augment)
            y = y_all[torch.from_numpy(idx).to(device)]
            data_time += time.perf_counter() - t_data
            with autocast_for(protocol, device):
                out = model(x)
                loss = loss_fn(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.detach() * len(idx)
            total_correct += (out.argmax(1) == y).sum()
            if on_step is not None and (step % 10 == 0 or step == steps_per_epoch - 1):
                on_step(epoch, step + 1, steps_per_epoch, time.perf_counter() - t_epoch)
        sync()
        epoch_time = time.perf_counter() - t_epoch
        train_time += epoch_time
        t_eval = time.perf_counter()
        val_probs = predict_probs(model, batcher, val_idx, protocol, device)
        val_y = labels[val_idx]
        eval_time += time.perf_counter() - t_eval
        n = len(train_idx)
        history.append({
            "epoch": epoch + 1,
            "train_loss": float(total_loss) / n,
            "train_accuracy": float(total_correct) / n,
            "val_loss": float(nn.functional.nll_loss(torch.log(torch.from_numpy(val_probs).clamp_min(1e-12)),
                                                     torch.from_numpy(val_y))),
            "val_accuracy": float((val_probs.argmax(1) == val_y).mean()),
            "epoch_time_s": epoch_time,
            "images_per_s": n / epoch_time,
        })
    return {"history": history, "train_time_s": train_time, "data_time_s": data_time, "eval_time_s": eval_time,
            "final_val_probs": val_probs}


@torch.no_grad()
def predict_probs(model: nn.Module, batcher: Batcher, idx: np.ndarray, protocol: Protocol,
                  device: torch.device, batch_size: int = 128) -> np.ndarray:
    model.eval()
    out = []
    for _, x in batcher.eval_batches(idx, batch_size):
        with autocast_for(protocol, device):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def time_inference(model: nn.Module, batcher: Batcher, idx: np.ndarray, protocol: Protocol,
                   device: torch.device) -> dict:
    """Batch-1 latency (median, p95 of >= 50 synchronised runs after warm-up) on a real
    validation image, and throughput at ``protocol.throughput_batch`` on real images."""
    model.eval()
    sync = sync_fn(device)
    one = batcher.eval_batch(idx[:1])
    reps = int(np.ceil(protocol.throughput_batch / len(idx)))
    big = batcher.eval_batch(np.tile(idx, reps)[:protocol.throughput_batch])

    def run(x):
        with autocast_for(protocol, device):
            model(x)

    lat = summarize_ms(time_calls(lambda: run(one), sync, protocol.latency_warmup, protocol.latency_runs))
    thr_ms = time_calls(lambda: run(big), sync, 2, 7)
    return {
        "latency_ms_p50": lat["p50"], "latency_ms_p95": lat["p95"], "latency_ms_min": lat["min"],
        "latency_runs": lat["n"],
        "throughput_img_s": protocol.throughput_batch / (float(np.median(thr_ms)) / 1000.0),
        "throughput_batch": protocol.throughput_batch,
        "latency_kind": "eager",
    }
