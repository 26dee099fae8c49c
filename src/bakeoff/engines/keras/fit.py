"""Fit, evaluate and time a Keras model through compiled steps (jax.jit or tf.function), on the same
batches as the PyTorch engine (bakeoff.data.batches.Batcher on the CPU, handed over as NHWC)."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from bakeoff.data.batches import Batcher
from bakeoff.engines.keras.adam import adam
from bakeoff.measure import epoch_record, summarize_ms, time_calls
from bakeoff.gpu_share import GpuShare, LoneGate
from bakeoff.job import FitResult
from bakeoff.protocol import Protocol
from bakeoff.timing import MEASURED, TOP_ONLY_BASIS, WINDOW_STEPS, Clock, Solo, settle_heap, window

__all__ = ["make_optimizer", "Steps", "fit", "fit_top_only", "predict_probs", "time_inference", "nhwc"]

SHARED_WINDOWS = 3  # solo windows an epoch, for a trial beside other processes' trials
EVAL_BATCH = 128  # validation images a predict call


def nhwc(x) -> np.ndarray:
    """A Batcher batch (NCHW torch tensor, on the CPU) as the NHWC float32 array Keras takes."""
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def to_backend(backend: str, x):
    """A Batcher batch (NCHW torch tensor) or features (N x D) as the input of Keras on
    ``backend``, on the device the batch is on: a batch made on the GPU crosses to the backend
    there (DLPack), without a copy through the host."""
    x = x.permute(0, 2, 3, 1).contiguous() if x.dim() == 4 else x.contiguous()
    if not x.is_cuda:
        return x.numpy()
    if backend == "jax":
        import jax.dlpack

        return jax.dlpack.from_dlpack(x)
    import tensorflow as tf
    import torch.utils.dlpack

    return tf.experimental.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(x))


def make_optimizer(keras, protocol: Protocol):
    # torch's defaults (eps 1e-8, AdamW decay 0.01, SGD momentum 0.9) so both frameworks get one protocol;
    # Keras's Adam and AdamW with their per-step values made once a step (engines.keras.adam)
    if protocol.optimizer == "adam":
        return adam(keras, protocol.lr, epsilon=1e-8)
    if protocol.optimizer == "adamw":
        return adam(keras, protocol.lr, epsilon=1e-8, weight_decay=0.01)
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

    def feed(self, x):
        return to_backend(self.backend, x)

    def predict_on_device(self, x):
        """Logits, left on the device (``sync`` waits for them)."""
        if self.backend == "jax":
            out = self._predict(self.state[0], self.state[1], x)
            self._last = out
            return out
        self._last = self._predict(x)
        return self._last

    def sync_predict(self) -> None:
        if self.backend == "jax":
            self._jax.block_until_ready(self._last)
        elif self._tf.config.list_logical_devices("GPU"):
            self._tf.test.experimental.sync_devices()
        else:
            self._last.numpy()

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

    def warm_predict(self, x) -> float:
        """Compile the predict function for this batch shape (one call, its output dropped)."""
        t0 = time.perf_counter()
        self.predict_on_device(x)
        self.sync_predict()
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
        protocol: Protocol, on_step: Callable[[int, int, int, float], None] | None = None,
        gate: GpuShare | None = None) -> FitResult:
    """Train with the protocol: the PyTorch engine's batches, order, crop boxes and flips
    (``engines.torch.fit.fit``: one generator draws each epoch's boxes, on the device where the batcher
    is), and its training-time definition (``bakeoff.timing``). Alone on its device, a trial
    times every stretch of ``WINDOW_STEPS`` steps after an epoch's first window as well: a
    host-bound step varies more from stretch to stretch than a graphed one. Beside trials of
    other processes (``gate`` a ``process_gate.ProcessGate``) each step is a shared section, and
    ``SHARED_WINDOWS`` windows spread over each epoch are timed alone. Compiling each batch shape
    of the training step and of the predict function happens before the loop, off the GPU's
    lock (``compile_time_s``); evaluation is timed apart.
    ``gate``: the trial's (alone when None); its windows stop the run's background compiles.
    """
    import torch

    gate = gate if gate is not None else LoneGate()
    gen = torch.Generator().manual_seed(protocol.seed)
    rng = np.random.default_rng(protocol.seed)
    y_all = labels.astype(np.int32)
    bs = protocol.batch_size
    compile_s = 0.0
    gate.idle()  # seconds to minutes of compiling: neighbours may be alone meanwhile
    for size in _batch_sizes(len(train_idx), bs):
        idx = train_idx[:size]
        warm_gen = torch.Generator().manual_seed(protocol.seed + 1)  # leaves the training generator untouched
        compile_s += steps.warm_up(steps.feed(batcher.train_batch(idx, warm_gen, protocol.augment)), y_all[idx])
    # the predict function too, at every shape evaluation and latency will call it with: its
    # compile never lands in an evaluation, nor in a solo section that neighbours wait for
    n_val = len(val_idx)
    for size in sorted({min(EVAL_BATCH, n_val), n_val % EVAL_BATCH or EVAL_BATCH, 1, protocol.throughput_batch}):
        compile_s += steps.warm_predict(steps.feed(batcher.eval_batch(np.resize(val_idx, size))))
    steps_per_epoch = int(np.ceil(len(train_idx) / bs))
    # beside others, the windows start a third of an epoch apart (alone: one after another)
    stride = max(2 * WINDOW_STEPS, steps_per_epoch // SHARED_WINDOWS) if gate.concurrent else 0
    clock = Clock()
    history, wall_time, data_time, eval_time = [], 0.0, 0.0, 0.0
    for epoch in range(protocol.epochs):
        settle_heap()
        order = rng.permutation(train_idx)
        with gate.shared():
            theta = batcher.crop_params(len(order), gen).to(batcher.device)
            pos = batcher.positions(order)
        outs, ran, opened_at = [], 0, 0
        win, solo = window(steps_per_epoch), Solo(gate, steps.sync, None, "window")
        steps.sync()
        t_epoch = time.perf_counter()
        try:
            for step in range(steps_per_epoch):
                lo, hi = step * bs, min((step + 1) * bs, len(order))
                if hi - lo < 2 < len(order):
                    continue  # a lone last image breaks batch-norm in training mode
                if step == win[0]:
                    solo.start()
                    opened_at = ran
                with gate.shared():
                    t_data = time.perf_counter()
                    x = steps.feed(batcher.train_batch(order[lo:hi], augment=protocol.augment, theta=theta[lo:hi],
                                                       pos=None if pos is None else pos[lo:hi]))
                    y = y_all[order[lo:hi]]
                    data_time += time.perf_counter() - t_data
                    loss, correct = steps.train(x, y)
                outs.append((loss, correct, hi - lo))
                ran += 1
                if solo.running and step == win[1] - 1:
                    clock.add("compiled", solo.stop(), ran - opened_at, win == (0, steps_per_epoch))
                    nxt = win[0] + stride if stride else step + 1
                    if steps_per_epoch - nxt >= WINDOW_STEPS:
                        win = (nxt, nxt + WINDOW_STEPS)
                if on_step is not None and (step % 10 == 0 or step == steps_per_epoch - 1):
                    on_step(epoch, step + 1, steps_per_epoch, time.perf_counter() - t_epoch)
            if solo.running:  # the window's last step was a skipped lone image
                clock.add("compiled", solo.stop(), ran - opened_at, win == (0, steps_per_epoch))
        finally:
            solo.release()
        steps.sync()
        clock.steps += ran
        epoch_time = time.perf_counter() - t_epoch
        wall_time += epoch_time
        val_probs = None
        t_eval = time.perf_counter()
        if protocol.validates(epoch):
            val_probs = predict_probs(steps, batcher, val_idx, gate=gate)
        epoch_eval = time.perf_counter() - t_eval
        eval_time += epoch_eval
        history.append(_record(epoch, outs, len(train_idx), val_probs, labels[val_idx], epoch_time, epoch_eval))
    return FitResult(history=history, **clock.figures("compiled"), train_wall_s=wall_time, data_time_s=data_time,
                     eval_time_s=eval_time, compile_time_s=compile_s, final_val_probs=val_probs)


def fit_top_only(keras, model, batcher: Batcher, train_idx: np.ndarray, labels: np.ndarray, val_idx: np.ndarray,
                 protocol: Protocol, on_step=None) -> FitResult:
    """--train-only-top-layer, the PyTorch engine's protocol (``engines.torch.fit.fit_top_only``): the
    frozen backbone runs once over the training images (centre crops, timed as training) and
    once over the validation images (timed apart), then the ``classifier`` layer trains on
    those features in the same order and batches."""
    import torch

    head_layer = model.get_layer("classifier")
    features = keras.Model(model.inputs, head_layer.input)
    backend = keras.backend.backend()

    def extract(idx):
        parts = [features(to_backend(backend, x), training=False) for _, x in batcher.eval_batches(idx, 256)]
        return keras.ops.cast(keras.ops.concatenate(parts, axis=0), "float32")

    t0 = time.perf_counter()
    f_train = extract(train_idx)
    keras.ops.convert_to_numpy(f_train[:1])  # waits for the pass
    feature_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    f_val = extract(val_idx)
    keras.ops.convert_to_numpy(f_val[:1])
    val_feature_s = time.perf_counter() - t0

    inp = keras.Input((int(f_train.shape[1]),), name="features")
    head = keras.Model(inp, head_layer(inp))
    steps = Steps(keras, head, make_optimizer(keras, protocol))
    gen = torch.Generator().manual_seed(protocol.seed)
    y_train = labels[train_idx].astype(np.int32)
    bs, n = protocol.batch_size, len(train_idx)
    n_steps = int(np.ceil(n / bs))
    history, train_time, final = [], feature_s, None
    for epoch in range(protocol.epochs):
        perm = torch.randperm(n, generator=gen).numpy()
        outs = []
        steps.sync()
        t_epoch = time.perf_counter()
        for start in range(n_steps):
            idx = perm[start * bs:(start + 1) * bs]
            loss, correct = steps.train(keras.ops.take(f_train, idx, axis=0), y_train[idx])
            outs.append((loss, correct, len(idx)))
        steps.sync()
        epoch_time = time.perf_counter() - t_epoch
        train_time += epoch_time
        if on_step is not None:
            on_step(epoch, n_steps, n_steps, epoch_time)
        t_eval = time.perf_counter()
        val_probs = _softmax(steps.predict(f_val)) if protocol.validates(epoch) else None
        history.append(_record(epoch, outs, n, val_probs, labels[val_idx], epoch_time, time.perf_counter() - t_eval))
        final = val_probs if val_probs is not None else final
    steps.finish()
    return FitResult(history=history, train_time_s=train_time, train_time_kind=MEASURED,
                     train_time_basis=TOP_ONLY_BASIS,
                     train_wall_s=train_time, data_time_s=0.0, eval_time_s=val_feature_s,
                     feature_time_s=feature_s, compile_time_s=0.0, final_val_probs=final)


def _record(epoch: int, outs: list, n: int, val_probs, val_y, epoch_time: float, eval_s: float) -> dict:
    """An epoch's figures from its steps' (loss, correct, batch size) device scalars and wall time."""
    return epoch_record(epoch, sum(float(loss) * k for loss, _, k in outs) / n, sum(int(c) for _, c, _ in outs) / n,
                        val_probs, val_y, epoch_time, n) | {"epoch_wall_s": epoch_time, "eval_time_s": eval_s}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def predict_probs(steps: Steps, batcher: Batcher, idx: np.ndarray, batch_size: int = EVAL_BATCH,
                  gate: GpuShare | None = None) -> np.ndarray:
    gate = gate if gate is not None else LoneGate()
    out = []
    for start in range(0, len(idx), batch_size):
        with gate.shared():  # the batch's crops are GPU work too: never inside a neighbour's solo section
            out.append(_softmax(steps.predict(steps.feed(batcher.eval_batch(idx[start:start + batch_size])))))
    return np.concatenate(out)


def time_inference(steps: Steps, batcher: Batcher, idx: np.ndarray, protocol: Protocol,
                   gate: GpuShare | None = None) -> dict:
    """Batch-1 latency by the rule every engine follows (``engines.torch.infer.time_inference``): the
    compiled predict function, input already on the device, logits left there, synchronised;
    median and p95 of >= 50 runs after warm-up. Throughput at ``protocol.throughput_batch``."""
    gate = gate if gate is not None else LoneGate()
    with gate.shared():
        one = steps.feed(batcher.eval_batch(idx[:1]))
        reps = int(np.ceil(protocol.throughput_batch / len(idx)))
        big = steps.feed(batcher.eval_batch(np.tile(idx, reps)[:protocol.throughput_batch]))
    # each timed call synchronises itself; nothing of this trial's is queued before
    with Solo(gate, lambda: None, None, "latency"):
        lat = summarize_ms(time_calls(lambda: steps.predict_on_device(one), steps.sync_predict,
                                      protocol.latency_warmup, protocol.latency_runs))
        thr_ms = time_calls(lambda: steps.predict_on_device(big), steps.sync_predict, 2, 7)
    return {
        "latency_ms_p50": lat["p50"], "latency_ms_p95": lat["p95"], "latency_runs": lat["n"],
        "throughput_img_s": protocol.throughput_batch / (float(np.median(thr_ms)) / 1000.0),
        "throughput_batch": protocol.throughput_batch, "throughput_kind": "compiled",
        "latency_kind": "compiled", "latency_form": steps.kind,
    }
