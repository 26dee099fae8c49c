"""The Keras engine's Adam and AdamW (engines.keras.adam) against Keras's own: the same weights bit
for bit after training steps, from a traced step or an eager one, and a smaller traced step."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("keras") is None or importlib.util.find_spec("tensorflow") is None:
    pytest.skip("needs bakeoff[tensorflow]", allow_module_level=True)


def small_net(keras):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, strides=2)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(16, 3)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def trained(keras, optimizer, traced: bool, steps: int = 4):
    """The weights of ``small_net`` after ``steps`` training steps with ``optimizer``."""
    from bakeoff.engines.keras.fit import Steps

    model = small_net(keras)
    rng = np.random.default_rng(1)
    batches = [(rng.random((6, 16, 16, 3), dtype=np.float32), rng.integers(0, 3, 6).astype(np.int32))
               for _ in range(steps)]
    if traced:
        step = Steps(keras, model, optimizer)
        for x, y in batches:
            step.train(x, y)
        step.sync()
    else:
        import tensorflow as tf

        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        for x, y in batches:
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    return [v.numpy() for v in model.trainable_variables], int(optimizer.iterations.numpy())


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "eager"])
@pytest.mark.parametrize("decay", [None, 0.01], ids=["adam", "adamw"])
def test_the_same_weights_as_keras_s_own_optimizer_bit_for_bit(keras, traced, decay):
    from bakeoff.engines.keras.adam import adam

    ours = adam(keras, 0.01, epsilon=1e-8, weight_decay=decay)
    reference = keras.optimizers.Adam(0.01, epsilon=1e-8) if decay is None else \
        keras.optimizers.AdamW(0.01, weight_decay=decay, epsilon=1e-8)
    assert isinstance(ours, type(reference))
    got, got_steps = trained(keras, ours, traced)
    want, want_steps = trained(keras, reference, traced)
    start = [v.numpy() for v in small_net(keras).trainable_variables]
    assert got_steps == want_steps == 4
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    assert not any(np.array_equal(g, s) for g, s in zip(got, start))  # it trained: every variable moved


def test_the_traced_update_has_fewer_ops(keras):
    import tensorflow as tf

    from bakeoff.engines.keras.adam import adam

    def ops_in_update(optimizer) -> int:
        variables = small_net(keras).trainable_variables
        optimizer.build(variables)
        update = tf.function(lambda grads: optimizer.apply(grads, variables))
        traced = update.get_concrete_function([tf.TensorSpec(v.shape) for v in variables])
        return len(traced.graph.get_operations())

    # eight variables: Keras's own makes the step's shared values eight times, ours once
    assert ops_in_update(adam(keras, 0.01, epsilon=1e-8)) < ops_in_update(keras.optimizers.Adam(0.01, epsilon=1e-8)) - 70
