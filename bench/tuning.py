"""What cuDNN autotuning of the training step costs and buys, per model.

Question: in a shared run, the eight captures at the start take about 100 s with the GPU near
idle (bench/RESULTS.md): each capture's warm-up tunes every convolution shape on the host.
This script measures, for each model and each way of picking kernels (``tuned``: bakeoff's
default, autotuning on inside ``tuned_alone``; ``heuristics``: cuDNN's heuristics only), in a
fresh process each (cuDNN's plan caches start empty):

- the capture: wall seconds, and the process's CPU seconds meanwhile (CPU close to wall: the
  time goes on the host, not on the GPU);
- the graphed step's images/s: median of 3 timed stretches of ``--steps`` replays after 20
  warm-up replays, device-synchronised, with min and max;
- the first and second call of an evaluation batch of 128 (no grad, eval mode), a shape the
  step did not tune: what a new shape costs under bakeoff's heuristics.

    PYTHONPATH=src python3 bench/tuning.py --models alexnet,resnet34,mobilenet_v2 --steps 200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time

ARCHS = ["alexnet", "resnet34", "resnet152", "mobilenet_v2", "densenet121", "densenet201", "googlenet",
         "inception_v3"]


def child(arch: str, mode: str, steps: int) -> dict:
    import torch

    import bakeoff.engines.torch_fit as tf
    from bakeoff.engines.torch_build import build_model
    from bakeoff.protocol import Protocol
    from bakeoff.zoo import resolve

    if mode == "heuristics":  # the capture keeps the GPU to itself but never turns tuning on
        tf.tuned_alone = lambda device, reason: tf.share().exclusive(device, reason)
    device = torch.device("cuda")
    spec = resolve(f"torchvision/{arch}")
    proto = Protocol(pretrained=False)
    model, _ = build_model(spec, 10, False)
    model = model.to(device).to(memory_format=torch.channels_last).train()
    opt = tf._optimizer(proto, model.parameters(), capturable=True)
    shape = (proto.batch_size, 3, spec.input_size, spec.input_size)
    torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    step = tf._Step(model, opt, proto, device, shape, channels_last=True)
    torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if step.graph is None:
        return {"model": arch, "mode": mode, "error": step.capture_error}
    step.static_x.copy_(torch.randn(shape, device=device))
    step.static_y.copy_(torch.randint(0, 10, (shape[0],), device=device))
    for _ in range(20):
        step.graph.replay()
    rates = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step.graph.replay()
        torch.cuda.synchronize()
        rates.append(steps * shape[0] / (time.perf_counter() - t0))
    model.eval()
    x = torch.randn((128, *shape[1:]), device=device).contiguous(memory_format=torch.channels_last)
    calls = []
    with torch.no_grad(), tf.autocast_for(proto, device):
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            torch.cuda.synchronize()
            calls.append(time.perf_counter() - t0)
    return {"model": arch, "mode": mode, "capture_s": wall, "capture_cpu_s": cpu,
            "images_per_s": statistics.median(rates), "images_per_s_min": min(rates),
            "images_per_s_max": max(rates), "eval128_first_s": calls[0], "eval128_second_s": calls[1],
            "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ARCHS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.steps)))
        return
    rows = []
    for arch in a.models.split(","):
        for mode in ("tuned", "heuristics"):
            done = subprocess.run([sys.executable, __file__, "--child", arch, mode, "--steps", str(a.steps)],
                                  capture_output=True, text=True)
            with contextlib.suppress(ValueError, IndexError):
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
                continue
            rows.append({"model": arch, "mode": mode, "error": done.stderr.strip().splitlines()[-1:]})
            print(json.dumps(rows[-1]), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=2)
    print(f"\n{'model':14s} {'mode':10s} {'capture s':>9s} {'CPU s':>6s} {'img/s (min-max)':>22s} "
          f"{'eval128 1st s':>13s} {'2nd s':>6s}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:14s} {r['mode']:10s} error: {r['error']}")
            continue
        spread = f"{r['images_per_s']:,.0f} ({r['images_per_s_min']:,.0f}-{r['images_per_s_max']:,.0f})"
        print(f"{r['model']:14s} {r['mode']:10s} {r['capture_s']:9.1f} {r['capture_cpu_s']:6.1f} {spread:>22s} "
              f"{r['eval128_first_s']:13.2f} {r['eval128_second_s']:6.3f}")


if __name__ == "__main__":
    main()
