"""The Keras 3 engine's trial: choose the backend, build, fit on the decoded cache, measure, save;
and load a saved model back. Keras runs on TensorFlow where it is installed, else on JAX."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bakeoff.engines.saved import read_model_dir, save_model_dir
from bakeoff.errors import BakeoffError
from bakeoff.job import TrialJob, result_row
from bakeoff.machine import cpu_threads, device_name, peak_rss, reset_peak_rss
from bakeoff.protocol import Protocol
from bakeoff.zoo.spec import ModelSpec

__all__ = ["run_trial", "load_saved", "load_predict", "import_keras", "choose_backend"]

BACKENDS = ("tensorflow", "jax")
INSTALL_HINT = "pip install 'bakeoff[tensorflow]' (Keras on TensorFlow), or install keras and jax"


def choose_backend() -> str:
    """KERAS_BACKEND when it names an installed tensorflow or jax; else tensorflow if installed; else jax."""
    asked = os.environ.get("KERAS_BACKEND")
    if asked in BACKENDS and importlib.util.find_spec(asked) is not None:
        return asked
    for backend in BACKENDS:
        if importlib.util.find_spec(backend) is not None:
            return backend
    raise BakeoffError(f"Keras models need TensorFlow or JAX: {INSTALL_HINT}")


def import_keras(device: str = "auto"):
    """Import Keras on the chosen backend (settings that must precede the import are made here).

    ``device="cpu"`` keeps the backend off any GPU. In a process that already imported Keras,
    that import (and its backend) is returned as it is.
    """
    if "keras" in sys.modules:
        return sys.modules["keras"]
    backend = choose_backend()
    if importlib.util.find_spec("keras") is None:
        raise BakeoffError(f"Keras models need keras 3: {INSTALL_HINT}")
    import torchvision  # noqa: F401 - imported after TensorFlow, torchvision crashes the process (segfault)

    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if backend == "jax":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # measured peak memory, room for others
        if device == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
    with _native_stderr_filtered():
        import keras

        if backend == "tensorflow":
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(cpu_threads())  # the PyTorch engine's count
            gpus = tf.config.list_physical_devices("GPU")
            if device == "cpu" and gpus:
                tf.config.set_visible_devices([], "GPU")
            for gpu in gpus if device != "cpu" else []:
                tf.config.experimental.set_memory_growth(gpu, True)
    return keras


# Start-up notices TensorFlow's C++ layer writes to the process's stderr whatever
# TF_CPP_MIN_LOG_LEVEL says; they would land between a run's progress bars.
NATIVE_NOISE = ("absl::InitializeLog", "oneDNN custom operations", "Unable to register cu", "TF-TRT Warning",
                "This TensorFlow binary is optimized", "rebuild TensorFlow with the appropriate compiler flags",
                "computation placer already registered")


@contextlib.contextmanager
def _native_stderr_filtered():
    """Catch what native code writes to file descriptor 2 meanwhile; pass on all but NATIVE_NOISE."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded interpreters): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                if line.strip() and not any(n in line for n in NATIVE_NOISE):
                    sys.stderr.write(line)


def _accelerator(keras) -> tuple[str, str] | None:
    """(device kind, name) of the GPU the backend computes on, or None on CPU."""
    if keras.backend.backend() == "jax":
        import jax

        dev = jax.devices()[0]
        return (dev.platform, dev.device_kind) if dev.platform != "cpu" else None
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if not gpus:
        return None
    details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
    return "cuda", details.get("device_name", gpus[0].name)


def _peak_memory(keras, on_gpu: bool, rss_reset: bool) -> tuple[float, str]:
    if on_gpu and keras.backend.backend() == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use", 0) / 2**20, "jax peak bytes in use"
    if on_gpu:
        import tensorflow as tf

        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20, "tensorflow GPU peak"
    return peak_rss(rss_reset)


def _save(model, spec: ModelSpec, classes: list[str], protocol: Protocol, out_dir: Path, input_size: int,
          weights: str, backend: str) -> Path:
    """OUT/models/<model>/: model.keras, spec.json, the class map, protocol.json (the PyTorch layout)."""
    return save_model_dir(spec, classes, protocol, out_dir, "model.keras", lambda tmp: model.save(tmp),
                          {"input_size": input_size, "start_weights": weights, "backend": backend,
                           "input_layout": "NHWC", "output": "logits"})


def run_trial(job: TrialJob, on_step=None, gate=None) -> dict:
    """Train and measure one Keras model; returns the result row (the PyTorch engine's keys + backend).
    A Keras trial runs in a process of its own: alone on its device (``gate`` a
    ``gpu_share.LoneGate`` when None, which stops the run's background compiles while it times),
    or beside other processes' trials through the lock files of ``job.gpu_gate``."""
    import torch

    spec, protocol = ModelSpec.from_dict(job.spec), Protocol(**job.protocol)
    want_gpu = job.device.startswith("cuda")
    keras = import_keras("cpu" if not want_gpu else job.device)
    backend = keras.backend.backend()
    if backend == "jax" and job.cache_root:
        # XLA picks kernels by timing them as it compiles, so two compiles of one network can
        # differ by 10% in speed; kept in the run's cache, a network compiles (and is tuned)
        # once for every trial and re-run that trains it.
        import jax

        jax.config.update("jax_compilation_cache_dir", str(Path(job.cache_root) / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the predict function too
    accel = _accelerator(keras)
    if want_gpu and accel is None:
        raise BakeoffError(f"--device {job.device}, but Keras on {backend} sees no GPU (a CPU-only build?): "
                           f"install a GPU build of {backend}, set KERAS_BACKEND to one that has it, or use --device cpu")

    from bakeoff.data.batches import Batcher
    from bakeoff.engines.keras.build import build_model
    from bakeoff.engines.keras.fit import Steps, fit, fit_top_only, make_optimizer, time_inference
    from bakeoff.gpu_share import LoneGate
    from bakeoff.timing import background_pids
    from bakeoff.measure import classification_metrics

    rss_reset = accel is None and reset_peak_rss()  # the peak counts from here, as in the PyTorch engine
    bf16 = protocol.precision == "bf16" or (protocol.precision == "auto" and accel is not None)
    keras.config.set_dtype_policy("mixed_bfloat16" if bf16 else "float32")
    keras.utils.set_random_seed(protocol.seed)
    np.random.seed(protocol.seed)

    t_build = time.perf_counter()
    model, backbone, weights, upsampled = build_model(keras, spec, len(job.classes), job.input_size,
                                                      protocol.pretrained, job.weights_dir)
    if protocol.train_only_top_layer:
        backbone.trainable = False  # also keeps its batch-norm statistics frozen, as the PyTorch engine does
    # Top-only trials train the classifier on features (``fit_top_only``); their full-model
    # step, for timing inference, is made after, from the trained weights.
    steps = None if protocol.train_only_top_layer else Steps(keras, model, make_optimizer(keras, protocol))
    build_s = time.perf_counter() - t_build

    images = np.load(job.cache_path, mmap_mode="r")
    needed = np.concatenate([job.train_idx, job.val_idx])
    t_load = time.perf_counter()
    # Crops, flips and normalisation on the GPU, as for PyTorch trials, when Keras computes there
    # and PyTorch sees it too; the batches cross to the backend on the device.
    on_gpu = accel is not None and torch.cuda.is_available()
    device = torch.device(job.device if job.device.startswith("cuda:") else "cuda") if on_gpu else torch.device("cpu")
    if job.gpu_gate:  # beside other processes' trials: their gate, not the worker's own
        from bakeoff.process_gate import ProcessGate

        # one CUDA context per process: synchronising it waits for JAX's streams too
        gate = ProcessGate(job.gpu_gate, lambda: torch.cuda.synchronize(device) if on_gpu else None,
                           job.concurrent_trials)
    gate = gate if gate is not None else LoneGate()
    since = gate.waited(), gate.alone()
    batcher = Batcher.create(images, needed, job.input_size, spec.mean, spec.std, device, on_gpu, "auto",
                             side=job.side, gate=gate)
    load_s = time.perf_counter() - t_load

    with gate.keeping_out(background_pids(job.background, job.compile)):
        if protocol.train_only_top_layer:
            fitted = fit_top_only(keras, model, batcher, job.train_idx, job.labels, job.val_idx, protocol, on_step)
            steps = Steps(keras, model, make_optimizer(keras, protocol))
        else:
            fitted = fit(steps, batcher, job.train_idx, job.labels, job.val_idx, protocol, on_step, gate)
        metrics = classification_metrics(job.labels[job.val_idx], fitted.final_val_probs, job.classes)
        timing = time_inference(steps, batcher, job.val_idx, protocol, gate)
    gate.idle()
    steps.finish()
    path = _save(model, spec, job.classes, protocol, Path(job.out_dir), job.input_size, weights, backend)
    peak_mb, peak_kind = _peak_memory(keras, accel is not None, rss_reset)
    if job.gpu_gate:
        gate.close()  # done with the GPU: not stopped for the neighbours' solo sections while it exits
    return result_row(
        spec, job, protocol, metrics, fitted, timing, build_s=build_s, load_s=load_s,
        params=model.count_params(), model_path=path, peak=(peak_mb, peak_kind), weights=weights,
        compile_time_s=fitted.compile_time_s, input_upsampled_to=upsampled, train_wall_s=fitted.train_wall_s,
        setup_time_s=build_s + load_s + fitted.compile_time_s, feature_time_s=fitted.feature_time_s,
        precision="bf16-mixed" if bf16 else "fp32", channels_last=True,  # Keras computes NHWC
        device="cuda" if accel else "cpu",
        device_name=accel[1] if accel else device_name(torch.device("cpu")),
        data_resident=batcher.residence, backend=backend,
        **gate.shared_figures(since),
    )


def load_saved(model_dir, device: str = "auto"):
    """Load ``OUT/models/<model>/`` written by a Keras trial: (keras model, spec dict, class names).

    The model takes NHWC float32 images of ``meta["input_size"]``, normalised with ``meta["mean"]``
    and ``meta["std"]`` on [0, 1] pixels, and returns logits.

    >>> model, meta, classes = load_saved("bakeoff-out/models/keras__MobileNetV2")  # doctest: +SKIP
    """
    folder, meta, classes = read_model_dir(model_dir, "model.keras", " for a Keras model")
    keras = import_keras(device)
    import bakeoff.engines.keras.bit  # noqa: F401 - registers BiT's layer for deserialisation

    model = keras.saving.load_model(folder / "model.keras", compile=False)
    return model, meta, classes


def load_predict(model_dir: Path, device: str):
    """A saved model for serving: (predict(N x 3 x S x S float32) -> probabilities, spec dict, class names, device)."""
    from bakeoff.measure import softmax

    model, meta, classes = load_saved(model_dir, device)
    logits = meta.get("output", "logits") == "logits"

    def predict(batch: np.ndarray) -> np.ndarray:
        # Keras computes NHWC; predict_on_batch is its compiled path (eager calls are far slower).
        out = np.asarray(model.predict_on_batch(np.ascontiguousarray(batch.transpose(0, 2, 3, 1))), np.float32)
        return softmax(out) if logits else out

    return predict, meta, classes, device
