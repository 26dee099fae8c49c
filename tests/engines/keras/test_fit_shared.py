"""Keras trials beside trials of other processes (``process_gate``): one trains exactly as it
would alone, and times a few windows spread over each epoch alone instead of the whole epoch;
two run at once, each in a process of its own, timing alone through their shared lock files."""

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


def test_two_keras_trials_run_at_once_in_processes_of_their_own_sharing_the_lock(shared_colour_folder, tmp_path,
                                                                                 monkeypatch):
    # The runner's placement is set (a GPU's, on the CPU here); the processes, the lock files
    # and the trials are the real ones: the worker hands each trial a lone gate of its own, but
    # its windows and latency go through the lock files it shares with its neighbour.
    import bakeoff.api
    from bakeoff.api import run_comparison
    from bakeoff.store import Store
    from conftest import TF_MOBILENET, TINY

    monkeypatch.setattr(bakeoff.api, "_gpu_slots", lambda *a: (["cpu"], 1))
    monkeypatch.setattr(bakeoff.api, "_processes_per_gpu", lambda *a: (2, None))
    models = [TF_MOBILENET, "keras/MobileNetV2"]
    run_comparison(shared_colour_folder, models, out=tmp_path / "out", **(TINY | {"epochs": 1}))
    trials = {t["model"]: t for t in Store(tmp_path / "out" / "bakeoff.db").trials()}
    assert [trials[m]["status"] for m in models] == ["ok", "ok"], [trials[m]["error"] for m in models]
    rows = [trials[m]["result"] for m in models]
    assert all(r["concurrent_trials"] == 2 and {"window", "latency"} <= set(r["gpu_alone_s"]) for r in rows)
    (a, b) = (trials[m] for m in models)
    assert a["started"] < b["finished"] and b["started"] < a["finished"]  # at once


def test_evaluation_makes_each_batch_inside_the_shared_section(keras):
    # A batch's crops and resize are GPU work where the images are: made outside the shared
    # section, they would run during a neighbour's solo window
    import contextlib

    import torch

    from bakeoff.data.batches import Batcher
    from bakeoff.engines.keras.fit import Steps, make_optimizer, predict_probs
    from bakeoff.gpu_share import GpuShare
    from bakeoff.protocol import Protocol

    class Recording(GpuShare):
        inside = 0

        @contextlib.contextmanager
        def shared(self):
            with super().shared():
                self.inside += 1
                try:
                    yield
                finally:
                    self.inside -= 1

    rng = np.random.default_rng(0)
    batcher = Batcher.create(rng.integers(0, 256, (10, 20, 20, 3), dtype=np.uint8), np.arange(10), 16,
                             (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten(), keras.layers.Dense(3, name="classifier")])
    steps = Steps(keras, model, make_optimizer(keras, Protocol()))
    gate, made_inside = Recording(trials=2), []
    make = batcher.eval_batch
    batcher.eval_batch = lambda idx, pos=None: (made_inside.append(gate.inside > 0), make(idx, pos))[1]
    shared = predict_probs(steps, batcher, np.arange(10), batch_size=4, gate=gate)
    assert made_inside == [True, True, True]  # batches of 4, 4 and 2
    batcher.eval_batch = make
    np.testing.assert_allclose(shared, predict_probs(steps, batcher, np.arange(10), batch_size=4), rtol=1e-6)
    assert shared.shape == (10, 3)
