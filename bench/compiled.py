"""Whether compiled kernels make bakeoff's graphed training step cheaper on the GPU, per model.

Question: a shared run of the eight models keeps the GPU busy (100% in nearly every sample,
docs/results.md) and is bound by the GPU work of its steps at batch 16. Each step is already
replayed from a CUDA graph, so launching costs nothing; what is left is the kernels. Here the
same step (``engines.torch.step.Step``: bf16 autocast, channels-last, fused Adam, captured in a graph)
is built twice per model, in one fresh process per model:

- ``compiled``: the model wrapped in ``torch.compile`` (default mode: generated kernels that fuse
  normalisation, activations and the like; convolutions stay with cuDNN), compiled during the
  capture's warm-up, its kernels then captured in the graph. Measured first, so it pays the cold
  cuDNN plan cache too, and with an empty compile cache of its own (a first run's cost).
- ``eager``: the model as bakeoff trains it today.

For each: the capture's wall seconds (for ``compiled``, compilation included), the graphed
step's images/s (median of 3 timed stretches of ``--steps`` replays after 20 warm-up replays,
device-synchronised; min and max), and, alone on the GPU, a replay's time is its GPU work. Then
the largest difference of the two models' logits on one evaluation batch with the same weights
(bf16: differences of order 1e-2 are rounding).

    PYTHONPATH=src python3 bench/compiled.py --models densenet201,resnet152 --steps 100 --json out.json

Models run one after another in the order given until ``--deadline`` seconds have passed.

A compile cache kept across runs: with ``--cache DIR`` every child uses that one cache, and
``--passes 2`` runs the models a second time over it (a re-run's cost: Dynamo still traces, the
generated kernels are loaded, not generated). ``--parallel`` runs a pass's children all at
once, as trials compiling side by side would; their step rates then overlap on the GPU and
only their compile seconds mean anything (``--variants compiled`` skips the eager twin).

    PYTHONPATH=src python3 bench/compiled.py --cache cc --passes 2 --parallel-first --steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from tuning import replay_rates  # bench/, beside this script

from harness import child_rows, parser, write_json  # bench/, beside this script

ARCHS = ["densenet201", "resnet152", "inception_v3", "densenet121", "mobilenet_v2", "googlenet", "resnet34",
         "alexnet"]


def child(arch: str, steps: int, variants: tuple[str, ...] = ("compiled", "eager")) -> dict:
    import torch

    import bakeoff.engines.torch.step as tf
    from bakeoff.engines.torch.build import build_model
    from bakeoff.protocol import Protocol
    from bakeoff.zoo import resolve

    device = torch.device("cuda")
    spec, proto = resolve(f"torchvision/{arch}"), Protocol(pretrained=False)
    shape = (proto.batch_size, 3, spec.input_size, spec.input_size)
    torch.manual_seed(0)
    eager, _ = build_model(spec, 10, False)
    eager = eager.to(device).to(memory_format=torch.channels_last).train()
    twin, _ = build_model(spec, 10, False)
    twin = twin.to(device).to(memory_format=torch.channels_last).train()
    twin.load_state_dict(eager.state_dict())
    row = {"model": arch, "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "batch": shape[0], "size": shape[2]}
    compiled = torch.compile(twin)
    for name, model in (("compiled", compiled), ("eager", eager)):
        if name not in variants:
            continue
        opt = tf.make_optimizer(proto, model.parameters(), capturable=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            step = tf.Step(model, opt, proto, device, shape, channels_last=True)
        except Exception as exc:  # noqa: BLE001 - a row that says why, and the next variant
            row[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
            continue
        torch.cuda.synchronize()
        capture_s = time.perf_counter() - t0
        if step.graph is None:
            row[name] = {"error": step.capture_error, "capture_s": capture_s}
            continue
        row[name] = {"capture_s": capture_s, "mode": step.mode} | replay_rates(step, shape, steps)
        del step, opt
    if "images_per_s" in row.get("compiled", {}) and "images_per_s" in row.get("eager", {}):
        row["speedup"] = row["compiled"]["images_per_s"] / row["eager"]["images_per_s"]
        twin.load_state_dict(eager.state_dict())  # trained apart: the same weights again
        x = torch.randn((64, *shape[1:]), device=device).contiguous(memory_format=torch.channels_last)
        eager.eval()
        twin.eval()
        with torch.no_grad(), tf.autocast_for(proto, device):
            logits = eager(x).float()
            row["max_logit_diff"] = float((logits - compiled(x).float()).abs().max())
            row["logit_scale"] = float(logits.abs().max())
    return row


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--models", default=",".join(ARCHS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--deadline", type=float, default=3600, help="start no model after this many seconds")
    ap.add_argument("--json", default=None, help="write the rows here as they come")
    ap.add_argument("--cache", default=None, help="one compile cache for every child (default: a fresh one each)")
    ap.add_argument("--passes", type=int, default=1, help="run the models this many times over --cache")
    ap.add_argument("--parallel-first", action="store_true", help="the first pass's children all at once")
    ap.add_argument("--variants", default="compiled,eager")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps, tuple(a.variants.split(",")))))
        return
    t0, rows = time.perf_counter(), []

    def env_for(cache: str) -> dict:
        return os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}

    def cmd(arch: str, variants: str) -> list[str]:
        return [sys.executable, __file__, "--child", arch, "--steps", str(a.steps), "--variants", variants]

    def parsed(arch: str, out: str, err: str) -> dict:
        found = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return found[0] if found else {"model": arch, "error": err.strip().splitlines()[-3:]}

    def keep(row: dict, pass_no: int) -> None:
        row |= {"wall_s": time.perf_counter() - t0, "pass": pass_no, "cache": "shared" if a.cache else "fresh"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.json:
            write_json(a.json, rows)

    archs = a.models.split(",")
    for pass_no in range(1, a.passes + 1):
        if pass_no == 1 and a.parallel_first and a.cache:
            procs = {arch: subprocess.Popen(cmd(arch, "compiled"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True, env=env_for(a.cache)) for arch in archs}
            for arch, proc in procs.items():
                try:
                    out, err = proc.communicate(timeout=max(1.0, a.deadline - (time.perf_counter() - t0)))
                    keep(parsed(arch, out, err) | {"parallel": len(archs)}, pass_no)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    keep({"model": arch, "error": f"not finished in {a.deadline:.0f} s", "parallel": len(archs)},
                         pass_no)
            continue
        for arch in archs:
            left = a.deadline - (time.perf_counter() - t0)
            if left < 30:
                print(f"{arch}: not run, {left:.0f} s left")
                continue
            with tempfile.TemporaryDirectory() as fresh:  # an empty compile cache: a first run's cost
                found, why = child_rows(cmd(arch, a.variants), left, env_for(a.cache or fresh))
                row = found[0] if found else {"model": arch, "error": why}
            keep(row, pass_no)
    print(f"\n{'pass':4s} {'model':13s} {'eager img/s (min-max)':>24s} {'compiled img/s (min-max)':>26s} "
          f"{'x':>5s} {'capture s eager/compiled':>25s}")
    for r in rows:
        e, c = r.get("eager", {}), r.get("compiled", {})
        if "images_per_s" not in e or "images_per_s" not in c:
            if "capture_s" in c:
                note = f"compiled capture {c['capture_s']:.1f} s" + (f" ({r['parallel']} at once)" if "parallel" in r else "")
                print(f"{r['pass']:<4d} {r['model']:13s} {note}")
            else:
                print(f"{r['pass']:<4d} {r['model']:13s} error: {r.get('error') or e.get('error') or c.get('error')}")
            continue
        fmt = lambda v: f"{v['images_per_s']:,.0f} ({v['images_per_s_min']:,.0f}-{v['images_per_s_max']:,.0f})"  # noqa: E731
        print(f"{r['pass']:<4d} {r['model']:13s} {fmt(e):>24s} {fmt(c):>26s} {r['speedup']:5.2f} "
              f"{e['capture_s']:12.1f} / {c['capture_s']:.1f}")


if __name__ == "__main__":
    main()
