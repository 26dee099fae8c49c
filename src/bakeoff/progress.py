"""Progress bars: one for the run, one for each trial in flight (epoch, images/s, time left).

Several trials train at once when they share a GPU or run on several (Ray, several GPUs): each
has its bar, which goes when the trial ends."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

__all__ = ["RunProgress", "NullProgress"]


class NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def decode(self, label: str):
        return None

    def on_event(self, kind, job, payload) -> None:
        pass


class RunProgress(NullProgress):
    def __init__(self, n_trials: int, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.n_trials = n_trials
        self.run_task = None
        self.trial_tasks: dict[str, int] = {}  # trial key -> its bar

    def __enter__(self):
        self.progress.__enter__()
        self.run_task = self.progress.add_task("run", total=self.n_trials, rate="")
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def decode(self, label: str):
        task = self.progress.add_task(f"decode once {label}", total=None, rate="")

        def update(done: int, total: int) -> None:
            self.progress.update(task, completed=done, total=total)
        return update

    def on_event(self, kind, job, payload) -> None:
        model = _label(job)
        if kind == "start":  # a trial sent back to run alone starts again: a fresh bar
            self._drop(job.key)
            self._bar(job)
        elif kind == "step":
            epoch, step, steps, elapsed = payload
            epochs = job.protocol["epochs"]
            rate = step * job.protocol["batch_size"] / elapsed if elapsed > 0 else 0.0
            self.progress.update(self._bar(job), description=f"{model} epoch {epoch + 1}/{epochs}",
                                 total=steps * epochs, completed=epoch * steps + step, rate=f"{rate:,.0f} img/s")
        elif kind in ("done", "failed", "resumed"):
            self._drop(job.key)
            word = {"done": "[green]done[/]", "failed": "[red]failed[/]", "resumed": "[cyan]already done[/]"}[kind]
            extra = ""
            if kind == "done":
                extra = f" acc {payload['accuracy']:.3f}, train {payload['train_time_s']:.1f}s"
            elif kind == "failed":
                extra = f": {escape(str(payload['error']))}"
            self.console.print(f"{model}: {word}{extra}")
            self.progress.advance(self.run_task)

    def _bar(self, job) -> int:
        """The trial's bar, made at its first event."""
        if job.key not in self.trial_tasks:
            self.trial_tasks[job.key] = self.progress.add_task(
                f"{_label(job)} epoch 1/{job.protocol['epochs']}", total=None, rate="")
        return self.trial_tasks[job.key]

    def _drop(self, key: str) -> None:
        task = self.trial_tasks.pop(key, None)
        if task is not None:
            self.progress.remove_task(task)


def _label(job) -> str:
    """The model, and with repeats the seed of this one."""
    return job.spec["id"] + (f" (seed {job.protocol['seed']})" if getattr(job, "repeat", None) is not None else "")
