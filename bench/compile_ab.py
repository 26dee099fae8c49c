"""The same `bakeoff run` with compiled kernels and without, back to back: end-to-end time and
accuracy per model, side by side.

Claim checked: compiled training steps (`--compile auto`, the default on CUDA GPUs) make a run
shorter at equal accuracy (95% intervals that overlap) against eager kernels (`--compile off`).
Each run gets a fresh output folder and a fresh cache folder, so each pays its own decoding and,
with `auto`, its own cold compiles, as a first run on new data does; `--drop-caches` (root on
Linux) empties the page cache before each. Runs go in the order of `--modes`, once per seed of
`--seeds`; each command's wall time is timed around it.

    PYTHONPATH=src python3 bench/compile_ab.py fashion55k --work ab \\
        --models pytorch-ic-resnet34,pytorch-ic-mobilenet-v2 --modes auto,off --seeds 0 -- --no-pretrained

Everything after `--` goes to every `bakeoff run` unchanged. Figures land in WORK/ab.json and
as a table at the end; `bakeoff timeline WORK/<run>` reads any one run back in detail.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bakeoff.compare.timeline import timeline

from harness import parser, write_json  # bench/, beside this script

BAKEOFF = [sys.executable, "-c", "from bakeoff.cli import main; main()"]


def one_run(data: str, work: Path, models: str, mode: str, seed: int, extra: list[str], drop: bool) -> dict:
    name = f"{mode}-seed{seed}"
    out, cache = work / name, work / f"{name}-cache"
    if drop:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    cmd = BAKEOFF + ["run", data, "--models", models, "--compile", mode, "--seed", str(seed), "--out", str(out),
                     "--cache-dir", str(cache), *extra]
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    row = {"run": name, "mode": mode, "seed": seed, "whole_s": time.time() - t0, "rc": done.returncode,
           "command": " ".join(cmd[3:]), "models": {}}
    if done.returncode != 0:
        row["stderr"] = done.stderr.strip().splitlines()[-3:]
    if (out / "bakeoff.db").is_file():
        row["models"] = {t["model"]: t for t in timeline(out)["trials"]}
    return row


def _acc(m: dict | None) -> str:
    if not m or m.get("accuracy") is None:
        return "-"
    return f"{m['accuracy']:.3f} ({m['accuracy_ci'][0]:.3f}-{m['accuracy_ci'][1]:.3f})"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = parser(__doc__)
    ap.add_argument("data", help="the image folder every run trains on")
    ap.add_argument("--work", type=Path, required=True, help="where the runs' output and cache folders go")
    ap.add_argument("--models", required=True)
    ap.add_argument("--modes", default="auto,off", help="--compile values, in the order they run")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--drop-caches", action="store_true", help="empty the page cache before each run (root)")
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    a.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        for mode in a.modes.split(","):
            rows.append(one_run(a.data, a.work, a.models, mode, seed, extra, a.drop_caches))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "models"}), flush=True)
            write_json(a.work / "ab.json", rows)
    print("\n| run | whole s | " + " | ".join(m.split("-ic-")[-1] for m in a.models.split(",")) + " |")
    print("|---|---|" + "---|" * len(a.models.split(",")))
    for r in rows:
        cells = []
        for m in a.models.split(","):
            found = next((v for k, v in r["models"].items() if k == m or k.endswith(m)), None)
            note = ""
            if found and found["compiled_from_epoch"] is not None:
                at = found.get("compiled_from_step")
                note = f", compiled from {found['compiled_from_epoch']}" + (f" step {at}" if at else "")
            cells.append(_acc(found) + note)
        print(f"| {r['run']} | {r['whole_s']:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
