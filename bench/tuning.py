"""What cuDNN autotuning of the training step costs and buys, per model.

Question: in a shared run, the eight captures at the start took about 100 s with the GPU near
idle (docs/results.md): each capture's warm-up autotuned every convolution shape on the host.
This script measures, for each model and each way of picking kernels (``tuned``: autotuning on
inside ``engines.torch.step.tuned``, bakeoff's default until 2026-12; ``heuristics``: cuDNN's
heuristics only, the default since this script's figures), in a fresh process each (cuDNN's
plan caches start empty):

- the capture: wall seconds, and the process's CPU seconds meanwhile (CPU close to wall: the
  time goes on the host, not on the GPU);
- the graphed step's images/s: median of 3 timed stretches of ``--steps`` replays after 20
  warm-up replays, device-synchronised, with min and max;
- the first and second call of an evaluation batch of 128 (no grad, eval mode), a shape the
  step did not tune: what a new shape costs under bakeoff's heuristics.

With ``--limits 1,3``, also tuned with ``torch.backends.cudnn.benchmark_limit`` at each of
those values: fewer candidate kernels timed per shape, a shorter capture, perhaps a slower step.

With ``--together``, also all the models in one more fresh process, one thread each, capturing
at once through a shared run's gate with ``tune_together`` (``GpuShare.tuning``: tuners'
warm-ups overlap, their captures take turns, nothing else runs): the wall seconds until the last capture ended, then each graph's images/s timed alone,
as above, to see whether candidates timed beside other tuners' still pick fast kernels.

    PYTHONPATH=src python3 bench/tuning.py --models alexnet,resnet34,mobilenet_v2 --steps 200 --together
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from harness import child_rows, parser, write_json  # bench/, beside this script

ARCHS = ["alexnet", "resnet34", "resnet152", "mobilenet_v2", "densenet121", "densenet201", "googlenet",
         "inception_v3"]


def build_step(arch: str, channels_last: bool = True):
    import torch

    import bakeoff.engines.torch.step as tf
    from bakeoff.engines.torch.build import build_model
    from bakeoff.protocol import Protocol
    from bakeoff.zoo import resolve

    spec = resolve(f"torchvision/{arch}")
    proto = Protocol(pretrained=False)
    model, _ = build_model(spec, 10, False)
    model = model.to("cuda")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = tf.make_optimizer(proto, model.parameters(), capturable=True)
    return model, opt, proto, (proto.batch_size, 3, spec.input_size, spec.input_size)


def child(arch: str, mode: str, steps: int) -> dict:
    import torch

    import bakeoff.engines.torch.step as tf

    tf.AUTOTUNE = mode != "heuristics"
    if mode.startswith("limit"):  # tuning on, timing at most this many candidate kernels per shape
        torch.backends.cudnn.benchmark_limit = int(mode[len("limit"):])
    device = torch.device("cuda")
    model, opt, proto, shape = build_step(arch)
    torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    step = tf.Step(model, opt, proto, device, shape, channels_last=True)
    torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if step.graph is None:
        return {"model": arch, "mode": mode, "error": step.capture_error}
    return {"model": arch, "mode": mode, "capture_s": wall, "capture_cpu_s": cpu} | _timed(step, model, proto,
                                                                                            shape, steps)


def replay_rates(step, shape, steps: int) -> dict:
    """A graphed step's images/s on random inputs: median, min and max of 3 timed stretches of
    ``steps`` replays after 20 warm-up replays, device-synchronised."""
    import torch

    device = torch.device("cuda")
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
    return {"images_per_s": statistics.median(rates), "images_per_s_min": min(rates),
            "images_per_s_max": max(rates)}


def _timed(step, model, proto, shape, steps: int) -> dict:
    import torch

    import bakeoff.engines.torch.step as tf

    device = torch.device("cuda")
    rates = replay_rates(step, shape, steps)
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
    return rates | {"eval128_first_s": calls[0], "eval128_second_s": calls[1],
                    "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
                    "cudnn": torch.backends.cudnn.version()}


def together(archs: list[str], steps: int) -> list[dict]:
    """All of ``archs`` capturing at once in one process, one thread and place each, through a
    shared run's gate; then each graph timed alone."""
    import threading

    import torch

    import bakeoff.engines.torch.step as tf
    from bakeoff.gpu_share import GpuShare

    tf.AUTOTUNE = True  # what tune_together is for: overlapping autotuning's host work
    device, gate = torch.device("cuda"), GpuShare(len(archs), tune_together=True)
    built = {a: build_step(a) for a in archs}
    steps_of, ends, ready = {}, {}, threading.Barrier(len(archs))

    def capture(arch):
        model, opt, proto, shape = built[arch]
        with gate.place(device):
            ready.wait()
            steps_of[arch] = tf.Step(model, opt, proto, device, shape, channels_last=True, gate=gate)
            torch.cuda.current_stream(device).synchronize()
            ends[arch] = time.perf_counter()

    torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=capture, args=(a,)) for a in archs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall_all, cpu_all = time.perf_counter() - wall, time.process_time() - cpu
    rows = []
    for arch in archs:
        step = steps_of.get(arch)
        row = {"model": arch, "mode": "together", "capture_s": ends.get(arch, wall) - wall,
               "all_captures_s": wall_all, "all_captures_cpu_s": cpu_all}
        if step is None or step.graph is None:
            rows.append(row | {"error": getattr(step, "capture_error", "no step")})
            continue
        model, _, proto, shape = built[arch]
        rows.append(row | {"capture_cpu_s": float("nan")} | _timed(step, model, proto, shape, steps))
    return rows


def _child_rows(models: str, mode: str, steps: int) -> list[dict]:
    """The rows a fresh child process prints for ``models`` in ``mode``, or one error row."""
    rows, why = child_rows([sys.executable, __file__, "--child", models, mode, "--steps", str(steps)])
    return rows or [{"model": models, "mode": mode, "error": why}]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--models", default=",".join(ARCHS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None)
    ap.add_argument("--together", action="store_true", help="also every model capturing at once in one process")
    ap.add_argument("--limits", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="also tuned with cudnn.benchmark_limit at each of these (PyTorch's default: 10)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        if a.child[1] == "together":
            for row in together(a.child[0].split(","), a.steps):
                print(json.dumps(row))
        else:
            print(json.dumps(child(a.child[0], a.child[1], a.steps)))
        return
    runs = [(arch, mode) for arch in a.models.split(",")
            for mode in ("tuned", "heuristics", *(f"limit{n}" for n in a.limits))]
    rows = []
    for models, mode in runs + ([(a.models, "together")] if a.together else []):
        for row in _child_rows(models, mode, a.steps):
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        write_json(a.out, rows)
    print(f"\n{'model':14s} {'mode':10s} {'capture s':>9s} {'CPU s':>6s} {'img/s (min-max)':>22s} "
          f"{'eval128 1st s':>13s} {'2nd s':>6s}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:14s} {r['mode']:10s} error: {r['error']}")
            continue
        spread = f"{r['images_per_s']:,.0f} ({r['images_per_s_min']:,.0f}-{r['images_per_s_max']:,.0f})"
        print(f"{r['model']:14s} {r['mode']:10s} {r['capture_s']:9.1f} {r['capture_cpu_s']:6.1f} {spread:>22s} "
              f"{r['eval128_first_s']:13.2f} {r['eval128_second_s']:6.3f}")
    for r in rows:
        if r.get("mode") == "together" and "all_captures_s" in r:
            print(f"\ntogether: every capture ended {r['all_captures_s']:.1f} s after they started "
                  f"({r['all_captures_cpu_s']:.1f} CPU s); alone, one after another, they took "
                  f"{sum(x['capture_s'] for x in rows if x.get('mode') == 'tuned' and 'capture_s' in x):.1f} s")
            break


if __name__ == "__main__":
    main()
