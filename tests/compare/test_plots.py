"""The two trade-off plots, drawn from a hand-made results table."""

from __future__ import annotations

from bakeoff.compare.plots import plot_tradeoffs
from bakeoff.compare.tables import relative_frame
from conftest import results_table


def test_plots_are_written(tmp_path):
    rel, _ = relative_frame(results_table(), "base")
    paths = plot_tradeoffs(rel, tmp_path)
    assert [p.name for p in paths] == ["accuracy_vs_training_time.png", "accuracy_vs_inference_time.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
