"""Whether cuDNN autotuning makes the top-only feature pass faster, and what the tuning costs.

Question: `--train-only-top-layer` runs each frozen backbone once over every image at batch 256
(bf16 autocast, channels-last, eval, no grad) with cuDNN's heuristics, the setting chosen for the
batch-16 training step (bench/tuning.py). The feature passes are most of a top-only run's
training time. Per model and way of picking kernels (``heuristics``; ``autotuned``: cuDNN times
candidate kernels for each shape at its first call), in a fresh process each (cuDNN's plan cache
starts empty): the first call at batch 256 (what tuning costs) and images/s, the median of 3
timed stretches of --batches batches with min and max, device-synchronised; then the projected
pass over --images images (first call + images / rate), which is what a trial would pay.

    PYTHONPATH=src python3 bench/feature_pass.py --out feature_pass.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from harness import child_rows, machine, parser, write_json  # bench/, beside this script

MODELS = "alexnet,resnet34,resnet152,mobilenet_v2,densenet121,densenet201,googlenet,inception_v3"


def child(arch: str, mode: str, batch: int, batches: int) -> dict:
    import torch
    import torchvision

    torch.backends.cudnn.benchmark = mode == "autotuned"
    device = torch.device("cuda")
    size = 299 if arch == "inception_v3" else 224
    kwargs = {"aux_logits": False, "init_weights": False} if arch in ("inception_v3", "googlenet") else {}
    model = torchvision.models.get_model(arch, weights=None, num_classes=10, **kwargs).to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)

    def forward():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    forward()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    forward()  # a second call: anything left of the first's one-off work
    rates = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(batches):
            forward()
        torch.cuda.synchronize()
        rates.append(batch * batches / (time.perf_counter() - t0))
    return {"model": arch, "mode": mode, "batch": batch, "input": size, "first_call_s": first_s,
            "images_per_s": statistics.median(rates), "images_per_s_min": min(rates), "images_per_s_max": max(rates)}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=40, help="batches per timed stretch")
    ap.add_argument("--images", type=int, default=43_999, help="images of the projected pass (the 55k set's training part)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.batch, args.batches)), flush=True)
        return
    rows = []
    print(f"{'model':14s} {'mode':10s} {'first s':>8s} {'img/s':>9s} {'(min-max)':>17s} {'pass s':>7s}")
    for arch in args.models.split(","):
        for mode in ("heuristics", "autotuned"):
            got, why = child_rows([sys.executable, __file__, "--child", arch, mode, "--batch", str(args.batch),
                                   "--batches", str(args.batches)], timeout=600)
            if not got:
                print(f"{arch:14s} {mode:10s} failed: {why}")
                continue
            row = got[0] | {"pass_s": got[0]["first_call_s"] + args.images / got[0]["images_per_s"]}
            rows.append(row)
            print(f"{arch:14s} {mode:10s} {row['first_call_s']:8.2f} {row['images_per_s']:9.0f} "
                  f"({row['images_per_s_min']:7.0f}-{row['images_per_s_max']:7.0f}) {row['pass_s']:7.2f}", flush=True)
    if args.out:
        write_json(args.out, {"meta": machine("cuda"), "rows": rows})


if __name__ == "__main__":
    main()
