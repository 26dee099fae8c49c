"""Shared fixtures: small synthetic image folders that a tiny model can learn in seconds."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def make_colour_folder(root: Path, per_class: int = 24, size: int = 40, seed: int = 0,
                       classes: dict | None = None) -> Path:
    """One folder per class; each image is its class colour plus noise and a random bright square,
    so the task is learnable but not constant."""
    rng = np.random.default_rng(seed)
    for name, rgb in (classes or COLOURS).items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 25, (size, size, 3)), 0, 255)
            x, y = rng.integers(0, size - 10, 2)
            img[y:y + 10, x:x + 10] = rng.integers(150, 256, 3)
            Image.fromarray(img.astype(np.uint8)).save(folder / f"{name}_{i:03d}.png")
    return root


@pytest.fixture
def colour_folder(tmp_path) -> Path:
    return make_colour_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def shared_colour_folder(tmp_path_factory) -> Path:
    return make_colour_folder(tmp_path_factory.mktemp("shared") / "data")


TINY = dict(epochs=2, lr=0.002, batch_size=16, image_size=32, pretrained=False, progress=False, device="cpu")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs: a zombie not yet reaped has ended (read from /proc where
    there is one)."""
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_for(predicate, timeout: float, what: str):
    """``predicate()``'s first true value within ``timeout`` seconds, else an assertion error."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
