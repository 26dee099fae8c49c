"""Claim: `bakeoff serve` answers every request of a hostile mix from 32 concurrent clients with
the status docs/serving.md names (2xx for good requests, 4xx for bad ones): no 5xx, no dropped
connection, no crash, and the server's peak memory stays a few hundred MB above the idle server.

The mix (seeded, drawn request by request): valid images in several formats and modes, JSON
lists of them, garbage bytes, truncated images, wrong Content-Type, wrong Accept, images over
--max-pixels that are small on disk (flat or 1-bit PNGs of 13,000 x 13,000 and more, thin
strips), images just under it (16-bit grey: the costliest decode per pixel), deeply nested
JSON, JSON lists over --max-images, bad base64, other JSON, empty bodies, bodies over
--max-body-mb. Each client keeps one connection alive and opens a new one when the server
closes it. Peak memory is the server process's VmHWM (Linux), against its RSS once warmed up.
Then the attacks of the bug report, one after the other: concurrent 13,000 x 13,000 PNGs, a
JSON list of 109,216 images, 1,124 sockets that never finish their headers while /ping is asked.

    PYTHONPATH=src python3 bench/fuzz_serve.py --requests 10000 --clients 32 --out fuzz_serve.json
    PYTHONPATH=src python3 bench/fuzz_serve.py --run runs/leaves --model timm/resnet50 --out fuzz_serve.json

Without --run it serves an untrained timm/test_resnet saved here (answers are not the point).
Needs fastapi and uvicorn (bakeoff[serve]); the client uses only the standard library.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import random
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when a test imports this file by its path
from harness import machine, parser, write_json  # noqa: E402  (bench/, beside this script)

MODEL = "timm/test_resnet"
IMAGE, JSON, GOOD_ACCEPT = "application/x-image", "application/json", "application/json;verbose"


def tiny_saved_model(out: Path, model_id: str = MODEL, classes=("blue", "green", "red")) -> Path:
    """``out/models/<model>/`` as `bakeoff run` saves it, untrained (random weights): a run folder to serve."""
    from bakeoff.engines.torch.build import build_model
    from bakeoff.engines.torch.trial import save_model
    from bakeoff.protocol import Protocol
    from bakeoff.zoo.registry import resolve

    spec = resolve(model_id)
    model, weights = build_model(spec, len(classes), pretrained=False)
    save_model(model, spec, list(classes), Protocol(precision="fp32"), out, 32, weights)
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def flat_png(width: int, height: int, bit_depth: int = 1, colour_type: int = 0) -> bytes:
    """A valid PNG of one flat colour, compressed row by row: a few hundred KB at most on disk
    however many pixels it declares, and the client never holds the pixels."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\x00" + bytes((width * channels * bit_depth + 7) // 8)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def encoded(mode: str, size, fmt: str, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def request_kinds(max_pixels: int, max_images: int, max_body_bytes: int, seed: int = 0) -> dict:
    """``{kind: (weight, expected statuses, [(body, content type, accept), ...])}``: the request
    mix, each kind a few pre-built variants (so the client's time goes to sending, not encoding)."""
    rnd = random.Random(seed)
    valid = [encoded(m, (rnd.randint(20, 300), rnd.randint(20, 300)), f, seed + i)
             for i, (m, f) in enumerate([("RGB", "JPEG"), ("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG"),
                                         ("P", "GIF"), ("RGB", "BMP"), ("RGB", "TIFF"), ("RGB", "WEBP"),
                                         ("I;16", "PNG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PPM")])]
    side = int((max_pixels * 0.9) ** 0.5)  # 16-bit grey just under the budget: the costliest allowed decode
    near_limit = [flat_png(side, side, 16, 0)]
    # 13,000^2 and 20,000^2 (past Pillow's own bomb limit) 1-bit, 16-bit grey and RGB over the
    # budget, and a strip whose resized copy is what breaks it.
    over = [flat_png(13000, 13000, 1, 0), flat_png(20000, 20000, 1, 0), flat_png(2 * side, 2 * side, 16, 0),
            flat_png(side + 500, side + 500, 8, 2), flat_png(1, 120_000, 8, 0)]
    garbage = [rnd.randbytes(rnd.randint(1, 5000)) for _ in range(8)] + [b"\x89PNG\r\n\x1a\n" + rnd.randbytes(300),
                                                                       b"GIF89a" + rnd.randbytes(50)]
    truncated = [v[: len(v) // 2] for v in valid[:4]]
    one = valid[0]
    many = [json.dumps([b64(v) for v in rnd.sample(valid, 4)]).encode() for _ in range(6)]
    tiny = b64(encoded("RGB", (8, 8), "PNG", seed))  # many of them stay under --max-body-mb
    too_many = [json.dumps([tiny] * n).encode() for n in (max_images + 1, 10 * max_images, 5000)]
    return {
        "valid image": (30, {200}, [(v, ctype, acc) for v in valid
                                    for ctype, acc in ((IMAGE, GOOD_ACCEPT), ("image/png", JSON), (IMAGE, "*/*"))]),
        "valid JSON list": (8, {200}, [(b, JSON, GOOD_ACCEPT) for b in many]),
        "near --max-pixels": (0.4, {200}, [(b, IMAGE, JSON) for b in near_limit]),
        "over --max-pixels": (8, {413}, [(b, IMAGE, JSON) for b in over]
                              + [(json.dumps([b64(one), b64(over[0])]).encode(), JSON, JSON)]),
        "garbage bytes": (8, {400}, [(b, IMAGE, JSON) for b in garbage]),
        "truncated image": (4, {400}, [(b, IMAGE, JSON) for b in truncated]),
        "wrong Content-Type": (5, {415}, [(one, c, JSON) for c in ("text/plain", "", "multipart/form-data",
                                                                     "application/octet-stream")]),
        "wrong Accept": (5, {406}, [(one, IMAGE, a) for a in ("text/csv", "image/png", "text/html;q=1")]),
        "nested JSON": (4, {400}, [(b"[" * n + b"]" * n, JSON, JSON) for n in (100_000, 5000)]
                        + [(b"[" * 100_000, JSON, JSON), (b'{"a":' * 50_000, JSON, JSON)]),
        "JSON over --max-images": (4, {413}, [(b, JSON, JSON) for b in too_many]),
        "bad base64": (4, {400}, [(json.dumps(x).encode(), JSON, JSON)
                                  for x in (["not base64!"], [b64(one)[:-3]], ["data:image/png;base64,@@@"])]),
        "other JSON": (4, {400}, [(b, JSON, JSON) for b in (b'{"image": 1}', b"[]", b"[1, 2]", b"[", b"null",
                                                            b'"abc"', b"\xff\xfe", b"[\"" + b"A" * 1000)]),
        "empty body": (4, {400}, [(b"", IMAGE, JSON), (b"", JSON, JSON)]),
        "over --max-body-mb": (1, {413}, [(bytes(max_body_bytes + 1), IMAGE, JSON)]),
    }


def fire(url: str, kinds: dict, n: int, clients: int, seed: int = 0) -> dict:
    """``n`` requests drawn from ``kinds`` by weight, over ``clients`` threads; counts of
    (kind, status), the requests whose status was not an expected one, and transport errors."""
    parts = urlsplit(url)
    names = list(kinds)
    weights = [kinds[k][0] for k in names]
    rnd = random.Random(seed)
    plan = [(k, rnd.randrange(len(kinds[k][2]))) for k in rnd.choices(names, weights, k=n)]
    counts, unexpected, errors = Counter(), [], []
    lock = threading.Lock()

    def client(share: list) -> None:
        conn = None
        for kind, i in share:
            body, ctype, accept = kinds[kind][2][i]
            headers = {"Accept": accept} | ({"Content-Type": ctype} if ctype else {})
            r = text = None
            for attempt in (0, 1):  # a kept-alive connection the server closed in between: one retry
                conn = conn or http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
                try:
                    conn.request("POST", "/invocations", body=body, headers=headers)
                    r = conn.getresponse()
                    text = r.read()
                    break
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                    conn.close()
                    conn = None
                    if attempt:
                        with lock:
                            errors.append(f"{kind}: {exc!r}")
            if r is None:
                continue
            with lock:
                counts[(kind, r.status)] += 1
                if r.status not in kinds[kind][1]:
                    unexpected.append(f"{kind}: {r.status} {text[:200]!r}")
            if r.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, args=(plan[k::clients],), daemon=True) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    statuses = Counter()
    for (_, status), c in counts.items():
        statuses[status] += c
    return {"requests": n, "clients": clients, "wall_s": wall, "answered": sum(counts.values()),
            "by_status": dict(sorted(statuses.items())),
            "server_errors": sum(c for s, c in statuses.items() if s >= 500),
            "by_kind": {k: {str(s): c for (kk, s), c in sorted(counts.items()) if kk == k} for k in names},
            "unexpected": len(unexpected), "unexpected_first": unexpected[:5],
            "transport_errors": len(errors), "transport_errors_first": errors[:5]}


def post(url: str, body: bytes, ctype: str = IMAGE) -> tuple[int, float]:
    """One request on a new connection: (status, seconds)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    t0 = time.perf_counter()
    conn.request("POST", "/invocations", body=body, headers={"Content-Type": ctype, "Accept": JSON})
    status = conn.getresponse().status
    conn.close()
    return status, time.perf_counter() - t0


def reported_attacks(url: str, pid: int) -> dict:
    """The attacks of the bug report, one after the other: statuses, time, and the server's peak
    memory above its RSS before each (Linux)."""
    from concurrent.futures import ThreadPoolExecutor

    out = {}
    tiny = b64(flat_png(1, 1, 8, 2))
    for name, body, ctype, copies in (
            ("3 concurrent 16-bit 13,000 x 13,000 PNGs", flat_png(13000, 13000, 16, 0), IMAGE, 3),
            ("8 concurrent 1-bit 13,000 x 13,000 PNGs", flat_png(13000, 13000, 1, 0), IMAGE, 8),
            ("a JSON list of 109,216 1-pixel PNGs", json.dumps([tiny] * 109_216).encode(), JSON, 1)):
        idle = memory_mb(pid)["rss_mb"]
        reset_peak(pid)
        with ThreadPoolExecutor(copies) as pool:
            answers = list(pool.map(lambda b: post(url, b, ctype), [body] * copies))
        out[name] = {"body_bytes": len(body), "statuses": sorted(a[0] for a in answers),
                     "slowest_s": max(a[1] for a in answers),
                     "peak_above_idle_mb": memory_mb(pid)["peak_mb"] - idle}
    out["1,124 sockets that never finish their headers, 200 of non-HTTP bytes"] = slow_clients(url, 1124, 200)
    return out


def slow_clients(url: str, idle: int, garbage: int) -> dict:
    """``idle`` connections that send half a request head and wait, ``garbage`` that send
    non-HTTP bytes; meanwhile, ten ``/ping``s: their statuses and the slowest."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * (idle + garbage))), hard))
    parts = urlsplit(url)
    socks = []
    for k in range(idle + garbage):
        s = socket.create_connection((parts.hostname, parts.port))
        s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n" if k < idle else b"\x00GARBAGE\r\n\r\n")
        socks.append(s)
    pings = []
    for _ in range(10):
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        t0 = time.perf_counter()
        conn.request("GET", "/ping")
        pings.append((conn.getresponse().status, time.perf_counter() - t0))
        conn.close()
        time.sleep(0.3)
    for s in socks:
        s.close()
    return {"ping_statuses": sorted({p[0] for p in pings}), "ping_slowest_s": max(p[1] for p in pings)}


def reset_peak(pid: int) -> None:
    """Start the peak (VmHWM) of ``pid`` again from its RSS now (Linux; our own child process)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def memory_mb(pid: int) -> dict:
    """RSS now and its peak (VmHWM) of process ``pid``, in MB, from /proc (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            fields[line.split(":")[0]] = int(line.split()[1]) / 1024
    return {"rss_mb": fields["VmRSS"], "peak_mb": fields["VmHWM"]}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--run", type=Path, help="--out folder of a `bakeoff run` (default: an untrained tiny model)")
    ap.add_argument("--model", default=MODEL, help="model id to serve")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="JSON results")
    args = ap.parse_args()

    from bakeoff.serve.limits import ServeLimits
    from bakeoff.serve.server import ServerProcess

    limits = ServeLimits()  # the server runs with its defaults: the mix is built around them
    run = args.run or tiny_saved_model(Path(tempfile.mkdtemp(prefix="bakeoff-fuzz-")) / "run")
    kinds = request_kinds(limits.max_pixels, limits.max_images, limits.max_body_bytes, args.seed)
    with ServerProcess(run, args.model, "cpu") as srv:
        warm = fire(srv.url, {"valid image": kinds["valid image"]}, 50, 4, args.seed)
        idle = memory_mb(srv.proc.pid)
        result = fire(srv.url, kinds, args.requests, args.clients, args.seed + 1)
        after = memory_mb(srv.proc.pid)
        attacks = reported_attacks(srv.url, srv.proc.pid)
        alive = srv.proc.poll() is None
        log = srv.stderr_text()
    result |= {"reported_attacks": attacks,"warm_up_ok": warm["by_status"] == {200: 50}, "server_alive_after": alive,
               "server_rss_idle_mb": idle["rss_mb"], "server_peak_rss_mb": after["peak_mb"],
               "server_peak_above_idle_mb": after["peak_mb"] - idle["rss_mb"], "server_log_bytes": len(log),
               "server_log_last_lines": log.splitlines()[-5:]} | machine("cpu")
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("by_kind", "reported_attacks")}, indent=2))
    for kind, by in result["by_kind"].items():
        print(f"{kind:>24}: {by}")
    for attack, figures in attacks.items():
        print(f"{attack}: {figures}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
