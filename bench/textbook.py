"""The textbook PyTorch fine-tuning loop, the peer bakeoff is measured against.

torchvision ImageFolder + DataLoader (worker processes decode and augment every JPEG every
epoch), RandomResizedCrop + flip, fp32, eager, Adam. This is what most tutorials show.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms as T

from harness import parser  # bench/, beside this script

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loaders(data_dir, train_files: set[str] | None, size: int, batch_size: int, workers: int, seed: int = 0):
    """ImageFolder datasets for training (augmented) and validation (resize + centre crop)."""
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    eval_tf = T.Compose([T.Resize(int(round(size / 0.875))), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])
    train_ds = torchvision.datasets.ImageFolder(data_dir, train_tf)
    val_ds = torchvision.datasets.ImageFolder(data_dir, eval_tf)
    if train_files is not None:
        tr = [i for i, (p, _) in enumerate(train_ds.samples) if p in train_files]
        va = [i for i, (p, _) in enumerate(train_ds.samples) if p not in train_files]
        train_ds, val_ds = Subset(train_ds, tr), Subset(val_ds, va)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(train_ds, batch_size, shuffle=True, num_workers=workers, pin_memory=True,
                       persistent_workers=workers > 0, generator=g, drop_last=False)
    val = DataLoader(val_ds, 256, shuffle=False, num_workers=workers, pin_memory=True)
    return train, val


def build(arch: str, num_classes: int, device) -> nn.Module:
    kw = {"aux_logits": False, "init_weights": False} if arch in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kw).to(device)


def train(model, loader, device, epochs: int = 1, lr: float = 1e-3, max_steps: int | None = None,
          warmup_steps: int = 0) -> dict:
    """Train; returns images/s over the timed steps (warm-up steps excluded)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    seen, t0, step = 0, None, 0
    for _ in range(epochs):
        for x, y in loader:
            if step == warmup_steps:
                _sync(device)
                t0, seen = time.perf_counter(), 0
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
            step += 1
            if max_steps is not None and step >= warmup_steps + max_steps:
                break
    _sync(device)
    elapsed = time.perf_counter() - t0
    return {"images": seen, "seconds": elapsed, "images_per_s": seen / elapsed}


@torch.no_grad()
def evaluate(model, loader, device) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        pred = model(x.to(device, non_blocking=True)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return correct / total


def latency_ms(model, x, device, runs: int = 50) -> list[float]:
    model.eval()
    with torch.no_grad():
        for _ in range(10):
            model(x)
        out = []
        for _ in range(runs):
            _sync(device)
            t = time.perf_counter()
            model(x)
            _sync(device)
            out.append((time.perf_counter() - t) * 1000)
    return out


if __name__ == "__main__":  # pragma: no cover - a quick manual check
    ap = parser(__doc__)
    ap.add_argument("data")
    ap.add_argument("--arch", default="resnet34")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--workers", type=int, default=14)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tl, _ = loaders(a.data, None, 299 if a.arch == "inception_v3" else 224, 16, a.workers)
    m = build(a.arch, len(tl.dataset.classes), dev)
    print(train(m, tl, dev, max_steps=a.steps, warmup_steps=10))
    print("latency p50 ms", float(np.median(latency_ms(m, torch.randn(1, 3, 224, 224, device=dev), dev))))
