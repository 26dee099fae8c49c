"""The gate through which trials of one process share a GPU."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from bakeoff.gpu_share import GpuShare, share


def test_exclusive_waits_for_shared_sections_and_holds_new_ones_back():
    gate, log = GpuShare(2), []
    inside = threading.Event()

    def neighbour():
        with gate.shared():
            inside.set()
            time.sleep(0.2)
            log.append("neighbour step done")

    t = threading.Thread(target=neighbour)
    t.start()
    inside.wait()
    with gate.exclusive():
        log.append("alone")
        late = threading.Thread(target=lambda: (gate.shared().__enter__(), log.append("late step")))
        late.start()
        time.sleep(0.1)
        log.append("still alone")
    late.join()
    t.join()
    assert log == ["neighbour step done", "alone", "still alone", "late step"]


def test_nested_sections_do_not_deadlock_and_misuse_is_an_error():
    gate = GpuShare(2)
    with gate.exclusive():
        with gate.shared():  # a measurement's own launches
            pass
        with gate.exclusive():
            pass
    with gate.shared():
        with gate.shared():
            pass
        with pytest.raises(RuntimeError, match="inside shared"):
            with gate.exclusive():
                pass


def test_a_process_running_one_trial_has_a_gate_that_never_waits():
    assert not share().concurrent
    with share().shared(), share().exclusive():
        pass


def test_a_shared_trial_picks_kernels_alone_once_per_batch_size_and_mode(monkeypatch):
    from bakeoff.engines.torch_fit import _section
    from bakeoff.gpu_share import set_share

    calls = []

    class Recording(GpuShare):
        def shared(self):
            calls.append("shared")
            return super().shared()

        def exclusive(self, device=None):
            calls.append("alone")
            return super().exclusive()

    model, cuda = torch.nn.Linear(2, 2), torch.device("cuda")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    set_share(Recording(2))
    try:
        for rows in (128, 128, 64, 128):
            with _section(model, rows, cuda):
                pass
        model.eval()
        with torch.no_grad(), _section(model, 128, cuda):
            pass
        with _section(model, 128, torch.device("cpu")):  # no kernels to pick off a GPU
            pass
    finally:
        set_share(None)
    assert calls == ["alone", "shared", "alone", "shared", "alone", "shared"]
    with _section(model, 32, cuda):  # a trial alone on its GPU: never waits
        pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_graph_of_many_head_steps_equals_the_same_steps_run_eagerly():
    from bakeoff.engines.torch_fit import _optimizer, _Step
    from bakeoff.protocol import Protocol

    dev = torch.device("cuda")
    feats, labels = torch.randn(640, 32, device=dev), torch.randint(0, 5, (640,), device=dev)
    idx = torch.randperm(640, device=dev)
    out = []
    for graphs in (True, False):
        torch.manual_seed(0)
        head = torch.nn.Linear(32, 5).to(dev)
        proto = Protocol(pretrained=False, cuda_graphs=graphs, precision="fp32")
        step = _Step(head, _optimizer(proto, head.parameters(), capturable=graphs), proto, dev, (16, 32), False,
                     source=(feats, labels), steps=8)
        assert step.mode == ("cuda-graph" if graphs else "eager")
        for start in range(0, 640, 128):
            step.gathered(idx[start:start + 128])
        out.append((head.weight.detach().clone(), float(step.loss_sum)))
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-4, atol=1e-5)
    assert np.isclose(out[0][1], out[1][1], rtol=1e-4)
