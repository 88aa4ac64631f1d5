"""``NoisyBatchNormalization``: re-inject distribution shift after BN (Santurkar et al., 2018).

Santurkar, Tsipras, Ilyas and Madry ("How Does Batch Normalization Help Optimization?",
NeurIPS 2018) test the internal-covariate-shift story by adding noise right after each BN
layer: random, time-varying, non-zero-mean, non-unit-variance perturbations, so the next layer
sees a *moving* input distribution again. If BN helped only by removing that shift, the noisy
network should train like the network without BN; in their experiments it trains like BN.

This layer is that perturbation. Place it directly after a ``BatchNormalization`` layer.
"""

from __future__ import annotations

import math

import keras
from keras import ops

__all__ = ["NoisyBatchNormalization"]


@keras.saving.register_keras_serializable(package="bnutils")
class NoisyBatchNormalization(keras.layers.Layer):
    """Random per-channel scale and shift, redrawn at every training step; identity at inference.

    At every training step the layer draws, for each channel ``c``,

    * a shift ``m_c ~ U(-shift, shift)`` (the mean of the channel moves away from 0), and
    * a scale ``s_c = exp(u_c)`` with ``u_c ~ U(-log(1 + scale), log(1 + scale))`` (the
      variance moves away from 1, by up to a factor ``(1 + scale) ** 2`` either way),

    and returns ``s_c * x + m_c``. With ``per_example=True`` every example draws its own
    ``m`` and ``s`` (i.i.d. noise per sample and channel) from the same ranges. The draws come
    from a Keras ``SeedGenerator``, so they change every step and are reproducible from
    ``seed``. In inference (``training`` false or ``None``) the layer returns its input.

    Args:
        shift: half-width of the uniform shift distribution (non-negative).
        scale: the scale factor lies in ``[1 / (1 + scale), 1 + scale]`` (non-negative).
        axis: the channel axis (``-1`` for channels-last dense and conv activations).
        per_example: draw separate noise for every example instead of one draw per batch.
        seed: seed of the noise stream (``None``: unseeded, follows the global Keras seed).
        **kwargs: standard layer arguments (``name``, ``dtype``...).

    Raises:
        ValueError: a negative ``shift`` or ``scale``, or a non-integer ``axis``.
    """

    def __init__(
        self,
        shift: float = 1.0,
        scale: float = 1.0,
        axis: int = -1,
        per_example: bool = False,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for label, value in (("shift", shift), ("scale", scale)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(
                    f"NoisyBatchNormalization: `{label}` must be a non-negative number, "
                    f"received {value!r}. Use 0 to switch that part of the noise off."
                )
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(
                f"NoisyBatchNormalization: `axis` must be an integer, received {axis!r}."
            )
        self.shift = float(shift)
        self.scale = float(scale)
        self.axis = axis
        self.per_example = bool(per_example)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def build(self, input_shape):
        rank = len(input_shape)
        axis = self.axis % rank if rank else 0
        if rank < 2 or axis == 0:
            raise ValueError(
                f"NoisyBatchNormalization expects inputs of rank >= 2 with the channel axis "
                f"after the batch axis; received input shape {tuple(input_shape)} and "
                f"axis={self.axis}."
            )
        if input_shape[axis] is None:
            raise ValueError(
                f"NoisyBatchNormalization needs a known channel dimension; input shape "
                f"{tuple(input_shape)} has None on axis {self.axis}."
            )
        self._axis = axis
        self._rank = rank
        self._channels = int(input_shape[axis])

    def _noise_shape(self, inputs) -> list:
        shape = [1] * self._rank
        shape[self._axis] = self._channels
        if self.per_example:
            shape[0] = ops.shape(inputs)[0]
        return shape

    def call(self, inputs, training=None):
        if not training or (self.shift == 0.0 and self.scale == 0.0):
            return inputs
        shape = self._noise_shape(inputs)
        dtype = inputs.dtype
        log_range = math.log1p(self.scale)
        log_s = keras.random.uniform(
            shape, minval=-log_range, maxval=log_range, dtype=dtype, seed=self.seed_generator
        )
        m = keras.random.uniform(
            shape, minval=-self.shift, maxval=self.shift, dtype=dtype, seed=self.seed_generator
        )
        return inputs * ops.exp(log_s) + m

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            shift=self.shift,
            scale=self.scale,
            axis=self.axis,
            per_example=self.per_example,
            seed=self.seed,
        )
        return config
