"""Whether compiled kernels make bakeoff's graphed training step cheaper on the GPU, per model.

Question: a shared run of the eight models keeps the GPU busy (100% in nearly every sample,
bench/RESULTS.md) and is bound by the GPU work of its steps at batch 16. Each step is already
replayed from a CUDA graph, so launching costs nothing; what is left is the kernels. Here the
same step (``torch_step._Step``: bf16 autocast, channels-last, fused Adam, captured in a graph)
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

ARCHS = ["densenet201", "resnet152", "inception_v3", "densenet121", "mobilenet_v2", "googlenet", "resnet34",
         "alexnet"]


def child(arch: str, steps: int) -> dict:
    import torch

    import bakeoff.engines.torch_step as tf
    from bakeoff.engines.torch_build import build_model
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
        opt = tf._optimizer(proto, model.parameters(), capturable=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            step = tf._Step(model, opt, proto, device, shape, channels_last=True)
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ARCHS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--deadline", type=float, default=3600, help="start no model after this many seconds")
    ap.add_argument("--json", default=None, help="write the rows here as they come")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps)))
        return
    t0, rows = time.perf_counter(), []
    for arch in a.models.split(","):
        left = a.deadline - (time.perf_counter() - t0)
        if left < 30:
            print(f"{arch}: not run, {left:.0f} s left")
            continue
        with tempfile.TemporaryDirectory() as cache:  # an empty compile cache: a first run's cost
            env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
            try:
                done = subprocess.run([sys.executable, __file__, "--child", arch, "--steps", str(a.steps)],
                                      capture_output=True, text=True, env=env, timeout=left)
                found = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
                row = found[0] if found else {"model": arch, "error": done.stderr.strip().splitlines()[-3:]}
            except subprocess.TimeoutExpired:
                row = {"model": arch, "error": f"not finished in {left:.0f} s"}
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=2)
    print(f"\n{'model':13s} {'eager img/s (min-max)':>24s} {'compiled img/s (min-max)':>26s} {'x':>5s} "
          f"{'capture s eager/compiled':>25s}")
    for r in rows:
        e, c = r.get("eager", {}), r.get("compiled", {})
        if "images_per_s" not in e or "images_per_s" not in c:
            print(f"{r['model']:13s} error: {r.get('error') or e.get('error') or c.get('error')}")
            continue
        fmt = lambda v: f"{v['images_per_s']:,.0f} ({v['images_per_s_min']:,.0f}-{v['images_per_s_max']:,.0f})"  # noqa: E731
        print(f"{r['model']:13s} {fmt(e):>24s} {fmt(c):>26s} {r['speedup']:5.2f} "
              f"{e['capture_s']:12.1f} / {c['capture_s']:.1f}")


if __name__ == "__main__":
    main()
