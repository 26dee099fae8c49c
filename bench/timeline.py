"""Where a finished run's time went, read back from its output folder.

A run's `bakeoff.db` holds when each trial started and ended and, per epoch, its wall time and
evaluation time; `dataset.json` holds the scan and decode times. This prints them as one table
with the span of the whole command, the epoch each trial switched to compiled kernels at (and
the seconds that took), the gain of trials sharing the GPU (their epochs' training time alone,
added up, against the shared wall time of an epoch), and, with ``--project N``, the
time the same run would take for N epochs: the run as measured plus, for each epoch more, one
epoch of training and one evaluation of the trial that ended last (the one that sets the pace).

    python3 bench/timeline.py run2 --start start --end end --util util.csv --project 5

``--start``, ``--end``: when the command started and ended (seconds since the epoch, or a file
holding them); otherwise the run's own start, taken after the folder is scanned, and the last
output file. ``--util``: GPU utilisation samples in the
CSV form of ``nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 2``,
summarised as the spans under 50%. Reads files only: no GPU, no torch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

from bakeoff.store import Store


def _seconds(value: str) -> float:
    path = Path(value)
    return float(path.read_text().strip()) if path.is_file() else float(value)


def timeline(out: Path, start: float | None = None, end: float | None = None) -> dict:
    """The latest run in ``out``: per trial its start and end (seconds from ``start``), epoch
    walls, evaluations and projected training time; the whole span to ``end``, or to the last
    output file."""
    out = Path(out)
    span = (f"from {'the command' if start is not None else 'the run (after the scan)'}'s start "
            f"to {'the command' if end is not None else 'the last output file'}'s end")
    run, stored = Store(out / "bakeoff.db").latest_trials() if (out / "bakeoff.db").is_file() else (None, [])
    if run is None:
        raise SystemExit(f"{out} holds no run: pass the output folder of a `bakeoff run`")
    t0 = run["started"] if start is None else start
    dataset = json.loads((out / "dataset.json").read_text()) if (out / "dataset.json").is_file() else {}
    if end is None:
        end = max([p.stat().st_mtime for p in out.iterdir() if p.is_file()] + [run["finished"] or 0.0])
    trials = []
    for t in stored:
        r = t["result"] or {}
        history = r.get("history", [])
        trials.append({
            "model": t["model"], "status": t["status"], "started_s": t["started"] - t0, "ended_s": t["finished"] - t0,
            "accuracy": r.get("accuracy"), "train_time_s": r.get("train_time_s"),
            "capture_alone_s": (r.get("gpu_alone_s") or {}).get("capture"),
            "epoch_walls_s": [h["epoch_wall_s"] for h in history], "evals_s": [h["eval_time_s"] for h in history],
            "epoch_times_s": [h["epoch_time_s"] for h in history], "shared": r.get("concurrent_trials", 1) > 1,
            "compiled_from_epoch": r.get("compiled_from_epoch"), "compile_time_s": r.get("compile_time_s"),
            "compiled_from_step": next((h["compiled_from_step"] for h in history if "compiled_from_step" in h), None),
            "solo_step_s": [h.get("solo_step_s") for h in history],
            "accuracy_ci": [r.get("accuracy_ci_low"), r.get("accuracy_ci_high")], "compile_error": r.get("compile_error")})
    ok = [t for t in trials if t["status"] == "ok" and t["epoch_walls_s"]]
    report = {"span": span, "start": t0, "whole_s": end - t0,
              "scan_s": dataset.get("scan_time_s"), "decode_s": dataset.get("decode_time_s"), "trials": trials}
    if len(ok) > 1 and all(t["shared"] for t in ok):  # one at a time, epoch time and wall are the same
        # an epoch alone: the trial's training time (its steps timed alone) per epoch
        solo = sum(t["train_time_s"] / len(t["epoch_walls_s"]) for t in ok)
        shared = statistics.mean(statistics.mean(t["epoch_walls_s"]) for t in ok)
        report |= {"solo_epoch_sum_s": solo, "shared_epoch_wall_s": shared, "sharing_gain": solo / shared}
    if ok:
        report["pace_setter"] = max(ok, key=lambda t: t["ended_s"])["model"]
    return report


def project(report: dict, epochs: int) -> tuple[float, float] | None:
    """The whole run for ``epochs`` epochs, low and high: each epoch more costs one epoch of the
    pace setter's training and one evaluation, taken from its epochs before the last (the last
    one's evaluation overlaps the others' final measurements) and from all of them."""
    setter = next((t for t in report["trials"] if t["model"] == report.get("pace_setter")), None)
    if setter is None:
        return None
    cycles = [w + e for w, e in zip(setter["epoch_walls_s"], setter["evals_s"])]
    more = epochs - len(cycles)
    ways = [statistics.mean(cycles[:-1] or cycles), statistics.mean(cycles)]
    return report["whole_s"] + more * min(ways), report["whole_s"] + more * max(ways)


def low_spans(csv_path: Path, t0: float, below: int = 50) -> tuple[int, list[tuple[float, float]]]:
    """The number of samples, and the spans (seconds from ``t0``) where utilisation read under ``below``%."""
    samples = []
    for line in Path(csv_path).read_text().splitlines()[1:]:
        stamp, util = [x.strip() for x in line.split(",")][:2]
        when = dt.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=dt.timezone.utc).timestamp()
        samples.append((when - t0, int(util.split()[0])))
    spans: list[tuple[float, float]] = []
    was_low = False
    for when, util in samples:
        low = util < below
        if low and was_low:
            spans[-1] = (spans[-1][0], when)
        elif low:
            spans.append((when, when))
        was_low = low
    return len(samples), spans


def _f(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="a `bakeoff run` output folder")
    ap.add_argument("--start", type=_seconds, default=None, help="the command's start: seconds, or a file of them")
    ap.add_argument("--end", type=_seconds, default=None, help="the command's end: seconds, or a file of them")
    ap.add_argument("--util", type=Path, default=None, help="GPU utilisation samples (nvidia-smi CSV)")
    ap.add_argument("--project", type=int, default=None, help="project the whole run to this many epochs")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    rep = timeline(a.out, a.start, a.end)
    print(f"whole {_f(rep['whole_s'])} s ({rep['span']}); "
          f"scan {_f(rep['scan_s'])} s, decode {_f(rep['decode_s'])} s")
    print("| model | status | top-1 | training s | started s | ended s | capture alone s | epoch walls s | "
          "evaluations s | compiled from epoch (switch s) |\n|---|---|---|---|---|---|---|---|---|---|")
    for t in rep["trials"]:
        step = "" if t["compiled_from_step"] is None else f", step {t['compiled_from_step']}"
        compiled = "-" if t["compiled_from_epoch"] is None else \
            f"{t['compiled_from_epoch']}{step} ({_f(t['compile_time_s'])})"
        print(f"| {t['model']} | {t['status']} | {_f(t['accuracy'], 3)} | {_f(t['train_time_s'])} | "
              f"{_f(t['started_s'])} | {_f(t['ended_s'])} | {_f(t['capture_alone_s'], 2)} | "
              f"{' '.join(_f(w) for w in t['epoch_walls_s'])} | {' '.join(_f(e) for e in t['evals_s'])} | "
              f"{compiled} |")
    if "sharing_gain" in rep:
        print(f"sharing: {_f(rep['solo_epoch_sum_s'])} s of training alone per epoch in "
              f"{_f(rep['shared_epoch_wall_s'])} s shared, a gain of {rep['sharing_gain']:.2f}x")
    if a.project:
        span = project(rep, a.project)
        rep["projected_s"] = span
        print(f"projected to {a.project} epochs: {_f(span[0])}-{_f(span[1])} s (pace setter {rep['pace_setter']})"
              if span else "no trial finished: nothing to project from")
    if a.util:
        n, spans = low_spans(a.util, rep["start"])
        rep["util_samples"], rep["util_under_50"] = n, spans
        print(f"GPU under 50% in {len(spans)} spans of the {n} samples: "
              + ", ".join(f"{_f(s, 0)}-{_f(e, 0)} s" for s, e in spans))
    if a.json:
        a.json.write_text(json.dumps(rep, indent=2))


if __name__ == "__main__":
    sys.exit(main())
