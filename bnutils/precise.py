"""Precise BN: re-estimate BatchNormalization moving statistics exactly, with the weights frozen.

The moving mean and variance are an exponential moving average of batch statistics taken while
the weights were still changing: after a short run, or with a momentum close to 1, they lag
behind what the trained network feeds the layer. Precise BN (Wu & Johnson, *Rethinking "Batch"
in BatchNorm*, 2021; fvcore's ``update_bn_stats``) runs the model in training mode, records each
BN layer's per-batch input mean and variance (every axis but the channel axis, masks respected)
and writes their population values into ``moving_mean`` / ``moving_variance``. One pass measures
every layer (in training mode BN ignores its moving statistics); a recalibrated layer that runs
in inference mode (frozen and named in ``layers``) gets further passes until nothing changes.
All other variables are restored. Edge cases are the caller's, as in fvcore: use the training
batch size and data like the training data. Used in notebooks 06 and A2.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np
import tensorflow as tf

from bnutils._graph import find_batchnorm_layers
from bnutils._util import check_choice, check_positive_int, preserved_state
from bnutils.results import Report

__all__ = [
    "BatchNormInputStats",
    "LayerRecalibration",
    "RecalibrationReport",
    "batchnorm_input_statistics",
    "recalibrate_batchnorm",
]


def _select_layers(model, layers) -> tuple[list[tuple[str, Any]], list[str]]:
    """The BN layers to recalibrate, and the paths of frozen ones skipped by default."""
    all_bn = find_batchnorm_layers(model)
    if layers is None:
        return [(p, b) for p, b in all_bn if b.trainable], [p for p, b in all_bn if not b.trainable]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        layers = [layers]
    chosen = {}
    for item in layers:
        named = isinstance(item, str)
        match = [(p, b) for p, b in all_bn if (item in (p, b.name) if named else b is item)]
        if not match:
            what = f"Received {item!r} in `layers`, which is not a BatchNormalization layer"
            what = f"No BatchNormalization layer named {item!r}" if named else what
            raise ValueError(
                f"{what} in model {model.name!r}. Pass layer names or layer objects from "
                f"{[p for p, _ in all_bn]}."
            )
        chosen.update({id(b): (p, b) for p, b in match})
    return list(chosen.values()), []


def _num_examples(x) -> int:
    return int(np.shape(tf.nest.flatten(x)[0])[0])


def _is_arrays(data) -> bool:
    leaves = tf.nest.flatten(data)
    return bool(leaves) and all(hasattr(leaf, "__array__") for leaf in leaves)


def _batches(data, batch_size, num_batches, shuffle=False, seed=0, drop_remainder=False) -> list:
    """Input batches from arrays, ``(x, y[, w])``, a dict of arrays, a Dataset or an iterable."""
    if isinstance(data, (tuple, list)) and len(data) in (2, 3) and all(map(_is_arrays, data)):
        data = data[0]  # (x, y) or (x, y, sample_weight)
    if isinstance(data, (np.ndarray, tf.Tensor, dict)) and _is_arrays(data):
        n = _num_examples(data)
        if n == 0:
            raise ValueError("Received empty data (0 examples); expected at least one example.")
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        size = min(batch_size, n)
        stop = n - n % size if drop_remainder else n
        cuts = [order[s : s + size] for s in range(0, stop, size)][:num_batches]
        return [tf.nest.map_structure(lambda a, i=i: np.asarray(a)[i], data) for i in cuts]
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        kind = type(data).__name__
        raise TypeError(
            f"Expected `data` as arrays, (x, y), a Dataset or batches; received {kind}."
        )
    batches = list(itertools.islice(data, num_batches))
    return [b[0] if isinstance(b, (tuple, list)) and len(b) in (2, 3) else b for b in batches]


@dataclasses.dataclass
class BatchNormInputStats:
    """One BN layer's input statistics over the batches seen: ``path`` (``outer/inner/name``),
    ``layer``, per-channel ``mean`` and population ``variance``, ``count`` (values per channel)
    and ``used_batch_stats`` (``True``: training mode; ``False``: moving statistics; ``None``:
    mixed or not known)."""

    path: str
    layer: Any
    mean: np.ndarray
    variance: np.ndarray
    count: int
    used_batch_stats: bool | None


def _moments(layer, inputs, mask):
    """Per-channel (count, mean, biased variance) of one call's input, as tensors."""
    x = tf.cast(inputs, tf.float32)
    rank = len(x.shape)
    keep = layer.axis % rank
    axes = [a for a in range(rank) if a != keep]
    if mask is None:
        mean, var = tf.nn.moments(x, axes)
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float32)
    else:
        w = tf.broadcast_to(tf.expand_dims(tf.cast(mask, tf.float32), keep), tf.shape(x))
        mean, var = tf.nn.weighted_moments(x, axes, w)
        count = tf.reduce_sum(w) / tf.cast(tf.shape(x)[keep], tf.float32)
    return count, tf.reshape(mean, [-1]), tf.reshape(var, [-1])


def _wrap(layer, call, records: list, meta: list):
    """``layer.call`` that records the moments of its input (and whether it used them)."""

    def wrapped(*args, **kwargs):
        bound = inspect.signature(call).bind_partial(*args, **kwargs).arguments
        training = bound.get("training")
        known = training is None or isinstance(training, (bool, np.bool_))  # else symbolic
        records.append(_moments(layer, next(iter(bound.values())), bound.get("mask")))
        meta.append((id(layer), bool(training) and bool(layer.trainable) if known else None))
        return call(*args, **kwargs)

    return wrapped


def _collect(model, targets, batches, training) -> tuple[dict, int]:
    """One pass over ``batches``: per target ``id(layer)``, its calls' ``(count, mean, var)``
    in float64 and the modes seen; and the number of examples. Variables are restored after."""
    records: list = []
    meta: list = []
    saved = {id(b): (b, vars(b).get("call")) for _, b in targets}
    for _, b in targets:
        object.__setattr__(b, "call", _wrap(b, b.call, records, meta))

    def forward(x):
        records.clear()
        meta.clear()
        # A valid root name scope: a model named like "_net" is not one inside a tf.function.
        with tf.name_scope("bn_statistics"):
            model(x, training=training)
        return list(records)

    step = tf.function(forward, reduce_retracing=True)
    found = {key: ([], set()) for key in saved}
    n_examples = 0
    try:
        with preserved_state(model):
            for x in batches:
                out = step(x)
                for (key, mode), (count, mean, var) in zip(list(meta), out, strict=True):
                    found[key][0].append((float(count), mean.numpy(), var.numpy()))
                    found[key][1].add(mode)
                n_examples += _num_examples(x)
    finally:
        for layer, call in saved.values():
            if call is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", call)
    return found, n_examples


def _stats(targets, found, variance: str = "pooled") -> list[BatchNormInputStats]:
    """Pool each called target's per-call moments: exact mean, ``variance`` as chosen."""
    out = []
    for path, layer in targets:
        calls, modes = found[id(layer)]
        if not calls:
            continue
        n = np.array([c[0] for c in calls], np.float64)[:, None]
        means = np.stack([c[1] for c in calls]).astype(np.float64)
        w = n / n.sum()
        mean = (w * means).sum(0)
        var = (w * np.stack([c[2] for c in calls]).astype(np.float64)).sum(0)
        if variance == "pooled":  # plus the variance of the batch means
            var = var + (w * (means - mean) ** 2).sum(0)
        mode = next(iter(modes)) if len(modes) == 1 else None
        stats = BatchNormInputStats(
            path=path,
            layer=layer,
            mean=mean,
            variance=var,
            count=int(n.sum()),
            used_batch_stats=mode,
        )
        out.append(stats)
    return out


def batchnorm_input_statistics(
    model, data, training: bool | None = False, batch_size: int = 128, layers=None
) -> list[BatchNormInputStats]:
    """The statistics of each BN layer's input when ``model`` runs on ``data`` (the doctor's
    measurement; with ``training=False``: what each layer receives at inference). Variables are
    left as they were.

    Args:
        model: a built Keras model.
        data: as in :func:`recalibrate_batchnorm` (a last, smaller batch is kept here).
        training: the ``training`` flag of the passes (``None``: none, as in ``model(x)``).
        batch_size, layers: as in :func:`recalibrate_batchnorm` (``layers=None``: every BN).

    Returns:
        A :class:`BatchNormInputStats` per called layer, in forward order.
    """
    check_positive_int("batch_size", batch_size, minimum=2)
    targets = find_batchnorm_layers(model) if layers is None else _select_layers(model, layers)[0]
    if not targets:
        return []
    found, _ = _collect(model, targets, _batches(data, int(batch_size), None), training)
    return _stats(targets, found)


@dataclasses.dataclass
class LayerRecalibration:
    """Old and new moving statistics of one recalibrated BN layer (``path``), the ``count`` of
    values per channel behind them, and over channels: ``max_mean_gap``, the largest
    ``|new_mean - old_mean| / sqrt(new_variance + eps)`` (std of the input), and
    ``max_variance_ratio``, the largest ``max(r, 1/r)``, ``r = (old_var + eps) / (new_var + eps)``.
    """

    path: str
    old_mean: np.ndarray
    old_variance: np.ndarray
    new_mean: np.ndarray
    new_variance: np.ndarray
    count: int
    max_mean_gap: float
    max_variance_ratio: float


@dataclasses.dataclass
class RecalibrationReport(Report):
    """What :func:`recalibrate_batchnorm` changed: a :class:`LayerRecalibration` per layer in
    forward order, the paths of frozen layers ``skipped``, batches and examples per pass, the
    ``passes`` (more than 1 when a recalibrated layer runs in inference mode) and ``variance``."""

    layers: list[LayerRecalibration]
    skipped: list[str]
    num_batches: int
    num_examples: int
    passes: int
    variance: str

    @property
    def max_mean_gap(self) -> float:
        """The largest per-channel mean gap over all layers (0.0 when there are none)."""
        return max((r.max_mean_gap for r in self.layers), default=0.0)

    def __str__(self) -> str:
        w = max([len("layer")] + [len(r.path) for r in self.layers])
        lines = [
            f"Precise BN: {len(self.layers)} layer(s) recalibrated on {self.num_batches} "
            f"batch(es), {self.num_examples} examples, {self.passes} pass(es), "
            f"variance={self.variance!r}",
            f"{'layer':<{w}}  {'max mean gap (std)':>18}  {'max variance ratio':>18}",
        ]
        for r in self.layers:
            lines.append(f"{r.path:<{w}}  {r.max_mean_gap:>18.3f}  {r.max_variance_ratio:>18.3f}")
        if self.skipped:
            lines.append("skipped (trainable=False): " + ", ".join(self.skipped))
        return "\n".join(lines)


def _assign(layer, mean: np.ndarray, var: np.ndarray) -> None:
    layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
    layer.moving_variance.assign(var.astype(layer.moving_variance.dtype))
    if getattr(layer, "renorm", False):  # Keras derives the variance from moving_stddev
        layer.moving_stddev.assign(np.sqrt(var + layer.epsilon).astype(layer.moving_stddev.dtype))


def recalibrate_batchnorm(
    model,
    data,
    num_batches: int | None = 200,
    batch_size: int = 128,
    layers=None,
    variance: str = "pooled",
    shuffle: bool = True,
    seed: int = 0,
) -> RecalibrationReport:
    """Precise BN: replace the moving statistics by population statistics, weights frozen.

    Use the training batch size: deeper layers' inputs depend on it through the earlier
    layers' batch statistics. Every variable but the new moving statistics is left as it was.

    >>> report = recalibrate_batchnorm(model, x_train, batch_size=64)
    >>> print(report)  # per layer: how far the old moving statistics were off

    Args:
        model: a built Keras model (Sequential, Functional, subclassed or nested).
        data: training inputs ``x`` (array or structure of arrays), ``(x, y)``, a
            ``tf.data.Dataset`` or an iterable of batches (``x`` or ``(x, y[, w])``).
        num_batches: at most this many batches (``None``: all of ``data`` once). Arrays are
            cut into ``batch_size`` batches; a last, smaller batch is dropped.
        batch_size: examples per batch when ``data`` holds arrays.
        layers: BN layers (objects or names) to recalibrate; ``None``: every BN layer with
            ``trainable=True`` (frozen ones keep their statistics and run in inference mode).
        variance: ``"pooled"`` (population variance) or ``"batch_mean"`` (fvcore's choice).
        shuffle, seed: shuffle arrays (seeded) before batching.

    Returns:
        A :class:`RecalibrationReport` with the old and new statistics of each layer.

    Raises:
        TypeError: ``model`` is not a Keras model, or ``data`` is of an unsupported type.
        ValueError: bad ``batch_size``, ``num_batches``, ``variance`` or ``layers``.
        RuntimeError: a layer to recalibrate is never called on the forward path.
    """
    check_positive_int("batch_size", batch_size, minimum=2)  # one example has no batch stats
    if num_batches is not None:
        check_positive_int("num_batches", num_batches)
    check_choice("variance", variance, ("pooled", "batch_mean"))
    targets, skipped = _select_layers(model, layers)
    if not targets:
        found = "every one is frozen (trainable=False)" if skipped else "it has none"
        raise ValueError(
            f"Nothing to recalibrate in model {getattr(model, 'name', model)!r}: expected "
            f"BatchNormalization layers with trainable=True, but {found}. Pass `layers=` to "
            "recalibrate frozen ones, or check that the model is the one with BN."
        )
    old = {id(b): (b.moving_mean.numpy(), b.moving_variance.numpy()) for _, b in targets}
    # Materialized once: every pass must see the same batches.
    batches = _batches(data, int(batch_size), num_batches, shuffle, seed, drop_remainder=True)
    if not batches:
        raise ValueError("`data` yielded no batches; expected at least one batch of inputs.")
    for passes in itertools.count(1):
        found, n_examples = _collect(model, targets, batches, training=True)
        stats = _stats(targets, found, variance)
        unused = [p for p, b in targets if not found[id(b)][0]]
        if unused:
            raise RuntimeError(
                f"BatchNormalization layer(s) {unused} of model {model.name!r} were never called "
                "on the data: expected BN layers on the forward path; pass `layers=` the used ones."
            )
        for s in stats:
            _assign(s.layer, s.mean, s.variance)
        # Layers in inference mode feed their new statistics forward: repeat until settled.
        if passes > sum(s.used_batch_stats is not True for s in stats):
            break
    results = []
    for s in stats:
        old_mean, old_var = (np.asarray(a, np.float64) for a in old[id(s.layer)])
        eps = float(s.layer.epsilon)
        gap = np.abs(s.mean - old_mean) / np.sqrt(s.variance + eps)
        ratio = (old_var + eps) / (s.variance + eps)
        layer = LayerRecalibration(
            path=s.path,
            old_mean=old_mean,
            old_variance=old_var,
            new_mean=s.mean,
            new_variance=s.variance,
            count=s.count,
            max_mean_gap=float(gap.max()),
            max_variance_ratio=float(np.maximum(ratio, 1 / ratio).max()),
        )
        results.append(layer)
    return RecalibrationReport(
        layers=results,
        skipped=skipped,
        num_batches=len(batches),
        num_examples=n_examples,
        passes=passes,
        variance=variance,
    )
