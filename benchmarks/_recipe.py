"""The training recipe that the accuracy benchmarks share: what BN makes possible, in Keras.

``bench_best_accuracy.py`` (best test accuracy in 20 minutes) and ``bench_time_to_accuracy.py``
(seconds to 91%) train the same small residual CNN (``bnutils.build_resnet``: 32-64-128
channels, two pre-activation blocks per stage, global average pooling) with and without BN:

* SGD with Nesterov momentum 0.9 and a one-cycle learning rate (:class:`OneCycle`): a linear
  warm-up over the first quarter of the steps to the peak, then a cosine decay to nearly zero,
  sized to the planned number of epochs;
* label smoothing 0.1 (:class:`SmoothedCrossentropy`, for integer labels);
* pad-and-crop by up to 2 pixels and horizontal flips (:func:`augmenter`);
* the test accuracy with and without flip test-time augmentation (:func:`test_accuracy`).

Everything here is plain Keras; the schedule and the loss have ``get_config`` so that the run
cache (``bnutils.train``) keys a run on their settings.
"""

from __future__ import annotations

import math

import keras
import numpy as np

WIDTHS = (32, 64, 128)
BATCH_SIZE = 128
MOMENTUM = 0.9
LABEL_SMOOTHING = 0.1
SHIFT_PIXELS = 2


class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from ``peak / 25`` to ``peak`` over ``warmup`` of ``steps``, then a
    cosine decay to ``peak / 1e4`` at ``steps`` (Smith and Topin 2017, as in PyTorch's
    ``OneCycleLR``); constant at the end value after ``steps``."""

    def __init__(self, peak: float, steps: int, warmup: float = 0.25):
        if not peak > 0 or steps < 1 or not 0 < warmup < 1:
            raise ValueError(
                f"OneCycle needs peak > 0, steps >= 1 and 0 < warmup < 1; received peak={peak}, "
                f"steps={steps}, warmup={warmup}."
            )
        self.peak = float(peak)
        self.steps = int(steps)
        self.warmup = float(warmup)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        start, end = self.peak / 25.0, self.peak / 1e4
        rise = max(1.0, self.warmup * self.steps)
        up = start + (self.peak - start) * keras.ops.minimum(step / rise, 1.0)
        done = keras.ops.clip((step - rise) / max(1.0, self.steps - rise), 0.0, 1.0)
        down = end + (self.peak - end) * 0.5 * (1.0 + keras.ops.cos(math.pi * done))
        return keras.ops.where(step < rise, up, down)

    def get_config(self):
        return {"peak": self.peak, "steps": self.steps, "warmup": self.warmup}


class SmoothedCrossentropy(keras.losses.Loss):
    """Cross-entropy of softmax outputs against integer labels smoothed by ``smoothing``
    (``keras.losses.CategoricalCrossentropy(label_smoothing=...)`` on one-hot labels)."""

    def __init__(self, smoothing: float = LABEL_SMOOTHING, classes: int = 10, name="smoothed_ce"):
        super().__init__(name=name)
        self.smoothing = float(smoothing)
        self.classes = int(classes)

    def call(self, y_true, y_pred):
        labels = keras.ops.one_hot(
            keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,)), self.classes
        )
        return keras.losses.categorical_crossentropy(labels, y_pred, label_smoothing=self.smoothing)

    def get_config(self):
        return {"smoothing": self.smoothing, "classes": self.classes, "name": self.name}


def build(bn: bool, peak: float, steps: int, name: str | None = None) -> keras.Model:
    """The residual CNN with fused BN (``bn``) or without any normalization, compiled with the
    recipe's optimizer (one-cycle to ``peak`` over ``steps``) and loss."""
    import bnutils

    model = bnutils.build_resnet(
        widths=WIDTHS,
        norm="batch" if bn else None,
        bn_layer=bnutils.FusedBatchNormalization if bn else None,
        name=name or ("resnet_bn" if bn else "resnet"),
    )
    optimizer = keras.optimizers.SGD(OneCycle(peak, steps), momentum=MOMENTUM, nesterov=True)
    model.compile(optimizer=optimizer, loss=SmoothedCrossentropy(), metrics=["accuracy"])
    return model


def augmenter(seed: int) -> keras.Sequential:
    """Shifts by up to ``SHIFT_PIXELS`` (nearest pixels, zero fill: pad-and-crop) and
    horizontal flips, per image."""
    shift = SHIFT_PIXELS / 28
    return keras.Sequential(
        [
            keras.layers.RandomTranslation(
                shift, shift, fill_mode="constant", interpolation="nearest", seed=seed
            ),
            keras.layers.RandomFlip("horizontal", seed=seed + 1),
        ],
        name="pad_crop_flip",
    )


def test_accuracy(model, data) -> dict:
    """Test accuracy in inference mode, and with flip test-time augmentation (the mean of the
    probabilities of each image and its mirror image). The ``measure`` of a training run."""
    x, y = data.x_test, np.asarray(data.y_test).reshape(-1)
    p = model.predict(x, batch_size=1000, verbose=0)
    p_flip = model.predict(x[:, :, ::-1], batch_size=1000, verbose=0)
    return {
        "test_accuracy": float(np.mean(p.argmax(-1) == y)),
        "test_accuracy_flip_tta": float(np.mean((p + p_flip).argmax(-1) == y)),
    }
