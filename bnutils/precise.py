"""Precise BN: re-estimate every BatchNormalization layer's moving statistics exactly.

A BN layer's moving mean and variance are an exponential moving average (EMA) of batch
statistics taken while the weights were still changing. After a short run, or with a
momentum close to 1, they lag behind what the trained network actually feeds the layer.
"Precise BN" (Wu & Johnson, *Rethinking "Batch" in BatchNorm*, 2021; fvcore's
``update_bn_stats``) replaces the EMA with a true population estimate, with the weights
frozen:

1. run the model forward in **training mode** (``training=True``) on ``num_batches``
   batches, exactly as fvcore does, so every BN layer sees the inputs it saw in training
   (earlier BN layers normalize with their batch statistics, Dropout is active);
2. record, for every BN layer, the per-batch mean and variance of its input over all axes
   but the channel axis;
3. pool them into the population mean and variance and write those into
   ``moving_mean`` / ``moving_variance``.

In training mode a BN layer's output does not depend on its moving statistics, so one pass
collects the statistics of every layer at once, in any order. Layers that run in inference
mode during that pass (frozen ones named in ``layers``, or a BN that a custom layer calls
with ``training=False``) do depend on them: for those a further pass is made with the new
values, until nothing downstream changes.

**Variance.** The default, ``variance="pooled"``, is the exact population variance of the
layer's input over all values seen, ``E[x^2] - E[x]^2`` pooled across batches (merged with
Chan's parallel formula in float64 to avoid cancellation). It equals the average of the
per-batch variances plus the variance of the per-batch means. ``variance="batch_mean"`` is
fvcore's choice, the average of the per-batch variances (weighted by the number of values
in each batch), which is what an EMA with an exact-average momentum would hold. Both are
biased (divide by the count), like Keras's own moments.

Nothing else changes: all variables (trainable weights, other layers' state such as
random-seed generators, the moving statistics of BN layers not recalibrated) are restored
after the passes.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "BatchNormInputStats",
    "LayerRecalibration",
    "RecalibrationReport",
    "batchnorm_input_statistics",
    "find_batchnorm_layers",
    "recalibrate_batchnorm",
]

_VARIANCE_MODES = ("pooled", "batch_mean")


# ------------------------------------------------------------------ finding BN layers


def _children(layer) -> list:
    import keras

    if isinstance(layer, keras.Model):
        return list(layer.layers)
    return list(getattr(layer, "_layers", []) or [])


def find_batchnorm_layers(model) -> list[tuple[str, Any]]:
    """Every ``keras.layers.BatchNormalization`` (or subclass) inside ``model``, nested included.

    Args:
        model: a Keras model or layer (Sequential, Functional, subclassed, nested).

    Returns:
        ``(path, layer)`` pairs in forward order where the model exposes it (``model.layers``),
        ``path`` being the layer names from the outermost model down, joined by ``/``.

    Raises:
        TypeError: ``model`` is not a Keras layer or model.
    """
    import keras

    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            f"Expected a Keras model or layer, received an object of type "
            f"{type(model).__name__}. Pass the `keras.Model` whose BatchNormalization layers "
            "you want to inspect."
        )
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def visit(layer, prefix: str) -> None:
        for child in _children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}{child.name}"
            if isinstance(child, keras.layers.BatchNormalization):
                found.append((path, child))
            visit(child, path + "/")

    visit(model, "")
    return found


def _select_layers(model, layers) -> tuple[list[tuple[str, Any]], list[str]]:
    """The BN layers to recalibrate, and the paths of frozen ones skipped by default."""
    all_bn = find_batchnorm_layers(model)
    if layers is None:
        chosen = [(p, lay) for p, lay in all_bn if lay.trainable]
        skipped = [p for p, lay in all_bn if not lay.trainable]
        return chosen, skipped
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        layers = [layers]
    by_id = {id(lay): (p, lay) for p, lay in all_bn}
    chosen = []
    for item in layers:
        if isinstance(item, str):
            match = [(p, lay) for p, lay in all_bn if item in (p, lay.name)]
            if not match:
                raise ValueError(
                    f"No BatchNormalization layer named {item!r} in model {model.name!r}. "
                    f"Expected one of {[p for p, _ in all_bn]}."
                )
            chosen.extend(match)
        elif id(item) in by_id:
            chosen.append(by_id[id(item)])
        else:
            raise ValueError(
                f"Received {item!r} in `layers`, which is not a BatchNormalization layer of "
                f"model {model.name!r}. Pass layer names or layer objects from "
                f"{[p for p, _ in all_bn]}."
            )
    unique = list({id(lay): (p, lay) for p, lay in chosen}.values())
    return unique, []


# ------------------------------------------------------------------ batching the data


def _first(structure):
    """``x`` from a batch that may be ``x``, ``(x, y)`` or ``(x, y, sample_weight)``."""
    if isinstance(structure, (tuple, list)) and len(structure) in (2, 3):
        return structure[0]
    return structure


def _num_examples(x) -> int:
    import tensorflow as tf

    leaves = tf.nest.flatten(x)
    n = {int(np.shape(leaf)[0]) for leaf in leaves}
    if len(n) != 1:
        raise ValueError(
            f"The inputs have different numbers of examples {sorted(n)}; expected every "
            "input array to have the same first dimension."
        )
    return n.pop()


def _is_array_like(data) -> bool:
    import tensorflow as tf

    leaves = tf.nest.flatten(data)
    return bool(leaves) and all(
        isinstance(leaf, (np.ndarray, tf.Tensor)) or hasattr(leaf, "__array__") for leaf in leaves
    )


def _array_batches(x, batch_size, num_batches, shuffle, seed, drop_remainder):
    import tensorflow as tf

    n = _num_examples(x)
    if n == 0:
        raise ValueError("Received empty data (0 examples); expected at least one example.")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    size = min(batch_size, n)
    stop = (n // size) * size if drop_remainder else n
    starts = range(0, stop, size)
    if num_batches is not None:
        starts = list(starts)[:num_batches]
    for s in starts:
        idx = order[s : s + size]
        yield tf.nest.map_structure(lambda a, idx=idx: np.asarray(a)[idx], x)


def _batches(data, batch_size, num_batches, shuffle, seed, drop_remainder=False):
    """Yield input batches from arrays, ``(x, y)`` tuples, a ``tf.data.Dataset`` or an iterable.

    A tuple or list of 2 or 3 arrays of equal length is read as ``(x, y[, sample_weight])``;
    a dict of arrays is one multi-input ``x``.
    """
    import tensorflow as tf

    if (
        isinstance(data, (tuple, list))
        and len(data) in (2, 3)
        and all(_is_array_like(d) for d in data)
        and len({_num_examples(d) for d in data}) == 1
    ):
        data = data[0]
    if isinstance(data, (np.ndarray, tf.Tensor, dict)) and _is_array_like(data):
        yield from _array_batches(data, batch_size, num_batches, shuffle, seed, drop_remainder)
        return
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise TypeError(
            f"Expected `data` to be a NumPy array, a tuple (x, y), a tf.data.Dataset or an "
            f"iterable of batches, received an object of type {type(data).__name__}."
        )
    for i, batch in enumerate(data):
        if num_batches is not None and i >= num_batches:
            break
        yield _first(batch)


# ------------------------------------------------------------------ collecting statistics


@dataclasses.dataclass
class BatchNormInputStats:
    """Population statistics of one BN layer's input, pooled over the batches seen.

    Attributes:
        path: the layer's path in the model (``outer/inner/name``).
        layer: the layer itself.
        mean: per-channel mean of the input.
        variance: per-channel population variance (``variance="pooled"``) or average batch
            variance (``variance="batch_mean"``).
        count: values per channel that went into the estimate.
        num_batches: forward passes (calls of the layer) seen.
        used_batch_stats: whether the layer normalized with its batch statistics in those
            calls (``True``: training mode; ``False``: moving statistics; ``None``: mixed or
            not known).
    """

    path: str
    layer: Any
    mean: np.ndarray
    variance: np.ndarray
    count: int
    num_batches: int
    used_batch_stats: bool | None


class _Accumulator:
    """Chan's parallel merge of per-batch (count, mean, M2) plus the sum of batch variances."""

    def __init__(self):
        self.n = 0.0
        self.mean = None
        self.m2 = None
        self.var_sum = None  # sum of count * batch variance
        self.calls = 0
        self.modes: set[bool | None] = set()

    def add(self, n: float, mean: np.ndarray, var: np.ndarray, mode: bool | None) -> None:
        mean = mean.astype(np.float64)
        var = var.astype(np.float64)
        self.calls += 1
        self.modes.add(mode)
        if self.mean is None:
            self.n, self.mean, self.m2, self.var_sum = n, mean, var * n, var * n
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta**2 * (self.n * n / total)
        self.var_sum = self.var_sum + var * n
        self.n = total

    def result(self, variance: str) -> tuple[np.ndarray, np.ndarray]:
        if variance == "pooled":
            return self.mean, self.m2 / self.n
        return self.mean, self.var_sum / self.n


def _bind(orig, args, kwargs) -> dict:
    try:
        return inspect.signature(orig).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return dict(kwargs, inputs=args[0] if args else None)


def _layer_moments(layer, inputs, mask):
    """Per-channel (count, mean, biased variance) of one call's input, as tensors."""
    import tensorflow as tf

    x = tf.cast(inputs, tf.float32)
    rank = len(x.shape)
    axes_attr = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    keep = sorted({a % rank for a in axes_attr})
    reduce_axes = [a for a in range(rank) if a not in keep]
    if mask is not None:
        w = tf.cast(mask, tf.float32)
        for a in keep:
            w = tf.expand_dims(w, a)
        w = tf.broadcast_to(w, tf.shape(x))
        mean, var = tf.nn.weighted_moments(x, reduce_axes, w)
        count = tf.reduce_sum(w) / tf.cast(tf.reduce_prod([tf.shape(x)[a] for a in keep]),
                                           tf.float32)
    else:
        mean, var = tf.nn.moments(x, reduce_axes)
        count = tf.cast(tf.reduce_prod([tf.shape(x)[a] for a in reduce_axes]), tf.float32)
    return count, tf.reshape(mean, [-1]), tf.reshape(var, [-1])


def _wrap(layer, orig, key: int, records: list, meta: list):
    def wrapped(*args, **kwargs):
        bound = _bind(orig, args, kwargs)
        inputs = bound.get("inputs", args[0] if args else None)
        training = bound.get("training")
        if isinstance(training, (bool, np.bool_)) or training is None:
            mode: bool | None = bool(training) and bool(layer.trainable)
        else:  # a symbolic boolean: not known when tracing
            mode = None
        count, mean, var = _layer_moments(layer, inputs, bound.get("mask"))
        records.append((count, mean, var))
        meta.append((key, mode))
        return orig(*args, **kwargs)

    return wrapped


def _snapshot(model) -> list[tuple[Any, np.ndarray]]:
    return [(v, np.array(v.numpy(), copy=True)) for v in model.variables]


def _restore(snapshot) -> None:
    for v, value in snapshot:
        v.assign(value)


def _collect(model, targets: Sequence[tuple[str, Any]], batches, training: bool):
    """One pass over ``batches``: an accumulator per target layer, keyed by ``id(layer)``.

    The model's variables are restored afterwards (a training-mode pass updates the moving
    statistics and any seed generator).
    """
    import tensorflow as tf

    records: list = []
    meta: list = []
    originals = {}
    for _, layer in targets:
        if id(layer) in originals:
            continue
        originals[id(layer)] = ("call" in vars(layer), vars(layer).get("call"))
        object.__setattr__(layer, "call", _wrap(layer, layer.call, id(layer), records, meta))

    def forward(x):
        records.clear()
        meta.clear()
        # A valid root scope: Keras names a model after its class, and a name such as
        # "_net" is not a valid root name scope inside a tf.function.
        with tf.name_scope("bn_statistics"):
            model(x, training=training)
        return list(records)

    step = tf.function(forward, reduce_retracing=True)
    accs = {id(layer): _Accumulator() for _, layer in targets}
    snapshot = _snapshot(model)
    n_batches = 0
    n_examples = 0
    try:
        for x in batches:
            out = step(x)
            info = list(meta)
            for (key, mode), (count, mean, var) in zip(info, out, strict=True):
                accs[key].add(float(count), mean.numpy(), var.numpy(), mode)
            n_batches += 1
            n_examples += _num_examples(x)
    finally:
        _restore(snapshot)
        for _, layer in targets:
            had, value = originals.get(id(layer), (False, None))
            if id(layer) not in originals:
                continue
            if had:
                object.__setattr__(layer, "call", value)
            else:
                object.__delattr__(layer, "call")
            originals.pop(id(layer))
    return accs, n_batches, n_examples


def _to_stats(targets, accs, variance: str, model_name: str, strict: bool = True):
    out = []
    for path, layer in targets:
        acc = accs[id(layer)]
        if acc.mean is None and not strict:
            continue
        if acc.mean is None:
            raise RuntimeError(
                f"BatchNormalization layer {path!r} was never called while running model "
                f"{model_name!r} on the data, so its input statistics cannot be measured. "
                "Expected every BN layer to be on the model's forward path; remove unused "
                "layers or pass `layers=` naming only the used ones."
            )
        mean, var = acc.result(variance)
        mode = next(iter(acc.modes)) if len(acc.modes) == 1 else None
        out.append(
            BatchNormInputStats(path, layer, mean, var, int(acc.n), acc.calls, mode)
        )
    return out


def _check_common(model, batch_size, num_batches, variance):
    import keras

    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            f"Expected a Keras model, received an object of type {type(model).__name__}."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 2:
        raise ValueError(
            f"batch_size must be an integer >= 2 (batch statistics of a single example are "
            f"meaningless), received {batch_size!r}."
        )
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, (int, np.integer))
        or num_batches < 1
    ):
        raise ValueError(f"num_batches must be a positive integer or None, received {num_batches!r}.")
    if variance not in _VARIANCE_MODES:
        raise ValueError(f"variance must be one of {list(_VARIANCE_MODES)}, received {variance!r}.")


def batchnorm_input_statistics(
    model,
    data,
    training: bool | None = False,
    batch_size: int = 128,
    num_batches: int | None = None,
    layers=None,
    variance: str = "pooled",
    shuffle: bool = False,
    seed: int = 0,
    strict: bool = True,
) -> list[BatchNormInputStats]:
    """Measure the statistics of every BN layer's input when ``model`` runs on ``data``.

    With ``training=False`` this is what each layer really receives at inference (every
    earlier BN normalizing with its moving statistics); compare it with the layer's
    ``moving_mean`` / ``moving_variance`` to see how far they are off. The model's
    variables are left exactly as they were.

    Args:
        model: a built Keras model.
        data: inputs ``x`` (array or structure of arrays), ``(x, y)``, a ``tf.data.Dataset``
            or any iterable of batches.
        training: the ``training`` flag of the forward passes (``None``: no flag, as in a
            plain ``model(x)``).
        batch_size: examples per batch when ``data`` holds arrays.
        num_batches: at most this many batches (``None``: all).
        layers: BN layers (objects or names) to measure; ``None``: all of them.
        variance: ``"pooled"`` or ``"batch_mean"`` (see the module docstring).
        shuffle: shuffle arrays (seeded) before batching.
        seed: the shuffle seed.
        strict: raise when a BN layer is never called on the forward path; with
            ``False`` such layers are left out of the result.

    Returns:
        A :class:`BatchNormInputStats` per layer that was called, in forward order.

    Raises:
        RuntimeError: with ``strict=True``, a BN layer was never called.
    """
    _check_common(model, batch_size, num_batches, variance)
    if layers is None:
        targets = find_batchnorm_layers(model)
    else:
        targets, _ = _select_layers(model, layers)
    if not targets:
        return []
    accs, _, _ = _collect(
        model, targets, _batches(data, int(batch_size), num_batches, shuffle, seed), training
    )
    return _to_stats(targets, accs, variance, model.name, strict)


# ------------------------------------------------------------------ recalibration


@dataclasses.dataclass
class LayerRecalibration:
    """Old and new moving statistics of one recalibrated BN layer.

    Attributes:
        path: the layer's path in the model.
        old_mean, old_variance: the moving statistics before.
        new_mean, new_variance: the population statistics written.
        count: values per channel behind the estimate.
        mean_gap: largest ``|new_mean - old_mean| / sqrt(new_variance + epsilon)`` over
            channels, in standard deviations of the layer's input.
        variance_ratio: largest ``max(r, 1 / r)`` over channels, with
            ``r = (old_variance + eps) / (new_variance + eps)`` (1.0: unchanged).
    """

    path: str
    old_mean: np.ndarray
    old_variance: np.ndarray
    new_mean: np.ndarray
    new_variance: np.ndarray
    count: int
    mean_gap: float
    variance_ratio: float


@dataclasses.dataclass
class RecalibrationReport:
    """What :func:`recalibrate_batchnorm` changed.

    Attributes:
        layers: one :class:`LayerRecalibration` per recalibrated layer, in forward order.
        skipped: paths of frozen (``trainable=False``) BN layers left alone.
        num_batches: batches run per pass.
        num_examples: examples run per pass.
        passes: forward passes over the batches (more than 1 only when some recalibrated
            layer runs in inference mode inside the model).
        variance: how variances were pooled (``"pooled"`` or ``"batch_mean"``).
    """

    layers: list[LayerRecalibration]
    skipped: list[str]
    num_batches: int
    num_examples: int
    passes: int
    variance: str

    @property
    def max_mean_gap(self) -> float:
        """The largest mean gap over all layers (0.0 when there are none)."""
        return max((r.mean_gap for r in self.layers), default=0.0)

    def to_dicts(self) -> list[dict]:
        """One plain dict per layer (path, count, mean_gap, variance_ratio)."""
        return [
            {"layer": r.path, "count": r.count, "mean_gap": r.mean_gap,
             "variance_ratio": r.variance_ratio}
            for r in self.layers
        ]

    def __str__(self) -> str:
        width = max([len("layer")] + [len(r.path) for r in self.layers])
        lines = [
            f"Precise BN: {len(self.layers)} layer(s) recalibrated on {self.num_batches} "
            f"batch(es), {self.num_examples} examples, {self.passes} pass(es), "
            f"variance={self.variance!r}",
            f"{'layer':<{width}}  {'mean gap (std)':>14}  {'variance ratio':>14}",
        ]
        for r in self.layers:
            lines.append(f"{r.path:<{width}}  {r.mean_gap:>14.3f}  {r.variance_ratio:>14.3f}")
        if self.skipped:
            lines.append("skipped (trainable=False): " + ", ".join(self.skipped))
        return "\n".join(lines)


def _assign(layer, mean: np.ndarray, var: np.ndarray) -> None:
    layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
    layer.moving_variance.assign(var.astype(layer.moving_variance.dtype))
    if getattr(layer, "renorm", False) and hasattr(layer, "moving_stddev"):
        std = np.sqrt(var + layer.epsilon)
        layer.moving_stddev.assign(std.astype(layer.moving_stddev.dtype))


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

    Runs the model in training mode on ``num_batches`` batches of ``data`` (as fvcore's
    ``update_bn_stats``), pools each BN layer's per-batch input statistics, and writes the
    result into ``moving_mean`` and ``moving_variance``. Trainable weights and every other
    variable are left as they were. Use the batch size the model was trained with: deeper
    layers' inputs depend on it through the earlier layers' batch statistics.

    Args:
        model: a built Keras model (Sequential, Functional, subclassed or nested).
        data: training inputs ``x`` (array or structure of arrays), ``(x, y)``, a
            ``tf.data.Dataset`` or any iterable of batches (``x`` or ``(x, y[, w])``).
        num_batches: at most this many batches (``None``: one pass over all of ``data``).
            Arrays are cut into ``batch_size`` batches; a last, smaller batch is dropped.
        batch_size: examples per batch when ``data`` holds arrays.
        layers: BN layers (objects or names) to recalibrate; ``None``: every BN layer with
            ``trainable=True`` (frozen ones keep their statistics and run in inference mode).
        variance: ``"pooled"`` (exact population variance, default) or ``"batch_mean"``
            (average of batch variances, fvcore's choice).
        shuffle: shuffle arrays (seeded) before batching, so that batches are random samples.
        seed: the shuffle seed.

    Returns:
        A :class:`RecalibrationReport` with the old and new statistics of each layer.

    Raises:
        TypeError: ``model`` is not a Keras model, or ``data`` is of an unsupported type.
        ValueError: bad ``batch_size``, ``num_batches``, ``variance`` or ``layers``.
    """
    _check_common(model, batch_size, num_batches, variance)
    targets, skipped = _select_layers(model, layers)
    if not targets:
        return RecalibrationReport([], skipped, 0, 0, 0, variance)
    old = {
        id(lay): (np.array(lay.moving_mean.numpy(), np.float64),
                  np.array(lay.moving_variance.numpy(), np.float64))
        for _, lay in targets
    }
    # Materialize the batches once: later passes must see the same ones.
    batches = list(_batches(data, int(batch_size), num_batches, shuffle, seed, True))
    if not batches:
        raise ValueError("`data` yielded no batches; expected at least one batch of inputs.")
    passes = 0
    n_inference = None
    while True:
        accs, n_batches, n_examples = _collect(model, targets, batches, training=True)
        passes += 1
        stats = _to_stats(targets, accs, variance, model.name)
        for s in stats:
            _assign(s.layer, s.mean, s.variance)
        inference_mode = [s for s in stats if s.used_batch_stats is not True]
        if n_inference is None:
            n_inference = len(inference_mode)
        # Layers in inference mode feed their new statistics forward: repeat until settled.
        if not inference_mode or passes > n_inference:
            break
    results = []
    for s in stats:
        old_mean, old_var = old[id(s.layer)]
        eps = float(getattr(s.layer, "epsilon", 1e-3))
        gap = np.abs(s.mean - old_mean) / np.sqrt(s.variance + eps)
        ratio = (old_var + eps) / (s.variance + eps)
        results.append(
            LayerRecalibration(
                path=s.path,
                old_mean=old_mean,
                old_variance=old_var,
                new_mean=s.mean,
                new_variance=s.variance,
                count=s.count,
                mean_gap=float(gap.max()),
                variance_ratio=float(np.maximum(ratio, 1.0 / ratio).max()),
            )
        )
    return RecalibrationReport(results, skipped, n_batches, n_examples, passes, variance)
