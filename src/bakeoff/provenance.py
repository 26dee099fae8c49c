"""Where a figure came from: library versions, bakeoff's commit, the machine."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

__all__ = ["provenance"]

LIBRARIES = ("torch", "torchvision", "timm", "numpy", "pandas", "scikit-learn", "pillow", "keras", "tensorflow",
             "jax")


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        bakeoff_version = importlib.metadata.version("bakeoff")
    except importlib.metadata.PackageNotFoundError:
        bakeoff_version = "source"
    return {
        "bakeoff_version": bakeoff_version,
        "bakeoff_commit": _git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "libraries": versions,
    }
