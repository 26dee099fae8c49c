"""Keras's Adam and AdamW, update for update, with what every variable's update shares made once per
step instead of once per variable.

Keras's ``Adam.update_step`` rebuilds the step's bias-corrected step size (a cast of the step
count, two powers, a square root, a division) and its constants for each variable. Inside a
traced training step those are most of a variable's ops, and most of the graph of a model with a
few hundred variables: tracing it and optimising it (before the first step, ``compile_time_s``) takes
longer than the network's own forward and backward ops. Made once per ``apply``, the same values
enter the same per-variable arithmetic, so the weights come out bit for bit the same
(tests/engines/keras/test_adam.py checks it against Keras's own optimizer); the optimised graph runs the same ops.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["adam"]


def adam(keras, learning_rate: float, epsilon: float, weight_decay: float | None = None):
    """Keras's Adam (AdamW with ``weight_decay``) with the shared per-step values made once."""
    plain, decoupled = _classes(keras)
    if weight_decay is None:
        return plain(learning_rate, epsilon=epsilon)
    return decoupled(learning_rate, weight_decay=weight_decay, epsilon=epsilon)


@lru_cache(maxsize=None)
def _classes(keras):
    ops = keras.ops

    class SharedStepValues:
        """Mixed in before Keras's Adam or AdamW: their ``update_step``, its shared values cached
        for the one ``apply`` (a traced step or an eager one) that makes them."""

        _shared: dict | None = None

        def apply(self, grads, trainable_variables=None):
            self._shared = {}
            try:
                return super().apply(grads, trainable_variables)
            finally:
                self._shared = None

        def _step_values(self, learning_rate, dtype):
            # Keras's expressions (keras/src/optimizers/adam.py), in its order, once per dtype
            if dtype not in self._shared:
                lr = ops.cast(learning_rate, dtype)
                local_step = ops.cast(self.iterations + 1, dtype)
                beta_1_power = ops.power(ops.cast(self.beta_1, dtype), local_step)
                beta_2_power = ops.power(ops.cast(self.beta_2, dtype), local_step)
                alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
                self._shared[dtype] = (alpha, ops.convert_to_tensor(1 - self.beta_1, dtype),
                                       ops.convert_to_tensor(1 - self.beta_2, dtype),
                                       ops.convert_to_tensor(self.epsilon, dtype))
            return self._shared[dtype]

        def update_step(self, gradient, variable, learning_rate):
            if self.amsgrad or self._shared is None:
                return super().update_step(gradient, variable, learning_rate)
            alpha, one_minus_beta_1, one_minus_beta_2, epsilon = self._step_values(learning_rate, variable.dtype)
            gradient = ops.cast(gradient, variable.dtype)
            m = self._momentums[self._get_variable_index(variable)]
            v = self._velocities[self._get_variable_index(variable)]
            self.assign_add(m, ops.multiply(ops.subtract(gradient, m), one_minus_beta_1))
            self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), one_minus_beta_2))
            self.assign_sub(variable, ops.divide(ops.multiply(m, alpha), ops.add(ops.sqrt(v), epsilon)))

    class Adam(SharedStepValues, keras.optimizers.Adam):
        pass

    class AdamW(SharedStepValues, keras.optimizers.AdamW):
        pass

    return Adam, AdamW
