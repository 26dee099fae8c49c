"""Training time and latency taken the same way for every model, whatever the run around it.

Claim checked: a model's `train_time_s` stays within 5% between a cold and a warm compile
cache, between `--trials-per-gpu 1` and the default sharing, and between two identical Keras
models of one run; every row's compared latency (`latency_kind`) is the compiled or graph form.

Three runs of the same models, seed and protocol, each into a fresh output folder:
  cold    default sharing, a fresh cache folder (images decoded, every model compiled cold)
  warm    default sharing, the cold run's cache folder (compiled kernels found at the start)
  alone   `--trials-per-gpu 1`, the same warm cache
The default model list is the study's 7 PyTorch models and 4 Keras MobileNetV2s, two of them
the same network under two ids (the identical pair).

    PYTHONPATH=src python3 bench/like_for_like.py fashion5k --work lfl -- --no-pretrained --epochs 3

Everything after `--` goes to every `bakeoff run`. Figures land in WORK/like_for_like.json and
as a table at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from harness import parser, write_json  # bench/, beside this script

BAKEOFF = [sys.executable, "-c", "from bakeoff.cli import main; main()"]
MODELS = ("pytorch-ic-alexnet,pytorch-ic-densenet121,pytorch-ic-densenet201,pytorch-ic-googlenet,"
          "pytorch-ic-mobilenet-v2,pytorch-ic-resnet152,pytorch-ic-resnet34,"
          "tensorflow-ic-tf2-preview-mobilenet-v2-classification-4,keras/MobileNetV2,"
          "tensorflow-ic-imagenet-mobilenet-v2-050-224-classification-4,"
          "tensorflow-ic-imagenet-mobilenet-v2-075-224-classification-4")
IDENTICAL = ("tensorflow-ic-tf2-preview-mobilenet-v2-classification-4", "keras/MobileNetV2")
RUNS = (("cold", "cold", []), ("warm", "cold", []), ("alone", "cold", ["--trials-per-gpu", "1"]))
COLUMNS = ["train_time_s", "train_time_kind", "setup_time_s", "compile_wait_s", "latency_ms_p50", "latency_kind",
           "latency_form", "latency_eager_ms_p50", "accuracy", "status", "error"]


def one_run(data: str, work: Path, models: str, name: str, cache: str, flags: list[str], extra: list[str]) -> dict:
    out = work / name
    cmd = BAKEOFF + ["run", data, "--models", models, "--out", str(out), "--cache-dir", str(work / f"{cache}-cache"),
                     *flags, *extra]
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    row = {"run": name, "whole_s": time.time() - t0, "rc": done.returncode, "command": " ".join(cmd[3:])}
    if done.returncode != 0:
        row["stderr"] = done.stderr.strip().splitlines()[-5:]
    results = out / "results.csv"
    row["models"] = pd.read_csv(results).set_index("model").reindex(columns=COLUMNS).to_dict("index") \
        if results.is_file() else {}
    return row


def _ratio(a, b) -> float | None:
    try:
        return float(a) / float(b) - 1.0
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = parser(__doc__)
    ap.add_argument("data")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--runs", default="cold,warm,alone", help="which of cold, warm, alone, in order")
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    a.work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, cache, flags in RUNS:
        if name in a.runs.split(","):
            rows[name] = one_run(a.data, a.work, a.models, name, cache, flags, extra)
            print(json.dumps({k: v for k, v in rows[name].items() if k != "models"}), flush=True)
            write_json(a.work / f"like_for_like-{'-'.join(rows)}.json", rows)
    names = list(rows)
    print("\n| model | " + " | ".join(f"{n} train s" for n in names) + " | warm vs cold | alone vs warm "
          "| compared latency ms (kind) | eager ms |")
    print("|---|" + "---|" * (len(names) + 4))
    for model in a.models.split(","):
        got = [rows[n]["models"].get(model, {}) for n in names]
        cells = [f"{g['train_time_s']:.2f}" if pd.notna(g.get("train_time_s")) else str(g.get("status", "-"))
                 for g in got]
        by = dict(zip(names, got))
        d1 = _ratio(by.get("warm", {}).get("train_time_s"), by.get("cold", {}).get("train_time_s"))
        d2 = _ratio(by.get("alone", {}).get("train_time_s"), by.get("warm", {}).get("train_time_s"))
        last = got[-1]
        lat = f"{last.get('latency_ms_p50', float('nan')):.2f} ({last.get('latency_kind')}: {last.get('latency_form')})"
        print(f"| {model} | " + " | ".join(cells) + f" | {'-' if d1 is None else f'{100 * d1:+.1f}%'} | "
              f"{'-' if d2 is None else f'{100 * d2:+.1f}%'} | {lat} | {last.get('latency_eager_ms_p50', float('nan')):.2f} |")
    for n in names:
        pair = [rows[n]["models"].get(m, {}).get("train_time_s") for m in IDENTICAL]
        d = _ratio(*pair)
        print(f"identical Keras pair in {n}: {pair} ({'-' if d is None else f'{100 * d:+.1f}%'})")


if __name__ == "__main__":
    main()
