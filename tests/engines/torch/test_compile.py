"""Compiled training steps: background compiles, their markers, and a step that switches to
compiled kernels between epochs without losing its optimizer's state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bakeoff.engines.torch.compile import Compiles, Marker, compile_key
from bakeoff.gpu_share import GpuShare
from bakeoff.protocol import Protocol
from conftest import becomes_stopped, small_net, spinning_child

RESNET = {"id": "pytorch-ic-resnet34", "framework": "pytorch"}


def _learnable(n=96, size=24, classes=3, seed=0):
    """Images whose class is the one bright colour channel: a task a small net learns."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 90, (n, size, size, 3), dtype=np.uint8)
    images[np.arange(n), :, :, labels] += 120
    return images, labels


def _fit(device, compile_ready=None, compile_fn=None, epochs=3, n=96, gate=None, **proto):
    from bakeoff.data.batches import Batcher
    from bakeoff.engines.torch.fit import fit

    images, labels = _learnable(n)
    model = small_net().to(device)
    batcher = Batcher.create(images, np.arange(len(labels)), 20, (0.5,) * 3, (0.25,) * 3, device)
    protocol = Protocol(pretrained=False, epochs=epochs, lr=0.01, **proto)
    kwargs = {} if compile_fn is None else {"compile_fn": compile_fn}
    train = n * 3 // 4
    out = fit(model, batcher, np.arange(train), labels, np.arange(train, n), protocol, device,
              compile_ready=compile_ready, gate=gate, **kwargs)
    return model, out


def _ready_after(n: int):
    """A ``compile_ready`` that says no to its first ``n`` asks and yes after (``fit`` asks before
    the first epoch, every ``SWITCH_CHECK`` steps while it may switch, and after each epoch)."""
    asked = []
    return lambda: asked.append(1) or len(asked) > n


def _traced(model):
    """The compiler's tracing backend without code generation: the same arithmetic as eager, so
    a switch that dropped Adam's moments or the batch-norm statistics would show in the weights."""
    return torch.compile(model, backend="aot_eager", dynamic=False)


def test_a_step_switches_kernels_between_epochs_and_trains_on_as_before():
    eager_model, eager = _fit(torch.device("cpu"))
    model, out = _fit(torch.device("cpu"), compile_ready=_ready_after(1), compile_fn=_traced)
    assert [h["kernels"] for h in out.history] == ["eager", "compiled", "compiled"]
    assert out.compiled_from_epoch == 2 and out.compile_error is None
    assert 0 < out.compile_time_s and out.step_mode == "eager, compiled"
    for (name, a), b in zip(eager_model.state_dict().items(), model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-4), name
    assert [h["train_loss"] for h in out.history] == pytest.approx([h["train_loss"] for h in eager.history],
                                                                     rel=1e-4)
    assert out.history[-1]["val_accuracy"] > 0.6  # it learned: chance is 1/3


def test_a_step_switches_mid_epoch_as_soon_as_its_kernels_are_ready(monkeypatch):
    from bakeoff.engines.torch import fit as torch_fit

    monkeypatch.setattr(torch_fit, "SWITCH_CHECK", 10)
    long = dict(n=640, batch_size=4, epochs=2)  # 120 steps an epoch; the epoch's window is steps 9-56
    eager_model, eager = _fit(torch.device("cpu"), **long)
    # Asked at the start, then every 10 steps after the epoch's window while 56 steps (room for
    # a window on the new kernels) are left: after step 60 only, and ready at that second ask.
    model, out = _fit(torch.device("cpu"), compile_ready=_ready_after(1), compile_fn=_traced, **long)
    first, second = out.history
    assert (first["kernels"], first["compiled_from_step"], second["kernels"]) == (
        "eager, then compiled", 61, "compiled")
    assert out.compiled_from_epoch == 1 and out.compile_time_s > 0 and out.compile_error is None
    # The switch kept weights, optimizer state and the epoch's running loss: as if it had not happened.
    for (name, a), b in zip(eager_model.state_dict().items(), model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-4), name
    assert [h["train_loss"] for h in out.history] == pytest.approx([h["train_loss"] for h in eager.history],
                                                                     rel=1e-4)


def test_sharing_a_mid_epoch_switch_waits_for_the_solo_window_and_times_each_kernel_set_alone(monkeypatch):
    from bakeoff.engines.torch import fit as torch_fit

    monkeypatch.setattr(torch_fit, "SWITCH_CHECK", 10)
    # A GPU shared with one neighbour (none runs here): solo windows, projected times. 120 steps
    # an epoch; the window is steps 9-56, so the first ask after it is at step 60, and 60 steps
    # are left for a window on the new kernels (steps 69-116).
    _, out = _fit(torch.device("cpu"), compile_ready=_ready_after(1), compile_fn=_traced, n=640,
                  batch_size=4, epochs=1, gate=GpuShare(2))
    _, late = _fit(torch.device("cpu"), compile_ready=_ready_after(2), compile_fn=_traced, n=640,
                   batch_size=4, epochs=2, gate=GpuShare(2))
    (only,) = out.history
    assert out.compiled_from_epoch == 1 and only["compiled_from_step"] == 61, out.compile_error
    eager_s, compiled_s = only["solo_step_s"]
    # The training time is the kernels the trial ended with, for every step it ran.
    assert out.train_time_s == pytest.approx(120 * compiled_s)
    assert out.train_time_kind == "projected from solo windows"
    # Not ready at step 60, the last ask with room for a window after it: the next ask is at the
    # epoch's end, and the switch there.
    assert [h["kernels"] for h in late.history] == ["eager", "compiled"] and late.compiled_from_epoch == 2
    assert len(late.history[0]["solo_step_s"]) == 1


def test_a_warm_compile_is_used_from_the_first_epoch_and_a_failing_one_leaves_the_step_eager():
    _, out = _fit(torch.device("cpu"), compile_ready=lambda: True, compile_fn=_traced, epochs=2)
    assert [h["kernels"] for h in out.history] == ["compiled", "compiled"] and out.compiled_from_epoch == 1

    def broken(model):
        def fwd(x):
            raise RuntimeError("no kernels for this model\nmore detail")
        return fwd

    _, out = _fit(torch.device("cpu"), compile_ready=lambda: False, compile_fn=_traced, epochs=2)
    assert out.compiled_from_epoch is None and out.compile_error == (
        "its compiled kernels were not ready before the last epoch began")

    model, out = _fit(torch.device("cpu"), compile_ready=_ready_after(1), compile_fn=broken)
    assert [h["kernels"] for h in out.history] == ["eager"] * 3 and out.compiled_from_epoch is None
    assert out.compile_error == "RuntimeError: no kernels for this model"
    assert out.step_mode == "eager" and out.history[-1]["val_accuracy"] > 0.6


def test_a_trial_waits_only_for_kernels_compiled_on_its_own_gpu(tmp_path):
    from bakeoff.engines.torch.compile import marker_for

    found = {"folder": str(tmp_path), "key": "k", "device": "cuda:0"}
    assert marker_for(found, torch.device("cuda:0")) == Marker(str(tmp_path), "k")
    assert marker_for(found, torch.device("cuda:1")) is None
    assert marker_for(found | {"device": "cuda:1"}, torch.device("cuda:1")) is not None
    assert marker_for(found, torch.device("cpu")) is None and marker_for(None, torch.device("cuda:0")) is None


def test_markers_say_ready_or_why_not():
    with_dir = lambda p: Marker(str(p), "k1")  # noqa: E731
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        m = with_dir(d)
        assert m.read() is None and not m.ready() and m.error() is None
        m.write("failed", error="OutOfMemoryError: no room")
        assert not m.ready() and m.error() == "OutOfMemoryError: no room"
        m.write("ready", seconds=3.0)
        assert m.ready() and m.error() is None and m.read()["seconds"] == 3.0


def test_a_compiled_step_is_keyed_by_what_it_depends_on():
    p = Protocol(pretrained=False).to_dict()
    key = compile_key("pytorch-ic-resnet34", 10, 224, p, "NVIDIA H200")
    assert key == compile_key("pytorch-ic-resnet34", 10, 224, p | {"lr": 0.1, "epochs": 2}, "NVIDIA H200")
    others = {compile_key("pytorch-ic-resnet152", 10, 224, p, "NVIDIA H200"),
              compile_key("pytorch-ic-resnet34", 11, 224, p, "NVIDIA H200"),
              compile_key("pytorch-ic-resnet34", 10, 299, p, "NVIDIA H200"),
              compile_key("pytorch-ic-resnet34", 10, 224, p | {"batch_size": 32}, "NVIDIA H200"),
              compile_key("pytorch-ic-resnet34", 10, 224, p, "NVIDIA H100")}
    assert key not in others and len(others) == 5


@pytest.mark.parametrize("change", [dict(compile="off"), dict(cuda_graphs=False), dict(precision="fp32"),
                                    dict(train_only_top_layer=True)])
def test_no_background_compile_when_turned_off_or_where_the_step_would_not_use_it(tmp_path, change):
    found = Compiles().start([(RESNET, 224)], 10, Protocol(pretrained=False, **change).to_dict(), tmp_path,
                             "cuda", "GPU")
    assert found == {} and not (tmp_path / "compiled").exists()


def test_an_earlier_runs_marker_means_no_second_compile(tmp_path):
    p = Protocol(pretrained=False, compile="auto").to_dict()
    keras = {"id": "tensorflow-ic-x", "framework": "tensorflow"}
    key = compile_key(RESNET["id"], 10, 224, p, "GPU")
    (tmp_path / "compiled").mkdir()
    Marker(str(tmp_path / "compiled"), key).write("ready")
    compiles = Compiles()
    found = compiles.start([(RESNET, 224), (keras, 224)], 10, p, tmp_path, "cuda", "GPU")
    assert found == {RESNET["id"]: {"folder": str(tmp_path / "compiled"), "key": key, "device": "cuda"}}
    assert compiles.procs == []


def test_a_background_compile_that_fails_leaves_its_reason_and_the_trial_its_eager_step(tmp_path):
    # No usable GPU for this child (here: none, or a device index that does not exist).
    args = {"spec": {"id": "pytorch-ic-resnet34", "framework": "pytorch", "source": "torchvision",
                     "architecture": "resnet34"},
            "classes": 3, "input_size": 32, "protocol": Protocol(pretrained=False).to_dict(), "device": "cuda:99",
            "folder": str(tmp_path), "key": "k"}
    done = subprocess.run([sys.executable, "-m", "bakeoff.engines.torch.compile", json.dumps(args)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    marker = Marker(str(tmp_path), "k")
    assert not marker.ready() and marker.error() and "Error" in marker.error().split(":")[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_graphed_step_switches_to_compiled_kernels_and_keeps_learning():
    dev = torch.device("cuda")
    _, eager = _fit(dev)
    _, out = _fit(dev, compile_ready=_ready_after(1))
    assert out.step_mode == "cuda-graph, compiled" and out.compiled_from_epoch == 2, out.compile_error
    assert out.history[-1]["val_accuracy"] > 0.6
    assert out.history[-1]["train_loss"] == pytest.approx(eager.history[-1]["train_loss"], rel=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dropout_in_a_replayed_compiled_step_draws_new_masks():
    from bakeoff.engines.torch.compile import compile_model
    from bakeoff.engines.torch.step import graph_of

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Dropout(0.5)).cuda().train()
    fwd, x, outs = compile_model(model), torch.randn(32, 64, device="cuda"), []
    static = {}
    graph = graph_of(lambda: static.update(y=fwd(x)), torch.device("cuda"), "own stream, thread-local")
    for _ in range(3):
        graph.replay()
        outs.append((static["y"] == 0).clone())
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    assert 0.4 < outs[0].float().mean().item() < 0.6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_replayed_compiled_training_step_keeps_batch_norm_statistics_and_fresh_dropout():
    # What evaluation reads after training: running statistics that a compiled graph failed to
    # write back, or a dropout mask frozen into it, would leave train-mode accuracy intact and
    # evaluation worse.
    import copy

    from bakeoff.engines.torch.compile import compile_model
    from bakeoff.engines.torch.step import make_optimizer, Step, autocast_for

    dev, proto = torch.device("cuda"), Protocol(pretrained=False, lr=1e-9)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 3)).to(dev).to(memory_format=torch.channels_last).train()
    eager = copy.deepcopy(model)
    step = Step(model, make_optimizer(proto, model.parameters(), capturable=True), proto, dev, (16, 3, 20, 20), True,
                 fwd=compile_model(model))
    assert step.mode == "cuda-graph, compiled", (step.capture_error, step.compile_error)
    x = (torch.randn(16, 3, 20, 20, device=dev) * 2 + 1).contiguous(memory_format=torch.channels_last)
    y = torch.arange(16, device=dev) % 3
    losses = []
    for _ in range(4):
        step.reset_counts()
        step(x, y)
        losses.append(float(step.loss_sum))
        with torch.no_grad(), autocast_for(proto, dev):
            eager(x)
    assert len(set(losses)) == 4  # each replay drew its own mask (the weights barely move at this lr)
    bn, ref = model[1], eager[1]
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 4
    assert torch.allclose(bn.running_mean, ref.running_mean, rtol=2e-2, atol=2e-3)
    assert torch.allclose(bn.running_var, ref.running_var, rtol=2e-2, atol=2e-3)


def test_a_started_compile_hands_its_trial_the_process_to_keep_out_of_solo_sections(tmp_path):
    compiles = Compiles()
    p = Protocol(pretrained=False, compile="auto").to_dict()
    try:
        found = compiles.start([(RESNET, 224)], 10, p, tmp_path, "cuda", "GPU")
        (proc,) = compiles.procs
        assert found[RESNET["id"]]["pid"] == proc.pid and proc.poll() is None
    finally:
        compiles.stop()
    assert proc.returncode is not None and compiles.procs == []


def _dropout_grads_follow_masks(device: torch.device, replays: int = 3) -> list[bool]:
    """Whether the gradient reaching a compiled dropout's input follows the mask its forward
    drew (kept: 1 / (1 - p); dropped: 0), on ``device``; on a GPU, in a replayed graph."""
    from bakeoff.engines.torch.compile import compile_model
    from bakeoff.engines.torch.step import graph_of

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64).to(device)
    fwd = compile_model(torch.nn.Sequential(lin, torch.nn.Dropout(0.5)).train())
    x, kept, grads = torch.randn(32, 64, device=device) + 3, {}, []

    def step():
        lin.zero_grad(set_to_none=False)
        out = fwd(x)
        out.backward(torch.ones_like(out))
        kept["mask"] = out != 0  # the linear layer's outputs are never exactly 0 here

    if device.type == "cuda":
        lin.bias.grad = torch.zeros_like(lin.bias)
        graph = graph_of(step, device, "own stream, thread-local")
        runs = [graph.replay] * replays
    else:
        runs = [step] * replays
    for run in runs:
        run()
        grads.append(torch.allclose(lin.bias.grad, kept["mask"].float().sum(0) * 2))
    return grads


def test_a_compiled_dropouts_gradient_follows_the_mask_it_drew():
    assert _dropout_grads_follow_masks(torch.device("cpu")) == [True] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_compiled_dropouts_gradient_follows_its_mask_in_a_replayed_graph():
    assert _dropout_grads_follow_masks(torch.device("cuda")) == [True] * 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sends SIGSTOP")
def test_ending_the_compiles_continues_a_stopped_one_so_it_can_exit():
    import signal

    # It handles SIGTERM itself, as a compiler's worker pool may: stopped, it would never see it.
    child = spinning_child("signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))\n")
    os.kill(child.pid, signal.SIGSTOP)
    assert becomes_stopped(child.pid, stopped=True)
    compiles = Compiles()
    compiles.procs.append(child)
    t0 = time.perf_counter()
    compiles.stop()
    assert child.returncode == 3 and time.perf_counter() - t0 < 5


def test_a_background_compile_whose_run_is_gone_ends_without_compiling(tmp_path):
    # the compile's own entry point, told its run is a process that is not its parent (as after
    # the run died and the compile was adopted): it ends before compiling, and leaves no marker
    args = {"spec": {}, "classes": 3, "input_size": 32, "protocol": {}, "device": "cuda:0", "folder": str(tmp_path),
            "key": "k", "parent": os.getpid() + 1_000_000}
    proc = subprocess.run([sys.executable, "-m", "bakeoff.engines.torch.compile", json.dumps(args)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and not list(tmp_path.iterdir()), proc.stderr
