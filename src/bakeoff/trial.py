"""One trial = one model trained and measured with the run's protocol, in a process of its own
(a fresh one, or a worker that runs one PyTorch trial after another on the same data)."""

from __future__ import annotations

import traceback

from bakeoff.job import RunAlone, TrialJob

__all__ = ["run_trial", "trial_process_main", "worker_main", "reusable_after"]


def run_trial(job: TrialJob, on_step=None, gate=None) -> dict | RunAlone:
    """Train and measure one model with the engine of its framework: the result row, or
    ``RunAlone`` when it cannot share the GPU that ``gate`` (``gpu_share``; alone when None)
    shares out."""
    from bakeoff.engines import engine_for

    return engine_for(job.spec["framework"]).load().run_trial(job, on_step, gate)


def trial_process_main(job: TrialJob, queue, gate=None) -> None:
    """Entry point of a trial in its own process (or a worker's thread, sharing ``gate``):
    results and progress go back through ``queue``."""
    try:
        import torch

        from bakeoff.machine import cpu_threads

        torch.set_num_threads(cpu_threads())

        def on_step(epoch, step, steps, elapsed):
            queue.put(("step", job.key, epoch, step, steps, elapsed))

        outcome = run_trial(job, on_step, gate)
        if isinstance(outcome, RunAlone):
            queue.put(("alone", job.key, outcome.reason[:1000]))
        else:
            queue.put(("result", job.key, outcome))
    except KeyboardInterrupt:
        queue.put(("interrupted", job.key, None))
    except BaseException as exc:  # any failure becomes a failed row, never a crashed sweep
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
        or job.concurrent_trials > 1)


def _run_one(job: TrialJob, queue, gate, own_stream: bool) -> None:
    """One trial, then the worker's clean-up; with neighbours (in a thread of its own) on a CUDA
    stream of its own, so its kernels can overlap theirs."""
    import torch

    if own_stream and str(job.device).startswith("cuda") and torch.cuda.is_available():
        with gate.place(torch.device(job.device)):
            trial_process_main(job, queue, gate)
    else:
        trial_process_main(job, queue, gate)
    import gc

    from bakeoff.machine import release_freed_memory

    gc.collect()
    release_freed_memory()
    if not own_stream and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _warm_up(device: str) -> None:
    """What the first trial of a fresh process would otherwise wait for (seconds): the CUDA
    context and allocator, the cuDNN and cuBLAS libraries (loaded on first use),
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

    from bakeoff.gpu_share import GpuShare, LoneGate

    gate = LoneGate()  # the worker's one gate, handed to each trial it runs
    if prewarm:
        _warm_up(prewarm)
    threads: list[threading.Thread] = []
    while (job := jobs.get()) is not None:
        if isinstance(job, tuple):  # ("capacity", n) before any job; ("last", True) after the last
            if job[0] == "capacity":
                capacity = job[1]
            elif gate.concurrent:
                gate.pace = True
            continue
        if capacity == 1:  # one at a time: in this thread, on the default stream, as a lone trial always ran
            _run_one(job, queue, gate, own_stream=False)
            continue
        if not gate.concurrent:
            gate = GpuShare(capacity, pace=False)  # no pacing until the runner says no more trials will come
        thread = threading.Thread(target=_run_one, args=(job, queue, gate, True), daemon=True,
                                  name=f"trial-{job.spec['id']}")
        thread.start()
        threads = [t for t in threads if t.is_alive()] + [thread]
    for thread in threads:
        thread.join()
