"""The run's progress display: one bar per trial in flight, also when several train at once."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from bakeoff.progress import RunProgress


def _job(key: str) -> SimpleNamespace:
    return SimpleNamespace(key=key, spec={"id": f"model-{key}"}, protocol={"epochs": 2, "batch_size": 16})


def test_trials_training_at_once_each_have_a_bar_that_goes_when_they_end():
    out = io.StringIO()
    a, b = _job("a"), _job("b")
    with RunProgress(2, Console(file=out, width=120)) as display:
        display.on_event("start", a, None)
        display.on_event("start", b, None)
        display.on_event("step", a, (1, 50, 100, 2.0))  # epoch 2, step 50 of 100, 2 s into the epoch
        display.on_event("step", b, (0, 10, 100, 1.0))
        bars = {t.description: (t.completed, t.total, t.fields["rate"]) for t in display.progress.tasks}
        assert bars["model-a epoch 2/2"] == (150, 200, "400 img/s")
        assert bars["model-b epoch 1/2"] == (10, 200, "160 img/s")
        display.on_event("done", a, {"accuracy": 0.75, "train_time_s": 3.0})
        left = [t.description for t in display.progress.tasks]
        assert left == ["run", "model-b epoch 1/2"]
        display.on_event("start", b, None)  # sent back to run alone: starts again, one bar
        display.on_event("failed", b, {"error": "out of memory"})
        assert [t.description for t in display.progress.tasks] == ["run"]
        assert display.progress.tasks[0].completed == 2
    printed = out.getvalue()
    assert "model-a: done acc 0.750, train 3.0s" in printed and "model-b: failed: out of memory" in printed
