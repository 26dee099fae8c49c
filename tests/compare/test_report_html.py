"""report.html and report.md from a real tiny run, checked as files and in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bakeoff.api import run_comparison
from bakeoff.compare.outputs import write_outputs
from bakeoff.compare.report_html import confusion_figure, worst_classes
from bakeoff.measure import wilson_interval
from bakeoff.store import Store
from conftest import TINY

MODELS = ["timm/test_resnet", "timm/test_efficientnet"]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_colour_folder):
    out = tmp_path_factory.mktemp("report") / "out"
    comparison = run_comparison(shared_colour_folder, MODELS, out=out, **TINY)
    assert (comparison.results["status"] == "ok").all(), comparison.results["error"].tolist()
    return out, comparison


@pytest.fixture(scope="module")
def varied_run(tiny_run, tmp_path_factory):
    """The tiny run plus an endpoint latency per model and a failed trial whose error holds markup."""
    src, _ = tiny_run
    out = tmp_path_factory.mktemp("varied") / "out"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("cache", "models"))
    store = Store(out / "bakeoff.db")
    run = store.latest_run()
    for n, key in enumerate(run["trial_keys"].values()):
        # endpoint latencies in the opposite order to the in-process ones' models: the switch must move points
        store.update_result(key, {"endpoint_latency_ms_p50": 5.0 + 10 * n, "endpoint_latency_ms_p95": 6.0 + 10 * n})
    store.save_trial("failedkey", 1, "timm/test_vit", "pytorch", "failed", 0.0,
                     error="RuntimeError: <script>alert(1)</script> shapes do not match", traceback="Traceback ...")
    keys = run["trial_keys"] | {"timm/test_vit": "failedkey"}
    run_id = store.start_run("bakeoff run data --models x", MODELS[0], keys, run["protocol"], run["dataset"],
                             run["provenance"])
    store.finish_run(run_id, "finished")
    return out, write_outputs(out)


def test_run_writes_a_self_contained_report(tiny_run):
    out, comparison = tiny_run
    page = (out / "report.html").read_text()
    # nothing to fetch: no external script, stylesheet or image
    assert not re.search(r"<script[^>]+src=", page)
    markup = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.S)
    assert not re.search(r"""(href|src)=["']?(https?:)?//""", markup)
    assert page.count("plotly.js v") == 1  # the plotting library is inlined exactly once
    for model in MODELS:
        assert model in page
    md = (out / "report.md").read_text()
    assert "## Recommendations" in md and "**Most accurate:**" in md and "**Best pytorch model:**" in md
    rows = [line for line in md.splitlines() if line.startswith("| timm/")]
    assert len(rows) == 2 and rows[0].startswith(f"| {MODELS[0]} (baseline) | pytorch | ok |")
    acc = comparison.results.set_index("model")["accuracy"]
    assert f"{100 * acc[MODELS[1]]:.1f}%" in rows[1]
    assert "## Provenance" in md and "command: `" in md


def test_paired_figures_and_starting_weights_of_a_real_run(tiny_run):
    from statsmodels.stats.contingency_tables import mcnemar

    out, comparison = tiny_run
    trials = {t["model"]: t["result"] for t in Store(out / "bakeoff.db").latest_trials()[1]}
    n_val = len(json.loads((out / "split.json").read_text())["val"])
    # the engine stored each validation image's answer and label, in the split's order
    assert all(len(r["val_pred"]) == len(r["val_true"]) == n_val for r in trials.values())
    assert trials[MODELS[0]]["val_true"] == trials[MODELS[1]]["val_true"]
    base, other = (np.equal(trials[m]["val_pred"], trials[m]["val_true"]) for m in MODELS)
    table = [[np.sum(other & base), np.sum(other & ~base)], [np.sum(~other & base), np.sum(~other & ~base)]]
    rel = pd.read_csv(out / "relative.csv").set_index("model")
    assert rel["weights"].tolist() == ["random-init", "random-init"]  # TINY trains from random weights
    # how each ranked figure was taken: tiny CPU epochs timed whole, alone; TorchScript latency on a CPU
    assert rel["train_time_kind"].tolist() == ["measured alone"] * 2
    assert rel["latency_kind"].tolist() == ["compiled"] * 2
    assert rel.loc[MODELS[1], "p_vs_baseline"] == pytest.approx(mcnemar(table, exact=True).pvalue)
    assert rel.loc[MODELS[0], ["relative_accuracy_ci_low", "relative_accuracy_ci_high", "p_vs_baseline"]].tolist() \
        == [1.0, 1.0, 1.0]
    lo, hi = rel.loc[MODELS[1], ["relative_accuracy_ci_low", "relative_accuracy_ci_high"]]
    assert lo <= rel.loc[MODELS[1], "relative_accuracy"] <= hi
    res = pd.read_csv(out / "results.csv").set_index("model")
    assert res["p_vs_baseline"].tolist() == rel["p_vs_baseline"].tolist()
    assert "val_pred" not in res.columns and "val_true" not in res.columns
    md = (out / "report.md").read_text()
    assert f"| {MODELS[1]} | pytorch | ok | random-init |" in md


def test_failed_trial_and_escaping(varied_run):
    out, comparison = varied_run
    page = (out / "report.html").read_text()
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; shapes do not match" in page
    md = (out / "report.md").read_text()
    assert "### Failed trials" in md and "- timm/test_vit: `RuntimeError: <script>" in md
    assert "| timm/test_vit | pytorch | failed |" in md
    # both latencies reach the Markdown table; endpoint figures relative to the baseline's 5 ms
    assert "endpoint latency p50 / p95" in md and "rel. inference time (endpoint)" in md
    line = next(x for x in md.splitlines() if x.startswith(f"| {MODELS[1]} |"))
    assert "15.00 / 16.00 ms" in line and "3.00x" in line


def test_a_collapsed_model_is_marked_and_never_recommended(tiny_run, tmp_path):
    src, comparison = tiny_run
    out = tmp_path / "out"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("cache", "models"))
    store = Store(out / "bakeoff.db")
    n = comparison.run["dataset"]["n_val"]
    keys = store.latest_run()["trial_keys"]
    third = n // 3
    # rows stored before the chance check: the check is made from their confusion matrices
    collapsed = [[third, 0, 0], [third, 0, 0], [n - 2 * third, 0, 0]]  # every image answered "first class"
    right = [[third, 0, 0], [0, third, 0], [0, 0, n - 2 * third]]
    for model, cm in ((MODELS[0], collapsed), (MODELS[1], right)):
        correct = sum(cm[i][i] for i in range(3))
        lo, hi = wilson_interval(correct, n)
        store.update_result(keys[model], {"confusion_matrix": cm, "accuracy": correct / n, "accuracy_ci_low": lo,
                                          "accuracy_ci_high": hi, "above_chance": None})
    redone = write_outputs(out)
    row = redone.results.set_index("model").loc[MODELS[0]]
    assert row["above_chance"] is False or row["above_chance"] == False  # noqa: E712 (numpy bool)
    assert redone.baseline == MODELS[1]  # the first model that learned
    assert not pd.read_csv(out / "relative.csv").set_index("model").loc[MODELS[0], "pareto"]
    md = (out / "report.md").read_text()
    assert f"| {MODELS[0]} | pytorch | not distinguishable from chance | random-init |" in md
    assert "not distinguishable from chance (the share of the largest validation class" in md
    assert "try a lower --lr" in md
    page = (out / "report.html").read_text()
    assert "the largest class's share): on no Pareto front" in page and ">not distinguishable from chance<" in page
    assert len(re.findall(r'<tr class="chance">', page)) == 1 and '<tr class="failed">' not in page
    recs = md.split("## Recommendations")[1].split("## Results")[0]
    assert MODELS[0] not in recs and f"**Most accurate:** {MODELS[1]}" in recs
    proc = subprocess.run([sys.executable, "-m", "bakeoff.cli", "report", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if MODELS[0] in ln and "│" in ln)
    assert "not" in line.split("│")[2] and "*" not in line.split("│")[-2]
    assert "not distinguishable from chance (the share" in " ".join(proc.stdout.split())


def test_worst_classes_and_confusion():
    cm = [[8, 2, 0], [1, 4, 5], [0, 0, 10]]
    per_class = {"a": 0.8, "b": 0.4, "c": 1.0}
    worst = worst_classes(per_class, cm, ["a", "b", "c"], n=2)
    assert [(w["class"], w["correct"], w["total"], w["confused_with"], w["confused_n"]) for w in worst] == [
        ("b", 4, 10, "c", 5), ("a", 8, 10, "b", 2)]
    fig = confusion_figure(cm, ["a", "b", "c"])
    assert fig["data"][0]["z"][1] == [0.1, 0.4, 0.5] and fig["data"][0]["text"][1] == [1, 4, 5]


def test_without_plotly_the_markdown_is_still_written(tiny_run, tmp_path, monkeypatch):
    import builtins

    src, _ = tiny_run
    out = tmp_path / "out"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("cache", "models", "report.*"))
    real_import = builtins.__import__

    def no_plotly(name, *args, **kwargs):
        if name.startswith("plotly"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_plotly)
    comparison = write_outputs(out)
    assert (out / "report.md").exists() and not (out / "report.html").exists()
    assert "pip install 'bakeoff[report]'" in comparison.warning


# ---- in a real browser -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: `make test` installs Debian's chromium and chromium-driver")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def _open(browser, html: Path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(html.resolve().as_uri(), wait_until="load")
    page.wait_for_selector("#plot-inference .scatterlayer .point", timeout=20_000)
    return page, problems


def _points(page, plot_id: str) -> int:
    return page.locator(f"#{plot_id} .scatterlayer .trace .point").count()


def _column(page, header: str) -> list[str]:
    """The sort values of the column whose header starts with ``header``."""
    idx = page.evaluate("""h => Array.from(document.querySelectorAll('#results thead th'))
                              .findIndex(th => th.textContent.trim().startsWith(h))""", header)
    assert idx >= 0, header
    return page.evaluate("i => Array.from(document.querySelectorAll('#results tbody tr'))"
                         ".map(r => r.cells[i].getAttribute('data-sort'))", idx)


def test_page_in_chromium(browser, tiny_run, tmp_path):
    out, comparison = tiny_run
    page, problems = _open(browser, out / "report.html")
    assert _points(page, "plot-training") == 2 and _points(page, "plot-inference") == 2
    assert page.locator(".rec").count() >= 4 and page.locator(".rec-most-accurate .pick").inner_text() in MODELS
    # hovering a point shows the model and its absolute figures with the interval
    page.locator("#plot-training").scroll_into_view_if_needed()  # the recommendations above may be long
    box = page.locator("#plot-training .scatterlayer .point").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#plot-training .hoverlayer .hovertext", timeout=5_000)
    hover = page.locator("#plot-training .hoverlayer").last.text_content()
    assert any(m in hover for m in MODELS) and "(95% CI" in hover and "training time" in hover
    # sorting by training time orders the rows by it, both ways
    page.click("#results thead th:has-text('training time') >> nth=0")
    # the header says how the figure was taken: tiny CPU epochs are timed whole, alone
    assert page.locator("#results thead th", has_text="training time (measured alone)").count() == 1
    up = [float(v) for v in _column(page, "training time")]
    assert up == sorted(up)
    page.click("#results thead th:has-text('training time') >> nth=0")
    down = [float(v) for v in _column(page, "training time")]
    assert down == sorted(down, reverse=True) and down != up
    # a model's details draw its training curve and confusion matrix when opened
    page.click("details#m1 summary")
    page.wait_for_selector("#m1-curves .scatterlayer .trace", timeout=10_000)
    assert page.locator("#m1-curves .scatterlayer .trace").count() == 4
    assert page.locator("#m1-confusion .heatmaplayer, #m1-confusion .hm").count() >= 1
    page.click("details#m1 summary")  # closed again for the screenshot
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    if os.environ.get("BAKEOFF_SCREENSHOT"):
        page.screenshot(path=os.environ["BAKEOFF_SCREENSHOT"], full_page=True)
    assert problems == []
    page.close()


def test_latency_switch_and_failed_row_in_chromium(browser, varied_run):
    out, _ = varied_run
    page, problems = _open(browser, out / "report.html")
    assert _points(page, "plot-inference") == 2  # the failed model has no point
    before = page.evaluate("document.getElementById('plot-inference').data[0].x")
    assert page.locator("th[data-latency='endpoint']").first.is_hidden()
    page.check("input[name=latency][value=endpoint]")
    page.wait_for_function("document.getElementById('plot-inference').layout.title.text.includes('endpoint')")
    after = page.evaluate("document.getElementById('plot-inference').data[0].x")
    assert sorted(after) == [1.0, 3.0] and after != before
    assert page.locator("th[data-latency='endpoint']").first.is_visible()
    assert page.locator("th[data-latency='in-process']").first.is_hidden()
    assert page.locator(".rec-fastest-inference:visible").count() == 1
    failed = page.locator("#results tbody tr.failed")
    assert failed.count() == 1 and "shapes do not match" in failed.inner_text()
    assert problems == []
    page.close()


def test_report_when_every_trial_failed(tmp_path):
    store = Store(tmp_path / "bakeoff.db")
    run_id = store.start_run("bakeoff run data --models timm/test_vit", None, {"timm/test_vit": "k1"},
                             {"epochs": 1}, {"classes": ["a", "b"], "n_train": 4, "n_val": 2}, {"device": "cpu"})
    store.save_trial("k1", run_id, "timm/test_vit", "pytorch", "failed", 0.0, error="out of memory: CUDA")
    store.finish_run(run_id, "finished")
    comparison = write_outputs(tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "No model finished" in page and "out of memory: CUDA" in page
    assert 'id="plot-training"' not in page
    md = (tmp_path / "report.md").read_text()
    assert "nothing to recommend" in md and "| timm/test_vit | pytorch | failed |" in md
    assert comparison.relative is None
