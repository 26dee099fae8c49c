"""A Keras trial beside trials of other processes (``process_gate``): it trains exactly as it
would alone, and times a few windows spread over each epoch alone instead of the whole epoch."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest

if importlib.util.find_spec("keras") is None or importlib.util.find_spec("tensorflow") is None:
    pytest.skip("needs bakeoff[tensorflow]", allow_module_level=True)


def _fit(keras, gate):
    import torch

    from bakeoff.data.batches import Batcher
    from bakeoff.engines.keras.fit import Steps, fit, make_optimizer
    from bakeoff.protocol import Protocol

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (520, 20, 20, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 520)
    protocol = Protocol(epochs=2, batch_size=2, lr=0.01, precision="fp32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                              keras.layers.Dense(3, name="classifier")])
    steps = Steps(keras, model, make_optimizer(keras, protocol))
    batcher = Batcher.create(images, np.arange(520), 16, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    return fit(steps, batcher, np.arange(500), labels, np.arange(500, 520), protocol, gate=gate)


def test_beside_other_processes_a_keras_trial_trains_the_same_and_times_spread_windows(keras, tmp_path):
    from bakeoff.engines.keras.fit import SHARED_WINDOWS
    from bakeoff.process_gate import ProcessGate
    from bakeoff.timing import PROJECTED

    alone = _fit(keras, None)
    gate = ProcessGate(str(tmp_path / "gpu0"))
    shared = _fit(keras, gate)
    # the same steps on the same batches: the same losses and predictions
    for a, s in zip(alone.history, shared.history):
        assert s["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
    np.testing.assert_allclose(shared.final_val_probs, alone.final_val_probs, rtol=1e-5, atol=1e-7)
    # 250 steps an epoch: alone, each whole 48-step stretch after the first 8 steps is timed (5
    # an epoch); beside others, 3 windows an epoch, at steps 8, 104 and 200
    count = lambda fitted: int(re.match(r"median of (\d+) solo window", fitted.train_time_basis).group(1))  # noqa: E731
    assert count(alone) == 2 * 5 and count(shared) == 2 * SHARED_WINDOWS == 6
    assert shared.train_time_kind == PROJECTED and shared.train_time_s > 0
    assert gate.alone()["window"] > 0


def test_a_keras_trial_handed_its_gpus_lock_files_times_alone_through_them(keras, tmp_path):
    # as the runner hands a Keras trial to a worker of its own: the worker's gate is a lone one,
    # but the trial's windows and latency go through the lock files it shares with its neighbours
    from bakeoff.gpu_share import LoneGate
    from bakeoff.job import TrialJob
    from bakeoff.protocol import Protocol
    from bakeoff.trial import trial_process_main
    from bakeoff.zoo.registry import resolve
    from conftest import TF_MOBILENET

    rng = np.random.default_rng(0)
    np.save(tmp_path / "images.npy", rng.integers(0, 256, (40, 40, 40, 3), dtype=np.uint8))
    protocol = Protocol(epochs=1, batch_size=4, lr=0.01, pretrained=False, image_size=32)
    job = TrialJob(spec=resolve(TF_MOBILENET).to_dict(), protocol=protocol.to_dict(),
                   cache_path=str(tmp_path / "images.npy"), input_size=32, labels=rng.integers(0, 3, 40),
                   train_idx=np.arange(32), val_idx=np.arange(32, 40), classes=["a", "b", "c"],
                   out_dir=str(tmp_path / "out"), device="cpu", key="k", gpu_gate=str(tmp_path / "gpu0"),
                   concurrent_trials=2)

    class Messages(list):
        put = list.append

    got = Messages()
    trial_process_main(job, got, LoneGate())
    kind, _, row = got[-1]
    assert kind == "result", row
    assert {"window", "latency"} <= set(row["gpu_alone_s"]) and row["gpu_wait_s"] >= 0
