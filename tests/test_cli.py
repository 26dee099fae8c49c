"""The command line refuses bad input with one line and exit code 2, lists models whole, prints
a run's table (and says plainly when training went nowhere), and on Ctrl-C keeps what finished.

A few cases run the real CLI in its own process (exit code, stderr, no traceback); the rest call
``main`` in this process, which is the same code path without paying the start-up each time.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import make_colour_folder, run_main

BAKEOFF = [sys.executable, "-m", "bakeoff.cli"]
LONG_ID = "tensorflow-ic-imagenet-inception-resnet-v2-classification-4"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_colour_folder(tmp_path_factory.mktemp("cli") / "data", 2, classes={"a": (200, 0, 0), "b": (0, 0, 200)})


def one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def unwritable(tmp_path):
    """A folder this user cannot make: a read-only parent, or for root (who may write anywhere
    on a disk) a folder in /proc, where nobody can make one."""
    if os.geteuid() == 0:
        return "/proc/bakeoff-test/out"
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o500)
    return str(parent / "out")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, says", [
    (["run", "{data}", "--epoch", "1"], "No such option: --epoch (Possible options: --epochs)"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["run", "{data}", "--device", "tpu", "--out", "{out}"], "'tpu' is not a device"),
])
def test_usage_errors_in_a_real_process(data, tmp_path, args, says):
    args = [a.format(data=data, out=tmp_path / "out") for a in args]
    proc = subprocess.run(BAKEOFF + args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert says in one_line_error(proc.stderr)
    assert proc.stdout == "" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, says", [
    (["run", "{data}", "--epochs", "abc"], "Invalid value for '--epochs'"),
    (["run", "{data}", "--epochs"], "Option '--epochs' requires an argument"),
    (["serve", "{data}", "-m", "x", "--port", "http"], "Invalid value for '--port'"),
    (["serve", "{data}", "-m", "x", "--port", "70000"], "Invalid value for '--port'"),
    (["serve", "{data}", "-m", "x", "--device", "tpu"], "'tpu' is not a device"),
    (["run", "{data}", "--device", "tpu"], "'tpu' is not a device: pass auto, cpu, cuda or cuda:N"),
    (["run", "{data}", "--device", "cuda:x"], "'cuda:x' is not a device"),
    (["run", "{data}", "--trials-per-gpu", "0"], "pass a whole number from 1, or auto"),
    (["run", "{data}", "--keras-per-gpu", "two"], "pass a whole number from 1, or auto"),
    (["run", "{data}", "-m", "timm/resnet18", "--lr", "inf"], "above 0, e.g. 0.001, got inf"),
    (["run", "{data}", "-m", "timm/resnet18", "--lr", "nan"], "above 0, e.g. 0.001, got nan"),
    (["run", "{data}", "-m", "timm/resnet18", "--lr", "-1"], "--lr must be a finite number above 0"),
    (["run", "{data}", "-m", "timm/resnet18", "--image-size", "100000"],
     "--image-size must be between 16 and 1024, got 100000"),
    (["run", "{data}", "-m", "timm/resnet18", "--seed", "-1"], "--seed must be between 0 and"),
    (["run", "{data}", "--out", "{file}"], "is a file: pass a folder"),
    (["run", "{data}", "--out", "{file}/sub/out"], "is under a file"),
    (["run", "{data}", "--cache-dir", "{file}"], "Invalid value for '--cache-dir'"),
    (["run", "{data}", "--out", "{unwritable}"], "cannot be written"),
    (["demo", "--out", "{file}"], "is a file"),
    (["models", "--format", "xml"], "pass table, csv, json"),
    (["report", "{data}", "--bogus"], "No such option: --bogus"),
])
def test_every_usage_error_is_one_line_and_exit_code_2(data, tmp_path, capsys, args, says):
    (tmp_path / "file.txt").write_text("not a folder")
    args = [a.format(data=data, file=tmp_path / "file.txt", unwritable=unwritable(tmp_path)) for a in args]
    before = sorted(os.listdir(tmp_path))
    code, out, err = run_main(capsys, args)
    assert code == 2
    assert says in one_line_error(err)
    assert sorted(os.listdir(tmp_path)) == before  # nothing made on the way to the refusal


def test_a_writable_out_folder_is_checked_and_not_left_behind(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "new" / "deeper"
    code, _, err = run_main(capsys, ["run", str(data), "--out", str(out), "--epochs", "0", "-m", "timm/resnet18"])
    assert code == 2 and "--epochs must be at least 1" in one_line_error(err)  # --out passed, the next check failed
    assert not (tmp_path / "new").exists()


def test_a_bare_command_prints_the_help(capsys):
    code, out, err = run_main(capsys, [])
    assert code == 0 and "run" in out and "models" in out and err == ""


def test_models_as_csv_and_json_give_every_column_and_whole_ids(capsys):
    code, out, _ = run_main(capsys, ["models", "tensorflow-ic-imagenet-inception", "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and {r["id"] for r in rows} == {LONG_ID, "tensorflow-ic-imagenet-inception-v3-classification-4"}
    assert set(rows[0]) >= {"id", "framework", "params", "input_size", "offline_weights", "weight_source", "license"}
    assert all(r["weight_source"].startswith("https://") and r["weight_source"].endswith(".h5") for r in rows)

    code, out, _ = run_main(capsys, ["models", "tensorflow-ic-imagenet-inception", "-f", "json"])
    records = json.loads(out)
    assert code == 0 and {r["id"] for r in records} == {r["id"] for r in rows}
    assert [r["weight_source"] for r in records] == [r["weight_source"] for r in rows]  # no escaped slashes
    assert all(isinstance(r["params"], int) and r["input_size"] == 299 for r in records)


@pytest.mark.timeout(90)
def test_a_narrow_piped_model_table_keeps_ids_whole(tmp_path):
    proc = subprocess.run(BAKEOFF + ["models", "tensorflow-ic-imagenet-inception"], capture_output=True, text=True,
                          timeout=90, env={**os.environ, "COLUMNS": "40"})
    assert proc.returncode == 0, proc.stderr
    assert LONG_ID in proc.stdout and "…" not in proc.stdout
    assert "tensorflow-ic-imagenet-inception-v3-classification-4 " in proc.stdout


def test_a_narrow_terminal_draws_the_model_table_wider_than_cut_an_id(capsys, monkeypatch):
    from rich.console import Console

    import bakeoff.cli as cli

    monkeypatch.setattr(cli, "console", Console(width=40, force_terminal=True))
    cli.print_models(__import__("pandas").DataFrame([
        {"id": LONG_ID, "framework": "tensorflow", "params": 55_873_736, "input_size": 299,
         "offline_weights": False, "weight_source": "https://example.org/" + "w" * 80 + ".h5"}]))
    out = capsys.readouterr().out
    assert LONG_ID in out and "…" not in out


def _cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(BAKEOFF + [str(a) for a in args], capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize("make_args, message", [
    (lambda p: ["run", p / "missing", "--models", "timm/test_resnet"], "does not exist"),
    (lambda p: ["run", p / "data", "--models", "pytorch-ic-resnet43"], "closest: pytorch-ic-resnet34"),
    (lambda p: ["run", p / "data", "--models", "timm/test_resnet", "--val-dir", p / "missing"], "does not exist"),
    (lambda p: ["report", p / "nothing-here"], "does not exist"),
    (lambda p: ["run", p / "data", "--models", "pytorch-ic-resnet34", "--out", p / "o"], "--no-pretrained"),
    (lambda p: ["run", p / "data", "--models", "timm/test_resnet", "--compile", "always"],
     "--compile must be one of auto, off"),
])
def test_cli_bad_input_is_one_line_exit_2_no_traceback(tmp_path, colour_folder, make_args, message):
    proc = _cli(*make_args(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1


def test_cli_run_prints_the_table_and_interrupt_keeps_finished_work(tmp_path, colour_folder):
    out = tmp_path / "out"
    args = ["run", colour_folder, "--models", "timm/test_resnet,timm/test_efficientnet", "--out", out,
            "--no-pretrained", "--image-size", "32", "--epochs", "1", "--device", "cpu"]
    proc = subprocess.Popen(BAKEOFF + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for the first trial to be stored, then press Ctrl-C
        if (out / "bakeoff.db").exists():
            with sqlite3.connect(out / "bakeoff.db") as db:
                try:
                    if db.execute("SELECT count(*) FROM trials").fetchone()[0] >= 1:
                        break
                except sqlite3.OperationalError:  # the file is there, its tables not yet
                    pass
        time.sleep(0.2)
    t_int = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # the second trial won the race: nothing left to interrupt
        with sqlite3.connect(out / "bakeoff.db") as db:
            rows = db.execute("SELECT model, started, finished FROM trials").fetchall()
        pytest.skip(f"run finished before the interrupt: {[(m, round(s - t_int, 2), round(f - t_int, 2)) for m, s, f in rows]}"
                    f" exit {time.time() - t_int:.2f}; {err[-400:]!r}")
    assert proc.returncode == 130 and "resume" in err and "Traceback" not in err
    with sqlite3.connect(out / "bakeoff.db") as db:
        assert db.execute("SELECT model FROM trials WHERE status='ok'").fetchall() == [("timm/test_resnet",)]
    done = _cli(*args)
    assert done.returncode == 0, done.stderr
    assert "trained 1, already done 1, failed 0" in done.stdout.replace("\n", " ")
    assert "timm/test_resnet" in done.stdout and "relative to" in done.stdout


def test_a_learning_rate_that_wrecks_training_is_reported_as_at_chance(tmp_path, shared_colour_folder):
    # lr 10 drives the model to one answer for every image: the run finishes, and says so plainly
    out = tmp_path / "out"
    proc = _cli("run", shared_colour_folder, "--models", "timm/test_resnet", "--out", out, "--no-pretrained",
                "--image-size", "32", "--epochs", "2", "--lr", "10", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    row = pd.read_csv(out / "results.csv").iloc[0]
    assert row["status"] == "ok" and not row["above_chance"]
    assert row["accuracy"] <= row["chance_accuracy"] == pytest.approx(1 / 3)
    text = " ".join(proc.stdout.split())
    assert "not distinguishable from chance" in text and "try a lower --lr" in text
    assert "nothing to recommend" in (out / "report.md").read_text()


@pytest.mark.parametrize("value, says", [("0", "--repeats must be a whole number from 1, got 0"),
                                         ("abc", "Invalid value for '--repeats'")])
def test_bad_repeats_is_one_line_and_exit_code_2(shared_colour_folder, tmp_path, capsys, value, says):
    code, _, err = run_main(capsys, ["run", str(shared_colour_folder), "-m", "timm/test_resnet",
                                     "--out", str(tmp_path / "out"), "--repeats", value])
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and says in err
    assert not (tmp_path / "out").exists()
