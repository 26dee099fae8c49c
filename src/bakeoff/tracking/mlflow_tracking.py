"""Log a bakeoff run to MLflow: one experiment per run, one MLflow run per trial.

Params are the protocol and the model spec; metrics are every numeric figure of the trial plus
its per-epoch curves (step = epoch); artifacts are the plots, the report files and the saved model.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

from bakeoff.errors import BakeoffError
from bakeoff.store import Store

__all__ = ["require_mlflow", "experiment_name", "log_run"]

# Files of OUT that belong to the whole comparison; each trial's run carries the ones that exist.
REPORT_FILES = ("results.csv", "relative.csv", "report.html", "report.md", "dataset.json",
                "class_label_to_prediction_index.json")
PARAM_LIMIT, TAG_LIMIT, BATCH = 500, 5000, 100  # 500: the smallest value limit among MLflow servers


def require_mlflow():
    try:
        import mlflow
    except ImportError:
        raise BakeoffError("--mlflow-uri needs MLflow: pip install 'bakeoff[mlflow]'") from None
    return mlflow


def experiment_name(out_dir, run: dict) -> str:
    """``bakeoff <absolute output folder> run <id> <start time>``: one per bakeoff run, even when the
    output folder is deleted and its run ids start again at 1."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["started"]))
    return f"bakeoff {Path(out_dir).expanduser().resolve()} run {run['id']} {started}"


def _metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)[:250]


def _numeric(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _artifact_root(uri: str, name: str) -> str | None:
    """Next to a SQLite file store (MLflow would otherwise use ./mlruns of the current folder)."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    db = Path(unquote(parsed.path)[1:]).resolve()  # sqlite:///rel.db is relative, sqlite:////abs.db absolute
    return (db.parent / "mlartifacts" / re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")).as_uri()


def _flatten(prefix: str, d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(f"{prefix}{k}.", v))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _spec(model: str) -> dict:
    from bakeoff.zoo.registry import resolve

    try:
        return resolve(model).to_dict()
    except BakeoffError:  # a model no longer in the zoo: its params are simply absent
        return {}


def _trial_entities(trial: dict, run: dict):
    from mlflow.entities import Metric, Param

    result = trial["result"] or {}
    stamp = int((trial["finished"] or trial["started"] or 0) * 1000)
    data = run["dataset"]
    params = {**_flatten("protocol.", run["protocol"]), **_flatten("model.", _spec(trial["model"])),
              "dataset.fingerprint": data.get("fingerprint"), "dataset.n_train": data.get("n_train"),
              "dataset.n_val": data.get("n_val"), "dataset.classes": len(data.get("classes", []))}
    if trial.get("repeat") is not None:  # a repeat trains with its own seed (Store.latest_trials says which)
        params |= {"protocol.seed": run["protocol"].get("seed", 0) + trial["repeat"], "repeat": trial["repeat"]}
    metrics, tags = [], {}
    for k, v in result.items():
        if k in ("history", "confusion_matrix", "per_class_accuracy"):
            continue
        num = _numeric(v)
        if num is not None:
            metrics.append(Metric(_metric_name(k), num, stamp, 0))
        elif isinstance(v, (str, bool)):
            tags[f"bakeoff.{k}"] = str(v)
    for cls, acc in (result.get("per_class_accuracy") or {}).items():
        if _numeric(acc) is not None:
            metrics.append(Metric(_metric_name(f"per_class_accuracy/{cls}"), float(acc), stamp, 0))
    for entry in result.get("history") or []:
        epoch = int(entry.get("epoch", 0))
        for k, v in entry.items():
            if k != "epoch" and _numeric(v) is not None:
                metrics.append(Metric(_metric_name(k), float(v), stamp, epoch))
    params = [Param(k, str(v)[:PARAM_LIMIT]) for k, v in params.items() if v is not None]
    return params, metrics, tags


def _logged_id(trial: dict) -> str:
    """Which outcome of a trial a run holds: a trial that failed and later succeeded is logged twice."""
    return f"{trial['key']}@{trial['finished']!r}"


def _log_trial(client, experiment_id: str, trial: dict, run: dict, out_dir: Path) -> str:
    from mlflow.entities import RunTag

    params, metrics, tags = _trial_entities(trial, run)
    tags |= {"bakeoff.model": trial["model"], "bakeoff.trial_key": trial["key"], "bakeoff.logged": _logged_id(trial),
             "bakeoff.status": trial["status"], "bakeoff.framework": trial["framework"] or ""}
    tags |= {f"bakeoff.provenance.{k}": str(v) for k, v in _flatten("", run["provenance"]).items()}
    if trial["error"]:
        tags["bakeoff.error"] = trial["error"]
    created = client.create_run(experiment_id, start_time=int((trial["started"] or 0) * 1000),
                                run_name=trial["model"])
    rid = created.info.run_id
    tag_list = [RunTag(k, v[:TAG_LIMIT]) for k, v in tags.items()]
    for i in range(0, max(len(params), len(tag_list)), BATCH):
        client.log_batch(rid, params=params[i:i + BATCH], tags=tag_list[i:i + BATCH])
    for i in range(0, len(metrics), 1000):
        client.log_batch(rid, metrics=metrics[i:i + 1000])
    if trial["result"]:
        client.log_dict(rid, trial["result"], "result.json")
    if trial["traceback"]:
        client.log_text(rid, trial["traceback"], "traceback.txt")
    if (out_dir / "plots").is_dir():
        client.log_artifacts(rid, str(out_dir / "plots"), "plots")
    for name in REPORT_FILES:
        if (out_dir / name).is_file():
            client.log_artifact(rid, str(out_dir / name), "report")
    model_dir = (trial["result"] or {}).get("model_dir")
    if trial["status"] == "ok" and model_dir and (out_dir / model_dir).is_dir():
        client.log_artifacts(rid, str(out_dir / model_dir), "model")
    client.set_terminated(rid, "FINISHED" if trial["status"] == "ok" else "FAILED",
                          end_time=int((trial["finished"] or trial["started"] or 0) * 1000))
    return rid


def log_run(out_dir, uri: str) -> str:
    """Log the latest run of ``out_dir/bakeoff.db`` to the MLflow tracking server or store at ``uri``.

    Returns the experiment name. Logging the same run twice adds nothing: a trial outcome
    already logged in the experiment is skipped.

    >>> log_run("runs/leaves", "sqlite:///mlflow.db")  # doctest: +SKIP
    'bakeoff /home/me/runs/leaves run 1 2026-01-31 09:15:02'
    """
    require_mlflow()
    from mlflow.tracking import MlflowClient

    out_dir = Path(out_dir)
    run, trials = Store(out_dir / "bakeoff.db").latest_trials()
    if run is None:
        raise BakeoffError(f"{out_dir / 'bakeoff.db'} holds no run to log: start one with `bakeoff run`")
    name = experiment_name(out_dir, run)
    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            name, artifact_location=_artifact_root(uri, name),
            tags={"bakeoff.out": str(out_dir.resolve()), "bakeoff.run_id": str(run["id"]),
                  "bakeoff.command": (run["command"] or "")[:TAG_LIMIT], "bakeoff.baseline": run["baseline"] or ""})
        logged = {r.data.tags.get("bakeoff.logged") for r in client.search_runs([exp_id], max_results=10_000)}
        for trial in trials:
            if _logged_id(trial) not in logged:
                _log_trial(client, exp_id, trial, run, out_dir)
    except BakeoffError:
        raise
    except Exception as exc:  # an unreachable server or a rejected value must not hide the finished results
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise BakeoffError(f"could not log to MLflow at {uri} ({type(exc).__name__}: {first}); the results are "
                           f"saved in {out_dir}: run the same command again to log them") from None
    return name
