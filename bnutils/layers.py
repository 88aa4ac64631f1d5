"""Batch normalization layer variants for Keras 3: fused, ghost and noisy BN.

- :class:`FusedBatchNormalization`: Keras's BN computed by TensorFlow's ``FusedBatchNormV3``.
- :class:`GhostBatchNormalization`: batch statistics per virtual batch (Hoffer et al., 2017).
- :class:`NoisyBatchNormalization`: random shift and scale after BN (Santurkar et al., 2018).
- :func:`convert_batchnorm`: a copy of a model with its BN layers swapped for another class.

Fused and ghost BN subclass ``keras.layers.BatchNormalization`` and keep its weights and config,
so weights move between them with ``set_weights`` or ``tf.train.Checkpoint``. Used in notebooks
03-05 and ``benchmarks/bench_bn_layers.py``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import keras
from keras import ops

from bnutils._graph import is_batchnorm, is_graph_model, rewrite
from bnutils._util import check_positive_int
from bnutils.results import Report

__all__ = [
    "ConversionReport",
    "FusedBatchNormalization",
    "GhostBatchNormalization",
    "NoisyBatchNormalization",
    "convert_batchnorm",
]

_FUSED_INPUT_DTYPES = ("float16", "bfloat16", "float32")


def _reject_flags(cls_name: str, kwargs: dict) -> None:
    for flag in ("renorm", "synchronized"):
        if kwargs.get(flag):
            raise ValueError(
                f"{cls_name} does not support {flag}=True (received {flag}={kwargs[flag]!r}); "
                f"expected {flag}=False. Use keras.layers.BatchNormalization for it."
            )


@keras.saving.register_keras_serializable(package="bnutils")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` computed by TensorFlow's fused kernel.

    Same arguments, weights, config and numbers as the Keras layer. On the TensorFlow backend it
    calls ``tf.raw_ops.FusedBatchNormV3`` for float16/bfloat16/float32 inputs with float32
    weights whose channel axis is last, or first after the batch axis for rank-4 inputs.
    Everything else (other backends or axes, ``renorm``, ``synchronized``, masks, float64) runs
    Keras's ``call``. The kernel's batch variance is unbiased; it is converted back to the
    biased one before Keras's moving-average update.
    """

    def _fused_layout(self, shape: tuple, dtype: Any, mask: Any) -> str | None:
        """``"NHWC"``, ``"NCHW"``, ``"flat"`` (reshape to NHWC) or ``None`` (fall back)."""
        if keras.backend.backend() != "tensorflow" or mask is not None:
            return None
        if self.renorm or self.synchronized:
            return None
        if keras.backend.standardize_dtype(dtype) not in _FUSED_INPUT_DTYPES:
            return None
        if self.moving_mean is not None and self.moving_mean.dtype != "float32":
            return None
        rank = len(shape)
        if rank < 2:
            return None
        axis = self.axis % rank if -rank <= self.axis < rank else None
        if rank == 4 and axis == 3:
            return "NHWC"
        if rank == 4 and axis == 1:
            return "NCHW"
        if axis == rank - 1 and shape[-1] is not None:
            return "flat"
        return None

    def call(self, inputs, training=None, mask=None):
        layout = self._fused_layout(tuple(inputs.shape), inputs.dtype, mask)
        if layout is None:
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        x = inputs
        if layout == "flat":
            x = tf.reshape(x, [-1, 1, 1, x.shape[-1]])
        data_format = "NHWC" if layout == "flat" else layout
        channels = x.shape[1] if data_format == "NCHW" else x.shape[-1]

        def _param(variable, fill):
            if variable is None:
                return tf.fill([channels], tf.constant(fill, tf.float32))
            return tf.cast(variable, tf.float32)

        gamma = _param(self.gamma if self.scale else None, 1.0)
        beta = _param(self.beta if self.center else None, 0.0)
        moving_mean = tf.cast(self.moving_mean, tf.float32)
        moving_variance = tf.cast(self.moving_variance, tf.float32)
        kernel_args = dict(
            x=x, scale=gamma, offset=beta, epsilon=self.epsilon, data_format=data_format
        )
        if training and self.trainable:
            empty = tf.constant([], tf.float32)
            y, batch_mean, unbiased_variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                **kernel_args,
                mean=empty,
                variance=empty,
                exponential_avg_factor=1.0,
                is_training=True,
            )
            # The kernel applies Bessel's correction n / max(n - 1, 1); undo it.
            n = tf.cast(tf.size(x, out_type=tf.int64) // channels, tf.float32)
            variance = unbiased_variance * (tf.maximum(n - 1.0, 1.0) / n)
            self.moving_mean.assign(
                moving_mean * self.momentum + batch_mean * (1.0 - self.momentum)
            )
            self.moving_variance.assign(
                moving_variance * self.momentum + variance * (1.0 - self.momentum)
            )
        else:
            y = tf.raw_ops.FusedBatchNormV3(
                **kernel_args, mean=moving_mean, variance=moving_variance, is_training=False
            )[0]
        if layout == "flat":
            y = tf.reshape(y, tf.shape(inputs))
        return ops.cast(y, self.compute_dtype)


@keras.saving.register_keras_serializable(package="bnutils")
class GhostBatchNormalization(keras.layers.BatchNormalization):
    """Ghost batch normalization: batch statistics per virtual batch during training.

    Training normalizes each group of ``virtual_batch_size`` consecutive examples with its own
    mean and biased variance; the moving statistics are updated once per step with their
    averages over groups (as ``tf.keras`` 2 did). Inference is Keras's BN.

    Args:
        virtual_batch_size: examples per virtual batch; must divide every training batch size.
        **kwargs: ``keras.layers.BatchNormalization`` arguments except ``renorm=True`` and
            ``synchronized=True``.

    Raises:
        ValueError: a bad ``virtual_batch_size``, ``renorm``/``synchronized``, ``axis=0``, a mask
            in training, or a training batch size not divisible by ``virtual_batch_size``.
    """

    def __init__(self, virtual_batch_size: int, **kwargs: Any):
        virtual_batch_size = check_positive_int("virtual_batch_size", virtual_batch_size)
        _reject_flags("GhostBatchNormalization", kwargs)
        super().__init__(**kwargs)
        self.virtual_batch_size = virtual_batch_size

    def build(self, input_shape):
        if self.axis % len(input_shape) == 0:
            raise ValueError(
                "GhostBatchNormalization normalizes over the batch axis, so the feature axis "
                f"cannot be axis 0; received axis={self.axis} for input shape {input_shape}. "
                "Expected the channel axis, e.g. axis=-1."
            )
        super().build(input_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "virtual_batch_size": self.virtual_batch_size}

    def _check_batch_size(self, x, batch_size):
        """Raise (static batch) or add a TF assertion (dynamic batch) on divisibility."""
        vbs = self.virtual_batch_size
        head = f"GhostBatchNormalization {self.name!r}: the batch size"
        tail = (
            f"is not divisible by virtual_batch_size={vbs}. Expected a batch size that is a "
            f"multiple of {vbs}: change the batch size or drop the last, smaller batch "
            "(drop_remainder=True)."
        )
        if isinstance(batch_size, int):
            if batch_size % vbs:
                raise ValueError(f"{head} {batch_size} {tail}")
            return x
        if keras.backend.backend() != "tensorflow":
            return x
        import tensorflow as tf

        check = tf.debugging.Assert(tf.equal(batch_size % vbs, 0), [head, batch_size, tail])
        with tf.control_dependencies([check]):
            return tf.identity(x)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        if mask is not None:
            raise ValueError(
                "GhostBatchNormalization does not support masks in training; received a mask "
                f"of shape {mask.shape}. Expected mask=None (use "
                "keras.layers.BatchNormalization for masked inputs)."
            )
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, dtype)
        shape = ops.shape(x)
        rank = len(shape)
        axis = self.axis % rank
        x = self._check_batch_size(x, shape[0])

        # (batch, ...) -> (groups, virtual_batch_size, ...): consecutive examples per group.
        grouped = ops.reshape(x, (-1, self.virtual_batch_size, *shape[1:]))
        channel_axis = axis + 1
        reduction_axes = [a for a in range(1, rank + 1) if a != channel_axis]
        mean, variance = ops.moments(grouped, axes=reduction_axes, keepdims=True)

        param_shape = [1] * (rank + 1)
        param_shape[channel_axis] = shape[axis]
        inv = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            inv = inv * ops.reshape(ops.cast(self.gamma, dtype), param_shape)
        offset = ops.reshape(ops.cast(self.beta, dtype), param_shape) if self.center else 0.0
        y = ops.reshape(grouped * inv + (offset - mean * inv), shape)

        for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
            batch = ops.reshape(ops.mean(batch, axis=0), (-1,))
            old = ops.cast(moving, dtype)
            moving.assign(old * self.momentum + batch * (1.0 - self.momentum))
        return ops.cast(y, self.compute_dtype)


@keras.saving.register_keras_serializable(package="bnutils")
class NoisyBatchNormalization(keras.layers.Layer):
    """Random per-channel scale and shift, redrawn every training step; identity at inference.

    Santurkar et al.'s test of the internal-covariate-shift story: placed right after a BN layer,
    it returns ``s_c * x + m_c`` with, per channel ``c`` and step, ``m_c ~ U(-shift, shift)``
    and ``s_c = exp(u_c)``, ``u_c ~ U(-log(1 + scale), log(1 + scale))``. Used in notebook 05.

    Args:
        shift: half-width of the uniform shift (non-negative).
        scale: the scale factor lies in ``[1 / (1 + scale), 1 + scale]`` (non-negative).
        axis: the channel axis.
        seed: seed of the noise stream (``None``: follows the global Keras seed).
        **kwargs: base-layer arguments (``name``, ``dtype``...).

    Raises:
        ValueError: a negative ``shift`` or ``scale``, or a non-integer ``axis``.
    """

    def __init__(
        self,
        shift: float = 1.0,
        scale: float = 1.0,
        axis: int = -1,
        seed: int | None = None,
        **kwargs: Any,
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
        self.shift, self.scale, self.axis, self.seed = float(shift), float(scale), axis, seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def build(self, input_shape):
        rank = len(input_shape)
        axis = self.axis % rank if rank else 0
        if rank < 2 or axis == 0 or input_shape[axis] is None:
            raise ValueError(
                "NoisyBatchNormalization expects inputs of rank >= 2 with a known channel axis "
                f"after the batch axis; received input shape {tuple(input_shape)} and "
                f"axis={self.axis}."
            )
        self._noise_shape = [1] * rank
        self._noise_shape[axis] = int(input_shape[axis])

    def call(self, inputs, training=None):
        if not training or (self.shift == 0.0 and self.scale == 0.0):
            return inputs
        log_range = math.log1p(self.scale)
        draw = dict(shape=self._noise_shape, dtype=inputs.dtype, seed=self.seed_generator)
        log_s = keras.random.uniform(minval=-log_range, maxval=log_range, **draw)
        m = keras.random.uniform(minval=-self.shift, maxval=self.shift, **draw)
        return inputs * ops.exp(log_s) + m

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(shift=self.shift, scale=self.scale, axis=self.axis, seed=self.seed)
        return config


@dataclasses.dataclass
class ConversionReport(Report):
    """What :func:`convert_batchnorm` did.

    Attributes:
        bn_layer: the class the BN layers became.
        converted: ``(name, old class)`` of each converted BN layer (a shared layer once).
    """

    bn_layer: str = ""
    converted: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"Converted {len(self.converted)} BN layer(s) to {self.bn_layer}."]
        lines += [f"  {name}: {old} -> {self.bn_layer}" for name, old in self.converted]
        return "\n".join(lines)


def convert_batchnorm(
    model: keras.Model,
    bn_layer: type[keras.layers.BatchNormalization] = FusedBatchNormalization,
    return_report: bool = False,
    **bn_kwargs: Any,
):
    """A copy of ``model`` with every BN layer rebuilt as ``bn_layer``, weights copied.

    Each BN layer (nested models included) is rebuilt from its config plus ``bn_kwargs``; the
    original model is not modified.

    >>> ghost = convert_batchnorm(model, GhostBatchNormalization, virtual_batch_size=32)

    Args:
        model: a Sequential or Functional model.
        bn_layer: ``keras.layers.BatchNormalization`` or a subclass.
        return_report: also return a :class:`ConversionReport`.
        **bn_kwargs: config overrides for the new BN layers.

    Returns:
        The converted model, with the same weights as ``model``; with ``return_report=True``,
        ``(model, report)``.

    Warns:
        UserWarning: the model has no BN layer to convert (the copy changes nothing).

    Raises:
        ValueError: ``bn_layer`` is not a BatchNormalization class.
        TypeError: ``model`` is not a Sequential or Functional model (as for every transform).
    """
    if not (isinstance(bn_layer, type) and issubclass(bn_layer, keras.layers.BatchNormalization)):
        raise ValueError(
            "Expected `bn_layer` to be keras.layers.BatchNormalization or a subclass of it, "
            f"received {bn_layer!r}."
        )

    copies = {}  # one copy per layer, at every nesting level (a shared layer stays shared)

    def _clone(layer):
        if id(layer) not in copies:
            copies[id(layer)] = _copy(layer)
        return copies[id(layer)]

    def _copy(layer):
        if is_graph_model(layer):
            return rewrite(layer, _clone)
        if not isinstance(layer, keras.layers.Layer):
            return layer  # a keras.ops operation
        config = layer.get_config()
        if not is_batchnorm(layer):
            return layer.__class__.from_config(config)
        if not issubclass(bn_layer, GhostBatchNormalization):
            config.pop("virtual_batch_size", None)
        report.converted.append((layer.name, type(layer).__name__))
        return bn_layer.from_config({**config, **bn_kwargs})

    report = ConversionReport(bn_layer=bn_layer.__name__)
    converted = rewrite(model, _clone)
    converted.set_weights(model.get_weights())
    if not report.converted:  # nothing silent, as fold_batchnorm
        warnings.warn(
            f"convert_batchnorm converted nothing in model {model.name!r}: it has no "
            "BatchNormalization layer. Add BN first (bnutils.insert_batchnorm).",
            stacklevel=2,
        )
    return (converted, report) if return_report else converted
