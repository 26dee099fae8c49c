"""Several graphed training steps replayed at once in one process, each on its own CUDA stream.

Question measured: once bakeoff's batch-16 step is a CUDA graph, packing trials as separate
processes adds nothing (their kernels time-slice the GPU rather than overlap). Graphs replayed
on separate streams of one process may overlap. This script builds K trials of bakeoff's real
training step (`bakeoff.engines.torch.step.Step`: bf16 autocast, channels-last, capturable Adam,
whole step captured), feeds each from images already on the GPU, and measures the total
images/s of all K, replayed round-robin on one stream (serial) and on K streams (concurrent),
after warm-up, device-synchronised; median of repeats with min-max.

    PYTHONPATH=src python3 bench/streams.py --models resnet34,mobilenet_v2 --copies 1,2,4
    PYTHONPATH=src python3 bench/streams.py --mix alexnet,resnet34,resnet152,mobilenet_v2,densenet121
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from bakeoff.engines.torch.build import build_model
from bakeoff.engines.torch.step import make_optimizer, Step
from bakeoff.protocol import Protocol
from bakeoff.zoo import resolve

from harness import parser, write_json  # bench/, beside this script


def _trial(arch: str, device, batch: int):
    spec = resolve(f"torchvision/{arch}")
    proto = Protocol(pretrained=False, batch_size=batch)
    model, _ = build_model(spec, 10, False)
    model = model.to(device).to(memory_format=torch.channels_last).train()
    opt = make_optimizer(proto, model.parameters(), capturable=True)
    shape = (batch, 3, spec.input_size, spec.input_size)
    step = Step(model, opt, proto, device, shape, channels_last=True)
    if step.graph is None:
        raise RuntimeError(f"{arch}: capture failed: {getattr(step, 'capture_error', '')}")
    x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    step.static_x.copy_(x)
    step.static_y.copy_(y)
    return step


def replay_rate(steps, streams, n_steps: int, batch: int, device) -> float:
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        for step, stream in zip(steps, streams):
            with torch.cuda.stream(stream):
                step.graph.replay()
    torch.cuda.synchronize(device)
    return len(steps) * n_steps * batch / (time.perf_counter() - t0)


def measure(archs: list[str], device, batch: int, n_steps: int, repeats: int) -> dict:
    steps = [_trial(a, device, batch) for a in archs]
    one = [torch.cuda.current_stream(device)] * len(steps)
    many = [torch.cuda.Stream(device) for _ in steps]
    for s in many:
        s.wait_stream(torch.cuda.current_stream(device))
    replay_rate(steps, one, 10, batch, device)
    replay_rate(steps, many, 10, batch, device)  # warm-up both ways
    serial = [replay_rate(steps, one, n_steps, batch, device) for _ in range(repeats)]
    concurrent = [replay_rate(steps, many, n_steps, batch, device) for _ in range(repeats)]
    del steps
    torch.cuda.empty_cache()
    return {"models": archs, "serial_img_s": float(np.median(serial)), "serial_range": [min(serial), max(serial)],
            "concurrent_img_s": float(np.median(concurrent)),
            "concurrent_range": [min(concurrent), max(concurrent)],
            "gain": float(np.median(concurrent) / np.median(serial))}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--models", default="", help="each measured with K copies of itself")
    ap.add_argument("--copies", default="1,2,4")
    ap.add_argument("--mix", default="", help="one copy each of these, all at once")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    rows = []
    for arch in [a for a in args.models.split(",") if a]:
        for k in [int(c) for c in args.copies.split(",")]:
            rows.append(measure([arch] * k, device, args.batch, args.steps, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    if args.mix:
        rows.append(measure(args.mix.split(","), device, args.batch, args.steps, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "batch": args.batch,
              "steps": args.steps, "repeats": args.repeats, "rows": rows}
    if args.out:
        write_json(args.out, result, indent=1)


if __name__ == "__main__":
    main()
