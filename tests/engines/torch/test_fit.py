"""The epoch loop: evaluation only where the protocol asks, full passes that keep one batch
shape, and top-only training on features computed once (up to what a converged linear probe
of the same features reaches on real photos)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import bakeoff
from bakeoff.api import run_comparison
from bakeoff.data.batches import Batcher
from bakeoff.data.cache import cache_side
from bakeoff.engines.torch.build import build_model
from bakeoff.engines.torch.trial import load_saved
from bakeoff.errors import BakeoffError
from bakeoff.protocol import Protocol
from bakeoff.serve.predictor import Preprocess
from bakeoff.store import Store
from bakeoff.zoo import resolve
from conftest import REPO, TINY


def test_val_every_skips_evaluations_and_trains_the_same(shared_colour_folder, tmp_path):
    # validated after each of 3 epochs, then only after the last: evaluating changes no training,
    # so the per-epoch training figures and the final accuracy are the same
    runs = {n: run_comparison(shared_colour_folder, ["timm/test_resnet"], out=tmp_path / f"every{n}",
                              **(TINY | {"epochs": 3}), val_every=n) for n in (1, 3)}
    assert runs[3].run["protocol"]["val_every"] == 3
    out = tmp_path / "every3"

    def history(folder):
        _, trials = Store(folder / "bakeoff.db").latest_trials()
        return trials[0]["result"]["history"]

    sparse, full = history(out), history(tmp_path / "every1")
    assert [h["val_accuracy"] is None for h in sparse] == [True, True, False]
    assert [h["val_accuracy"] is None for h in full] == [False, False, False]
    assert [h["train_loss"] for h in sparse] == [h["train_loss"] for h in full]
    assert sparse[-1]["val_accuracy"] == full[-1]["val_accuracy"]
    assert sum(h["eval_time_s"] for h in sparse[:2]) < 0.01
    assert "scored every 3 epochs and after the last" in (out / "report.md").read_text()
    with pytest.raises(BakeoffError, match="--val-every must be at least 1"):
        Protocol(val_every=0)
    assert [Protocol(epochs=5, val_every=2).validates(e) for e in range(5)] == [False, True, False, True, True]
    # the default validation, with eager kernels, leaves the trial keys of earlier runs as they were
    legacy = {k: v for k, v in Protocol().to_dict().items() if k not in ("val_every", "compile")}
    eager = Protocol(compile="off")
    assert eager.key() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]
    assert Protocol(val_every=2).key() != Protocol().key()
    assert Protocol(val_every=2, compile="off").key() != eager.key()


def test_train_only_top_layer_trains_the_head_on_features_computed_once(shared_colour_folder, tmp_path):
    out = tmp_path / "top"
    run_comparison(shared_colour_folder, ["timm/test_resnet"], out=out,
                   **(TINY | {"epochs": 4, "lr": 0.01, "train_only_top_layer": True}))
    row = pd.read_csv(out / "results.csv").iloc[0]
    assert row["status"] == "ok" and row["step_mode"].startswith("cached-features")
    assert row["accuracy"] > 0.5  # chance is 1/3: the head learnt from the frozen features
    # The backbone is exactly its seeded initial state; only the classifier moved.
    torch.manual_seed(0)
    start, _ = build_model(resolve("timm/test_resnet"), 3, pretrained=False)
    model, _, _ = load_saved(next((out / "models").iterdir()))
    before, after = start.state_dict(), model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"fc.weight", "fc.bias"}


def test_gpu_passes_fill_their_last_batch_and_drop_the_filler(monkeypatch):
    from types import SimpleNamespace

    from torch import nn

    from bakeoff.engines.torch.fit import predict_probs
    from bakeoff.engines.torch.top_only import features

    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    images = np.random.default_rng(0).integers(0, 256, (300, 40, 40, 3), dtype=np.uint8)
    b = Batcher.create(images, np.arange(300), 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"))
    idx = np.arange(299, -1, -1)
    proto = Protocol(pretrained=False, precision="fp32")
    monkeypatch.setattr("bakeoff.engines.torch.fit.sync_fn", lambda device: lambda: None)  # stand-in "cuda": no stream
    sizes = []
    model.register_forward_hook(lambda mod, inp, out: sizes.append(len(inp[0])))
    plain = features(model, b, idx, proto, torch.device("cpu"), head)
    assert sizes == [256, 44]
    sizes.clear()
    filled = features(model, b, idx, proto, SimpleNamespace(type="cuda"), head)
    assert sizes == [256, 256]  # one shape throughout
    assert plain.shape == filled.shape == (300, 4)
    torch.testing.assert_close(plain, filled)
    sizes.clear()
    plain = predict_probs(model, b, idx, proto, torch.device("cpu"))
    filled = predict_probs(model, b, idx, proto, SimpleNamespace(type="cuda"))
    assert sizes == [128, 128, 44, 128, 128, 128]
    assert plain.shape == filled.shape == (300, 3)
    np.testing.assert_allclose(plain, filled, rtol=1e-6, atol=1e-7)


FLOWERS = REPO.parent / "shared" / "data" / "flowers"


def flower_folders(root: Path, train: int, val: int) -> tuple[Path, Path]:
    """``train`` and ``val`` photos per class, copied into two folders (the first files of each class)."""
    for cls in sorted(p.name for p in FLOWERS.iterdir() if p.is_dir()):
        files = sorted((FLOWERS / cls).iterdir())[:train + val]
        for part, chosen in (("train", files[:train]), ("val", files[train:])):
            (root / part / cls).mkdir(parents=True)
            for f in chosen:
                shutil.copy(f, root / part / cls / f.name)
    return root / "train", root / "val"


def probe_accuracy(model_id: str, out: Path, size: int) -> float:
    """A converged multinomial logistic regression on the frozen backbone's features of the
    run's own centre crops and split (``split.json``): what a trained linear head can reach."""
    from sklearn.linear_model import LogisticRegression

    spec = resolve(model_id)
    model, _ = build_model(spec, 1, pretrained=True)
    model.eval()
    prep = Preprocess(size, cache_side(size, spec.crop_pct), spec.interpolation, spec.mean, spec.std)
    classes = json.loads((out / "class_label_to_prediction_index.json").read_text())
    split = json.loads((out / "split.json").read_text())

    def features(files):
        x = torch.from_numpy(np.stack([prep(Path(f).read_bytes()) for f in files]))
        with torch.no_grad():
            return model.forward_head(model.forward_features(x), pre_logits=True).numpy()

    def labels(files):
        return np.array([classes[Path(f).parent.name] for f in files])

    probe = LogisticRegression(max_iter=5000, tol=1e-6)
    probe.fit(features(split["train"]), labels(split["train"]))
    assert probe.n_iter_.max() < 5000  # converged
    return float(probe.score(features(split["val"]), labels(split["val"])))


@pytest.mark.skipif(not FLOWERS.is_dir(), reason="needs the shared flower photos")
def test_top_only_lite0_on_real_photos_reaches_a_converged_linear_probe(tmp_path):
    train, val = flower_folders(tmp_path / "flowers", train=80, val=40)
    out = tmp_path / "out"
    df = bakeoff.run(train, ["timm/tf_efficientnet_lite0"], val_dir=val, out=out, train_only_top_layer=True,
                     epochs=10, batch_size=32, image_size=128, pretrained=True, device="cpu", progress=False)
    row = df.iloc[0]
    assert row["status"] == "ok", row["error"]
    probe = probe_accuracy("timm/tf_efficientnet_lite0", out, 128)
    assert probe > 0.6  # the features separate the flowers: the comparison below means something
    assert row["accuracy"] >= probe - 0.05, (row["accuracy"], probe)
