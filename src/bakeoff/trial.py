"""One trial = one model trained and measured with the run's protocol, in a process of its own
(a fresh one, or a worker that runs one PyTorch trial after another on the same data)."""

from __future__ import annotations

import os
import platform
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["TrialJob", "run_trial", "trial_process_main", "worker_main", "available_memory_bytes", "device_name"]


@dataclass
class TrialJob:
    """Everything a trial process needs; plain data so it crosses process boundaries."""

    spec: dict
    protocol: dict
    cache_path: str
    input_size: int
    labels: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    classes: list[str]
    out_dir: str
    device: str = "auto"
    weights_dir: str | None = None
    key: str = ""
    side: int | None = None  # the model's resize size; the cache may be stored at another
    cache_root: str | None = None  # the run's cache folder (decoded images, compiled kernels)
    extra: dict = field(default_factory=dict)


def available_memory_bytes(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int:
    """Memory this process may still use: the machine's available memory, or less where the
    process's control group (a container's memory limit, v1 or v2) leaves less."""
    free = None
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    room = _cgroup_room(proc, cgroups)
    return min(free, room) if room is not None else free


def _cgroup_room(proc: Path, cgroups: Path) -> int | None:
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: memory.max / memory.current
            limit_file, used_file = cgroups / path.lstrip("/") / "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # v1
            limit_file, used_file = cgroups / "memory" / path.lstrip("/") / "memory.limit_in_bytes", \
                "memory.usage_in_bytes"
        else:
            continue
        try:
            limit = limit_file.read_text().strip()
            used = int((limit_file.parent / used_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge number: no limit
            return max(0, int(limit) - used)
    return None


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def result_row(spec, job: TrialJob, protocol, metrics: dict, fitted: dict, timing: dict, *, build_s: float,
               load_s: float, params: int, model_path: Path, peak: tuple[float, str], weights: str,
               **engine_fields) -> dict:
    """The stored row of a finished trial, the same keys whatever the engine; ``engine_fields``
    adds what only one engine knows (precision, device, step mode, backend, ...)."""
    train_s = fitted["train_time_s"]
    return {
        "model": spec.id,
        "framework": spec.framework,
        "source": spec.source,
        "status": "ok",
        **metrics,
        "train_time_s": train_s,
        # how train_time_s was taken (``bakeoff.timing``), the same keys for every engine
        **{k: fitted.get(k) for k in ("train_time_kind", "train_time_basis", "train_step_ms", "train_step_ms_min",
                                      "train_step_ms_max")},
        "data_time_s": fitted["data_time_s"],
        # Share of the trial's data + training time spent getting images ready (cache load included).
        "data_fraction": (load_s + fitted["data_time_s"]) / (load_s + train_s) if train_s else None,
        "eval_time_s": fitted["eval_time_s"],
        "build_time_s": build_s,
        "load_time_s": load_s,
        "train_images_per_s": len(job.train_idx) * protocol.epochs / train_s if train_s else None,
        **timing,
        "params": int(params),
        "size_mb": model_path.stat().st_size / 2**20,
        "peak_memory_mb": peak[0],
        "peak_memory_kind": peak[1],
        "history": fitted["history"],
        "weights": weights,
        "input_size": job.input_size,
        "model_dir": str(model_path.parent.relative_to(job.out_dir)),
        **engine_fields,
    }


def run_trial(job: TrialJob, on_step=None) -> dict:
    """Train and measure one model with the engine of its framework; returns the result row."""
    from bakeoff.engines import engine_for

    return engine_for(job.spec["framework"]).load().run_trial(job, on_step)


def trial_process_main(job: TrialJob, queue) -> None:
    """Entry point of the trial's own process: results and progress go back through ``queue``."""
    try:
        import torch

        torch.set_num_threads(max(1, os.cpu_count() or 1))

        def on_step(epoch, step, steps, elapsed):
            queue.put(("step", job.key, epoch, step, steps, elapsed))

        queue.put(("result", job.key, run_trial(job, on_step)))
    except KeyboardInterrupt:
        queue.put(("interrupted", job.key, None))
    except BaseException as exc:  # any failure becomes a failed row, never a crashed sweep
        from bakeoff.gpu_share import NeedsGpuAlone

        if isinstance(exc, NeedsGpuAlone):
            queue.put(("alone", job.key, str(exc)[:1000]))
            return
        from bakeoff.errors import BakeoffError

        kind = "out of memory" if "out of memory" in str(exc).lower() else type(exc).__name__
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else kind
        detail = "" if isinstance(exc, BakeoffError) else traceback.format_exc()
        queue.put(("error", job.key, {"error": f"{kind}: {message}"[:1000], "traceback": detail}))


def reusable_after(job: TrialJob) -> bool:
    """Whether a worker may run another trial after this one: after PyTorch trials on the CPU
    and top-only trials, whose data load is a large share of the trial, and after any PyTorch
    trial in a worker that runs several at once (its neighbours keep it busy anyway). A lone
    full fine-tune on a GPU ends its worker (a fresh process per graph-captured trial; its load
    is small beside its training), and so does a Keras trial, which leaves its backend's memory
    behind."""
    from bakeoff.engines import engine_for

    return engine_for(job.spec["framework"]).shares_process and (
        job.device == "cpu" or bool(job.protocol.get("train_only_top_layer"))
        or job.extra.get("concurrent_trials", 1) > 1)


def _run_one(job: TrialJob, queue, own_stream: bool) -> None:
    """One trial, then the worker's clean-up; with neighbours (in a thread of its own) on a CUDA
    stream of its own, so its kernels can overlap theirs."""
    import torch

    if own_stream and str(job.device).startswith("cuda") and torch.cuda.is_available():
        from bakeoff.gpu_share import share

        with share().place(torch.device(job.device)):
            trial_process_main(job, queue)
    else:
        trial_process_main(job, queue)
    import gc

    gc.collect()
    if not own_stream and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _warm_up(device: str) -> None:
    """What the first trial of a fresh process would otherwise wait for (about 4 s on an H200
    host): the CUDA context and allocator, the cuDNN and cuBLAS libraries (loaded on first use),
    and the imports of the PyTorch engine and of torchvision."""
    import torch

    import bakeoff.engines.torch.trial  # noqa: F401
    import bakeoff.engines.torch.fit  # noqa: F401

    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    if not torch.cuda.is_available():
        return
    x = torch.randn(2, 3, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(3, 4, 3).to(device).to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        conv(x).flatten(1).matmul(torch.ones(144, 2, device=device)).sum().backward()
    torch.cuda.synchronize(device)


def worker_main(jobs, queue, capacity: int = 1, prewarm: str | None = None) -> None:
    """A long-lived trial process: runs the jobs it is given, up to ``capacity`` at once (one
    thread and one CUDA stream each, sharing the GPU through ``bakeoff.gpu_share``), keeping
    the decoded images resident between trials on the same data. The runner decides when it
    ends (``None``): after a failed trial (whose state may be broken, e.g. a CUDA error) or a
    trial that cannot share a process, it sends no more jobs.

    ``prewarm`` (a CUDA device): a worker started while the parent still decodes the images
    imports torch and starts CUDA there meanwhile; it learns its capacity from a
    ("capacity", n) message. ("last", True): no more trials will come, so the ones running
    keep pace with each other from then on."""
    import threading

    from bakeoff.gpu_share import GpuShare, set_share, share

    if prewarm:
        _warm_up(prewarm)
    threads: list[threading.Thread] = []
    while (job := jobs.get()) is not None:
        if isinstance(job, tuple):  # ("capacity", n) before any job; ("last", True) after the last
            if job[0] == "capacity":
                capacity = job[1]
            elif share().concurrent:
                share().pace = True
            continue
        if capacity == 1:  # one at a time: in this thread, on the default stream, as a lone trial always ran
            _run_one(job, queue, own_stream=False)
            continue
        if not share().concurrent:
            set_share(GpuShare(capacity, pace=False))  # until the runner says no more trials will come
        thread = threading.Thread(target=_run_one, args=(job, queue, True), daemon=True,
                                  name=f"trial-{job.spec['id']}")
        thread.start()
        threads = [t for t in threads if t.is_alive()] + [thread]
    for thread in threads:
        thread.join()
