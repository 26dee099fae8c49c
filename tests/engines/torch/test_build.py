"""Every new classifier head starts the same way whatever its source (zero weights and bias, so
the first loss is ln(classes)), and a top-only fine-tune of real photos reaches what a converged
logistic-regression probe on the same frozen features reaches."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import bakeoff
from bakeoff.data.cache import cache_side
from bakeoff.engines.torch.build import build_model, find_head, head_names
from bakeoff.engines.torch.step import make_optimizer, Step
from bakeoff.protocol import Protocol
from bakeoff.serve.predictor import Preprocess
from bakeoff.zoo import resolve
from conftest import REPO

FLOWERS = REPO.parent / "shared" / "data" / "flowers"


def first_torch_loss(model: torch.nn.Module, classes: int, size: int, batch: int = 6) -> float:
    """The loss of the engine's first training step on random images and labels."""
    cpu = torch.device("cpu")
    protocol = Protocol(precision="fp32")
    step = Step(model.train(), make_optimizer(protocol, model.parameters()), protocol, cpu, (batch, 3, size, size), False)
    gen = torch.Generator().manual_seed(0)
    step(torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, classes, (batch,), generator=gen))
    return float(step.loss_sum) / batch


@pytest.mark.parametrize("model_id, classes, size", [
    ("torchvision/resnet18", 7, 32),
    ("pytorch-ic-mobilenet-v2", 3, 32),
    ("timm/test_resnet", 5, 32),
    ("timm/tf_efficientnet_lite0", 4, 32),
])
def test_torch_heads_start_at_zero_and_the_first_loss_is_ln_classes(model_id, classes, size):
    spec = resolve(model_id)
    model, _ = build_model(spec, classes, pretrained=False)
    head = find_head(model)
    if spec.classifier:  # the zoo's name for the layer is the one the engine zeroes and trains
        assert head_names(model)[0] == spec.classifier
    assert head.out_features == classes
    assert torch.count_nonzero(head.weight) == 0 and torch.count_nonzero(head.bias) == 0
    assert first_torch_loss(model, classes, size) == pytest.approx(math.log(classes), abs=1e-5)


def test_the_zoos_classifier_name_is_the_head_and_a_missing_one_falls_back_to_the_last_layer():
    from dataclasses import replace

    # an embedding layer after the classifier: the last-layer guess would pick the wrong one
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 8))
    spec = replace(resolve("timm/test_resnet"), classifier="0")
    assert head_names(model, spec) == ["0"] and find_head(model, spec) is model[0]
    assert head_names(model, replace(spec, classifier="fc")) == ["1"]  # not in this model: the guess
    assert head_names(model, replace(spec, classifier=["0", "1"])) == ["0", "1"]  # two heads, as JSON keeps them


def test_pretrained_weights_do_not_bring_their_head_along():
    # ImageNet weights for a 1000-class run: the loaded ImageNet classifier fits by shape,
    # but the run's classes are not ImageNet's, so it starts from zero like any other head
    model, weights = build_model(resolve("timm/tf_efficientnet_lite0"), 1000, pretrained=True)
    assert "imagenet" in weights and torch.count_nonzero(model.classifier.weight) == 0
    assert torch.count_nonzero(model.conv_stem.weight) > 0


def test_every_head_of_a_two_headed_model_starts_at_zero():
    model, _ = build_model(resolve("timm/deit_tiny_distilled_patch16_224"), 3, pretrained=False)
    assert head_names(model) == ["head", "head_dist"]
    for head in (model.head, model.head_dist):
        assert torch.count_nonzero(head.weight) == 0 and torch.count_nonzero(head.bias) == 0


def test_a_head_behind_a_relu_starts_uniform_and_still_learns():
    # SqueezeNet's classifier is a convolution followed by a ReLU: all-zero outputs would pass no
    # gradient, so its bias starts at one (equal logits) and the first step moves the weights
    model, _ = build_model(resolve("torchvision/squeezenet1_1"), 4, pretrained=False)
    head = find_head(model)
    assert torch.count_nonzero(head.weight) == 0 and torch.equal(head.bias, torch.ones(4))
    assert first_torch_loss(model, 4, 64) == pytest.approx(math.log(4), abs=1e-5)
    assert torch.count_nonzero(head.weight) > 0


@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="needs bakeoff[tensorflow]")
def test_keras_head_starts_at_zero_and_the_first_loss_is_ln_classes():
    from bakeoff.engines.keras.build import build_model as build_keras
    from bakeoff.engines.keras.trial import import_keras
    from bakeoff.engines.keras.fit import Steps, make_optimizer

    keras = import_keras("cpu")
    spec = resolve("tensorflow-ic-imagenet-mobilenet-v2-050-224-classification-4")
    model, _, _, _ = build_keras(keras, spec, 6, 32, pretrained=False)
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in model.get_layer("classifier").weights)
    assert kernel.shape == (1280, 6) and not kernel.any() and not bias.any()
    steps = Steps(keras, model, make_optimizer(keras, Protocol()))
    rng = np.random.default_rng(0)
    loss, _ = steps.train(rng.normal(size=(6, 32, 32, 3)).astype(np.float32), rng.integers(0, 6, 6).astype(np.int32))
    assert float(loss) == pytest.approx(math.log(6), abs=1e-5)


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
