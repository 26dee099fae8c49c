"""The threads a trial computes with on the CPU: every core, or OMP_NUM_THREADS where it is set, in
both engines alike, and said in the row's device name."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from bakeoff.api import run
from bakeoff.machine import cpu_threads
from bakeoff.store import Store
from conftest import TINY


@pytest.mark.parametrize("value, want", [("1", 1), (" 3 ", 3), ("", None), ("0", None), ("2,1", None), ("x", None)])
def test_omp_num_threads_sets_the_count_and_anything_else_means_every_core(monkeypatch, value, want):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert cpu_threads() == (want or os.cpu_count())


def test_a_pytorch_trial_computes_with_the_threads_asked_for(colour_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    run(colour_folder, ["timm/test_resnet"], out=out, **TINY | {"epochs": 1})
    result = Store(out / "bakeoff.db").latest_trials()[1][0]["result"]
    assert result["status"] == "ok"
    assert result["device_name"].endswith(f"({os.cpu_count()} cores, 1 thread)") or os.cpu_count() == 1


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs bakeoff[tensorflow]")
def test_keras_on_tensorflow_computes_with_the_same_count():
    code = ("from bakeoff.engines.keras.trial import import_keras; import_keras('cpu'); import tensorflow as tf; "
            "print(tf.config.threading.get_intra_op_parallelism_threads())")
    for asked, want in (("1", 1), ("", os.cpu_count())):
        env = os.environ | {"OMP_NUM_THREADS": asked}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split()[-1] == str(want)
