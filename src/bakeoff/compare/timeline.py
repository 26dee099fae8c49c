"""Where a finished run's time went, read back from its output folder (``bakeoff timeline``).

A run's ``bakeoff.db`` holds when each trial started and ended and, per epoch, its wall time and
evaluation time; ``dataset.json`` holds the scan and decode times. ``timeline`` gathers them,
``project`` extends the run to more epochs, ``low_spans`` summarises GPU utilisation samples and
``render`` prints it all as one table. Reads files only: no device, no torch.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
from pathlib import Path

from bakeoff.errors import BakeoffError
from bakeoff.store import Store

__all__ = ["seconds", "timeline", "project", "low_spans", "render"]


def seconds(value: str) -> float:
    """A moment in seconds since the epoch, given as a number or as a file holding one."""
    path = Path(value)
    text = path.read_text().strip() if path.is_file() else value
    try:
        return float(text)
    except ValueError:
        raise BakeoffError(f"{value!r} is neither a number of seconds nor a file holding one "
                           f"(write it with `date +%s.%N > start`)") from None


def timeline(out: Path, start: float | None = None, end: float | None = None) -> dict:
    """The latest run in ``out``: per trial its start and end (seconds from ``start``), epoch
    walls, evaluations and training time; the whole span to ``end``, or to the last output file.
    Without ``start`` the run's own start (taken after the folder is scanned) is used."""
    out = Path(out)
    span = (f"from {'the command' if start is not None else 'the run (after the scan)'}'s start "
            f"to {'the command' if end is not None else 'the last output file'}'s end")
    run, stored = Store(out / "bakeoff.db").latest_trials() if (out / "bakeoff.db").is_file() else (None, [])
    if run is None:
        raise BakeoffError(f"{out} holds no run: pass the output folder of a `bakeoff run`")
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
            # runs stored before every engine recorded both: an epoch alone has its time as its wall
            "epoch_walls_s": [h.get("epoch_wall_s", h["epoch_time_s"]) for h in history],
            "evals_s": [h.get("eval_time_s") for h in history],
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
    cycles = [w + (e or 0.0) for w, e in zip(setter["epoch_walls_s"], setter["evals_s"])]
    more = epochs - len(cycles)
    ways = [statistics.mean(cycles[:-1] or cycles), statistics.mean(cycles)]
    return report["whole_s"] + more * min(ways), report["whole_s"] + more * max(ways)


def low_spans(csv_path: Path, t0: float, below: int = 50) -> tuple[int, list[tuple[float, float]]]:
    """The number of samples, and the spans (seconds from ``t0``) where utilisation read under
    ``below``%, from the CSV of
    ``nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 2``."""
    samples = []
    for n, line in enumerate(Path(csv_path).read_text().splitlines()[1:], start=2):
        try:
            stamp, util = [x.strip() for x in line.split(",")][:2]
            when = dt.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=dt.timezone.utc).timestamp()
            samples.append((when - t0, int(util.split()[0])))
        except (ValueError, IndexError):
            raise BakeoffError(f"{csv_path}, line {n}: not a utilisation sample (expected the CSV of "
                               f"`nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv`)") from None
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


def render(report: dict, epochs: int | None = None, util: tuple[int, list] | None = None) -> str:
    """The report as text: the whole span, one Markdown table row per trial, the sharing gain,
    and, when given, the projection to ``epochs`` and the low-utilisation spans ``util``."""
    lines = [f"whole {_f(report['whole_s'])} s ({report['span']}); "
             f"scan {_f(report['scan_s'])} s, decode {_f(report['decode_s'])} s",
             "| model | status | top-1 | training s | started s | ended s | capture alone s | epoch walls s | "
             "evaluations s | compiled from epoch (switch s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in report["trials"]:
        step = "" if t["compiled_from_step"] is None else f", step {t['compiled_from_step']}"
        compiled = "-" if t["compiled_from_epoch"] is None else \
            f"{t['compiled_from_epoch']}{step} ({_f(t['compile_time_s'])})"
        lines.append(f"| {t['model']} | {t['status']} | {_f(t['accuracy'], 3)} | {_f(t['train_time_s'])} | "
                     f"{_f(t['started_s'])} | {_f(t['ended_s'])} | {_f(t['capture_alone_s'], 2)} | "
                     f"{' '.join(_f(w) for w in t['epoch_walls_s'])} | {' '.join(_f(e) for e in t['evals_s'])} | "
                     f"{compiled} |")
    if "sharing_gain" in report:
        lines.append(f"sharing: {_f(report['solo_epoch_sum_s'])} s of training alone per epoch in "
                     f"{_f(report['shared_epoch_wall_s'])} s shared, a gain of {report['sharing_gain']:.2f}x")
    if epochs:
        span = project(report, epochs)
        lines.append(f"projected to {epochs} epochs: {_f(span[0])}-{_f(span[1])} s (pace setter "
                     f"{report['pace_setter']})" if span else "no trial finished: nothing to project from")
    if util is not None:
        n, spans = util
        lines.append(f"GPU under 50% in {len(spans)} spans of the {n} samples: "
                     + ", ".join(f"{_f(s, 0)}-{_f(e, 0)} s" for s, e in spans))
    return "\n".join(lines)
