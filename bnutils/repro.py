"""Reproducibility: one call seeds everything and makes TensorFlow ops deterministic."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["set_seed"]


def set_seed(seed: int = 0, deterministic: bool = True) -> None:
    """Seed Python, NumPy, TensorFlow and Keras; optionally turn on TensorFlow op determinism.

    Used in every notebook's Setup cell and before each experiment.

    Args:
        seed: a non-negative integer.
        deterministic: also call ``tf.config.experimental.enable_op_determinism()`` (the same
            seed then gives the same numbers on CPU; some GPU ops raise instead).

    Raises:
        ValueError: ``seed`` is not a non-negative integer.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"Expected a non-negative integer seed, received {seed!r}.")
    import keras
    import tensorflow as tf

    os.environ["PYTHONHASHSEED"] = str(int(seed))
    keras.utils.set_random_seed(int(seed))  # seeds Python's random, NumPy and TensorFlow
    if deterministic:
        tf.config.experimental.enable_op_determinism()
