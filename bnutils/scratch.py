"""Batch normalization written out with ``keras.ops``: the arithmetic, nothing hidden.

Training normalizes with the batch mean and *biased* variance and updates the moving statistics
as ``moving * momentum + batch * (1 - momentum)``; inference uses the moving statistics. Used in
notebook 03.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

__all__ = ["ScratchBatchNormalization"]

_MODULES = {
    "initializer": keras.initializers,
    "regularizer": keras.regularizers,
    "constraint": keras.constraints,
}


@keras.saving.register_keras_serializable(package="bnutils")
class ScratchBatchNormalization(keras.layers.Layer):
    """``keras.layers.BatchNormalization`` from ``keras.ops``, with the same numbers and weights.

    Takes every argument of the Keras layer and its ``get_config()``, so
    ``ScratchBatchNormalization.from_config(keras_bn.get_config())`` works. The options it does
    not implement must keep their defaults: ``synchronized=False`` and ``renorm=False``
    (``renorm_clipping`` and ``renorm_momentum`` are then unused, as in Keras).

    Raises:
        ValueError: ``momentum`` outside [0, 1], ``epsilon <= 0``, ``synchronized=True`` or
            ``renorm=True``.
    """

    def __init__(
        self,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: dict | None = None,
        renorm_momentum: float = 0.99,
        synchronized: bool = False,
        **kwargs: Any,
    ):
        for flag, value, instead in (
            ("synchronized", synchronized, "cross-replica statistics"),
            ("renorm", renorm, "batch renormalization"),
        ):
            if value:
                raise ValueError(
                    f"ScratchBatchNormalization does not implement {flag}=True (received "
                    f"{flag}={value!r}); expected {flag}=False. For {instead} use "
                    f"keras.layers.BatchNormalization({flag}=True)."
                )
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"Expected `momentum` in [0, 1], received {momentum!r}.")
        if float(epsilon) <= 0.0:
            raise ValueError(f"Expected `epsilon` > 0, received {epsilon!r}.")
        super().__init__(**kwargs)
        self.axis, self.momentum, self.epsilon = int(axis), float(momentum), float(epsilon)
        self.center, self.scale = bool(center), bool(scale)
        self.synchronized, self.renorm = False, False
        self.renorm_clipping, self.renorm_momentum = renorm_clipping, float(renorm_momentum)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None

    def build(self, input_shape):
        rank = len(input_shape)
        if rank < 2 or not -rank <= self.axis < rank or input_shape[self.axis] is None:
            raise ValueError(
                f"ScratchBatchNormalization expects inputs of rank >= 2 with a known size on "
                f"axis={self.axis}; received input shape {tuple(input_shape)}."
            )
        axis = self.axis % rank
        channels = input_shape[axis]

        def weight(name, trainable):
            options = {kind: getattr(self, f"{name}_{kind}", None) for kind in _MODULES}
            return self.add_weight(
                shape=(channels,), name=name, trainable=trainable, autocast=False, **options
            )

        if self.scale:
            self.gamma = weight("gamma", True)
        if self.center:
            self.beta = weight("beta", True)
        self.moving_mean = weight("moving_mean", False)
        self.moving_variance = weight("moving_variance", False)
        self._reduction_axes = [i for i in range(rank) if i != axis]
        self._broadcast = [1] * rank
        self._broadcast[axis] = channels

    def call(self, inputs, training=None):
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        if training and self.trainable:
            mean = ops.mean(x, axis=self._reduction_axes)
            variance = ops.mean(  # biased: divide by n, not n - 1
                ops.square(x - ops.reshape(mean, self._broadcast)), axis=self._reduction_axes
            )
            m = self.momentum
            self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
            self.moving_variance.assign(self.moving_variance * m + variance * (1.0 - m))
        else:
            mean = ops.cast(self.moving_mean, x.dtype)
            variance = ops.cast(self.moving_variance, x.dtype)
        # y = gamma * (x - mean) / sqrt(variance + eps) + beta, written as x * inv + shift
        inv = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            inv = inv * ops.cast(self.gamma, x.dtype)
        shift = -mean * inv
        if self.center:
            shift = shift + ops.cast(self.beta, x.dtype)
        outputs = x * ops.reshape(inv, self._broadcast) + ops.reshape(shift, self._broadcast)
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        for key in ("axis", "momentum", "epsilon", "center", "scale"):
            config[key] = getattr(self, key)
        for name in ("beta", "gamma", "moving_mean", "moving_variance"):
            for kind, module in _MODULES.items():
                if hasattr(self, f"{name}_{kind}"):  # moving statistics: initializer only
                    config[f"{name}_{kind}"] = module.serialize(getattr(self, f"{name}_{kind}"))
        for key in ("synchronized", "renorm", "renorm_clipping", "renorm_momentum"):
            config[key] = getattr(self, key)
        return config
