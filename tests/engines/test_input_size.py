"""One rule for an --image-size below a network's minimum, in both engines: the input is upsampled
bilinearly to the minimum inside the model and the row records ``input_upsampled_to``."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torchvision

from bakeoff.api import run
from bakeoff.engines.torch.build import build_model, upsample_to_minimum
from bakeoff.engines.torch.trial import load_saved
from bakeoff.store import Store
from bakeoff.zoo.registry import resolve
from bakeoff.zoo.torchvision_zoo import MIN_INPUT_SIZE
from conftest import TINY

FAMILY = {"alexnet": "alexnet", "convnext": "convnext_tiny", "densenet": "densenet121", "inception_v3": "inception_v3",
          "squeezenet1_0": "squeezenet1_0", "squeezenet1_1": "squeezenet1_1", "vgg": "vgg11"}


def runs_at(name: str, side: int) -> bool:
    """Whether torchvision's network runs a forward pass at ``side`` (shapes only: the meta device)."""
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None, num_classes=3, **kwargs).eval()
        try:
            model(torch.zeros(1, 3, side, side))
        except RuntimeError:
            return False
    return True


@pytest.mark.parametrize("family", sorted(MIN_INPUT_SIZE))
def test_each_listed_minimum_is_the_smallest_side_its_network_runs_at(family):
    name, side = FAMILY[family], MIN_INPUT_SIZE[family]
    assert resolve(f"torchvision/{name}").min_input_size == side
    assert runs_at(name, side) and not runs_at(name, side - 1)


def test_networks_without_a_minimum_run_at_the_smallest_image_size():
    for name in ("resnet34", "mobilenet_v2", "googlenet", "resnet152"):
        assert resolve(f"torchvision/{name}").min_input_size is None and runs_at(name, 16), name


def test_a_small_input_is_upsampled_inside_the_model_to_the_network_s_minimum():
    spec = resolve("pytorch-ic-alexnet")
    torch.manual_seed(0)
    model, _ = build_model(spec, 3, pretrained=False)
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(RuntimeError):
        model(x)  # alexnet's fixed pooling: too small as it is
    reference = model(torch.nn.functional.interpolate(x, size=(63, 63), mode="bilinear", align_corners=False))
    assert upsample_to_minimum(model, spec, 32) == 63
    assert torch.equal(model(x), reference)
    assert upsample_to_minimum(build_model(spec, 3, pretrained=False)[0], spec, 63) is None  # big enough: as it is


@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="needs bakeoff[tensorflow]")
def test_the_pytorch_upsampling_samples_as_the_keras_engine_s():
    from bakeoff.engines.keras.trial import import_keras

    keras = import_keras("cpu")
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    want = keras.ops.convert_to_numpy(keras.layers.Resizing(75, 75, interpolation="bilinear")(x))
    identity = torch.nn.Identity()
    upsample_to_minimum(identity, resolve("torchvision/inception_v3"), 32)
    got = identity(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    # the same sampling positions and weights; float32 rounding apart (align_corners=True would be 1e-2 off)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_alexnet_trains_at_32_px_upsampled_and_loads_back_the_same(colour_folder, tmp_path):
    out = tmp_path / "out"
    df = run(colour_folder, ["pytorch-ic-alexnet", "pytorch-ic-mobilenet-v2"], out=out, **TINY | {"epochs": 1})
    assert df["status"].tolist() == ["ok", "ok"] and df["input_size"].tolist() == [32, 32]
    trials = {t["model"]: t for t in Store(out / "bakeoff.db").latest_trials()[1]}
    result, small = trials["pytorch-ic-alexnet"]["result"], trials["pytorch-ic-mobilenet-v2"]
    assert result["input_upsampled_to"] == 63
    # mobilenet_v2 trained after alexnet in the same worker: its peak counts from its own start,
    # not the process's (which would be alexnet's: 57M parameters, their gradients and Adam's two
    # moments). What the worker still holds of alexnet counts in it: 0.3-0.6 GB less, not 0.9.
    assert small["started"] >= trials["pytorch-ic-alexnet"]["finished"]
    assert small["result"]["peak_memory_mb"] < result["peak_memory_mb"] - 100
    folder = out / "models" / "pytorch-ic-alexnet"
    model, meta, classes = load_saved(folder)
    assert meta["min_input_size"] == 63 and meta["input_size"] == 32
    # the saved weights on the input upsampled by hand: what the loaded model gives at 32 px
    plain, _ = build_model(resolve("pytorch-ic-alexnet"), len(classes), pretrained=False)
    plain.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = plain.eval()(torch.nn.functional.interpolate(x, size=(63, 63), mode="bilinear", align_corners=False))
        assert torch.equal(model(x), want)
