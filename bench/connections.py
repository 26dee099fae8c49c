"""How many trials' CUDA streams run at once, by the order the streams are made.

A GPU runs kernels of two streams at the same time only when the streams sit on different
hardware queues (CUDA_DEVICE_MAX_CONNECTIONS of them, 8 by default, at most 32); kernels of
streams on one queue run one after the other. ``gpu_share`` gives each of up to 8 places one
stream per priority level (4). This script makes 8 places' streams in two orders, place by
place (each place's four levels, then the next place's: what ``GpuShare.place`` does) and level
by level, and measures how many of the places' streams run at once: each gets one CUDA graph of K
kernels that spin one GPU thread for T microseconds (``torch.cuda._sleep``, so the GPU itself is
never full), all eight replayed together. Concurrency = (8 x one stream's time alone) / (the
eight's time together): 8 when every stream has a queue of its own.

Two sets of streams per order: each place's level-0 stream (where every trial starts) and
"ranked" levels 0,0,1,1,2,2,3,3 (what ``prioritize`` hands out to 8 trials). Each setting of
CUDA_DEVICE_MAX_CONNECTIONS runs in a process of its own (the driver reads it at start-up).
Median of repeats after a warm-up, with min and max.

    PYTHONPATH=src python3 bench/connections.py --connections 8,32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from harness import child_rows, parser, write_json  # bench/, beside this script

PLACES, LEVELS = 8, 4


def _as_bakeoff_makes_them(device):
    from bakeoff.gpu_share import PRIORITY_LEVELS, GpuShare

    assert PRIORITY_LEVELS == LEVELS
    return GpuShare(PLACES).streams(device)


def _level_major(device):
    import torch

    by_level = [[torch.cuda.Stream(device, priority=-lv) for _ in range(PLACES)] for lv in range(LEVELS)]
    return [[by_level[lv][p] for lv in range(LEVELS)] for p in range(PLACES)]


def _graph(device, stream, kernels: int, cycles: int):
    import torch

    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(g, stream=stream):
            for _ in range(kernels):
                torch.cuda._sleep(cycles)
    return g


def _time(device, jobs, repeats: int) -> list[float]:
    """Seconds to replay every (stream, graph) of ``jobs`` together; one warm-up round first."""
    import torch

    out = []
    for r in range(repeats + 1):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for stream, g in jobs:
            with torch.cuda.stream(stream):
                g.replay()
        torch.cuda.synchronize(device)
        if r:
            out.append(time.perf_counter() - t0)
    return out


def child(kernels: int, micros: float, repeats: int) -> dict:
    import torch

    device = torch.device("cuda")
    torch.cuda.init()
    cycles = int(micros * torch.cuda.get_device_properties(device).clock_rate / 1000)
    res = {"connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "8 (unset)"),
           "gpu": torch.cuda.get_device_name(device), "kernels": kernels, "kernel_us": micros, "rows": []}
    for order, make in (("place by place", _as_bakeoff_makes_them), ("level by level", _level_major)):
        places = make(device)
        for which, levels in (("level 0", [0] * PLACES), ("ranked", [p * LEVELS // PLACES for p in range(PLACES)])):
            streams = [places[p][levels[p]] for p in range(PLACES)]
            graphs = [_graph(device, s, kernels, cycles) for s in streams]
            alone = statistics.median(_time(device, [(streams[0], graphs[0])], repeats))
            together = _time(device, list(zip(streams, graphs)), repeats)
            med = statistics.median(together)
            res["rows"].append({"order": order, "streams": which, "alone_ms": alone * 1e3,
                                "together_ms": med * 1e3, "together_min_ms": min(together) * 1e3,
                                "together_max_ms": max(together) * 1e3,
                                "concurrency": PLACES * alone / med})
    return res


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--connections", default="8,32", help="CUDA_DEVICE_MAX_CONNECTIONS settings; 8 is the default")
    ap.add_argument("--kernels", type=int, default=50)
    ap.add_argument("--kernel-us", type=float, default=200.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.kernels, a.kernel_us, a.repeats)))
        return
    results = []
    for n in a.connections.split(","):
        env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS=n)
        if n == "8":
            env.pop("CUDA_DEVICE_MAX_CONNECTIONS")  # the default, as a run without the setting sees it
        rows, why = child_rows([sys.executable, __file__, "--child", "--kernels", str(a.kernels),
                                "--kernel-us", str(a.kernel_us), "--repeats", str(a.repeats)], env=env)
        if not rows:
            raise SystemExit(f"CUDA_DEVICE_MAX_CONNECTIONS={n}: {why}")
        results.append(rows[-1])
    if a.out:
        write_json(a.out, results)
    print(f"{results[0]['gpu']}: 8 streams, one graph each of {a.kernels} kernels of {a.kernel_us:.0f} us "
          f"(one GPU thread each); median of {a.repeats}")
    print(f"{'connections':>12} {'order':>15} {'streams':>8} {'alone ms':>9} {'together ms (min-max)':>24} "
          f"{'at once':>8}")
    for r in results:
        for row in r["rows"]:
            spread = f"{row['together_ms']:.2f} ({row['together_min_ms']:.2f}-{row['together_max_ms']:.2f})"
            print(f"{r['connections']:>12} {row['order']:>15} {row['streams']:>8} {row['alone_ms']:9.2f} "
                  f"{spread:>24} {row['concurrency']:8.2f}")


if __name__ == "__main__":
    main()
