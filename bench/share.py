"""Trials sharing one GPU against the same trials one at a time, measured directly.

Question: `bakeoff run --trials-per-gpu N` trains N trials at once in one process (one thread
and one CUDA stream each, through bakeoff's gate) and reports each trial's training time as
projected from stretches of steps it runs alone. Two things were left open on the H200: do the
trials' training loops overlap at all (more images per second in total than one at a time),
and do the projections match the time a trial takes when it really is alone? This script
answers both with bakeoff's own `fit` on the same images (random uint8 pictures already on the
device, so no file or decoder is involved):

1. each model alone, one after another: two epochs; the second epoch's time is measured;
2. all models at once, one thread each: two epochs; per trial the second epoch's projected
   time and its wall time (device-synchronised at both ends), and for all of them the span
   from the first second epoch's start to the last one's end.

The total gain is (sum of the solo second epochs) / (shared second-epoch span); each trial's
projection error is projected / solo. Second epochs, so capture, autotuning and warm-up are
outside what is compared. Random init; one timed run (read the spread from repeated runs).

    PYTHONPATH=src python3 bench/share.py --models alexnet,resnet34,mobilenet_v2,googlenet --steps 400
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time

import numpy as np
import torch

from bakeoff.data.batches import Batcher
from bakeoff.engines.torch_build import build_model
from bakeoff.engines.torch_fit import fit, uses_bf16
from bakeoff.gpu_share import GpuShare, set_share
from bakeoff.protocol import Protocol
from bakeoff.zoo import resolve


def _trial(arch: str, images, labels, train_idx, val_idx, proto, device, marks: dict) -> dict:
    spec = resolve(f"torchvision/{arch}")
    torch.manual_seed(0)
    model, _ = build_model(spec, int(labels.max()) + 1, False)
    channels_last = device.type == "cuda" and uses_bf16(proto, device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batcher = Batcher.create(images, np.concatenate([train_idx, val_idx]), spec.input_size, spec.mean, spec.std,
                             device, channels_last, side=images.shape[1])

    def on_step(epoch, step, steps, elapsed):
        if epoch == 1:  # the second epoch's start, from its first progress call
            marks.setdefault("start", time.perf_counter() - elapsed)

    fitted = fit(model, batcher, train_idx, labels, val_idx, proto, device, on_step)
    second = fitted["history"][1]
    marks["end"] = marks.get("start", 0.0) + second.get("epoch_wall_s", second["epoch_time_s"])  # synchronised
    return {"epoch_s": second["epoch_time_s"], "wall_s": second.get("epoch_wall_s", second["epoch_time_s"]),
            "mode": fitted["step_mode"], "kind": fitted["train_time_kind"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="alexnet,resnet34,mobilenet_v2,googlenet")
    ap.add_argument("--steps", type=int, default=400, help="batch-16 steps per epoch")
    ap.add_argument("--side", type=int, default=256, help="stored image side (models crop their own size)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    archs = args.models.split(",")
    proto = Protocol(pretrained=False, epochs=2)
    rng = np.random.default_rng(0)
    n_train, n_val = args.steps * proto.batch_size, 256
    images = rng.integers(0, 256, (n_train + n_val, args.side, args.side, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n_train + n_val)
    train_idx, val_idx = np.arange(n_train), np.arange(n_train, n_train + n_val)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {len(archs)} models, {args.steps} steps of "
          f"{proto.batch_size} per epoch, second epoch compared", flush=True)

    solo = {}
    for arch in archs:
        solo[arch] = _trial(arch, images, labels, train_idx, val_idx, proto, device, {})
        print(f"  alone   {arch:14s} {solo[arch]['epoch_s']:7.2f} s  ({solo[arch]['mode']})", flush=True)

    set_share(GpuShare(len(archs)))
    shared, marks = {}, {a: {} for a in archs}

    def run(arch: str) -> None:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            shared[arch] = _trial(arch, images, labels, train_idx, val_idx, proto, device, marks[arch])

    threads = [threading.Thread(target=run, args=(a,)) for a in archs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    set_share(None)
    missing = [a for a in archs if a not in shared]
    if missing:
        raise SystemExit(f"shared trials that did not finish: {', '.join(missing)}")
    span = max(m["end"] for m in marks.values()) - min(m["start"] for m in marks.values())
    print(f"{'model':14s} {'alone s':>8s} {'shared projected s':>19s} {'projected/alone':>16s} {'shared wall s':>14s}")
    for arch in archs:
        s, p = solo[arch]["epoch_s"], shared[arch]
        print(f"{arch:14s} {s:8.2f} {p['epoch_s']:19.2f} {p['epoch_s'] / s:16.2f} {p['wall_s']:14.2f}")
    total = sum(v["epoch_s"] for v in solo.values())
    print(f"second epochs: {total:.2f} s one at a time, {span:.2f} s at once: gain {total / span:.2f}x")


if __name__ == "__main__":
    main()
