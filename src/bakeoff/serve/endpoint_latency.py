"""Endpoint latency as the study measured it: the client-side time of one image per HTTP request
to the model served locally, on a seeded sample of real validation images."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from bakeoff.errors import BakeoffError
from bakeoff.measure import summarize_ms
from bakeoff.serve.predictor import describe, find_model_dir, require_serve
from bakeoff.store import Store

__all__ = ["validation_sample", "measure_endpoint_latency", "add_endpoint_latency", "check_endpoint_latency"]

WARMUP = 10


def check_endpoint_latency(n: int) -> None:
    """Refuse a bad request count or a missing ``serve`` extra before anything is trained."""
    if n < 1:
        raise BakeoffError(f"--endpoint-latency must be at least 1 request, got {n}")
    require_serve("fastapi", "uvicorn", "httpx")


def validation_sample(out_dir, n: int, seed: int = 0, repeat: bool = True) -> list[Path]:
    """``n`` files of the run's validation split (``split.json``), a seeded sample. When the split
    holds fewer than ``n``, files repeat (``repeat``) or the sample is the whole split."""
    split = Path(out_dir) / "split.json"
    if not split.is_file():
        raise BakeoffError(f"{split} does not exist: pass the --out folder of a `bakeoff run`")
    files = [Path(f) for f in json.loads(split.read_text())["val"]]
    files = [f for f in files if f.is_file()]
    if not files:
        raise BakeoffError(f"none of the validation files listed in {split} exists any more")
    rng = np.random.default_rng(seed)
    if not repeat:
        n = min(n, len(files))
    pick = rng.choice(len(files), size=n, replace=n > len(files))
    return [files[i] for i in pick]


def measure_endpoint_latency(out_dir, model_id: str, n: int, device: str = "cpu", seed: int = 0) -> dict:
    """Serve ``model_id`` on a free loopback port and time ``n`` sequential requests of one image each
    (after a few warm-up requests), client side, over one kept-alive connection."""
    check_endpoint_latency(n)
    import httpx

    from bakeoff.serve.server import ServerProcess

    find_model_dir(out_dir, model_id)  # a clear error before starting a process
    bodies = [f.read_bytes() for f in validation_sample(out_dir, n, seed)]
    headers = {"Content-Type": "application/x-image", "Accept": "application/json"}
    samples = []
    with ServerProcess(out_dir, model_id, device) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        url = "/invocations"
        served_on = client.get("/ping").json().get("device", device)
        for body in bodies[:WARMUP]:
            client.post(url, content=body, headers=headers).raise_for_status()
        for body in bodies:
            t0 = time.perf_counter()
            r = client.post(url, content=body, headers=headers)
            r.raise_for_status()
            r.json()
            samples.append((time.perf_counter() - t0) * 1000.0)
    s = summarize_ms(samples)
    return {"endpoint_latency_ms_p50": s["p50"], "endpoint_latency_ms_p95": s["p95"],
            "endpoint_latency_ms_min": s["min"], "endpoint_latency_n": s["n"], "endpoint_latency_warmup": WARMUP,
            "endpoint_latency_device": served_on,
            "endpoint_latency_kind": "client-side HTTP POST /invocations over loopback, one image per request"}


def add_endpoint_latency(out_dir, store: Store, keys: list[str], n: int, device: str = "cpu",
                         seed: int = 0) -> list[str]:
    """Measure every successful trial of ``keys`` that lacks an endpoint latency from ``n`` requests
    and store the figures beside its in-process latency. Returns one message per model that failed
    (a failure never loses the trained results)."""
    problems = []
    for trial in store.trials(keys=keys):
        result = trial["result"] or {}
        if trial["status"] != "ok" or result.get("endpoint_latency_n") == n:
            continue
        try:
            figures = measure_endpoint_latency(out_dir, trial["model"], n, device, seed)
        except Exception as exc:  # one model's server failing must not undo the run
            message = str(exc) if isinstance(exc, BakeoffError) else describe(exc)
            store.update_result(trial["key"], {"endpoint_latency_error": message})
            problems.append(f"endpoint latency of {trial['model']}: {message}")
            continue
        store.update_result(trial["key"], figures | {"endpoint_latency_error": None})
    return problems
