"""Trackers: Keras callbacks that record what happens inside a network while it trains.

:class:`ActivationPercentiles` (Ioffe & Szegedy 2015, Figure 1b, c: percentiles of a sigmoid's
input), :class:`MovingStatsTracker` (BN moving statistics) and :class:`AccuracyTracker`
(accuracy in inference mode on fixed sets, several times an epoch). Each records at step 0 and every ``every`` steps, into plain lists
that :func:`bnutils.training.train` saves with the run and restores on a cache hit. Trackers
never change the model: forward passes go through ``Model.stateless_call`` or run in inference
mode. Used in notebooks 04 and 05.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import keras
import numpy as np

from bnutils._graph import has_linear_activation, walk_layers
from bnutils._util import check_positive_int, model_outputs
from bnutils.cache import describe

__all__ = ["AccuracyTracker", "ActivationPercentiles", "MovingStatsTracker", "Tracker"]


class Tracker(keras.callbacks.Callback):
    """Base class: calls :meth:`record` at step 0 and then every ``every`` optimizer steps.

    Subclasses implement :meth:`record` (append one observation for ``step``) and name their
    attributes in ``_settings`` (what decides the records: part of the fingerprint, arrays by
    digest) and ``_records`` (the records: saved by :meth:`to_dict`).

    Args:
        every: record every this many training steps (batches).
        name: a label for plots and saved results (default: the class name).
    """

    _settings: tuple[str, ...] = ()
    _records: tuple[str, ...] = ()

    def __init__(self, every: int = 50, name: str | None = None):
        super().__init__()
        self.every = check_positive_int("every", every)
        self.name = name or type(self).__name__
        self.steps: list[int] = []
        self._step = 0

    def on_train_begin(self, logs=None):
        self._step = int(self.model.optimizer.iterations) if self.model.optimizer else 0
        self._prepare()
        if not self.steps or self.steps[-1] != self._step:
            self._record_now()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every == 0:
            self._record_now()

    def _record_now(self) -> None:
        self.steps.append(self._step)
        self.record(self._step)

    def _prepare(self) -> None:
        """Build whatever is needed once the model is known (sub-models, layer lists)."""

    def record(self, step: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """The tracker's class and settings (part of a training run's cache key)."""
        settings = {n: getattr(self, n) for n in ("every", "name", *self._settings)}
        return {"class": type(self).__name__, **describe(settings)}

    def to_dict(self) -> dict:
        """The records as JSON-friendly lists, with the tracker's settings."""
        records = {n: copy.deepcopy(getattr(self, n)) for n in self._records}
        return {**self.fingerprint(), "steps": list(self.steps), **records}

    def load_dict(self, data: dict) -> None:
        """Restore records saved by :meth:`to_dict` (replaces the current records).

        Raises:
            ValueError: ``data`` was written by another kind of tracker.
        """
        mine = type(self).__name__
        if data.get("class") != mine:
            raise ValueError(
                f"Cannot load records of a {data.get('class')!r} tracker into a {mine}; "
                f"expected records written by {mine}.to_dict()."
            )
        self.steps = [int(s) for s in data.get("steps", [])]
        for n in self._records:
            setattr(self, n, copy.deepcopy(data.get(n, type(getattr(self, n))())))


class ActivationPercentiles(Tracker):
    """Percentiles, over a fixed batch, of one unit of one layer's output (Ioffe Fig. 1b, c).

    The tracked tensor is the *input of a sigmoid*: name the layer whose output feeds the
    nonlinearity. In ``Dense -> BatchNormalization -> Activation("sigmoid")`` that is the BN
    layer; without BN it is the ``Dense`` layer, which must then have no activation of its own
    (a ``Dense(..., activation="sigmoid")`` is refused: its output is after the sigmoid). Or
    name the ``Activation`` layer itself with ``tensor="input"``.

    The forward pass on ``x_fixed`` is in training mode by default (BN uses ``x_fixed``'s
    statistics; the moving statistics are not touched); ``training=False`` uses the latter.

    Args:
        layer_name: the layer whose output (or input, see ``tensor``) is tracked.
        x_fixed: the fixed batch, e.g. the first 1,000 validation images.
        unit: which unit (last-axis index) to track; for conv maps all positions count.
        percentiles: the percentiles recorded.
        tensor: ``"output"`` (default) or ``"input"`` of ``layer_name``.
        training: run the forward pass in training mode.
        every, name: as for :class:`Tracker`.

    Attributes:
        steps: the steps recorded; ``values``: one row per step, one column per percentile.

    Raises:
        ValueError: bad arguments, an unknown layer, or a layer with a fused nonlinearity.
    """

    _settings = ("layer_name", "unit", "percentiles", "tensor", "training", "x_fixed")
    _records = ("values",)

    def __init__(
        self,
        layer_name: str,
        x_fixed: np.ndarray,
        unit: int = 0,
        percentiles: Sequence[float] = (15, 50, 85),
        every: int = 50,
        tensor: str = "output",
        training: bool = True,
        name: str | None = None,
    ):
        super().__init__(every=every, name=name or f"percentiles:{layer_name}")
        if tensor not in ("output", "input"):
            raise ValueError(f"`tensor` must be 'output' or 'input', received {tensor!r}.")
        self.percentiles = [float(p) for p in percentiles]
        if not self.percentiles or any(not 0 <= p <= 100 for p in self.percentiles):
            raise ValueError(
                f"`percentiles` must be numbers in [0, 100], received {percentiles!r}."
            )
        self.x_fixed = np.asarray(x_fixed, dtype="float32")
        if self.x_fixed.ndim < 2 or len(self.x_fixed) < 2:
            shape = self.x_fixed.shape
            raise ValueError(f"`x_fixed` must be a batch of at least 2 examples, received {shape}.")
        self.layer_name, self.unit, self.tensor = layer_name, int(unit), tensor
        self.training = bool(training)
        self.values: list[list[float]] = []

    def _prepare(self) -> None:
        model, me = self.model, f"ActivationPercentiles: layer {self.layer_name!r}"
        try:
            layer = model.get_layer(self.layer_name)
        except ValueError as e:
            raise ValueError(
                f"ActivationPercentiles: the model has no layer named {self.layer_name!r}. "
                f"Its layers are {[lyr.name for lyr in model.layers]}."
            ) from e
        act_name = getattr(getattr(layer, "activation", None), "__name__", "linear")
        if self.tensor == "output" and not has_linear_activation(layer):
            raise ValueError(
                f"{me} applies the nonlinearity {act_name!r} itself, so its output is after "
                "the nonlinearity. Build it with activation=None followed by a separate "
                "Activation layer, and track the pre-activation layer (or the Activation layer "
                "with tensor='input')."
            )
        target = layer.output if self.tensor == "output" else layer.input
        try:
            inputs = model.inputs
        except (AttributeError, ValueError) as e:
            raise ValueError(
                "ActivationPercentiles needs a Functional or Sequential model built from a "
                f"keras.Input; received {type(model).__name__} without defined inputs."
            ) from e
        inputs = inputs[0] if len(inputs) == 1 else inputs
        self._probe = keras.Model(inputs, target, name=f"probe_{self.layer_name}")
        units = int(target.shape[-1])
        if not -units <= self.unit < units:
            raise ValueError(
                f"{me}: unit {self.unit} is out of range for its {units} units on the last axis."
            )

    def record(self, step: int) -> None:
        probe = self._probe
        if self.training:
            trainable = [v.value for v in probe.trainable_variables]
            non_trainable = [v.value for v in probe.non_trainable_variables]
            out, _ = probe.stateless_call(trainable, non_trainable, self.x_fixed, training=True)
        else:
            out = probe(self.x_fixed, training=False)
        a = keras.ops.convert_to_numpy(out)[..., self.unit].reshape(-1)
        self.values.append([float(v) for v in np.percentile(a, self.percentiles)])

    def as_array(self) -> np.ndarray:
        """The records as an array of shape ``(steps, len(percentiles))``."""
        return np.asarray(self.values, dtype=float).reshape(-1, len(self.percentiles))


class MovingStatsTracker(Tracker):
    """The moving mean and variance of every BN layer over training.

    Any layer with ``moving_mean`` and ``moving_variance`` weights counts, so custom BN layers
    (e.g. :class:`bnutils.scratch.ScratchBatchNormalization`) are tracked too. For each layer
    it records the mean over channels of the moving mean and of the moving variance, and the
    values of a few ``channels``.

    Args:
        channels: channel indices recorded individually (beyond a layer's size: skipped).
        layers: names of the layers to track (default: all BN layers).
        every, name: as for :class:`Tracker`.

    Attributes:
        steps: the steps recorded; ``stats``: ``{layer: {"mean", "variance", "mean_channels",
            "variance_channels"}}``, each a list with one entry per recorded step.

    Raises:
        ValueError: the model has no BN layer, or a named layer is not one.
    """

    _settings = ("channels", "layers")
    _records = ("stats",)

    def __init__(
        self,
        every: int = 50,
        channels: Sequence[int] = (0, 1, 2),
        layers: Sequence[str] | None = None,
        name: str | None = None,
    ):
        super().__init__(every=every, name=name)
        self.channels = [int(c) for c in channels]
        self.layers = list(layers) if layers is not None else None
        self.stats: dict[str, dict[str, list]] = {}

    def _prepare(self) -> None:
        found = {
            lyr.name: lyr
            for _, lyr in walk_layers(self.model)
            if hasattr(lyr, "moving_mean") and hasattr(lyr, "moving_variance")
        }
        if missing := [n for n in self.layers or () if n not in found]:
            raise ValueError(
                f"MovingStatsTracker: {missing} are not BN layers of the model; its BN layers "
                f"are {sorted(found)}."
            )
        if not found:
            raise ValueError(
                "MovingStatsTracker: the model has no layer with moving_mean and "
                "moving_variance (no BatchNormalization). Track a model with BN."
            )
        self._tracked = [found[n] for n in self.layers] if self.layers else list(found.values())
        fields = ("mean", "variance", "mean_channels", "variance_channels")
        for lyr in self._tracked:
            self.stats.setdefault(lyr.name, {f: [] for f in fields})

    def record(self, step: int) -> None:
        for lyr in self._tracked:
            mean = np.ravel(keras.ops.convert_to_numpy(lyr.moving_mean))
            var = np.ravel(keras.ops.convert_to_numpy(lyr.moving_variance))
            chans = [c for c in self.channels if c < mean.size]
            for key, values in (("mean", mean), ("variance", var)):
                self.stats[lyr.name][key].append(float(values.mean()))
                self.stats[lyr.name][f"{key}_channels"].append([float(values[c]) for c in chans])


class AccuracyTracker(Tracker):
    """Accuracy in inference mode on fixed labelled sets, at step 0 and every ``every`` steps.

    The training accuracy Keras logs during an epoch is a running mean over batches computed in
    training mode (batch statistics, dropout on) while the weights change; this tracker
    measures every set the way a test set is measured, so that training and held-out accuracy
    can be compared at the same step (notebook 05: the gap at matched training accuracy).

    Args:
        sets: name -> ``(x, y)`` with integer labels, e.g. ``{"train": (x[:5000], y[:5000]),
            "val": (x_val, y_val)}``.
        batch_size: examples per forward pass.
        every, name: as for :class:`Tracker`.

    Attributes:
        steps: the steps recorded; ``accuracy``: ``{set name: [accuracy at each step]}``;
        ``seconds``: training time up to each record, summed over the optimizer steps only
        (the tracker's own evaluations and Keras's validation are left out).

    Raises:
        ValueError: no set, a set that is not ``(x, y)`` of equal lengths, or labels that are
            not integers.
    """

    _settings = ("sets", "batch_size")
    _records = ("accuracy", "seconds")

    def __init__(self, sets, batch_size: int = 1000, every: int = 50, name: str | None = None):
        super().__init__(every=every, name=name)
        if not isinstance(sets, dict) or not sets:
            raise ValueError(
                "AccuracyTracker: `sets` must be a non-empty dict name -> (x, y), received "
                f"{type(sets).__name__}."
            )
        self.sets = {}
        for key, pair in sets.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(
                    f"AccuracyTracker: sets[{key!r}] must be a pair (x, y), received "
                    f"{type(pair).__name__}."
                )
            x, y = np.asarray(pair[0], dtype="float32"), np.asarray(pair[1])
            if len(x) != len(y) or not len(x) or not np.issubdtype(y.dtype, np.integer):
                raise ValueError(
                    f"AccuracyTracker: sets[{key!r}] needs as many integer labels as inputs "
                    f"(at least one); received x of shape {x.shape}, y of shape {y.shape} "
                    f"and dtype {y.dtype}."
                )
            self.sets[str(key)] = (x, y.reshape(-1))
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.accuracy: dict[str, list[float]] = {}
        self.seconds: list[float] = []
        self._train_seconds = 0.0
        self._batch_start = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._train_seconds += time.perf_counter() - self._batch_start
        super().on_train_batch_end(batch, logs)

    def record(self, step: int) -> None:
        self.seconds.append(self._train_seconds)
        for key, (x, y) in self.sets.items():
            predicted = model_outputs(self.model, x, False, self.batch_size).argmax(axis=-1)
            self.accuracy.setdefault(key, []).append(float(np.mean(predicted == y)))
