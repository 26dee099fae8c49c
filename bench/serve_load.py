"""Load on `bakeoff serve`: requests/s and client-side p50/p95 latency at 1, 8 and 32 concurrent
clients, with micro-batching off (--max-batch 1) and on (--max-batch 32).

Claim measured: whether grouping concurrent requests into one forward pass raises throughput,
and what one image per request costs end to end (HTTP + decode + resize + forward) on this machine.
Each client is a thread with its own kept-alive connection, sending real JPEG validation images
one per request over loopback; a bounded number of requests (clients x --requests), after warm-up.

    PYTHONPATH=src python3 bench/serve_load.py --out serve_load.json                     # trains a model first
    PYTHONPATH=src python3 bench/serve_load.py --run runs/leaves --model timm/resnet50 --out serve_load.json

Needs fastapi and uvicorn (bakeoff[serve]); the client uses only the standard library.
"""

from __future__ import annotations

import http.client
import json
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


def drive(url: str, bodies: list[bytes], clients: int, requests: int, warmup: int = 2) -> dict:
    """``clients`` threads, each sending ``warmup`` + ``requests`` sequential requests."""
    parts = urlsplit(url)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []
    start = threading.Barrier(clients + 1)
    headers = {"Content-Type": "application/x-image", "Accept": "application/json"}

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)

        def one(body):
            conn.request("POST", "/invocations", body=body, headers=headers)
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
        start.wait()
        start.wait()  # all clients begin the timed part together
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
            latencies[k].append((time.perf_counter() - t0) * 1000.0)
        conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.concatenate([np.asarray(x) for x in latencies]) if any(latencies) else np.asarray([np.nan])
    done = int(sum(len(x) for x in latencies))
    return {"clients": clients, "requests": done, "failures": len(failures), "first_failure": failures[:1],
            "wall_s": wall, "requests_per_s": done / wall, "p50_ms": float(np.median(lat)),
            "p95_ms": float(np.percentile(lat, 95))}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--run", type=Path, help="--out folder of an earlier `bakeoff run` (default: train one)")
    ap.add_argument("--model", default="timm/resnet50", help="model id to serve (or to train when no --run)")
    ap.add_argument("--image-size", type=int, default=224, help="input size when training here")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels")
    ap.add_argument("--requests", type=int, default=50, help="timed requests per client")
    ap.add_argument("--max-batch", default="1,32", help="server settings to compare (1 = no micro-batching)")
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
    rows = []
    for max_batch in [int(b) for b in args.max_batch.split(",")]:
        with ServerProcess(run, args.model, str(device), ("--max-batch", str(max_batch))) as srv:
            for clients in [int(c) for c in args.clients.split(",")]:
                row = {"max_batch": max_batch} | drive(srv.url, bodies, clients, args.requests)
                rows.append(row)
                print(f"max_batch {max_batch:>3}  clients {clients:>3}  {row['requests_per_s']:8.1f} req/s  "
                      f"p50 {row['p50_ms']:8.2f} ms  p95 {row['p95_ms']:8.2f} ms  failures {row['failures']}",
                      flush=True)
    meta = machine(device) | {
        "model": args.model, "run": str(run), "device": str(device), "requests_per_client": args.requests,
        "image_bytes_median": int(np.median([len(b) for b in bodies])),
        "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0]}
    write_json(args.out, {"meta": meta, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
