"""Reproducibility: one call seeds everything and makes TensorFlow ops deterministic."""

from __future__ import annotations

import os
import random

import numpy as np

__all__ = ["set_seed"]


def set_seed(seed: int = 0, deterministic: bool = True) -> None:
    """Seed Python, NumPy, TensorFlow and Keras; optionally turn on op determinism.

    With ``deterministic=True`` the same seed gives the same numbers on CPU (TensorFlow's
    op determinism; some GPU ops then raise instead of running non-deterministically).

    Args:
        seed: a non-negative integer.
        deterministic: also call ``tf.config.experimental.enable_op_determinism()``.

    Raises:
        ValueError: ``seed`` is not a non-negative integer.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"Expected a non-negative integer seed, received {seed!r}.")
    import keras
    import tensorflow as tf

    seed = int(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)  # also seeds Python, NumPy and TensorFlow
    if deterministic:
        tf.config.experimental.enable_op_determinism()
