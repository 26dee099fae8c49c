"""The study's two scatter plots, redrawn: relative accuracy against relative training time and
against relative inference time, coloured by framework, baseline marked, Pareto front drawn."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from bakeoff.compare.tables import CHANCE_STATUS, figure_kind

__all__ = ["plot_tradeoffs", "short_label", "repeat_points", "FRAMEWORK_COLORS"]

# The study's ids carry their hub's naming; on a crowded plot the architecture is what reads.
_ID_NOISE = re.compile(r"^(pytorch|tensorflow)-ic-|imagenet-|-ilsvrc2012|-classification-\d+$")


def short_label(model: str) -> str:
    """``tensorflow-ic-imagenet-mobilenet-v2-050-224-classification-4`` -> ``mobilenet-v2-050-224``
    (the colour says the framework)."""
    return _ID_NOISE.sub("", model) or model

FRAMEWORK_COLORS = {"pytorch": "#d62728", "tensorflow": "#1f77b4"}  # red and blue, as in the study


def _plot(rel: pd.DataFrame, x: str, front: str, xlabel: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for fw, part in rel.groupby("framework"):
        color = FRAMEWORK_COLORS.get(fw, "#555555")
        xs, ys = repeat_points(part, x)
        if xs:  # each repeat, faint, behind the mean
            ax.scatter(xs, ys, color=color, alpha=0.25, s=14, linewidths=0, zorder=1)
        # no bar where the interval is unknown (trials stored without per-image predictions); a
        # percentile interval can miss its point estimate by a hair, which would make a bar negative
        yerr = [(part["relative_accuracy"] - part["relative_accuracy_ci_low"]).fillna(0).clip(lower=0),
                (part["relative_accuracy_ci_high"] - part["relative_accuracy"]).fillna(0).clip(lower=0)]
        ax.errorbar(part[x], part["relative_accuracy"], yerr=yerr, fmt="o", color=color, ecolor=color,
                    alpha=0.85, capsize=3, markersize=7, label=fw)
    pts = rel[rel[front]].sort_values(x)
    ax.step(pts[x], pts["relative_accuracy"], where="post", color="#2ca02c", lw=1.5, ls="--",
            label="Pareto front")
    base = rel[rel["baseline"]]
    ax.scatter(base[x], base["relative_accuracy"], s=260, facecolors="none", edgecolors="black", lw=1.5,
               label=f"baseline ({base['model'].iloc[0]})", zorder=5)
    texts = [ax.text(r[x], r["relative_accuracy"],
                     short_label(r["model"]) + (f" ({CHANCE_STATUS})" if bool(r.get("at_chance", False)) else ""),
                     fontsize=8)
             for _, r in rel.iterrows()]
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.axvline(1.0, color="grey", lw=0.6)
    if rel[x].max() / max(rel[x].min(), 1e-12) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("relative accuracy (95% CI)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _spread_labels(ax, texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def repeat_points(rel: pd.DataFrame, x: str) -> tuple[list[float], list[float]]:
    """Each finished repeat's relative accuracy (``relative_accuracy_by_repeat``) at its model's
    ``x``: the faint points a plot draws behind the means; none for a run without repeats."""
    if "relative_accuracy_by_repeat" not in rel.columns:
        return [], []
    xs, ys = [], []
    for xv, values in zip(rel[x], rel["relative_accuracy_by_repeat"]):
        for y in np.asarray(values if values is not None else [], dtype=float):
            if np.isfinite(y) and pd.notna(xv):
                xs.append(float(xv))
                ys.append(float(y))
    return xs, ys


def _spread_labels(ax, texts) -> None:
    """Move labels off each other and off the points, with a thin leader line where moved."""
    try:
        from adjustText import adjust_text
    except ImportError:  # labels stay where they are: readable unless points crowd
        return
    adjust_text(texts, ax=ax, expand=(1.3, 1.8), force_text=(0.6, 1.0), max_move=(40, 60),
                arrowprops={"arrowstyle": "-", "color": "#888888", "lw": 0.5})


def plot_tradeoffs(rel: pd.DataFrame, out_dir: Path, inference_label: str = "batch-1 latency p50") -> list[Path]:
    """The two plots; each axis says how its figure was taken (``figure_kind``)."""
    out = Path(out_dir) / "plots"
    paths = [out / "accuracy_vs_training_time.png", out / "accuracy_vs_inference_time.png"]
    if "latency_kind" in rel.columns:
        inference_label += f", {figure_kind(rel, 'latency_kind')}"
    _plot(rel, "relative_training_time", "pareto_training",
          f"relative training time ({figure_kind(rel, 'train_time_kind')}; lower is better)",
          "Accuracy vs training time, relative to the baseline", paths[0])
    _plot(rel, "relative_inference_time", "pareto_inference",
          f"relative inference time ({inference_label}; lower is better)",
          "Accuracy vs inference time, relative to the baseline", paths[1])
    return paths
