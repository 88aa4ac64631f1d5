"""Batch normalization written out with ``keras.ops``: the arithmetic, nothing hidden.

:class:`ScratchBatchNormalization` computes what ``keras.layers.BatchNormalization`` computes
(same arguments, weight names and numbers to float32 round-off), in a dozen readable lines:

- training (``training=True`` and the layer trainable): normalize with the batch mean and the
  *biased* batch variance over every axis but ``axis``, and update the moving statistics with
  Keras's convention ``moving = moving * momentum + batch * (1 - momentum)``;
- inference: normalize with the moving statistics;
- both: ``y = gamma * (x - mean) / sqrt(variance + epsilon) + beta``.

It is a teaching layer: it has no masking, renormalization or cross-replica statistics.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

__all__ = ["ScratchBatchNormalization"]


@keras.saving.register_keras_serializable(package="bnutils")
class ScratchBatchNormalization(keras.layers.Layer):
    """Batch normalization from ``keras.ops``, equal to ``keras.layers.BatchNormalization``.

    Args:
        axis: the feature (channel) axis, normalized per entry; default the last one.
        momentum: weight of the old value in the moving averages (Keras convention; PyTorch's
            ``momentum`` is ``1 - momentum``).
        epsilon: added to the variance inside the square root.
        center: learn an offset ``beta``.
        scale: learn a scale ``gamma``.
        beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_variance_initializer: initializers of the four weights.
        **kwargs: base-layer arguments (``name``, ``dtype``, ``trainable``).

    Call arguments:
        inputs: a tensor of rank >= 2, e.g. ``(N, C)`` or ``(N, H, W, C)``.
        training: use (and update) batch statistics; otherwise the moving ones.
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
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"Expected `momentum` in [0, 1], received {momentum!r}.")
        if float(epsilon) <= 0.0:
            raise ValueError(f"Expected `epsilon` > 0, received {epsilon!r}.")
        self.axis = int(axis)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self._reduction_axes: list[int] = []

    def build(self, input_shape):
        rank = len(input_shape)
        if rank < 2 or not -rank <= self.axis < rank:
            raise ValueError(
                f"ScratchBatchNormalization expects inputs of rank >= 2 with axis={self.axis} "
                f"inside them; received input shape {tuple(input_shape)}."
            )
        axis = self.axis % rank
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(
                f"The normalized axis {self.axis} of the input must be known; received input "
                f"shape {tuple(input_shape)}."
            )
        shape = (channels,)

        def weight(name, initializer, trainable):
            return self.add_weight(shape=shape, name=name, initializer=initializer,
                                   trainable=trainable, autocast=False)

        if self.scale:
            self.gamma = weight("gamma", self.gamma_initializer, True)
        if self.center:
            self.beta = weight("beta", self.beta_initializer, True)
        self.moving_mean = weight("moving_mean", self.moving_mean_initializer, False)
        self.moving_variance = weight("moving_variance", self.moving_variance_initializer, False)
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
        config.update(
            {
                "axis": self.axis,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "center": self.center,
                "scale": self.scale,
                "beta_initializer": keras.initializers.serialize(self.beta_initializer),
                "gamma_initializer": keras.initializers.serialize(self.gamma_initializer),
                "moving_mean_initializer": keras.initializers.serialize(
                    self.moving_mean_initializer
                ),
                "moving_variance_initializer": keras.initializers.serialize(
                    self.moving_variance_initializer
                ),
            }
        )
        return config
