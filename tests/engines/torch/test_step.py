"""The training step: CUDA-graph capture (alone or beside other trials), tuning only while no
neighbour trains, the last smaller batch met before training, a warm-up step undone."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
import torch

from bakeoff.gpu_share import GpuShare
from bakeoff.protocol import Protocol
from conftest import held_in_thread, small_net


def test_tuning_is_on_only_while_no_trial_trains_and_tuners_may_overlap(monkeypatch):
    from bakeoff.engines.torch.step import tuned

    gate, log, both = GpuShare(3, tune_together=True), [], threading.Barrier(2, timeout=5)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)

    def tuner(name, fail):
        with contextlib.suppress(ValueError), tuned(gate, torch.device("cpu"), "capture", autotune=True):
            both.wait()  # two trials tuning at once: neither waits for the other
            log.append((name, torch.backends.cudnn.benchmark))
            if fail:
                raise ValueError("a failed capture")
            time.sleep(0.2)
            log.append((name + " done", torch.backends.cudnn.benchmark))  # on until the last tuner leaves

    t = held_in_thread(gate.shared, lambda: log.append(("neighbour step done", torch.backends.cudnn.benchmark)))
    tuners = [threading.Thread(target=tuner, args=(n, n == "b")) for n in "ab"]
    for th in tuners:
        th.start()
    time.sleep(0.05)
    with gate.shared():  # a step asked for while they tune waits for both to end
        log.append(("next step", torch.backends.cudnn.benchmark))
    for th in tuners + [t]:
        th.join()
    with tuned(gate, torch.device("cpu"), "tune"):  # by default: alone, on cuDNN's heuristics
        log.append(("default", torch.backends.cudnn.benchmark))
    alone = gate.alone()
    assert log[0] == ("neighbour step done", False)  # tuning waited for the neighbour's step
    assert sorted(log[1:3]) == [("a", True), ("b", True)]
    assert log[3:] == [("a done", True), ("next step", False), ("default", False)]
    assert torch.backends.cudnn.benchmark is False  # back off, after a failure too
    assert set(alone) == {"tune"} and alone["tune"] >= 0.0  # this thread's own; each tuner counts its own


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_graph_of_many_head_steps_equals_the_same_steps_run_eagerly():
    from bakeoff.engines.torch.step import make_optimizer, Step

    dev = torch.device("cuda")
    feats, labels = torch.randn(640, 32, device=dev), torch.randint(0, 5, (640,), device=dev)
    idx = torch.randperm(640, device=dev)
    out = []
    for graphs in (True, False):
        torch.manual_seed(0)
        head = torch.nn.Linear(32, 5).to(dev)
        proto = Protocol(pretrained=False, cuda_graphs=graphs, precision="fp32")
        step = Step(head, make_optimizer(proto, head.parameters(), capturable=graphs), proto, dev, (16, 32), False,
                     source=(feats, labels), steps=8)
        assert step.mode == ("cuda-graph" if graphs else "eager")
        for start in range(0, 640, 128):
            step.gathered(idx[start:start + 128])
        out.append((head.weight.detach().clone(), float(step.loss_sum)))
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-4, atol=1e-5)
    assert np.isclose(out[0][1], out[1][1], rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("autotune", [True, False])
@pytest.mark.parametrize("graphs", [True, False])
def test_only_the_training_steps_shapes_are_tuned_and_only_when_asked(graphs, autotune, monkeypatch):
    from bakeoff.data.batches import Batcher
    from bakeoff.engines.torch.fit import fit

    dev, seen = torch.device("cuda"), []
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)).to(dev)
    model.register_forward_hook(lambda mod, inp, out: seen.append((len(inp[0]), mod.training,
                                                                   torch.backends.cudnn.benchmark)))
    images = np.random.default_rng(0).integers(0, 255, (90, 36, 36, 3), dtype=np.uint8)
    labels = np.arange(90) % 3
    b = Batcher.create(images, np.arange(90), 32, (0.5,) * 3, (0.25,) * 3, dev)
    proto = Protocol(pretrained=False, epochs=1, precision="fp32", cuda_graphs=graphs)
    torch.backends.cudnn.benchmark = False
    monkeypatch.setattr("bakeoff.engines.torch.step.AUTOTUNE", autotune)
    out = fit(model, b, np.arange(70), labels, np.arange(70, 90), proto, dev)
    assert out.step_mode == ("cuda-graph" if graphs else "eager")
    tuned = {(n, train) for n, train, on in seen if on}
    # With autotuning, the training step's shape only, at its warm-up or capture; without, none.
    assert tuned == ({(16, True)} if autotune else set())
    assert (6, True, False) in seen and (128, False, False) in seen  # last batch and evaluation: heuristics
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tune_together", [False, True])
def test_trials_capture_their_steps_at_once_and_each_graph_trains(tune_together):
    from bakeoff.engines.torch.step import make_optimizer, Step

    dev, gate, steps, start = torch.device("cuda"), GpuShare(3, tune_together), {}, threading.Barrier(3, timeout=30)
    proto = Protocol(pretrained=False)
    torch.backends.cudnn.benchmark = False

    def trial(i):
        torch.manual_seed(i)
        # Dropout draws from the process-wide CUDA generator: a capture beside a neighbour's
        # warm-up fails on it.
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8 * (i + 1), 3), torch.nn.BatchNorm2d(8 * (i + 1)),
                                    torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                    torch.nn.Dropout(0.2), torch.nn.Linear(8 * (i + 1), 3)
                                    ).to(dev).to(memory_format=torch.channels_last)
        with gate.place(dev):
            start.wait()
            step = Step(model, make_optimizer(proto, model.parameters(), capturable=True), proto, dev,
                         (16, 3, 40, 40), True, gate=gate)
            x = torch.randn(16, 3, 40, 40, device=dev).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 3, (16,), device=dev)
            for _ in range(30):
                with gate.shared():
                    step(x, y)
            torch.cuda.current_stream(dev).synchronize()
            steps[i] = (step, float(step.loss_sum), gate.alone())

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(steps) == [0, 1, 2]
    for step, loss_sum, alone in steps.values():
        assert step.mode == "cuda-graph" and step.capture_error is None
        assert np.isfinite(loss_sum) and loss_sum > 0 and "capture" in alone
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_last_smaller_batch_is_met_before_training_and_leaves_no_trace():
    from bakeoff.engines.torch.step import make_optimizer, Step

    dev, seen, proto = torch.device("cuda"), [], Protocol(pretrained=False, precision="fp32")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)).to(dev)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.register_forward_hook(lambda mod, inp, out: seen.append(len(inp[0])))
    opt = make_optimizer(proto, model.parameters(), capturable=True)
    step = Step(model, opt, proto, dev, (16, 3, 36, 36), False, last_batch=6)
    assert step.mode == "cuda-graph" and 6 in seen  # met at construction, not in the first epoch
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and batch-norm statistics put back
    assert all(float(t.sum()) == 0 for state in opt.state.values() for t in state.values() if torch.is_tensor(t))
    assert float(step.loss_sum) == 0 and int(step.correct) == 0


def test_undoing_a_warm_up_step_puts_weights_and_optimizer_state_back():
    from bakeoff.engines.torch.step import make_optimizer, Step

    model, proto = small_net(), Protocol(pretrained=False)
    opt = make_optimizer(proto, model.parameters())
    step = Step(model, opt, proto, torch.device("cpu"), (8, 3, 20, 20), False)
    x, y = torch.randn(8, 3, 20, 20), torch.arange(8) % 3
    step(x, y)
    step(x, y)  # Adam's moments and step count are non-zero now
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]
    step._undone(lambda: step(x * 2, y))
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for kept, now in zip(moments, opt.state.values()):
        assert all(torch.equal(kept[k], now[k]) for k in kept)
    assert float(step.loss_sum) == 0.0
