"""Like for like: every engine trains on the same crop boxes, and training time is the protocol's
steps timed alone on the final kernels, with one-off work kept out of it."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch

from bakeoff.data.batches import Batcher
from bakeoff.protocol import Protocol
from bakeoff.timing import MEASURED, PROJECTED, Clock, window


class _Recording(Batcher):
    """A batcher that notes which crop box each image of a training batch got."""

    def train_batch(self, idx, gen=None, augment="rrc-flip", theta=None, pos=None):
        if theta is not None:
            self.seen.append((np.asarray(idx).copy(), theta.detach().cpu().numpy().copy()))
        return super().train_batch(idx, gen, augment, theta, pos)


def _data(n=80, size=24, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % classes).astype(np.int64)
    images = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    return images, labels


def _recording_batcher(images, input_size=20):
    b = _Recording.create(images, np.arange(len(images)), input_size, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    b.seen = []
    return b


def _boxes(seen) -> list[dict]:
    """Per epoch (a new order each), image -> its crop box, from the recorded batches."""
    epochs, current = [], {}
    for idx, theta in seen:
        for i, t in zip(idx.tolist(), theta):
            if i in current:  # an image seen twice: a new epoch began
                epochs.append(current)
                current = {}
            current[i] = t
    epochs.append(current)
    return epochs


def _small_net(classes=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, classes))


@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="needs bakeoff[tensorflow]")
def test_both_engines_draw_the_same_crop_box_and_flip_for_each_image_in_each_epoch():
    from bakeoff.engines.keras import fit as keras_fit
    from bakeoff.engines.torch import fit as torch_fit
    from bakeoff.engines.keras.trial import import_keras

    keras = import_keras("cpu")
    images, labels = _data()
    train, val = np.arange(60), np.arange(60, 80)
    protocol = Protocol(pretrained=False, epochs=2, batch_size=8, seed=3)

    torch_batcher = _recording_batcher(images)
    torch_fit.fit(_small_net(), torch_batcher, train, labels, val, protocol, torch.device("cpu"))

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20, 20, 3)), keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3)])
    steps = keras_fit.Steps(keras, model, keras_fit.make_optimizer(keras, protocol))
    keras_batcher = _recording_batcher(images)
    keras_fit.fit(steps, keras_batcher, train, labels, val, protocol)

    a, b = _boxes(torch_batcher.seen), _boxes(keras_batcher.seen)
    assert len(a) == len(b) == 2
    for epoch_a, epoch_b in zip(a, b):
        assert set(epoch_a) == set(epoch_b) == set(train.tolist())
        for i in epoch_a:
            np.testing.assert_array_equal(epoch_a[i], epoch_b[i])
    # and the boxes differ between epochs: a new draw each epoch, not one box per image
    assert any(not np.array_equal(a[0][i], a[1][i]) for i in a[0])


class _SlowFirstCalls(torch.nn.Module):
    """A model whose first training-mode calls sleep: one-off work (a first call at a shape, a
    new graph) of the kind a step meets when it starts."""

    def __init__(self, net, seconds, calls=3):
        super().__init__()
        self.net, self.seconds, self.slow = net, seconds, calls

    def forward(self, x):
        if self.training and self.slow > 0:
            self.slow -= 1
            time.sleep(self.seconds)
        return self.net(x)


def _fit_time(seconds: float, **extra):
    from bakeoff.engines.torch.fit import fit

    images, labels = _data(n=120)
    batcher = Batcher.create(images, np.arange(120), 20, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    protocol = Protocol(pretrained=False, epochs=2, batch_size=8, cuda_graphs=False)
    return fit(_SlowFirstCalls(_small_net(), seconds), batcher, np.arange(96), labels, np.arange(96, 120), protocol,
               torch.device("cpu"), **extra)


def test_one_off_work_at_an_epoch_start_or_a_slow_compile_stays_out_of_the_training_time():
    plain = _fit_time(0.0)
    slow = _fit_time(1.0)
    assert slow.train_wall_s > plain.train_wall_s + 1.5  # the sleeps happened, in the loop
    # 12 steps an epoch: the window is steps 9-12, so the slow first steps are never timed (one
    # sleep inside a 4-step window would add 0.25 s to each of its steps)
    windows = [s for h in slow.history for s in h["solo_step_s"]]
    assert len(windows) == 2 and max(windows) < 0.2
    assert slow.train_time_s == pytest.approx(24 * slow.train_step_ms / 1000)
    assert slow.train_time_kind == plain.train_time_kind == PROJECTED

    def slow_compile(model):
        time.sleep(1.0)
        return model

    compiled = _fit_time(0.0, compile_ready=lambda: True, compile_fn=slow_compile)
    assert compiled.compile_time_s + compiled.capture_time_s >= 1.0  # reported apart
    assert max(s for h in compiled.history for s in h["solo_step_s"]) < 0.2


def test_the_figure_is_the_final_kernels_median_step_times_the_steps_ran():
    clock = Clock()
    for seconds in (4.0, 4.4, 4.2):  # eager windows of 10 steps: 0.4 s a step
        clock.add("eager", seconds, 10, whole_epoch=False)
    for seconds in (2.0, 3.0, 2.2):  # compiled: 0.2, 0.3, 0.22 s a step; median 0.22
        clock.add("compiled", seconds, 10, whole_epoch=False)
    clock.steps = 500
    got = clock.figures("compiled")
    assert got["train_time_s"] == pytest.approx(0.22 * 500)
    assert got["train_time_kind"] == PROJECTED and got["train_step_ms_min"] == pytest.approx(200.0)
    whole = Clock()
    whole.add("compiled", 1.0, 5, whole_epoch=True)
    whole.steps = 5
    assert whole.figures("compiled")["train_time_kind"] == MEASURED


def test_a_window_skips_the_epoch_start_or_covers_a_short_epoch():
    assert window(300) == (8, 56)
    assert window(300, start=100) == (108, 156)
    assert window(30) == (8, 30)
    assert window(11) == (0, 11)


def test_a_trial_waits_for_its_pending_kernels_before_its_last_epoch_and_ends_on_them():
    """A cold compile cache (kernels ready only after a while) and a warm one (ready at once) end
    on the same kernels."""
    ready_at = time.perf_counter() + 1.5

    def ready():
        return time.perf_counter() > ready_at

    cold = _fit_time(0.0, compile_ready=ready, compile_settled=ready, compile_fn=lambda m: m)
    assert cold.compile_wait_s > 0 and cold.history[-1]["kernels"] == "compiled"
    assert cold.compile_error is None


@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="needs bakeoff[tensorflow]")
def test_a_keras_trial_alone_times_every_stretch_after_the_epoch_start():
    from bakeoff.engines.keras import fit as keras_fit
    from bakeoff.engines.keras.trial import import_keras

    keras = import_keras("cpu")
    images, labels = _data(n=560, size=12)
    protocol = Protocol(pretrained=False, epochs=2, batch_size=4, seed=1)
    model = keras.Sequential([keras.Input((10, 10, 3)), keras.layers.Conv2D(2, 3), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3)])
    steps = keras_fit.Steps(keras, model, keras_fit.make_optimizer(keras, protocol))
    batcher = Batcher.create(images, np.arange(560), 10, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    got = keras_fit.fit(steps, batcher, np.arange(520), labels, np.arange(520, 560), protocol)
    # 130 steps an epoch: windows of steps 9-56 and 57-104 (not 105-130: too short for a whole one)
    assert got.train_time_basis.startswith("median of 4 solo window(s) of 48 steps")
    assert got.train_time_s == pytest.approx(260 * got.train_step_ms / 1000)
    assert got.train_time_kind == PROJECTED


def test_a_solo_stretch_keeps_neighbours_out_and_reads_its_own_time():
    import threading
    import time

    from bakeoff.gpu_share import GpuShare
    from bakeoff.timing import Solo

    gate, synced, order = GpuShare(2), [], []
    solo = Solo(gate, lambda: synced.append("sync"), None, "window")

    def neighbour():
        with gate.shared():
            order.append("neighbour")

    solo.start()
    other = threading.Thread(target=neighbour)
    other.start()
    time.sleep(0.2)
    order.append("solo ends")
    seconds = solo.stop()
    other.join(timeout=5)
    assert order == ["solo ends", "neighbour"]  # the neighbour waited for the whole stretch
    assert seconds >= 0.2 and synced == ["sync", "sync"]  # synchronised at both ends
    assert gate.alone()["window"] >= 0.2  # the time every neighbour spent kept out

    with pytest.raises(ValueError):  # a failure inside lets the neighbours in, with no reading
        with Solo(gate, lambda: None, None, "latency") as failed:
            raise ValueError("a failed pass")
    assert failed.seconds is None and not failed.running
    with gate.shared():
        pass
