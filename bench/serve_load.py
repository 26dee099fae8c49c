"""Load on `bakeoff serve`: requests/s and client-side p50/p95 latency at 1, 8 and 32 concurrent
clients, with micro-batching off (--max-batch 1) and on (--max-batch 32).

Claim measured: whether grouping concurrent requests into one forward pass raises throughput,
and what one image per request costs end to end (HTTP + decode + resize + forward) on this machine.
Each client is a thread with its own kept-alive connection, sending real JPEG validation images
one per request over loopback; a bounded number of requests (clients x --requests), after warm-up.
The clients are spread over several processes, so that the load generator's own interpreter lock
is not the limit; a /ping row at the most clients shows the ceiling of HTTP and the generator.
--workers compares server processes (`bakeoff serve --workers N`).

    PYTHONPATH=src python3 bench/serve_load.py --out serve_load.json                     # trains a model first
    PYTHONPATH=src python3 bench/serve_load.py --run runs/leaves --model timm/resnet50 --out serve_load.json

Needs fastapi and uvicorn (bakeoff[serve]); the client uses only the standard library.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from harness import machine, parser, write_json  # bench/, beside this script


def make_images(root: Path, classes: int = 4, per_class: int = 12, size=(400, 300)) -> Path:
    """Photo-sized synthetic JPEGs, one colour per class (a learnable task, realistic decode cost)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        rgb = rng.integers(0, 256, 3)
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.clip(rgb[None, None] + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.jpg", quality=90)
    return root


def train(model: str, image_size: int, device: str, work: Path) -> Path:
    from bakeoff.api import run_comparison

    out = work / "run"
    run_comparison(make_images(work / "images"), [model], out=out, epochs=1, batch_size=16, pretrained=False,
                   image_size=image_size, device=device, progress=False, command="bench/serve_load.py")
    return out


def _clients(url: str, bodies: list[bytes], ks: list[int], requests: int, warmup: int, path: str, barrier,
             results) -> None:
    """Clients ``ks`` as threads of this process; each puts (latencies ms, failures, start, end) on ``results``."""
    parts = urlsplit(url)
    headers = {"Content-Type": "application/x-image", "Accept": "application/json"}

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        latencies, failures = [], []

        def one(body):
            if path == "/ping":
                conn.request("GET", path)
            else:
                conn.request("POST", path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
            json.loads(data)

        try:
            for i in range(warmup):
                one(bodies[(k + i) % len(bodies)])
        except Exception as exc:
            failures.append(repr(exc))
        barrier.wait()  # every client of every process begins the timed part together
        t_start = time.perf_counter()
        for i in range(requests):
            body = bodies[(k * 7 + i) % len(bodies)]
            t0 = time.perf_counter()
            try:
                one(body)
            except Exception as exc:
                failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
                continue
            latencies.append((time.perf_counter() - t0) * 1000.0)
        results.put((latencies, failures, t_start, time.perf_counter()))
        conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in ks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def drive(url: str, bodies: list[bytes], clients: int, requests: int, procs: int = 1, warmup: int = 2,
          path: str = "/invocations") -> dict:
    """``clients`` clients spread over ``procs`` processes (one interpreter's lock would otherwise
    bound the load it can make), each sending ``warmup`` + ``requests`` sequential requests."""
    ctx = mp.get_context("spawn")
    procs = max(1, min(procs, clients))
    barrier, results = ctx.Barrier(clients), ctx.Queue()
    workers = [ctx.Process(target=_clients, args=(url, bodies, list(range(p, clients, procs)), requests, warmup,
                                                  path, barrier, results), daemon=True) for p in range(procs)]
    for w in workers:
        w.start()
    got = [results.get(timeout=600) for _ in range(clients)]
    for w in workers:
        w.join()
    # perf_counter is the system-wide monotonic clock on Linux: comparable across processes
    wall = max(end for *_, end in got) - min(start for _, _, start, _ in got)
    lat = np.concatenate([np.asarray(x) for x, *_ in got]) if any(x for x, *_ in got) else np.asarray([np.nan])
    failures = [f for _, fs, *_ in got for f in fs]
    done = int(sum(len(x) for x, *_ in got))
    return {"path": path, "clients": clients, "client_processes": procs, "requests": done,
            "failures": len(failures), "first_failure": failures[:1], "wall_s": wall,
            "requests_per_s": done / wall, "p50_ms": float(np.median(lat)), "p95_ms": float(np.percentile(lat, 95))}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--run", type=Path, help="--out folder of an earlier `bakeoff run` (default: train one)")
    ap.add_argument("--model", default="timm/resnet50", help="model id to serve (or to train when no --run)")
    ap.add_argument("--image-size", type=int, default=224, help="input size when training here")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels")
    ap.add_argument("--requests", type=int, default=50, help="timed requests per client")
    ap.add_argument("--max-batch", default="1,32", help="server settings to compare (1 = no micro-batching)")
    ap.add_argument("--workers", default="1", help="server processes (bakeoff serve --workers) to compare")
    ap.add_argument("--client-processes", type=int, default=max(1, (os.cpu_count() or 1) // 4),
                    help="processes the clients are spread over (default: a quarter of the cores)")
    ap.add_argument("--out", type=Path, required=True, help="JSON results")
    args = ap.parse_args()

    from bakeoff.engines.torch.fit import resolve_device
    from bakeoff.serve.endpoint_latency import validation_sample
    from bakeoff.serve.server import ServerProcess

    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bakeoff-serve-load-"))
    run = args.run or train(args.model, args.image_size, str(device), work)
    bodies = [f.read_bytes() for f in validation_sample(run, 64, seed=0, repeat=False)]
    load_before = os.getloadavg()[0]  # other work on the machine skews every figure: record it
    levels = [int(c) for c in args.clients.split(",")]
    # /ping at the most clients: what HTTP and this load generator allow with no image work
    loads = [(clients, "/invocations") for clients in levels] + [(max(levels), "/ping")]
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        for max_batch in [int(b) for b in args.max_batch.split(",")]:
            extra = ("--max-batch", str(max_batch), "--workers", str(workers))
            with ServerProcess(run, args.model, str(device), extra) as srv:
                for clients, path in loads:
                    row = {"workers": workers, "max_batch": max_batch} | drive(
                        srv.url, bodies, clients, args.requests, args.client_processes, path=path)
                    rows.append(row)
                    print(f"workers {workers:>2}  max_batch {max_batch:>3}  {path:<12}  clients {clients:>3}  "
                          f"{row['requests_per_s']:8.1f} req/s  p50 {row['p50_ms']:8.2f} ms  "
                          f"p95 {row['p95_ms']:8.2f} ms  failures {row['failures']}", flush=True)
    meta = machine(device) | {
        "model": args.model, "run": str(run), "device": str(device), "requests_per_client": args.requests,
        "client_processes": args.client_processes, "image_bytes_median": int(np.median([len(b) for b in bodies])),
        "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0]}
    write_json(args.out, {"meta": meta, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
