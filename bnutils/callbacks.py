"""Trackers: Keras callbacks that record what happens inside a network while it trains.

* :class:`ActivationPercentiles` - Ioffe & Szegedy (2015), Figure 1(b, c): the 15th, 50th and
  85th percentiles of one sigmoid unit's *input* over a fixed batch, every ``every`` steps.
* :class:`MovingStatsTracker` - the BN layers' moving mean and variance over training.
* :class:`GradientNormTracker` - per-layer gradient norms on a fixed batch.

Every tracker records at the start of training (step 0) and then every ``every`` optimizer
steps, keeps its records as plain lists, and can be saved and restored with
:meth:`Tracker.to_dict` / :meth:`Tracker.load_dict`. :func:`bnutils.training.train` stores the
trackers' records with a run, so a run loaded from the cache gives back its curves too.

Trackers never change the model: a training-mode forward pass is made with
``Model.stateless_call`` and its updates to the BN moving statistics are thrown away.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import keras
import numpy as np

from bnutils.evaluation import ends_in_softmax

__all__ = [
    "ActivationPercentiles",
    "GradientNormTracker",
    "MovingStatsTracker",
    "Tracker",
    "iter_layers",
]


def iter_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Every layer of ``model``, depth first, descending into nested models."""
    for layer in getattr(model, "layers", []):
        yield layer
        if hasattr(layer, "layers"):
            yield from iter_layers(layer)


def _array_digest(x: np.ndarray) -> str:
    x = np.ascontiguousarray(x)
    h = hashlib.sha256(str((x.shape, x.dtype.str)).encode())
    h.update(x.tobytes())
    return h.hexdigest()[:16]


def _check_every(every) -> int:
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"`every` must be a positive integer (steps), received {every!r}.")
    return int(every)


class Tracker(keras.callbacks.Callback):
    """Base class: calls :meth:`record` at step 0 and then every ``every`` optimizer steps.

    Subclasses implement :meth:`record` (append one observation for ``step``), ``_config``
    (the settings that decide what is recorded) and ``_state`` / ``_load_state``.

    Args:
        every: record every this many training steps (batches).
        name: a label for plots and saved results (default: the class name).
    """

    def __init__(self, every: int = 50, name: str | None = None):
        super().__init__()
        self.every = _check_every(every)
        self.name = name or type(self).__name__
        self.steps: list[int] = []
        self._step = 0

    # -- the hooks Keras calls
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

    # -- what subclasses provide
    def _prepare(self) -> None:
        """Build whatever is needed once the model is known (sub-models, layer lists)."""

    def record(self, step: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _config(self) -> dict:
        return {"every": self.every, "name": self.name}

    def _state(self) -> dict:
        return {}

    def _load_state(self, state: dict) -> None:
        pass

    # -- saving and restoring
    def fingerprint(self) -> dict:
        """The tracker's class and settings (part of a training run's cache key)."""
        return {"class": type(self).__name__, **self._config()}

    def to_dict(self) -> dict:
        """The records as JSON-friendly lists, with the tracker's settings."""
        return {**self.fingerprint(), "steps": list(self.steps), **self._state()}

    def load_dict(self, data: dict) -> None:
        """Restore records saved by :meth:`to_dict` (replaces the current records).

        Raises:
            ValueError: ``data`` was written by another kind of tracker.
        """
        if data.get("class") != type(self).__name__:
            raise ValueError(
                f"Cannot load records of a {data.get('class')!r} tracker into a "
                f"{type(self).__name__}; expected records written by "
                f"{type(self).__name__}.to_dict()."
            )
        self.steps = [int(s) for s in data.get("steps", [])]
        self._load_state(data)


class ActivationPercentiles(Tracker):
    """Percentiles, over a fixed batch, of one unit of one layer's output (Ioffe Fig. 1b, c).

    The tracked tensor is the *input of a sigmoid*: name the layer whose output feeds the
    nonlinearity. In a network built as ``Dense -> BatchNormalization -> Activation("sigmoid")``
    that is the BN layer (the normalized, scaled and shifted value); without BN it is the
    ``Dense`` layer, which must then have no activation of its own (a ``Dense(...,
    activation="sigmoid")`` outputs the sigmoid's *output*, which is refused). Alternatively
    name the ``Activation`` layer itself and pass ``tensor="input"``.

    The forward pass on ``x_fixed`` runs in training mode by default (BN uses the statistics of
    ``x_fixed``, as during training) through ``stateless_call``, so the moving statistics are
    not touched; ``training=False`` uses the moving statistics instead.

    Args:
        layer_name: the layer whose output (or input, see ``tensor``) is tracked.
        x_fixed: the fixed batch, e.g. the first 1,000 validation images.
        unit: which unit (last-axis index) to track; for conv maps all positions count.
        percentiles: the percentiles recorded.
        every: record every this many steps.
        tensor: ``"output"`` (default) or ``"input"`` of ``layer_name``.
        training: run the forward pass in training mode.
        name: label for plots.

    Attributes:
        steps: the steps recorded.
        values: list of rows, one per step, one column per percentile.

    Raises:
        ValueError: bad arguments, an unknown layer, or a layer with a fused nonlinearity.
    """

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
        pct = [float(p) for p in percentiles]
        if not pct or any(not 0 <= p <= 100 for p in pct):
            raise ValueError(f"`percentiles` must be numbers in [0, 100], received {percentiles!r}.")
        self.layer_name = layer_name
        self.x_fixed = np.asarray(x_fixed, dtype="float32")
        if self.x_fixed.ndim < 2 or len(self.x_fixed) < 2:
            raise ValueError(
                f"`x_fixed` must be a batch of at least 2 examples, received an array of shape "
                f"{self.x_fixed.shape}."
            )
        self.unit = int(unit)
        self.percentiles = pct
        self.tensor = tensor
        self.training = bool(training)
        self.values: list[list[float]] = []
        self._probe = None

    def _config(self) -> dict:
        return {
            **super()._config(),
            "layer_name": self.layer_name,
            "unit": self.unit,
            "percentiles": self.percentiles,
            "tensor": self.tensor,
            "training": self.training,
            "x_fixed": _array_digest(self.x_fixed),
        }

    def _prepare(self) -> None:
        model = self.model
        try:
            layer = model.get_layer(self.layer_name)
        except ValueError as e:
            names = [lyr.name for lyr in model.layers]
            raise ValueError(
                f"ActivationPercentiles: the model has no layer named {self.layer_name!r}. "
                f"Its layers are {names}."
            ) from e
        activation = getattr(layer, "activation", None)
        act_name = getattr(activation, "__name__", "linear")
        if self.tensor == "output" and activation is not None and act_name != "linear":
            raise ValueError(
                f"ActivationPercentiles: layer {self.layer_name!r} applies the nonlinearity "
                f"{act_name!r} itself, so its output is after the nonlinearity. Build it with "
                f"activation=None followed by a separate Activation layer, and track the "
                f"pre-activation layer (or the Activation layer with tensor='input')."
            )
        target = layer.output if self.tensor == "output" else layer.input
        try:
            model_inputs = model.inputs
        except (AttributeError, ValueError) as e:
            raise ValueError(
                "ActivationPercentiles needs a Functional or Sequential model built from a "
                f"keras.Input; received {type(model).__name__} without defined inputs."
            ) from e
        inputs = model_inputs[0] if len(model_inputs) == 1 else model_inputs
        self._probe = keras.Model(inputs, target, name=f"probe_{self.layer_name}")
        units = int(target.shape[-1])
        if not -units <= self.unit < units:
            raise ValueError(
                f"ActivationPercentiles: unit {self.unit} is out of range for layer "
                f"{self.layer_name!r} with {units} units on its last axis."
            )

    def _activations(self) -> np.ndarray:
        probe = self._probe
        if self.training:
            out, _ = probe.stateless_call(
                [v.value for v in probe.trainable_variables],
                [v.value for v in probe.non_trainable_variables],
                self.x_fixed,
                training=True,
            )
        else:
            out = probe(self.x_fixed, training=False)
        return keras.ops.convert_to_numpy(out)

    def record(self, step: int) -> None:
        a = self._activations()[..., self.unit].reshape(-1)
        self.values.append([float(v) for v in np.percentile(a, self.percentiles)])

    def _state(self) -> dict:
        return {"values": self.values}

    def _load_state(self, state: dict) -> None:
        self.values = [list(map(float, row)) for row in state.get("values", [])]

    def as_array(self) -> np.ndarray:
        """The records as an array of shape ``(steps, len(percentiles))``."""
        return np.asarray(self.values, dtype=float).reshape(-1, len(self.percentiles))


class MovingStatsTracker(Tracker):
    """The moving mean and variance of every BN layer over training.

    Any layer with ``moving_mean`` and ``moving_variance`` weights counts, so custom BN layers
    are tracked too. For each layer it records the mean over channels of the moving mean and of
    the moving variance, and the values of a few ``channels``.

    Args:
        every: record every this many steps.
        channels: channel indices recorded individually (those beyond a layer's size are
            skipped).
        layers: names of the layers to track (default: all BN layers).
        name: label for plots.

    Attributes:
        steps: the steps recorded.
        stats: ``{layer: {"mean": [...], "variance": [...], "mean_channels": [[...], ...],
            "variance_channels": [[...], ...]}}``, one entry per recorded step.

    Raises:
        ValueError: the model has no BN layer, or a named layer is not one.
    """

    def __init__(
        self,
        every: int = 50,
        channels: Sequence[int] = (0, 1, 2),
        layers: Sequence[str] | None = None,
        name: str | None = None,
    ):
        super().__init__(every=every, name=name)
        self.channels = [int(c) for c in channels]
        self.layer_names = list(layers) if layers is not None else None
        self.stats: dict[str, dict[str, list]] = {}
        self._layers: list = []

    def _config(self) -> dict:
        return {**super()._config(), "channels": self.channels, "layers": self.layer_names}

    def _prepare(self) -> None:
        found = [
            lyr for lyr in iter_layers(self.model)
            if hasattr(lyr, "moving_mean") and hasattr(lyr, "moving_variance")
        ]
        if self.layer_names is not None:
            by_name = {lyr.name: lyr for lyr in found}
            missing = [n for n in self.layer_names if n not in by_name]
            if missing:
                raise ValueError(
                    f"MovingStatsTracker: {missing} are not BN layers of the model; its BN "
                    f"layers are {sorted(by_name)}."
                )
            found = [by_name[n] for n in self.layer_names]
        if not found:
            raise ValueError(
                "MovingStatsTracker: the model has no layer with moving_mean and "
                "moving_variance (no BatchNormalization). Track a model with BN."
            )
        self._layers = found
        for lyr in found:
            self.stats.setdefault(
                lyr.name, {"mean": [], "variance": [], "mean_channels": [], "variance_channels": []}
            )

    def record(self, step: int) -> None:
        for lyr in self._layers:
            mean = np.ravel(keras.ops.convert_to_numpy(lyr.moving_mean))
            var = np.ravel(keras.ops.convert_to_numpy(lyr.moving_variance))
            chans = [c for c in self.channels if c < mean.size]
            s = self.stats[lyr.name]
            s["mean"].append(float(mean.mean()))
            s["variance"].append(float(var.mean()))
            s["mean_channels"].append([float(mean[c]) for c in chans])
            s["variance_channels"].append([float(var[c]) for c in chans])

    def _state(self) -> dict:
        return {"stats": self.stats}

    def _load_state(self, state: dict) -> None:
        self.stats = {k: {f: list(v) for f, v in d.items()} for k, d in state.get("stats", {}).items()}


class GradientNormTracker(Tracker):
    """Per-layer gradient norms of the loss on a fixed batch.

    The gradient is taken in training mode (BN uses the batch's statistics) through
    ``stateless_call``, so the moving statistics and the optimizer are untouched. The norm of a
    layer is the L2 norm of the gradients of all its trainable weights together.

    Args:
        x: the fixed inputs.
        y: their integer labels.
        every: record every this many steps.
        loss: a Keras loss (name, function or object); default: the model's compiled loss, or
            sparse categorical cross-entropy (from logits unless the model ends in a softmax).
        name: label for plots.

    Attributes:
        steps: the steps recorded.
        norms: ``{layer path: [norm at each recorded step]}`` plus ``"total"``.

    Raises:
        ValueError: ``x`` and ``y`` lengths differ.
    """

    def __init__(self, x, y, every: int = 50, loss=None, name: str | None = None):
        super().__init__(every=every, name=name)
        self.x = np.asarray(x, dtype="float32")
        self.y = np.asarray(y)
        if len(self.x) != len(self.y):
            raise ValueError(
                f"GradientNormTracker: x has {len(self.x)} examples but y has {len(self.y)}; "
                "expected equal lengths."
            )
        self.loss = loss
        self.norms: dict[str, list[float]] = {}
        self._loss_fn = None

    def _config(self) -> dict:
        loss = self.loss if isinstance(self.loss, (str, type(None))) else type(self.loss).__name__
        return {
            **super()._config(),
            "loss": loss,
            "x": _array_digest(self.x),
            "y": _array_digest(self.y),
        }

    def _prepare(self) -> None:
        loss = self.loss if self.loss is not None else getattr(self.model, "loss", None)
        if loss is None:
            from_logits = not ends_in_softmax(self.model)
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
        self._loss_fn = keras.losses.get(loss) if isinstance(loss, str) else loss
        prefix = self.model.name + "/"
        self._groups = [
            v.path[len(prefix):].rsplit("/", 1)[0] if v.path.startswith(prefix)
            else v.path.rsplit("/", 1)[0]
            for v in self.model.trainable_variables
        ]

    def record(self, step: int) -> None:
        import tensorflow as tf

        model = self.model
        trainable = [tf.convert_to_tensor(v.value) for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            out, _ = model.stateless_call(trainable, non_trainable, self.x, training=True)
            loss = keras.ops.mean(self._loss_fn(self.y, out))
        grads = tape.gradient(loss, trainable)
        squares: dict[str, float] = {}
        for group, g in zip(self._groups, grads, strict=True):
            value = 0.0 if g is None else float(tf.reduce_sum(tf.square(tf.cast(g, "float64"))))
            squares[group] = squares.get(group, 0.0) + value
        squares["total"] = sum(squares.values())
        for group, sq in squares.items():
            self.norms.setdefault(group, []).append(float(np.sqrt(sq)))

    def _state(self) -> dict:
        return {"norms": self.norms}

    def _load_state(self, state: dict) -> None:
        self.norms = {k: [float(v) for v in vals] for k, vals in state.get("norms", {}).items()}

