"""Batch normalization layers for Keras 3: a fused kernel and ghost (virtual-batch) BN.

Both classes subclass :class:`keras.layers.BatchNormalization`, keep its weights (``gamma``,
``beta``, ``moving_mean``, ``moving_variance``) and its config, so checkpoints move between
them and the Keras layer, and code that looks for BN (folding, insertion) finds them.

- :class:`FusedBatchNormalization` computes exactly what Keras's layer computes, but with one
  ``FusedBatchNormV3`` kernel instead of separate moment and normalization ops (Keras 3 on
  TensorFlow never uses the fused kernel).
- :class:`GhostBatchNormalization` normalizes each *virtual batch* of ``virtual_batch_size``
  consecutive examples with its own statistics during training (Hoffer et al., 2017).
- :func:`convert_batchnorm` copies a model with every BN layer swapped for another BN class,
  weights included. (Keras's ``.weights.h5`` files key layers by class name, so a whole-model
  weights file does not load across classes; ``layer.set_weights``, ``model.set_weights``,
  ``tf.train.Checkpoint`` and this function do.)
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

__all__ = ["FusedBatchNormalization", "GhostBatchNormalization", "convert_batchnorm"]

_FUSED_INPUT_DTYPES = ("float16", "bfloat16", "float32")


def _dtype_name(dtype: Any) -> str:
    return keras.backend.standardize_dtype(dtype)


@keras.saving.register_keras_serializable(package="bnutils")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` computed by TensorFlow's fused kernel.

    Same arguments, weights, config and numbers as the Keras layer (outputs, gradients and
    moving statistics agree to float32 round-off). On the TensorFlow backend the layer calls
    ``tf.raw_ops.FusedBatchNormV3`` in training and inference for:

    - inputs of rank 4 with the channel axis last (NHWC) or first after the batch (NCHW);
    - inputs of any other rank >= 2 with the channel axis last (reshaped to ``(-1, 1, 1, C)``);
    - float32, float16 or bfloat16 inputs (mixed precision included) with float32 weights.

    Everything else (other backends, other axes, ``renorm``, ``synchronized``, masks, float64)
    runs the parent's ``call`` unchanged; :meth:`uses_fused_kernel` tells which path a given
    input takes.

    The kernel returns the *unbiased* batch variance (``n / (n - 1)`` times the biased one,
    ``n`` the number of values per channel); Keras updates the moving variance with the
    *biased* one, so the layer converts it back before the update. The update is Keras's:
    ``moving = moving * momentum + batch * (1 - momentum)``.
    """

    def uses_fused_kernel(
        self, input_shape: Any, input_dtype: Any = "float32", mask: Any = None
    ) -> bool:
        """Whether a call on inputs of this shape and dtype runs the fused kernel.

        Args:
            input_shape: the input shape (a tuple; ``None`` for unknown dimensions).
            input_dtype: the input dtype.
            mask: the mask that would be passed (any non-``None`` mask disables fusion).

        Returns:
            ``True`` when ``call`` uses ``FusedBatchNormV3``, ``False`` when it falls back.
        """
        return self._fused_layout(tuple(input_shape), input_dtype, mask) is not None

    def _fused_layout(self, shape: tuple, dtype: Any, mask: Any) -> str | None:
        """``"NHWC"``, ``"NCHW"``, ``"flat"`` (reshape to NHWC) or ``None`` (fall back)."""
        if keras.backend.backend() != "tensorflow" or mask is not None:
            return None
        if self.renorm or self.synchronized:
            return None
        if _dtype_name(dtype) not in _FUSED_INPUT_DTYPES:
            return None
        if self.moving_mean is not None and _dtype_name(self.moving_mean.dtype) != "float32":
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
            data_format = "NHWC"
        else:
            data_format = layout
        channels = x.shape[1] if data_format == "NCHW" else x.shape[-1]

        def _param(variable, fill):
            if variable is None:
                return tf.fill([channels], tf.constant(fill, tf.float32))
            return tf.cast(variable, tf.float32)

        gamma = _param(self.gamma if self.scale else None, 1.0)
        beta = _param(self.beta if self.center else None, 0.0)
        moving_mean = tf.cast(self.moving_mean, tf.float32)
        moving_variance = tf.cast(self.moving_variance, tf.float32)

        if training and self.trainable:
            empty = tf.constant([], tf.float32)
            y, batch_mean, unbiased_variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x,
                scale=gamma,
                offset=beta,
                mean=empty,
                variance=empty,
                epsilon=self.epsilon,
                exponential_avg_factor=1.0,
                data_format=data_format,
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
                x=x,
                scale=gamma,
                offset=beta,
                mean=moving_mean,
                variance=moving_variance,
                epsilon=self.epsilon,
                data_format=data_format,
                is_training=False,
            )[0]
        if layout == "flat":
            y = tf.reshape(y, tf.shape(inputs))
        return ops.cast(y, self.compute_dtype)


@keras.saving.register_keras_serializable(package="bnutils")
class GhostBatchNormalization(keras.layers.BatchNormalization):
    """Ghost batch normalization: batch statistics per virtual batch during training.

    In training the batch is split into consecutive virtual batches of
    ``virtual_batch_size`` examples, each normalized with its own mean and (biased) variance.
    The moving statistics are updated once per step with the average over virtual batches of
    their means and variances (as ``tf.keras`` 2 did). Inference is exactly Keras's BN.

    Args:
        virtual_batch_size: examples per virtual batch (a positive integer dividing every
            training batch size).
        **kwargs: any argument of ``keras.layers.BatchNormalization`` except ``renorm=True``
            and ``synchronized=True``.

    Raises:
        ValueError: a bad ``virtual_batch_size``, ``renorm``/``synchronized`` requested, or
            (at call time, training) a batch size not divisible by ``virtual_batch_size``.
    """

    def __init__(self, virtual_batch_size: int, **kwargs: Any):
        if (
            isinstance(virtual_batch_size, bool)
            or not isinstance(virtual_batch_size, int)
            or virtual_batch_size < 1
        ):
            raise ValueError(
                "GhostBatchNormalization expects `virtual_batch_size` to be a positive "
                f"integer, received virtual_batch_size={virtual_batch_size!r}. For plain batch "
                "normalization use keras.layers.BatchNormalization."
            )
        for flag in ("renorm", "synchronized"):
            if kwargs.get(flag):
                raise ValueError(
                    f"GhostBatchNormalization does not support {flag}=True (received "
                    f"{flag}={kwargs[flag]!r}); expected {flag}=False. Use "
                    "keras.layers.BatchNormalization for it."
                )
        super().__init__(**kwargs)
        self.virtual_batch_size = virtual_batch_size

    def build(self, input_shape):
        rank = len(input_shape)
        if self.axis % rank == 0:
            raise ValueError(
                "GhostBatchNormalization normalizes over the batch axis, so the feature axis "
                f"cannot be axis 0; received axis={self.axis} for input shape {input_shape}. "
                "Expected the channel axis, e.g. axis=-1."
            )
        super().build(input_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "virtual_batch_size": self.virtual_batch_size}

    def _check_batch_size(self, batch_size):
        """Raise (static batch) or return TF assertions (dynamic batch) on divisibility."""
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
            return []
        if keras.backend.backend() != "tensorflow":
            return []
        import tensorflow as tf

        return [tf.debugging.Assert(tf.equal(batch_size % vbs, 0), [head, batch_size, tail])]

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        if mask is not None:
            raise ValueError(
                "GhostBatchNormalization does not support masks in training; received a mask "
                f"of shape {mask.shape}. Expected mask=None (use "
                "keras.layers.BatchNormalization for masked inputs)."
            )
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, compute_dtype)
        shape = ops.shape(x)
        rank = len(shape)
        axis = self.axis % rank
        checks = self._check_batch_size(shape[0])
        if checks:
            import tensorflow as tf

            with tf.control_dependencies(checks):
                x = tf.identity(x)

        # (batch, ...) -> (groups, virtual_batch_size, ...): consecutive examples per group.
        grouped = ops.reshape(x, (-1, self.virtual_batch_size, *shape[1:]))
        channel_axis = axis + 1
        reduction_axes = [a for a in range(1, rank + 1) if a != channel_axis]
        mean, variance = ops.moments(grouped, axes=reduction_axes, keepdims=True)

        param_shape = [1] * (rank + 1)
        param_shape[channel_axis] = shape[axis]
        gamma = (
            ops.reshape(ops.cast(self.gamma, compute_dtype), param_shape) if self.scale else None
        )
        beta = ops.reshape(ops.cast(self.beta, compute_dtype), param_shape) if self.center else None
        inv = ops.rsqrt(variance + self.epsilon)
        if gamma is not None:
            inv = inv * gamma
        y = grouped * inv + ((beta if beta is not None else 0.0) - mean * inv)
        y = ops.reshape(y, shape)

        batch_mean = ops.reshape(ops.mean(mean, axis=0), (-1,))
        batch_variance = ops.reshape(ops.mean(variance, axis=0), (-1,))
        moving_mean = ops.cast(self.moving_mean, compute_dtype)
        moving_variance = ops.cast(self.moving_variance, compute_dtype)
        self.moving_mean.assign(moving_mean * self.momentum + batch_mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            moving_variance * self.momentum + batch_variance * (1.0 - self.momentum)
        )
        return ops.cast(y, self.compute_dtype)


def convert_batchnorm(
    model: keras.Model,
    bn_class: type[keras.layers.BatchNormalization] = FusedBatchNormalization,
    **bn_kwargs: Any,
) -> keras.Model:
    """A copy of ``model`` with every BN layer rebuilt as ``bn_class``, weights copied.

    Each BatchNormalization layer (any subclass) is rebuilt from its own config plus
    ``bn_kwargs``; other layers are cloned unchanged; nested Sequential/Functional models are
    converted too. The original model is not modified.

    Args:
        model: a Sequential or Functional model.
        bn_class: the target class, ``keras.layers.BatchNormalization`` or a subclass (e.g.
            :class:`FusedBatchNormalization`, :class:`GhostBatchNormalization`).
        **bn_kwargs: config overrides for the new BN layers (e.g. ``virtual_batch_size=32``).

    Returns:
        The converted model, with the same weights as ``model``.

    Raises:
        ValueError: ``bn_class`` is not a BatchNormalization class, or ``model`` is a
            subclassed model (``keras.models.clone_model`` cannot copy those).
    """
    if not (isinstance(bn_class, type) and issubclass(bn_class, keras.layers.BatchNormalization)):
        raise ValueError(
            "Expected `bn_class` to be keras.layers.BatchNormalization or a subclass of it, "
            f"received {bn_class!r}."
        )

    def _clone(layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.BatchNormalization):
            return layer.__class__.from_config(config)
        if not issubclass(bn_class, GhostBatchNormalization):
            config.pop("virtual_batch_size", None)
        return bn_class.from_config({**config, **bn_kwargs})

    converted = keras.models.clone_model(model, clone_function=_clone, recursive=True)
    converted.set_weights(model.get_weights())
    return converted
