"""What every bench script shares: a parser whose help is the script's claim, the machine a figure
was taken on, the JSON rows a measurement run in a fresh process prints, and the JSON file a
script writes. Mechanics only: nothing here decides what a benchmark measures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["parser", "machine", "child_rows", "write_json"]


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A script's argument parser; its docstring (the claim, then how to run it) is the help."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def machine(device=None) -> dict:
    """Where a figure was taken: a run's provenance (library versions, bakeoff's commit, Python,
    platform), the device as a run names it, torch and cuDNN as loaded, the cores and the command."""
    import torch  # here, so that a script that only parses its arguments starts fast

    from bakeoff.provenance import provenance
    from bakeoff.machine import device_name

    dev = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    return provenance() | {
        "device_name": device_name(dev), "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None, "cpu_count": os.cpu_count(),
        "command": " ".join([Path(sys.executable).name, *sys.argv])}


def child_rows(cmd: list[str], timeout: float | None = None, env: dict | None = None) -> tuple[list[dict], str]:
    """Run one measurement in a fresh process (its own CUDA context and caches): the JSON rows it
    printed (lines that start with ``{``), and why there are none ("" when there are)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [], f"not finished in {timeout:.0f} s"
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return rows, "" if rows else " | ".join(done.stderr.strip().splitlines()[-3:])


def write_json(path, result, indent: int = 2) -> None:
    """Write a script's result (rows, or a dict with its machine and rows) as JSON."""
    Path(path).write_text(json.dumps(result, indent=indent, default=str))
