"""Fit, evaluate and time a Keras model through compiled steps (jax.jit or tf.function), on the same
batches as the PyTorch engine (bakeoff.data.batches.Batcher on the CPU, handed over as NHWC)."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from bakeoff.data.batches import Batcher
from bakeoff.measure import summarize_ms, time_calls, validation_figures
from bakeoff.protocol import Protocol

__all__ = ["make_optimizer", "Steps", "fit", "predict_probs", "time_inference", "nhwc"]


def nhwc(x) -> np.ndarray:
    """A Batcher batch (NCHW torch tensor) as the NHWC float32 array Keras takes."""
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def make_optimizer(keras, protocol: Protocol):
    # torch's defaults (eps 1e-8, AdamW decay 0.01, SGD momentum 0.9) so both frameworks get one protocol
    if protocol.optimizer == "adam":
        return keras.optimizers.Adam(protocol.lr, epsilon=1e-8)
    if protocol.optimizer == "adamw":
        return keras.optimizers.AdamW(protocol.lr, weight_decay=0.01, epsilon=1e-8)
    return keras.optimizers.SGD(protocol.lr, momentum=0.9)


class Steps:
    """One model's compiled train step and predict function on the active Keras backend.

    ``train`` returns device scalars (loss, correct) without waiting; ``sync`` waits for the
    device; ``warm_up`` compiles a batch shape without changing the weights or optimizer state.
    """

    def __init__(self, keras, model, optimizer) -> None:
        self.keras, self.model, self.optimizer = keras, model, optimizer
        self.backend = keras.backend.backend()
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        optimizer.build(model.trainable_variables)
        if self.backend == "jax":
            self._init_jax(loss_fn)
        elif self.backend == "tensorflow":
            self._init_tf(loss_fn)
        else:
            from bakeoff.errors import BakeoffError

            raise BakeoffError(f"Keras backend {self.backend!r} is not supported: use tensorflow or jax")

    @property
    def kind(self) -> str:
        return "compiled (jax.jit, XLA)" if self.backend == "jax" else \
            f"compiled (tf.function{', XLA' if self._xla else ''})"

    def _init_jax(self, loss_fn) -> None:
        import jax
        import jax.numpy as jnp

        model, optimizer = self.model, self.optimizer

        def loss_and_updates(tv, ntv, x, y):
            logits, ntv = model.stateless_call(tv, ntv, x, training=True)
            return loss_fn(y, logits), (logits, ntv)

        grad_fn = jax.value_and_grad(loss_and_updates, has_aux=True)

        def train_step(state, x, y):
            tv, ntv, ov = state
            (loss, (logits, ntv)), grads = grad_fn(tv, ntv, x, y)
            tv, ov = optimizer.stateless_apply(ov, grads, tv)
            correct = jnp.sum(jnp.argmax(logits, axis=-1) == y)
            return loss, correct, (tv, ntv, ov)

        self._jax = jax
        self._train = jax.jit(train_step, donate_argnums=0)
        self._predict = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0])
        self.state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
                      [v.value for v in optimizer.variables])

    def _init_tf(self, loss_fn) -> None:
        import tensorflow as tf

        model, optimizer = self.model, self.optimizer
        self._xla = bool(model.jit_compile)  # Keras's "auto": XLA on a GPU when every layer supports it

        # A free batch dimension: one trace serves the full and the last, smaller batch.
        image = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)

        @tf.function(jit_compile=self._xla, input_signature=[image, tf.TensorSpec((None,), tf.int32)])
        def train_step(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = loss_fn(y, logits)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y), tf.int32))
            return loss, correct

        self._tf = tf
        self._train = train_step
        self._predict = tf.function(lambda x: model(x, training=False), jit_compile=self._xla, input_signature=[image])

    def train(self, x: np.ndarray, y: np.ndarray):
        if self.backend == "jax":
            loss, correct, self.state = self._train(self.state, x, y)
            return loss, correct
        return self._train(x, y)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits as numpy (so the call has finished on the device when it returns)."""
        if self.backend == "jax":
            return np.asarray(self._predict(self.state[0], self.state[1], x))
        return self._predict(x).numpy()

    def sync(self) -> None:
        if self.backend == "jax":
            self._jax.block_until_ready(self.state)
        else:
            self.optimizer.iterations.numpy()  # written last by each step

    def warm_up(self, x: np.ndarray, y: np.ndarray) -> float:
        """Compile the train step for this batch shape; weights and optimizer state stay as they were."""
        t0 = time.perf_counter()
        if self.backend == "jax":
            copy = self._jax.tree_util.tree_map(lambda a: a.copy(), self.state)
            self._jax.block_until_ready(self._train(copy, x, y))
        else:
            variables = list(self.model.variables) + list(self.optimizer.variables)
            saved = [v.numpy() for v in variables]
            self._train(x, y)
            for v, value in zip(variables, saved):
                v.assign(value)
        return time.perf_counter() - t0

    def finish(self) -> None:
        """Write the trained state back into the model's variables (for saving)."""
        if self.backend == "jax":
            tv, ntv, ov = self.state
            for pairs in ((self.model.trainable_variables, tv), (self.model.non_trainable_variables, ntv),
                          (self.optimizer.variables, ov)):
                for v, value in zip(*pairs):
                    v.assign(value)


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    """The batch sizes one epoch will see (the last may be smaller; a lone image is skipped)."""
    sizes = [min(batch_size, n)]
    last = n % batch_size
    if last >= 2 and n > batch_size:
        sizes.append(last)
    return sizes


def fit(steps: Steps, batcher: Batcher, train_idx: np.ndarray, labels: np.ndarray, val_idx: np.ndarray,
        protocol: Protocol, on_step: Callable[[int, int, int, float], None] | None = None) -> dict:
    """Train with the protocol; same batches, order and augmentation as the PyTorch engine's ``fit``.

    Training time counts only the training loop (device-synchronised at each epoch's ends);
    compiling each batch shape happens before it and is reported as ``compile_time_s``; the
    per-epoch validation pass is timed apart and excluded.
    """
    import torch

    gen = torch.Generator().manual_seed(protocol.seed)
    rng = np.random.default_rng(protocol.seed)
    y_all = labels.astype(np.int32)
    bs = protocol.batch_size
    compile_s = 0.0
    for size in _batch_sizes(len(train_idx), bs):
        idx = train_idx[:size]
        warm_gen = torch.Generator().manual_seed(protocol.seed + 1)  # leaves the training generator untouched
        compile_s += steps.warm_up(nhwc(batcher.train_batch(idx, warm_gen, protocol.augment)), y_all[idx])
    steps_per_epoch = int(np.ceil(len(train_idx) / bs))
    history, train_time, data_time, eval_time = [], 0.0, 0.0, 0.0
    for epoch in range(protocol.epochs):
        order = rng.permutation(train_idx)
        outs = []
        steps.sync()
        t_epoch = time.perf_counter()
        for step in range(steps_per_epoch):
            idx = order[step * bs:(step + 1) * bs]
            if len(idx) < 2 < len(order):
                continue  # a lone last image breaks batch-norm in training mode
            t_data = time.perf_counter()
            x = nhwc(batcher.train_batch(idx, gen, protocol.augment))
            y = y_all[idx]
            data_time += time.perf_counter() - t_data
            loss, correct = steps.train(x, y)
            outs.append((loss, correct, len(idx)))
            if on_step is not None and (step % 10 == 0 or step == steps_per_epoch - 1):
                on_step(epoch, step + 1, steps_per_epoch, time.perf_counter() - t_epoch)
        steps.sync()
        epoch_time = time.perf_counter() - t_epoch
        train_time += epoch_time
        val_y = labels[val_idx]
        val_loss = val_acc = None
        if protocol.validates(epoch):
            t_eval = time.perf_counter()
            val_probs = predict_probs(steps, batcher, val_idx)
            eval_time += time.perf_counter() - t_eval
            val_loss, val_acc = validation_figures(val_probs, val_y)
        n = len(train_idx)
        history.append({
            "epoch": epoch + 1,
            "train_loss": sum(float(loss) * k for loss, _, k in outs) / n,
            "train_accuracy": sum(int(c) for _, c, _ in outs) / n,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "epoch_time_s": epoch_time,
            "images_per_s": n / epoch_time,
        })
    return {"history": history, "train_time_s": train_time, "data_time_s": data_time, "eval_time_s": eval_time,
            "compile_time_s": compile_s, "final_val_probs": val_probs}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def predict_probs(steps: Steps, batcher: Batcher, idx: np.ndarray, batch_size: int = 128) -> np.ndarray:
    return np.concatenate([_softmax(steps.predict(nhwc(x))) for _, x in batcher.eval_batches(idx, batch_size)])


def time_inference(steps: Steps, batcher: Batcher, idx: np.ndarray, protocol: Protocol) -> dict:
    """Batch-1 latency (median, p95 of >= 50 runs after warm-up) on a real validation image, and
    throughput at ``protocol.throughput_batch``, both through the compiled predict function."""
    one = nhwc(batcher.eval_batch(idx[:1]))
    reps = int(np.ceil(protocol.throughput_batch / len(idx)))
    big = nhwc(batcher.eval_batch(np.tile(idx, reps)[:protocol.throughput_batch]))
    no_sync = lambda: None  # noqa: E731 - predict returns host arrays, so each call has finished
    lat = summarize_ms(time_calls(lambda: steps.predict(one), no_sync, protocol.latency_warmup, protocol.latency_runs))
    thr_ms = time_calls(lambda: steps.predict(big), no_sync, 2, 7)
    return {
        "latency_ms_p50": lat["p50"], "latency_ms_p95": lat["p95"], "latency_ms_min": lat["min"],
        "latency_runs": lat["n"],
        "throughput_img_s": protocol.throughput_batch / (float(np.median(thr_ms)) / 1000.0),
        "throughput_batch": protocol.throughput_batch,
        "latency_kind": steps.kind,
    }
