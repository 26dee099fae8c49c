"""Which memory format makes each model's graphed training step cheaper on the GPU.

Question: bakeoff trains every PyTorch model on a GPU in channels-last (NHWC), the layout
bf16 tensor-core convolutions prefer. A shared run of the eight models is bound by the GPU
work of their batch-16 steps, and half of that work is two DenseNets, whose many
concatenations and narrow convolutions may not gain from NHWC. For each model and format, in a
fresh process each (cuDNN's plan caches start empty, as in a run):

- building the step (``engines.torch.step.Step``: bf16 autocast, fused capturable Adam, three warm-up
  steps and the capture): wall seconds, a cold first call included; every neighbour of a
  shared run waits this long;
- the graphed step's images/s: median of 3 timed stretches of ``--steps`` replays after 20
  warm-up replays, device-synchronised, with min and max. Alone on the GPU a replay's time is
  its GPU work.

With ``--mix``, also all the models in one more process, one graph and stream each, replayed
round after round (one step of each model per round) as a shared run does, once with every
model in channels-last and once with each in the format that was faster alone: the seconds
per round, median of 3 stretches of ``--mix-rounds`` rounds.

    PYTHONPATH=src python3 bench/formats.py --steps 100 --mix --json formats.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from tuning import build_step, replay_rates  # bench/, beside this script

from harness import child_rows, parser, write_json  # bench/, beside this script

ARCHS = ["alexnet", "resnet34", "resnet152", "mobilenet_v2", "densenet121", "densenet201", "googlenet",
         "inception_v3"]
FORMATS = ["channels_last", "contiguous"]


def _step(arch: str, fmt: str):
    """The model's graphed step in ``fmt``, its batch shape, and the wall seconds building it took."""
    import torch

    import bakeoff.engines.torch.step as tf

    torch.manual_seed(0)
    model, opt, proto, shape = build_step(arch, channels_last=fmt == "channels_last")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step = tf.Step(model, opt, proto, torch.device("cuda"), shape, channels_last=fmt == "channels_last")
    torch.cuda.synchronize()
    return step, shape, time.perf_counter() - t0


def child(arch: str, fmt: str, steps: int) -> dict:
    import torch

    step, shape, build_s = _step(arch, fmt)
    row = {"model": arch, "format": fmt, "build_s": build_s, "gpu": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
    if step.graph is None:
        return row | {"error": step.capture_error}
    return row | replay_rates(step, shape, steps)


def mix(formats: dict[str, str], rounds: int) -> dict:
    """Seconds per round of one replay of each model's graph, each on its own stream."""
    import torch

    from streams import replay_rate  # bench/, beside this script

    steps = [_step(a, f)[0] for a, f in formats.items()]
    for step in steps:
        shape = step.static_x.shape
        step.static_x.copy_(torch.randn(shape, device="cuda"))
        step.static_y.copy_(torch.randint(0, 10, (shape[0],), device="cuda"))
    streams, device, batch = [torch.cuda.Stream() for _ in steps], torch.device("cuda"), steps[0].batch
    replay_rate(steps, streams, 10, batch, device)  # warm-up
    times = [len(steps) * batch / replay_rate(steps, streams, rounds, batch, device) for _ in range(3)]
    return {"formats": formats, "round_s": statistics.median(times), "round_s_min": min(times),
            "round_s_max": max(times)}


def _run(args: list[str], timeout: float) -> dict:
    rows, why = child_rows([sys.executable, __file__, *args], timeout)
    return rows[0] if rows else {"error": why}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--models", default=",".join(ARCHS))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--mix", action="store_true", help="also the models replayed together, both ways")
    ap.add_argument("--mix-rounds", type=int, default=60)
    ap.add_argument("--json", default=None, help="write the rows here as they come")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mix-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.steps)))
        return
    if a.mix_child:
        print(json.dumps(mix(json.loads(a.mix_child), a.mix_rounds)))
        return
    archs, rows = a.models.split(","), []

    def keep(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.json:
            write_json(a.json, rows)

    for arch in archs:
        for fmt in FORMATS:
            keep({"model": arch, "format": fmt} | _run(["--child", arch, fmt, "--steps", str(a.steps)], 300))
    rate = {(r["model"], r["format"]): r.get("images_per_s") for r in rows}
    best = {m: max(FORMATS, key=lambda f: rate.get((m, f)) or 0) for m in archs}
    if a.mix:
        for formats in ({m: "channels_last" for m in archs}, best):
            keep({"mix": True} | _run(["--mix-child", json.dumps(formats), "--mix-rounds", str(a.mix_rounds)], 400))
            if formats == best:
                break
    print(f"\n{'model':13s} {'format':14s} {'build s':>8s} {'img/s (min-max)':>24s}")
    for r in rows:
        if "mix" in r:
            continue
        figs = (f"{r['images_per_s']:,.0f} ({r['images_per_s_min']:,.0f}-{r['images_per_s_max']:,.0f})"
                if "images_per_s" in r else f"error: {r.get('error')}")
        print(f"{r['model']:13s} {r['format']:14s} {r.get('build_s', float('nan')):8.1f} {figs:>24s}")
    for r in rows:
        if "mix" in r:
            label = "all channels-last" if set(r.get("formats", {}).values()) == {"channels_last"} else "best each"
            print(f"together, {label}: "
                  + (f"{r['round_s'] * 1000:.2f} ms per round ({r['round_s_min'] * 1000:.2f}-"
                     f"{r['round_s_max'] * 1000:.2f})" if "round_s" in r else f"error: {r.get('error')}"))


if __name__ == "__main__":
    main()
