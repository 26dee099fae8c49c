"""Run trials as Ray tasks on a cluster; the driver stores each result in the run's SQLite db as it lands.

Each trial is one task in a fresh worker process (``max_calls=1``). The driver keeps the store:
workers never write to it, so a retried task can never leave a second row behind.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from bakeoff.errors import BakeoffError
from bakeoff.runners import record_outcome, split_finished
from bakeoff.store import Store
from bakeoff.job import TrialJob
from bakeoff.trial import trial_process_main

__all__ = ["connect", "cluster_device", "gpu_share", "run_ray", "MAX_RETRIES"]

MAX_RETRIES = 2  # a trial whose worker dies (node lost, killed) runs again up to this many times
TOKEN_FILE = ".bakeoff-driver"  # proves to a worker that it sees the driver's own output folder
CPUS_ENV, GPUS_ENV = "BAKEOFF_RAY_CPUS_PER_TRIAL", "BAKEOFF_RAY_GPUS_PER_TRIAL"


def _ray():
    try:
        import ray
    except ImportError:
        raise BakeoffError("--executor ray needs Ray: pip install 'bakeoff[ray]'") from None
    return ray


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at ``address`` (``HOST:6379``, ``ray://HOST:10001`` or ``auto``).

    Without an address Ray uses ``RAY_ADDRESS``, else the cluster started on this machine by
    ``ray start``, else it starts a private one on this machine. Already connected: nothing to do.
    """
    ray = _ray()
    if ray.is_initialized():
        return
    _check_reachable(address)
    try:
        ray.init(address=address, logging_level="warning", log_to_driver=True)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        # Ray sends its token to an address given by hand only when told to (RAY_AUTH_MODE=token).
        hint = "" if os.environ.get("RAY_AUTH_MODE") else \
            "; if the cluster uses token authentication (Ray's default), set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"
        raise BakeoffError(f"could not join the Ray cluster at {address or 'auto'} ({first}): start one with "
                           f"`ray start --head` and pass its address with --ray-address HOST:6379{hint}") from None


def _check_reachable(address: str | None) -> None:
    """Fail at once on a HOST:PORT nobody listens on (Ray itself would keep retrying for minutes)."""
    if not address or "://" in address or address == "auto" or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise BakeoffError(f"no Ray cluster answers at {address} ({exc}): start one there with "
                           f"`ray start --head --port {port}`, or pass the address it printed") from None


def cluster_device(device: str):
    """The device trials run on, from the cluster's resources rather than this machine's."""
    import torch

    gpus = _ray().cluster_resources().get("GPU", 0)
    if device == "auto":
        return torch.device("cuda" if gpus > 0 else "cpu")
    if device.startswith("cuda") and gpus <= 0:
        raise BakeoffError("--device cuda, but the Ray cluster has no GPU: start GPU nodes with "
                           "`ray start --address HEAD:6379 --num-gpus N` or use --device cpu")
    return torch.device(device.split(":")[0])


def gpu_share(job: TrialJob) -> float:
    """The fraction of a GPU one trial asks for: small models pack several to a GPU.

    At the study's batch size of 16 one small model leaves most of a GPU idle; four trials
    packed on one GPU train about four times as many images per second in total.
    """
    if os.environ.get(GPUS_ENV):
        return float(os.environ[GPUS_ENV])
    params = job.spec.get("params")
    if params is None:
        return 0.5
    return 0.25 if params <= 30e6 else 0.5 if params <= 100e6 else 1.0


def _cpus_per_trial(ray, on_gpu: bool) -> float:
    if os.environ.get(CPUS_ENV):
        return float(os.environ[CPUS_ENV])
    if on_gpu:
        return 1.0
    # A CPU trial uses every core of its node (as with the local executor), so it asks for a whole
    # node: the smallest one, so that every node can take a trial.
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return float(min((c for c in cpus if c > 0), default=1))


class _Outbox:
    """The queue that ``trial_process_main`` reports to, inside the worker: keeps the outcome,
    forwards progress to the driver through a Ray queue (dropped when the queue is full)."""

    def __init__(self, key: str, events) -> None:
        self.key, self.events, self.outcome = key, events, None

    def put(self, msg) -> None:
        if msg[0] in ("result", "error", "interrupted"):
            self.outcome = (msg[0], msg[2])
        else:
            self._forward(msg)

    def _forward(self, msg) -> None:
        if self.events is None:
            return
        try:
            self.events.put_nowait(msg)
        except Exception:  # progress is best-effort; a full or gone queue never fails a trial
            pass


def _local_cache(array, cache_path: str, size: int) -> str:
    """Write the array fetched from the object store to this node's disk once, for every trial here."""
    path = Path(tempfile.gettempdir()) / "bakeoff-cache" / Path(cache_path).parent.name / Path(cache_path).name
    if not (path.is_file() and path.stat().st_size == size):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.npy")
        np.save(tmp, array)
        os.replace(tmp, path)
    return str(path)


def _trial_task(entry: Callable, job: TrialJob, cache: tuple, token: str, events) -> dict:
    """The body of one Ray task: make the cache and the output folder reachable, run the trial."""
    started = time.time()
    # Arrays arrive read-only from the object store; the trial hands them to torch, which wants them writable.
    job = replace(job, labels=np.array(job.labels), train_idx=np.array(job.train_idx), val_idx=np.array(job.val_idx))
    refs, size = cache
    path = Path(job.cache_path)
    if refs and not (path.is_file() and path.stat().st_size == size):
        import ray

        job = replace(job, cache_path=_local_cache(ray.get(refs[0]), job.cache_path, size))
    token_file = Path(job.out_dir) / TOKEN_FILE
    shared_out = token_file.is_file() and token_file.read_text() == token
    scratch = None if shared_out else tempfile.mkdtemp(prefix="bakeoff-trial-")
    if scratch:
        job = replace(job, out_dir=scratch)
    outbox = _Outbox(job.key, events)
    outbox._forward(("start", job.key, started))
    try:
        entry(job, outbox)
        kind, payload = outbox.outcome or ("error", {"error": "the trial ended without a result", "traceback": ""})
        files = {}
        if scratch and kind == "result" and payload.get("model_dir"):
            root = Path(scratch)
            files = {str(p.relative_to(root)): p.read_bytes()
                     for p in (root / payload["model_dir"]).rglob("*") if p.is_file()}
        return {"kind": kind, "payload": payload, "files": files, "started": started}
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _write_files(out_dir: str, files: dict) -> None:
    """Write a model folder shipped back from a node that cannot see the output folder."""
    for rel, blob in files.items():
        dest = Path(out_dir) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, dest)


def _ray_failure(exc: BaseException) -> str:
    """One line for a task Ray gave up on (worker died more often than it may be retried, OOM)."""
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause  # the error raised in the worker, not Ray's wrapper around it
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = text.splitlines()[0][:300] if text else ""
    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        return f"out of memory: Ray killed the trial's worker ({first})"
    if isinstance(exc, ray.exceptions.WorkerCrashedError):
        return f"trial worker died {MAX_RETRIES + 1} times (killed or out of memory?)"
    if isinstance(exc, ray.exceptions.NodeDiedError):
        return f"the node running the trial died {MAX_RETRIES + 1} times ({first})"
    return f"{type(exc).__name__}: {first}"[:1000]


def _drain(events, by_key: dict, on_event: Callable) -> None:
    if events is None:
        return
    try:
        msgs = events.get_nowait_batch(events.qsize())
    except Exception:
        return
    for msg in msgs:
        job = by_key.get(msg[1])
        if job is None:
            continue
        if msg[0] == "start":
            on_event("start", job, None)
        elif msg[0] == "step":
            on_event("step", job, msg[2:])


def run_ray(jobs: list[TrialJob], store: Store, run_id: int, on_event: Callable = lambda *a: None,
            address: str | None = None, *, entry: Callable | None = None, cache_via: str = "auto",
            progress: bool = True) -> dict:
    """Run every job not already finished as a Ray task; same contract as ``run_local``.

    Results land in ``store`` as the tasks finish, whatever their order; a failed trial becomes
    a failed row and the run goes on; a worker lost mid-trial is retried (``MAX_RETRIES``);
    Ctrl-C cancels the outstanding tasks and keeps what had finished.

    ``cache_via``: how the decoded images reach a worker. ``"path"``: the cache file must be
    readable at the same path on every node (a shared file system). ``"object-store"``: each
    cache file is put in Ray's object store once, and a worker that cannot read the path fetches
    it from there. ``"auto"``: the object store when the cluster has more than one node or the
    driver joined through Ray Client (``ray://``).

    ``entry(job, queue)`` is what a worker runs for one trial (default ``trial_process_main``).
    Returns counts: trained, resumed (skipped because finished before), failed.
    """
    if cache_via not in ("auto", "path", "object-store"):
        raise BakeoffError(f"cache_via must be auto, path or object-store, got {cache_via!r}")
    ray = _ray()
    connect(address)
    entry = entry or trial_process_main
    todo, counts = split_finished(jobs, store, on_event)
    # absolute paths: a worker's current folder is not the driver's
    todo = [replace(job, cache_path=str(Path(job.cache_path).resolve()), out_dir=str(Path(job.out_dir).resolve()))
            for job in todo]
    if not todo:
        return counts

    if cache_via == "auto":  # a Ray Client driver (ray://) is on no node of the cluster
        remote = (address or os.environ.get("RAY_ADDRESS") or "").startswith("ray://")
        cache_via = "object-store" if remote or sum(1 for n in ray.nodes() if n.get("Alive")) > 1 else "path"
    on_gpu = any(j.device.startswith("cuda") for j in todo)
    task = ray.remote(max_calls=1, max_retries=MAX_RETRIES, retry_exceptions=False,
                      num_cpus=_cpus_per_trial(ray, on_gpu))(_trial_task)
    events = None
    if progress:
        from ray.util.queue import Queue

        events = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    out_dirs = {j.out_dir for j in todo}
    token = secrets.token_hex(16)
    for d in out_dirs:
        (Path(d) / TOKEN_FILE).write_text(token)

    caches: dict[str, tuple] = {}
    pending = {}
    by_key = {j.key: j for j in todo}
    try:
        for job in todo:
            if job.cache_path not in caches:
                size = Path(job.cache_path).stat().st_size
                refs = []
                if cache_via == "object-store":  # in a list, so a worker fetches it only if it cannot read the path
                    refs = [ray.put(np.load(job.cache_path, mmap_mode="r"))]
                caches[job.cache_path] = (refs, size)
            opts = {"name": f"bakeoff {job.spec['id']}"}
            if job.device.startswith("cuda"):
                opts["num_gpus"] = gpu_share(job)
            ref = task.options(**opts).remote(entry, job, caches[job.cache_path], token, events)
            pending[ref] = (job, time.time())
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
            _drain(events, by_key, on_event)
            for ref in ready:
                job, submitted = pending.pop(ref)
                try:
                    out = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    out = {"kind": "error", "payload": {"error": _ray_failure(exc), "traceback": ""},
                           "files": {}, "started": submitted}
                if out["kind"] == "interrupted":
                    raise KeyboardInterrupt
                _store(out, job, store, run_id, counts, on_event)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        for d in out_dirs:
            (Path(d) / TOKEN_FILE).unlink(missing_ok=True)
        if events is not None:
            events.shutdown()
    return counts


def _store(out: dict, job: TrialJob, store: Store, run_id: int, counts: dict, on_event: Callable) -> None:
    ok = out["kind"] == "result"
    if ok and out["files"]:
        _write_files(job.out_dir, out["files"])
    record_outcome(store, run_id, job, out["started"], ok, out["payload"], counts, on_event)
