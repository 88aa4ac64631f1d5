"""A ``tf.data`` input pipeline: seeded shuffle, batch, cache, prefetch."""

from __future__ import annotations

import numpy as np

__all__ = ["make_tf_dataset"]


def make_tf_dataset(
    x: np.ndarray,
    y: np.ndarray | None = None,
    batch_size: int = 128,
    shuffle: bool = True,
    seed: int = 0,
    cache: bool = True,
    drop_remainder: bool = False,
):
    """Wrap arrays in a ``tf.data.Dataset`` that keeps the model, not the input, busy.

    The data is cached in memory, shuffled with ``seed`` each epoch (a new order per epoch,
    the same sequence of orders for the same seed), batched and prefetched.

    Args:
        x: inputs, first axis the examples.
        y: labels with the same first dimension, or ``None``.
        batch_size: examples per batch (positive).
        shuffle: shuffle every epoch.
        seed: shuffle seed.
        cache: cache the (unbatched) elements after the first pass.
        drop_remainder: drop a last, smaller batch (BN dislikes a batch of 1).

    Raises:
        ValueError: a bad batch size or mismatched ``x`` / ``y`` lengths.
    """
    import tensorflow as tf

    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, received {batch_size!r}.")
    if y is not None and len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}; expected equal lengths.")
    ds = tf.data.Dataset.from_tensor_slices(x if y is None else (x, y))
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(min(len(x), 60_000), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)
