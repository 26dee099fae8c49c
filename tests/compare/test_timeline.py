"""`bakeoff timeline`: where a finished run's time went, checked against the run's own store."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3

import pytest

from bakeoff.api import run_comparison
from bakeoff.compare.timeline import low_spans
from conftest import TINY, run_main

MODELS = ["timm/test_resnet"]  # one tiny model keeps the run to seconds


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_colour_folder):
    out = tmp_path_factory.mktemp("timeline") / "out"
    run_comparison(shared_colour_folder, MODELS, out=out, **TINY)
    return out


def stored(out):
    """The latest run's start and end, and per model its trial's start, end and epoch walls,
    read straight from the SQLite store."""
    with sqlite3.connect(out / "bakeoff.db") as db:
        run_id, started, finished = db.execute(
            "SELECT id, started, finished FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        rows = db.execute("SELECT model, started, finished, result FROM trials WHERE run_id = ?", (run_id,)).fetchall()
    return started, finished, {m: (s, f, [h["epoch_wall_s"] for h in json.loads(r)["history"]],
                                   [h["eval_time_s"] for h in json.loads(r)["history"]]) for m, s, f, r in rows}


def table_rows(printed: str) -> dict[str, list[str]]:
    cells = [line.strip("|").split("|") for line in printed.splitlines() if line.startswith("| timm/")]
    return {c[0].strip(): [x.strip() for x in c[1:]] for c in cells}


def test_timeline_prints_each_trials_start_end_and_epoch_walls_as_stored(tiny_run, tmp_path, capsys):
    run_start, run_end, trials = stored(tiny_run)
    start, end = run_start - 5.0, run_end + 1.0
    (tmp_path / "start").write_text(f"{start}\n")  # a file of seconds, as `date +%s.%N > start` writes
    code, printed, err = run_main(capsys, ["timeline", str(tiny_run), "--start", str(tmp_path / "start"),
                                           "--end", str(end), "--project", "4", "--json", str(tmp_path / "t.json")])
    assert code == 0 and err == ""
    assert printed.startswith(f"whole {end - start:,.1f} s (from the command's start to the command's end)")
    rows = table_rows(printed)
    assert set(rows) == set(MODELS)
    for model, (t_start, t_end, walls, _) in trials.items():
        status, _, _, started_s, ended_s, _, walls_s, _, _ = rows[model]
        assert status == "ok"
        assert started_s == f"{t_start - start:,.1f}" and ended_s == f"{t_end - start:,.1f}"
        assert walls_s == " ".join(f"{w:,.1f}" for w in walls) and len(walls) == TINY["epochs"]
    # The projection, by hand: the trial that ended last sets the pace; each further epoch costs
    # one of its epochs plus one evaluation, the mean over all its epochs or over all but the last.
    setter = max(trials, key=lambda m: trials[m][1])
    cycles = [w + e for w, e in zip(trials[setter][2], trials[setter][3])]
    more = 4 - len(cycles)
    low, high = sorted([end - start + more * cycles[0], end - start + more * (cycles[0] + cycles[1]) / 2])
    assert f"projected to 4 epochs: {low:,.1f}-{high:,.1f} s (pace setter {setter})" in printed
    figures = json.loads((tmp_path / "t.json").read_text())
    assert figures["projected_s"] == pytest.approx([low, high])
    assert figures["whole_s"] == pytest.approx(end - start)


def test_timeline_without_times_spans_the_run_itself(tiny_run, capsys):
    run_start, _, trials = stored(tiny_run)
    code, printed, _ = run_main(capsys, ["timeline", str(tiny_run)])
    assert code == 0 and "from the run (after the scan)'s start to the last output file's end" in printed
    for model, row in table_rows(printed).items():
        assert row[3] == f"{trials[model][0] - run_start:,.1f}"


def test_utilisation_samples_become_the_spans_under_half(tmp_path):
    util = tmp_path / "util.csv"
    util.write_text("timestamp, utilization.gpu [%], memory.used [MiB]\n" + "".join(
        f"2026/12/02 03:55:{s:02d}.000, {u} %, 10 MiB\n" for s, u in [(0, 0), (2, 4), (4, 100), (6, 30), (8, 99)]))
    t0 = dt.datetime(2026, 12, 2, 3, 55, tzinfo=dt.timezone.utc).timestamp()
    assert low_spans(util, t0) == (5, [(0.0, 2.0), (6.0, 6.0)])


@pytest.mark.parametrize("args, message", [
    (["{empty}"], "holds no run"),
    (["{run}", "--start", "soon"], "'soon' is neither a number of seconds nor a file holding one"),
    (["{run}", "--project", "0"], "--project"),
    (["{run}", "--util", "{empty}/util.csv"], "no such file"),
    (["{run}", "--util", "{bad}"], "not a utilisation sample"),
])
def test_bad_input_is_one_line_and_exit_code_2(tiny_run, tmp_path, capsys, args, message):
    (tmp_path / "bad.csv").write_text("timestamp, utilization.gpu [%]\nyesterday, lots\n")
    paths = {"empty": tmp_path, "run": tiny_run, "bad": tmp_path / "bad.csv"}
    code, printed, err = run_main(capsys, ["timeline", *(a.format(**paths) for a in args)])
    assert code == 2 and printed == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_timeline_of_a_top_only_run_shows_each_epoch_as_stored(shared_colour_folder, tmp_path, capsys):
    # top-only epochs run alone: the engine records their wall time as their time
    out = tmp_path / "top"
    run_comparison(shared_colour_folder, MODELS, out=out, train_only_top_layer=True, **TINY)
    _, _, trials = stored(out)
    code, printed, err = run_main(capsys, ["timeline", str(out)])
    assert code == 0 and err == ""
    for model, (_, _, walls, evals) in trials.items():
        cells = table_rows(printed)[model]
        assert cells[6] == " ".join(f"{w:,.1f}" for w in walls) and all(e >= 0 for e in evals)
