"""What the first forward pass at a new batch size costs, channels-last against NCHW.

Question: in `--train-only-top-layer` runs mobilenet_v2's feature pass and latency measurement
took seconds more than resnet34's, though its steady forward pass is as fast. This script
times, per model and memory format, the first bf16 eval forward at batch 1, 64 and 256 in a
fresh process (cuDNN autotuning off, as in top-only runs), then the same sizes again, and the
median of 5 later calls; device-synchronised.

    PYTHONPATH=src python3 bench/first_call.py --models mobilenet_v2,resnet34
"""

from __future__ import annotations

import statistics

import torch
import torchvision

from bakeoff.measure import time_calls

from harness import parser  # bench/, beside this script


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--models", default="mobilenet_v2,resnet34")
    ap.add_argument("--batches", default="1,64,256")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = False
    device = torch.device("cuda")
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print(f"{'model':14s} {'format':14s} {'batch':>5s} {'first ms':>9s} {'second ms':>9s} {'median ms':>9s}")
    for arch in args.models.split(","):
        for fmt in (torch.channels_last, torch.contiguous_format):
            model = torchvision.models.get_model(arch, weights=None, num_classes=10).to(device).eval()
            model = model.to(memory_format=fmt)
            sizes = [int(b) for b in args.batches.split(",")]
            first: dict[int, list[float]] = {b: [] for b in sizes}
            for _ in range(2):  # the first round meets each shape for the first time
                for b in sizes:
                    x = torch.randn(b, 3, 224, 224, device=device).contiguous(memory_format=fmt)
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                        first[b] += time_calls(lambda: model(x), sync, 0, 1)
            for b in sizes:
                x = torch.randn(b, 3, 224, 224, device=device).contiguous(memory_format=fmt)
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    med = statistics.median(time_calls(lambda: model(x), sync, 0, 5))
                name = "channels-last" if fmt == torch.channels_last else "NCHW"
                print(f"{arch:14s} {name:14s} {b:5d} {first[b][0]:9.1f} {first[b][1]:9.1f} {med:9.2f}", flush=True)


if __name__ == "__main__":
    main()
