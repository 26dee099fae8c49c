"""Can bakeoff's training step be captured as a CUDA graph, alone and beside other trials?

Question: `bakeoff run --trials-per-gpu N` runs N trials in one process, one CUDA stream each.
On the H200 every trial's capture failed there while the same capture succeeded alone. This
script isolates that: part 1 captures each model's real step (`engines.torch.step.Step`: bf16,
channels-last, capturable fused Adam) in each capture way, alone, and prints the mode, the
error and the mean loss of five steps on one fixed batch (equal losses: the ways compute the
same); part 2 builds and captures N trials at once in N threads through the same gate the
worker uses, and prints what each capture said.

    PYTHONPATH=src python3 bench/capture_check.py --models resnet34,mobilenet_v2 --threads 4
"""

from __future__ import annotations

import threading

import torch

import bakeoff.engines.torch.step as tf
from bakeoff.engines.torch.build import build_model
from bakeoff.gpu_share import GpuShare
from bakeoff.protocol import Protocol
from bakeoff.zoo import resolve

from harness import parser  # bench/, beside this script

def _model(arch: str, device):
    torch.manual_seed(0)
    model, _ = build_model(resolve(f"torchvision/{arch}"), 10, False)
    return model.to(device).to(memory_format=torch.channels_last).train()


def _step(arch: str, device, ways: list[str] | None = None, gate: GpuShare | None = None) -> str:
    proto = Protocol(pretrained=False)
    model = _model(arch, device)
    opt = tf.make_optimizer(proto, model.parameters(), capturable=True)
    original = tf.capture_ways
    if ways is not None:
        tf.capture_ways = lambda concurrent: ways
    try:
        step = tf.Step(model, opt, proto, device, (16, 3, 224, 224), True, gate=gate)
    finally:
        tf.capture_ways = original
    if step.needs_alone:
        return f"needs the GPU alone: {step.needs_alone}"
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(16, 3, 224, 224, device=device, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device=device, generator=gen)
    for _ in range(5):
        step(x, y)
    torch.cuda.current_stream(device).synchronize()
    return f"{step.mode:12s} loss={float(step.loss_sum) / 80:.4f} error={step.capture_error}"


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--models", default="resnet34,mobilenet_v2")
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    archs = args.models.split(",")
    print("part 1: alone, main thread")
    for arch in archs:
        for way in tf.capture_ways(concurrent=False):  # every way a lone trial may try
            print(f"  {arch:14s} {way:26s} {_step(arch, device, [way])}", flush=True)
    print(f"part 2: {args.threads} trials at once, one thread and one stream each")
    gate = GpuShare(args.threads)
    said: dict[int, str] = {}

    def trial(i: int) -> None:
        with torch.cuda.stream(torch.cuda.Stream(device)):
            try:
                said[i] = _step(archs[i % len(archs)], device, gate=gate)
            except Exception as exc:
                said[i] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(args.threads):
        print(f"  trial {i} {archs[i % len(archs)]:14s} {said.get(i)}", flush=True)


if __name__ == "__main__":
    main()
