"""`bakeoff demo` compares pretrained models only."""

from __future__ import annotations

from bakeoff.zoo import resolve, weights_available_offline


def test_the_demo_compares_pretrained_models_only():
    from bakeoff.demo import DEMO_MODELS, DEMO_SETTINGS

    assert DEMO_SETTINGS["pretrained"] is True  # a missing weights package fails; no quiet random init
    assert all(weights_available_offline(resolve(m)) for m in DEMO_MODELS) and len(DEMO_MODELS) == 3
