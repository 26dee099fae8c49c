"""Where trials run: local child processes (one per trial) or Ray tasks. Both runners share the
bookkeeping below, so resume and failure rows mean the same thing whichever one ran."""

from __future__ import annotations

from typing import Callable

__all__ = ["split_finished", "record_outcome"]


def split_finished(jobs: list, store, on_event: Callable) -> tuple[list, dict]:
    """Jobs still to train, and counts with the already-finished ones (reported as resumed)."""
    done = store.finished_keys()
    counts = {"trained": 0, "resumed": 0, "failed": 0}
    todo = []
    for job in jobs:
        if job.key in done:
            counts["resumed"] += 1
            on_event("resumed", job, None)
        else:
            todo.append(job)
    return todo, counts


def record_outcome(store, run_id: int, job, started: float, ok: bool, payload: dict, counts: dict,
                   on_event: Callable) -> None:
    """Store one finished trial as an ok row (its figures) or a failed row (its error)."""
    model, framework = job.spec["id"], job.spec["framework"]
    if ok and job.repeat_dir and payload.get("model_dir"):
        # a repeat saves its model under OUT/<repeat_dir>/: its stored folder is relative to OUT, as any other's
        payload = payload | {"model_dir": f"{job.repeat_dir}/{payload['model_dir']}"}
    if ok:
        store.save_trial(job.key, run_id, model, framework, "ok", started, result=payload)
        counts["trained"] += 1
        on_event("done", job, payload)
    else:
        store.save_trial(job.key, run_id, model, framework, "failed", started,
                         error=payload["error"], traceback=payload.get("traceback"))
        counts["failed"] += 1
        on_event("failed", job, payload)
