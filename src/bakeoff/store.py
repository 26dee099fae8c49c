"""SQLite store (OUT/bakeoff.db): one row per run and per trial, committed as each finishes."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from bakeoff.lifetime import folder_in_use

__all__ = ["Store"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,
    command TEXT,
    baseline TEXT,
    trial_keys TEXT NOT NULL,   -- JSON {model id: trial key}, in the order the user listed them
    protocol TEXT NOT NULL,
    dataset TEXT NOT NULL,
    provenance TEXT NOT NULL,
    repeat_keys TEXT            -- JSON {model id: [trial key of each repeat]}; NULL: one repeat
);
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY,       -- model + protocol + data set fingerprint + device kind
    run_id INTEGER NOT NULL,
    model TEXT NOT NULL,
    framework TEXT,
    status TEXT NOT NULL,       -- ok | failed
    started REAL,
    finished REAL,
    error TEXT,
    traceback TEXT,
    result TEXT                 -- JSON: every figure and its provenance
);
"""


class Store:
    def __init__(self, path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.executescript(SCHEMA)
            if "repeat_keys" not in {r["name"] for r in db.execute("PRAGMA table_info(runs)")}:
                db.execute("ALTER TABLE runs ADD COLUMN repeat_keys TEXT")  # a store written before repeats

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def start_run(self, command: str, baseline: str | None, trial_keys: dict, protocol: dict, dataset: dict,
                  provenance: dict, repeat_keys: dict | None = None) -> int:
        """``trial_keys``: each model's first (or only) trial; ``repeat_keys``: with repeats, each
        model's list of trial keys, one a repeat."""
        with closing(self._connect()) as db, db:
            cur = db.execute(
                "INSERT INTO runs (started, status, command, baseline, trial_keys, protocol, dataset, provenance,"
                " repeat_keys) VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), command, baseline, json.dumps(trial_keys), json.dumps(protocol),
                 json.dumps(dataset), json.dumps(provenance), json.dumps(repeat_keys) if repeat_keys else None),
            )
            return int(cur.lastrowid)

    def finish_run(self, run_id: int, status: str) -> None:
        with closing(self._connect()) as db, db:
            db.execute("UPDATE runs SET finished = ?, status = ? WHERE id = ?", (time.time(), status, run_id))

    def mark_interrupted(self) -> int:
        """Mark the runs still "running" as interrupted (their process was killed: a run that
        ends in any other way says how it ended), as of their last stored trial. Call only
        while holding the folder (``lifetime.hold_folder``), so that none of them is live."""
        with closing(self._connect()) as db, db:
            return db.execute(
                "UPDATE runs SET status = 'interrupted', finished = COALESCE("
                "(SELECT MAX(finished) FROM trials WHERE trials.run_id = runs.id), started)"
                " WHERE status = 'running'").rowcount

    def finished_keys(self) -> set[str]:
        with closing(self._connect()) as db:
            return {r["key"] for r in db.execute("SELECT key FROM trials WHERE status = 'ok'")}

    def save_trial(self, key: str, run_id: int, model: str, framework: str, status: str, started: float,
                   result: dict | None = None, error: str | None = None, traceback: str | None = None) -> None:
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT OR REPLACE INTO trials (key, run_id, model, framework, status, started, finished, error,"
                " traceback, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, run_id, model, framework, status, started, time.time(), error, traceback,
                 json.dumps(result) if result is not None else None),
            )

    def update_result(self, key: str, extra: dict) -> None:
        """Merge ``extra`` figures (measured after training, e.g. endpoint latency) into a trial."""
        with closing(self._connect()) as db, db:
            row = db.execute("SELECT result FROM trials WHERE key = ?", (key,)).fetchone()
            if row is None or row["result"] is None:
                raise KeyError(key)
            result = json.loads(row["result"]) | extra
            db.execute("UPDATE trials SET result = ? WHERE key = ?", (json.dumps(result), key))

    def latest_run(self) -> dict | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        if row is None:
            return None
        run = dict(row)
        for k in ("trial_keys", "protocol", "dataset", "provenance"):
            run[k] = json.loads(run[k])
        if run.get("repeat_keys"):
            run["repeat_keys"] = json.loads(run["repeat_keys"])
        else:
            run.pop("repeat_keys", None)
        return run

    def latest_trials(self) -> tuple[dict | None, list[dict]]:
        """The latest run and its trials (in the order they finished); ``(None, [])`` before any run.

        The run's ``missing`` lists its models that have no stored trial yet, and a run still
        marked "running" whose process is gone (no run holds the folder) reads "interrupted".
        With repeats (``repeat_keys``) each trial carries its ``repeat`` (0, 1, ...), ``missing``
        lists the models with no stored repeat, and ``missing_repeats`` the (model, repeat) pairs
        not stored of the other models."""
        run = self.latest_run()
        if run is None:
            return None, []
        by_model = run.get("repeat_keys") or {m: [k] for m, k in run["trial_keys"].items()}
        repeat_of = {k: r for keys in by_model.values() for r, k in enumerate(keys)}
        trials = self.trials(keys=list(repeat_of))
        stored = {t["key"] for t in trials}
        run["missing"] = [m for m, keys in by_model.items() if not stored.intersection(keys)]
        if "repeat_keys" in run:
            for t in trials:
                t["repeat"] = repeat_of[t["key"]]
            run["missing_repeats"] = [(m, r) for m, keys in by_model.items() if m not in run["missing"]
                                      for r, k in enumerate(keys) if k not in stored]
        if run["status"] == "running" and folder_in_use(self.path.parent) is False:
            run["status"] = "interrupted"
        return run, trials

    def trials(self, keys: list[str] | None = None) -> list[dict]:
        with closing(self._connect()) as db:
            rows = [dict(r) for r in db.execute("SELECT * FROM trials ORDER BY finished")]
        wanted = set(keys) if keys is not None else None
        out = []
        for r in rows:
            if wanted is not None and r["key"] not in wanted:
                continue
            r["result"] = json.loads(r["result"]) if r["result"] else None
            out.append(r)
        return out
