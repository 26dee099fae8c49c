"""Trials sharing one GPU against the same trials one at a time, measured directly.

Question: `bakeoff run --trials-per-gpu N` trains N trials at once in one process (one thread
and one CUDA stream each, through bakeoff's gate) and reports each trial's training time as
projected from stretches of steps it runs alone. Two things were left open on the H200: do the
trials' training loops overlap at all (more images per second in total than one at a time),
and do the projections match the time a trial takes when it really is alone? This script
answers both with bakeoff's own `fit` on the same images (random uint8 pictures already on the
device, so no file or decoder is involved):

1. each model alone, one after another: two epochs; the second epoch's time is measured;
2. all models at once, one thread each: two epochs, the second ones started together (the
   trials wait for each other at the end of their first epoch); per trial the second epoch's
   projected time and its wall time (device-synchronised at both ends), and for all of them
   the span from the first second epoch's start to the last one's end.

The total gain is (sum of the solo second epochs) / (shared second-epoch span); each trial's
projection error is projected / solo. Second epochs, so capture, autotuning and warm-up are
outside what is compared. Random init; both phases repeated (``--repeats``), medians with
min-max.

    PYTHONPATH=src python3 bench/share.py --models alexnet,resnet34,mobilenet_v2,googlenet --steps 400
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time

import numpy as np
import torch

from bakeoff.data.batches import Batcher
from bakeoff.data.cache import cache_side
from bakeoff.engines.torch.build import build_model
from bakeoff.engines.torch.fit import fit, uses_bf16
from bakeoff.gpu_share import GpuShare
from bakeoff.protocol import Protocol
from bakeoff.zoo import resolve

from harness import parser  # bench/, beside this script


def _trial(arch: str, images, labels, train_idx, val_idx, proto, device, marks: dict,
           barrier: threading.Barrier | None = None, gate: GpuShare | None = None) -> dict:
    spec = resolve(f"torchvision/{arch}")
    torch.manual_seed(0)
    model, _ = build_model(spec, int(labels.max()) + 1, False)
    channels_last = device.type == "cuda" and uses_bf16(proto, device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batcher = Batcher.create(images, np.concatenate([train_idx, val_idx]), spec.input_size, spec.mean, spec.std,
                             device, channels_last, side=cache_side(spec.input_size, spec.crop_pct), gate=gate)

    def on_step(epoch, step, steps, elapsed):
        if epoch == 0 and step == steps and barrier is not None:
            with contextlib.suppress(threading.BrokenBarrierError):  # a neighbour failed: go on
                barrier.wait()  # second epochs start together: small models do not run ahead alone
        if epoch == 1:  # the second epoch's start, from its first progress call
            marks.setdefault("start", time.perf_counter() - elapsed)

    fitted = fit(model, batcher, train_idx, labels, val_idx, proto, device, on_step, gate=gate)
    second = fitted.history[1]
    marks["end"] = marks.get("start", 0.0) + second.get("epoch_wall_s", second["epoch_time_s"])  # synchronised
    # the second epoch alone: its window's seconds per step (on the kernels it ended with) x its steps
    steps = int(np.ceil(len(train_idx) / proto.batch_size))
    return {"epoch_s": second["solo_step_s"][-1] * steps, "wall_s": second.get("epoch_wall_s", second["epoch_time_s"]),
            "mode": fitted.step_mode, "kind": fitted.train_time_kind}


def fmt(values: list[float]) -> str:
    """Median, with (min-max) where there is more than one value."""
    med = statistics.median(values)
    return f"{med:.2f}" if len(values) == 1 else f"{med:.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--models", default="alexnet,resnet34,mobilenet_v2,googlenet")
    ap.add_argument("--steps", type=int, default=400, help="batch-16 steps per epoch")
    ap.add_argument("--side", type=int, default=256, help="stored image side (models crop their own size)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3, help="both phases, alternately; medians with min-max")
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
          f"{proto.batch_size} per epoch, second epoch compared, CUDA_DEVICE_MAX_CONNECTIONS="
          f"{os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS', 'unset')}", flush=True)

    solo: dict[str, list[float]] = {a: [] for a in archs}
    projected: dict[str, list[float]] = {a: [] for a in archs}
    walls: dict[str, list[float]] = {a: [] for a in archs}
    spans: list[float] = []
    for rep in range(args.repeats):
        for arch in archs:
            got = _trial(arch, images, labels, train_idx, val_idx, proto, device, {})
            solo[arch].append(got["epoch_s"])
            print(f"  {rep + 1}: alone   {arch:14s} {got['epoch_s']:7.2f} s  ({got['mode']})", flush=True)
        span, shared = _together(archs, images, labels, train_idx, val_idx, proto, device)
        spans.append(span)
        for arch in archs:
            projected[arch].append(shared[arch]["epoch_s"])
            walls[arch].append(shared[arch]["wall_s"])
        print(f"  {rep + 1}: at once {span:7.2f} s for the {len(archs)} second epochs", flush=True)

    print(f"medians over {args.repeats} repeat(s), (min-max) where more than one:")
    print(f"{'model':14s} | alone s | shared projected s | projected/alone | shared wall s")
    for arch in archs:
        ratio = statistics.median(projected[arch]) / statistics.median(solo[arch])
        print(f"{arch:14s} | {fmt(solo[arch])} | {fmt(projected[arch])} | {ratio:.2f} | {fmt(walls[arch])}")
    totals = [sum(solo[a][r] for a in archs) for r in range(args.repeats)]
    gains = [t / s for t, s in zip(totals, spans)]
    print(f"second epochs: {fmt(totals)} s one at a time, {fmt(spans)} s at once: gain {fmt(gains)}x")


def _together(archs, images, labels, train_idx, val_idx, proto, device) -> tuple[float, dict]:
    """All trials at once, one thread and one CUDA stream each: (span of their second epochs,
    each trial's figures)."""
    gate = GpuShare(len(archs))
    shared, marks = {}, {a: {} for a in archs}
    barrier = threading.Barrier(len(archs))

    def run(arch: str) -> None:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            try:
                shared[arch] = _trial(arch, images, labels, train_idx, val_idx, proto, device, marks[arch], barrier,
                                      gate)
            except BaseException:
                barrier.abort()  # the others must not wait for this one
                raise

    threads = [threading.Thread(target=run, args=(a,)) for a in archs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missing = [a for a in archs if a not in shared]
    if missing:
        raise SystemExit(f"shared trials that did not finish: {', '.join(missing)}")
    return max(m["end"] for m in marks.values()) - min(m["start"] for m in marks.values()), shared

if __name__ == "__main__":
    main()
