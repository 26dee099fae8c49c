"""OUT/report.html: one self-contained page (plotting code inlined, opens offline) to pick a model.

The page holds the two trade-off plots (interactive, with a switch between measured latencies),
the computed recommendations, a sortable table, each model's training curves, confusion matrix
and worst classes, and the run's provenance. OUT/report.md holds the same comparison as Markdown.

>>> paths = write_reports("runs/leaves", comparison, trials)  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from markupsafe import Markup

from bakeoff.compare.markdown import (LATENCY_SHORT, dataset_warnings, figure_table, relative_by_latency,
                                      report_markdown, run_summary)
from bakeoff.compare.plots import FRAMEWORK_COLORS, repeat_points
from bakeoff.compare.recommend import (LATENCIES, as_number, fmt_ci, fmt_ms, fmt_p, fmt_pct, fmt_seconds,
                                       is_number, recommend)
from bakeoff.compare.tables import CHANCE_STATUS, figure_kind, weights_kind
from bakeoff.errors import BakeoffError

__all__ = ["write_reports", "build_html", "other_repeats", "scatter_figure", "curves_figure", "confusion_figure", "worst_classes"]

FRONT_COLOR = "#2ca02c"
LABEL_LIMIT = 12  # beyond this many models, names show on hover only, not beside each point


def _clean(obj):
    """JSON-safe: NaN/inf -> null, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _json_script(obj) -> str:
    # "</script>" or "<!--" inside a <script> element would end or derail it: no "<" at all
    return json.dumps(_clean(obj), separators=(",", ":")).replace("<", "\\u003c")


def _hover(r, rel, baseline: str | None, kind: str | None) -> str:
    e = html.escape
    ci = fmt_ci(as_number(r["accuracy_ci_low"]), as_number(r["accuracy_ci_high"]))
    rlo, rhi = as_number(rel["relative_accuracy_ci_low"]), as_number(rel["relative_accuracy_ci_high"])
    paired = f" ({rlo:.3f}–{rhi:.3f}), {fmt_p(as_number(rel['p_vs_baseline']))}" if rlo is not None \
        and rhi is not None else ""
    lines = [f"<b>{e(r['model'])}</b> ({e(str(r['framework']))})" + (" · baseline" if r["model"] == baseline else ""),
             f"accuracy {fmt_pct(as_number(r['accuracy']))} (95% CI {ci}); weights "
             f"{e(weights_kind(r.get('weights')) or '?')}",
             f"relative accuracy {rel['relative_accuracy']:.3f}{paired}",
             f"training time {fmt_seconds(as_number(r['train_time_s']))} ({rel['relative_training_time']:.2f}x; "
             f"{e(str(r.get('train_time_kind') or 'not recorded'))})"]
    if kind is not None:
        p50, p95, label = LATENCIES[kind]
        form = f"; {e(str(r.get('latency_form') or r.get('latency_kind')))}" if kind == "in-process" else ""
        lines.append(f"{label}: p50 {fmt_ms(as_number(r.get(p50)))}, p95 {fmt_ms(as_number(r.get(p95)))} "
                     f"({rel['relative_inference_time']:.2f}x{form})")
    if as_number(r.get("throughput_img_s")) is not None:
        lines.append(f"throughput {r['throughput_img_s']:,.0f} img/s (batch 64)")
    fronts = [n for n, c in (("training", "pareto_training"), ("inference", "pareto_inference")) if rel[c]]
    if fronts:
        lines.append("on the Pareto front: " + " and ".join(fronts))
    if bool(rel.get("at_chance", False)):
        lines.append(f"{CHANCE_STATUS} ({fmt_pct(as_number(r.get('chance_accuracy')))}, the largest class's "
                     "share): on no Pareto front")
    return "<br>".join(lines)


def scatter_figure(rel: pd.DataFrame, results: pd.DataFrame, x: str, front: str, title: str, xlabel: str,
                   baseline: str | None, kind: str | None = None) -> dict:
    """A Plotly figure (plain dict): one marker per model, coloured by framework, CI bars, front."""
    res = results.set_index("model", drop=False)
    rel = rel[rel[x].notna()]
    labels = len(rel) <= LABEL_LIMIT
    data = []
    for fw, part in rel.groupby("framework", sort=False):
        # the legend draws a trace's first marker: keep the baseline's diamond out of that place
        part = part.assign(_b=part["model"] == baseline).sort_values("_b", kind="stable")
        y = part["relative_accuracy"]
        # no bar where the interval is unknown (trials stored without per-image predictions); a
        # percentile interval can miss its point estimate by a hair, which would make a bar negative
        up = (part["relative_accuracy_ci_high"] - y).fillna(0).clip(lower=0)
        down = (y - part["relative_accuracy_ci_low"]).fillna(0).clip(lower=0)
        is_base = part["model"] == baseline
        xs, ys = repeat_points(part, x)
        if xs:  # each repeat, faint, behind the mean
            data.append({"type": "scatter", "mode": "markers", "x": xs, "y": ys, "showlegend": False,
                         "hoverinfo": "skip", "marker": {"color": FRAMEWORK_COLORS.get(fw, "#555555"), "size": 6,
                                                         "opacity": 0.3}})
        data.append({
            "type": "scatter", "mode": "markers+text" if labels else "markers", "name": fw,
            "x": part[x].tolist(), "y": y.tolist(), "text": part["model"].tolist(),
            "textposition": "top center", "textfont": {"size": 11},
            "error_y": {"type": "data", "symmetric": False, "array": up.tolist(),
                        "arrayminus": down.tolist(), "thickness": 1.2,
                        "width": 3, "color": FRAMEWORK_COLORS.get(fw, "#555555")},
            "marker": {"color": FRAMEWORK_COLORS.get(fw, "#555555"), "size": [16 if b else 11 for b in is_base],
                       "symbol": ["diamond" if b else "circle" for b in is_base],
                       "line": {"color": "black", "width": [2.5 if b else 0.5 for b in is_base]}},
            "hovertext": [_hover(res.loc[m], r, baseline, kind) for m, (_, r) in zip(part["model"], part.iterrows())],
            "hovertemplate": "%{hovertext}<extra></extra>", "cliponaxis": False,
        })
    pts = rel[rel[front]].sort_values(x)
    data.append({"type": "scatter", "mode": "lines", "name": "Pareto front", "x": pts[x].tolist(),
                 "y": pts["relative_accuracy"].tolist(), "line": {"shape": "hv", "dash": "dash", "color": FRONT_COLOR,
                                                                  "width": 2}, "hoverinfo": "skip"})
    xs = rel[x].astype(float)
    log = bool(len(xs) and xs.min() > 0 and xs.max() / xs.min() > 20)
    xaxis = {"title": {"text": xlabel}, "type": "log" if log else "linear", "zeroline": False}
    yaxis = {"title": {"text": "relative accuracy (95% CI)"}, "zeroline": False}
    if len(xs):
        # room around the points for their names and error bars (log axes take ranges in log10 units)
        lo, hi = (math.log10(xs.min()), math.log10(xs.max())) if log else (xs.min(), xs.max())
        pad = 0.12 * max(hi - lo, 0.1 if log else 0.05 * abs(hi))
        xaxis["range"] = [lo - pad, hi + pad]
        ylo = float(rel["relative_accuracy_ci_low"].fillna(rel["relative_accuracy"]).min())
        yhi = float(rel["relative_accuracy_ci_high"].fillna(rel["relative_accuracy"]).max())
        ypad = max(yhi - ylo, 0.05)
        yaxis["range"] = [ylo - 0.08 * ypad, yhi + 0.15 * ypad]
    annotations = []
    base = rel[rel["model"] == baseline]
    if not base.empty:
        bx = float(base[x].iloc[0])
        annotations.append({"x": math.log10(bx) if log else bx, "y": float(base["relative_accuracy"].iloc[0]),
                            "text": "baseline", "showarrow": True, "arrowhead": 2, "ax": 40, "ay": 30,
                            "font": {"size": 11}})
    layout = {
        "title": {"text": title, "font": {"size": 15}}, "height": 430, "margin": {"l": 60, "r": 40, "t": 50, "b": 50},
        "xaxis": xaxis, "yaxis": yaxis,
        "legend": {"orientation": "h", "y": -0.2}, "hovermode": "closest", "hoverlabel": {"align": "left"}, "annotations": annotations,
        "shapes": [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": 1, "y1": 1,
                    "line": {"color": "#999", "width": 1}}],
        "plot_bgcolor": "#fafafa", "paper_bgcolor": "white",
    }
    return {"data": data, "layout": layout}


CURVES = (("train_loss", 1, "training loss", "#1f77b4", "solid"),
          ("val_loss", 1, "validation loss", "#ff7f0e", "dot"),
          ("train_accuracy", 2, "training accuracy", "#1f77b4", "solid"),
          ("val_accuracy", 2, "validation accuracy", "#ff7f0e", "dot"))


def curves_figure(history: list[dict], others: list[list[dict]] = ()) -> dict:
    """Loss (left) and accuracy (right) by epoch, training and validation (validation only after
    the epochs that were scored, ``--val-every``; the line joins them). ``others``: the other
    repeats' histories (``--repeats``), drawn faint behind the first repeat's."""
    data = []
    for r, other in enumerate(others, start=1):
        ep = [h.get("epoch") for h in other]
        for i, (key, axis, name, color, dash) in enumerate(CURVES):
            data.append({"type": "scatter", "mode": "lines", "name": f"repeats 1-{len(others)} (faint)", "x": ep,
                         "connectgaps": True, "y": [h.get(key) for h in other], "opacity": 0.3,
                         "hovertemplate": f"repeat {r}, {name}: %{{y:.3f}}<extra></extra>",
                         "xaxis": f"x{axis if axis > 1 else ''}", "yaxis": f"y{axis if axis > 1 else ''}",
                         "line": {"color": color, "dash": dash, "width": 1},
                         "legendgroup": "repeats", "showlegend": r == 1 and i == 0})
    ep = [h.get("epoch") for h in history]
    for key, axis, name, color, dash in CURVES:
        data.append({"type": "scatter", "mode": "lines+markers", "name": name + (" (repeat 0)" if others else ""),
                     "x": ep, "connectgaps": True,
                     "y": [h.get(key) for h in history], "xaxis": f"x{axis if axis > 1 else ''}",
                     "yaxis": f"y{axis if axis > 1 else ''}", "line": {"color": color, "dash": dash}})
    layout = {"height": 300, "margin": {"l": 50, "r": 20, "t": 50, "b": 40},
              "xaxis": {"domain": [0, 0.45], "title": {"text": "epoch"}, "dtick": 1},
              "xaxis2": {"domain": [0.55, 1], "title": {"text": "epoch"}, "dtick": 1, "anchor": "y2"},
              "yaxis": {"title": {"text": "loss"}}, "yaxis2": {"title": {"text": "accuracy"}, "anchor": "x2",
                                                               "tickformat": ".0%"},
              "legend": {"orientation": "h", "x": 0, "y": 1.18}}
    return {"data": data, "layout": layout}


def confusion_figure(cm: list[list[int]], classes: list[str]) -> dict:
    """Heatmap coloured by the share of each true class; the cells show counts."""
    m = np.asarray(cm, dtype=float)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    k = len(classes)
    trace = {"type": "heatmap", "z": share.round(4).tolist(), "x": classes, "y": classes,
             "text": m.astype(int).tolist(), "colorscale": [[0, "#f7fbff"], [0.5, "#6baed6"], [1, "#08306b"]],
             "zmin": 0, "zmax": 1,
             "hovertemplate": "true %{y}, predicted %{x}: %{text} images (%{z:.0%} of the class)<extra></extra>",
             "colorbar": {"title": {"text": "share"}, "tickformat": ".0%"}}
    if k <= 20:
        trace["texttemplate"] = "%{text}"
    side = min(900, max(320, 26 * k + 140))
    layout = {"height": side, "width": side + 80, "margin": {"l": 90, "r": 20, "t": 30, "b": 90},
              "xaxis": {"title": {"text": "predicted"}, "type": "category", "tickangle": -45 if k > 8 else 0},
              "yaxis": {"title": {"text": "true"}, "type": "category", "autorange": "reversed"}}
    return {"data": [trace], "layout": layout}


def worst_classes(per_class: dict, cm: list[list[int]] | None, classes: list[str], n: int = 5) -> list[dict]:
    """The ``n`` classes with the lowest accuracy, with counts and the class most often predicted instead."""
    m = np.asarray(cm, dtype=int) if cm is not None else None
    rows = []
    for i, c in enumerate(classes):
        acc = per_class.get(c)
        if acc is None:
            continue
        row = {"class": c, "accuracy": acc, "correct": None, "total": None, "confused_with": None, "confused_n": 0}
        if m is not None and i < len(m):
            row["correct"], row["total"] = int(m[i, i]), int(m[i].sum())
            off = m[i].copy()
            off[i] = 0
            if off.max() > 0:
                row["confused_with"], row["confused_n"] = classes[int(off.argmax())], int(off.max())
        rows.append(row)
    rows.sort(key=lambda r: (r["accuracy"], -(r["total"] or 0)))
    return rows[:n]


def _plotly_js() -> str:
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise BakeoffError("report.html needs plotly: pip install 'bakeoff[report]'") from None
    return get_plotlyjs()


def _when(ts) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if is_number(ts) else "?"


def _provenance(comparison, trials: dict) -> dict:
    run = comparison.run
    ds, prov = run.get("dataset", {}), run.get("provenance", {})
    started, finished = run.get("started"), run.get("finished")
    devices = sorted({str(t["result"].get("device_name")) for t in trials.values()
                      if t.get("result") and t["result"].get("device_name")})
    train_total = sum(as_number(t["result"].get("train_time_s")) or 0 for t in trials.values() if t.get("result"))
    classes = ds.get("classes", [])
    return {
        "data_dir": ds.get("data_dir"), "val_dir": ds.get("val_dir"), "val_fraction": ds.get("val_fraction"),
        "split_seed": ds.get("split_seed"), "fingerprint": ds.get("fingerprint"), "classes": classes,
        "counts": [(c, ds.get("train_counts", {}).get(c), ds.get("val_counts", {}).get(c)) for c in classes],
        "n_train": ds.get("n_train"), "n_val": ds.get("n_val"), "skipped": ds.get("skipped", []),
        "warnings": dataset_warnings(ds),
        "protocol": run.get("protocol", {}), "device": ", ".join(devices) or prov.get("device", "?"),
        "device_kind": prov.get("device"), "libraries": prov.get("libraries", {}),
        "bakeoff": f"{prov.get('bakeoff_version', '?')} (commit {prov.get('bakeoff_commit') or 'unknown'})",
        "python": prov.get("python"), "platform": prov.get("platform"), "started": _when(started),
        "finished": _when(finished), "status": run.get("status"),
        "wall": fmt_seconds(finished - started) if is_number(finished) and is_number(started) else "?",
        "train_total": fmt_seconds(train_total), "command": run.get("command") or "?",
    }


def _model_details(comparison, trials: dict, classes: list[str],
                   histories: dict | None = None) -> tuple[list[dict], dict]:
    details, figures = [], {}
    for i, (_, r) in enumerate(comparison.results.iterrows()):
        t = trials.get(r["model"], {})
        result = t.get("result") or {}
        item = {"id": f"m{i}", "model": r["model"], "framework": r["framework"], "status": r["status"],
                "error": r["error"], "traceback": t.get("traceback"), "summary": "", "worst": []}
        if r["status"] == "ok":
            ci = fmt_ci(as_number(r["accuracy_ci_low"]), as_number(r["accuracy_ci_high"]))
            item["summary"] = (f"accuracy {fmt_pct(as_number(r['accuracy']))} (95% CI {ci}), trained in "
                               f"{fmt_seconds(as_number(r['train_time_s']))}, "
                               f"{fmt_ms(as_number(r['latency_ms_p50']))} per image; weights: "
                               f"{result.get('weights', '?')}, input {result.get('input_size', '?')} px, "
                               f"{result.get('precision', '?')}")
            figs = {}
            if result.get("history"):
                figs["curves"] = curves_figure(result["history"], (histories or {}).get(r["model"], []))
            cm = result.get("confusion_matrix")
            if cm:
                figs["confusion"] = confusion_figure(cm, classes[:len(cm)])
            item["worst"] = [w | {"accuracy_text": fmt_pct(w["accuracy"])}
                             for w in worst_classes(result.get("per_class_accuracy") or {}, cm, classes)]
            figures[item["id"]] = figs
            item["figures"] = sorted(figs)
        details.append(item)
    return details, figures


def build_html(comparison, trials: dict, plotly_js: str | None = None, histories: dict | None = None) -> str:
    """The page's HTML; ``trials`` maps model id -> store row (with its ``result``);
    ``histories``: model id -> the epoch records of its other finished repeats, in order."""
    import jinja2

    classes = comparison.run.get("dataset", {}).get("classes", [])
    recs = recommend(comparison.results)
    rel = relative_by_latency(comparison)
    cols, rows = figure_table(comparison, rel)
    plots = {"training": None, "inference": {}}
    for kind, frame in rel.items():
        if plots["training"] is None:
            plots["training"] = scatter_figure(
                frame, comparison.results, "relative_training_time", "pareto_training",
                "Accuracy vs training time",
                f"training time ({figure_kind(comparison.results, 'train_time_kind')}) relative to the baseline "
                "(lower is better)",
                comparison.baseline)
        plots["inference"][kind] = scatter_figure(
            frame, comparison.results, "relative_inference_time", "pareto_inference",
            f"Accuracy vs inference time ({LATENCY_SHORT[kind]})",
            f"{LATENCIES[kind][2]}"
            f"{' (' + figure_kind(comparison.results, 'latency_kind') + ')' if kind == 'in-process' else ''} "
            "relative to the baseline (lower is better)", comparison.baseline, kind)
    details, figures = _model_details(comparison, trials, classes, histories)
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    folder = resources.files("bakeoff.compare") / "templates"
    template = env.from_string((folder / "report.html.j2").read_text(encoding="utf-8"))
    return template.render(
        title=f"bakeoff report: {Path(comparison.run.get('dataset', {}).get('data_dir') or 'run').name}",
        summary=run_summary(comparison), warning=comparison.warning, baseline=comparison.baseline,
        stability=(getattr(comparison, "stability", None) or {}).get("verdict"),
        recommendations=recs, latencies=list(rel), latency_labels={k: LATENCIES[k][2] for k in rel},
        columns=cols, rows=rows, details=details, chance_status=CHANCE_STATUS,
        numeric={c.key: any(is_number(r[c.key].sort) for r in rows) for c in cols},
        prov=_provenance(comparison, trials),
        generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        failed=[d for d in details if d["status"] != "ok"],
        data_json=Markup(_json_script({"plots": plots, "models": figures})),
        css=Markup((folder / "report.css").read_text(encoding="utf-8")),
        js=Markup((folder / "report.js").read_text(encoding="utf-8")),
        plotly_js=Markup(plotly_js if plotly_js is not None else _plotly_js()),
    )


def other_repeats(run: dict, by_key: dict[str, dict]) -> dict[str, list[list[dict]]]:
    """Model id -> the epoch records of each of its finished repeats after the first, in repeat
    order (empty for a run without repeats); ``by_key``: the run's stored trials by key."""
    return {model: [by_key[k]["result"]["history"] for k in keys[1:]
                    if k in by_key and by_key[k]["status"] == "ok" and (by_key[k]["result"] or {}).get("history")]
            for model, keys in (run.get("repeat_keys") or {}).items()}


def write_reports(out_dir, comparison, trials: list[dict]) -> list[Path]:
    """Write OUT/report.md and OUT/report.html; returns the paths written. ``trials``: the run's
    stored trials, every repeat's (``Store.latest_trials``).

    Without plotly installed, report.html is skipped and ``comparison.warning`` says how to get it.
    """
    out_dir = Path(out_dir)
    run = comparison.run
    by_key = {t["key"]: t for t in trials}
    firsts = {by_key[k]["model"]: by_key[k] for k in run.get("trial_keys", {}).values() if k in by_key}
    md = out_dir / "report.md"
    md.write_text(report_markdown(comparison, recommend(comparison.results)), encoding="utf-8")
    written = [md]
    try:
        page = build_html(comparison, firsts, histories=other_repeats(run, by_key))
    except BakeoffError as exc:
        comparison.warning = "; ".join(w for w in (comparison.warning, f"report.html not written: {exc}") if w)
        return written
    tmp = out_dir / "report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out_dir / "report.html")
    return written + [out_dir / "report.html"]
