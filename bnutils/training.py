"""``train``: one seeded, timed, cached training run, recorded as a :class:`TrainResult`.

It seeds, builds and compiles the model, then reads the run from :mod:`bnutils.cache` (keyed
by the built model, its initial weights, the data and the settings) or fits it through the
``tf.data`` pipeline and records curves, times, steps and divergence under ``results/runs/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from bnutils import cache
from bnutils import config as _config
from bnutils._graph import ends_in_softmax
from bnutils._util import (
    atomic_path,
    check_positive_int,
    env_info,
    json_safe,
    log_line,
    nan_list,
)
from bnutils.cache import FORMAT_VERSION
from bnutils.callbacks import Tracker
from bnutils.data import make_tf_dataset
from bnutils.repro import set_seed

__all__ = ["FORMAT_VERSION", "TrainResult", "load_result", "resolve_verbose", "train"]

# name -> (Keras class, its arguments besides the learning rate, default learning rate)
_OPTIMIZERS = {
    "sgd": ("SGD", {}, 0.01),
    "momentum": ("SGD", {"momentum": 0.9}, 0.01),
    "adam": ("Adam", {}, 1e-3),
}
CURVES = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")  # history key: no train_
# Callbacks that only watch or write files: they do not change a run, so they are not in its key
# (a TensorBoard log folder is a path of one machine: in the key, no other clone would hit it).
_OBSERVERS = (
    keras.callbacks.BackupAndRestore,
    keras.callbacks.CSVLogger,
    keras.callbacks.ModelCheckpoint,
    keras.callbacks.ProgbarLogger,
    keras.callbacks.TensorBoard,
)


@dataclasses.dataclass
class TrainResult:
    """Everything one training run produced, except (when loaded from the cache) the model.

    ``config`` holds the model's name and size, the optimizer and its config, lr, loss, batch
    size, epochs, dataset name and sizes, profile and the ``user`` config; ``history`` every
    per-epoch metric Keras logged, and ``train_loss`` ... ``val_accuracy`` the four main
    curves; ``measured`` what ``train``'s ``measure`` computed from the trained model (test
    accuracy, a confusion matrix, ...), so that the record answers without the weights;
    ``versions``, ``machine`` and ``created`` come from :func:`bnutils._util.env_info`.
    ``from_cache`` (nothing was trained), ``model`` (the trained model, or the saved one with
    ``save_model``), ``model_path`` and ``path`` (the JSON file) are not saved.
    """

    run_name: str
    key: str
    seed: int
    config: dict
    history: dict
    train_loss: list
    train_accuracy: list
    val_loss: list
    val_accuracy: list
    epoch_times: list
    total_time: float
    steps: int
    steps_per_epoch: int
    diverged: bool = False
    divergence_message: str | None = None
    versions: dict = dataclasses.field(default_factory=dict)
    machine: dict = dataclasses.field(default_factory=dict)
    trackers: list = dataclasses.field(default_factory=list)
    measured: dict = dataclasses.field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION
    from_cache: bool = dataclasses.field(default=False, compare=False)
    model: Any = dataclasses.field(default=None, repr=False, compare=False)
    model_path: str | None = dataclasses.field(default=None, compare=False)
    path: str | None = dataclasses.field(default=None, compare=False)

    _NOT_SAVED = ("from_cache", "model", "model_path", "path")

    @property
    def epochs_run(self) -> int:
        """Epochs actually run (fewer than asked for when the run diverged)."""
        return len(self.epoch_times)

    @property
    def final_val_accuracy(self) -> float:
        return self.val_accuracy[-1] if self.val_accuracy else math.nan

    @property
    def best_val_accuracy(self) -> float:
        finite = [v for v in self.val_accuracy if math.isfinite(v)]
        return max(finite) if finite else math.nan

    def to_dict(self) -> dict:
        """A JSON-ready dict (NaN and infinities become ``None``)."""
        fields = [f.name for f in dataclasses.fields(self) if f.name not in self._NOT_SAVED]
        return json_safe({name: getattr(self, name) for name in fields})

    @classmethod
    def from_dict(cls, d: dict) -> TrainResult:
        """Rebuild a result from :meth:`to_dict` output (``None`` in curves becomes NaN).

        Raises:
            ValueError: ``d`` lacks fields or was written by a newer format.
        """
        if int(d.get("format_version", 1)) > FORMAT_VERSION:
            raise ValueError(
                f"The result was written by format {d['format_version']}; this bnutils reads "
                f"up to {FORMAT_VERSION}. Update bnutils or rerun with force=True."
            )
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}

        kw.update({n: nan_list(kw[n]) for n in CURVES if n in kw})
        kw["history"] = {k: nan_list(v) for k, v in kw.get("history", {}).items()}
        try:
            return cls(**kw)
        except TypeError as e:  # a required field is missing
            raise ValueError(f"Not a saved TrainResult: {e}.") from e

    def load_model(self):
        """Load the model saved with ``save_model=True`` (also sets :attr:`model`).

        Raises:
            FileNotFoundError: the run saved no model, or the file is gone.
        """
        if not self.model_path or not Path(self.model_path).is_file():
            raise FileNotFoundError(
                f"Run {self.key!r} has no saved model (model_path={self.model_path!r}). Train "
                "it with save_model=True (add force=True if the run is already cached)."
            )
        try:
            self.model = keras.saving.load_model(self.model_path)
        except Exception:  # e.g. a custom loss that cannot be deserialized
            self.model = keras.saving.load_model(self.model_path, compile=False)
        return self.model

    def summary(self) -> str:
        """One line: name, epochs, final and best validation accuracy, time, divergence."""
        status, cached = "DIVERGED, " * self.diverged, " (cached)" * self.from_cache
        return (
            f"{self.run_name} seed={self.seed}: {status}{self.epochs_run} epochs, val_acc "
            f"{self.final_val_accuracy:.4f} (best {self.best_val_accuracy:.4f}), "
            f"{self.total_time:.1f} s{cached}"
        )


def load_result(path: str | os.PathLike) -> TrainResult:
    """Read a :class:`TrainResult` from its JSON file (``from_cache`` set).

    Raises:
        ValueError: the file is unreadable, not a result, or from a newer format.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read a training result from {path}: {e}") from e
    result = TrainResult.from_dict(data)
    result.from_cache, result.path = True, str(path)
    return result


def resolve_verbose(verbose: int | None = None) -> int:
    """``verbose``, or for ``None``: 0 when ``$BNUTILS_QUIET`` is set (not ``0``) or under pytest
    or nbval, 1 (progress bars) in Jupyter or a terminal, else 2 (one line per epoch)."""
    if verbose is not None:
        return int(verbose)
    if os.environ.get("BNUTILS_QUIET", "") not in ("", "0") or "PYTEST_CURRENT_TEST" in os.environ:
        return 0
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and "ipykernel" in sys.modules else None
    if type(ip).__name__ == "ZMQInteractiveShell" or getattr(sys.stdout, "isatty", bool)():
        return 1
    return 2


def _make_optimizer(optimizer, lr):
    if isinstance(optimizer, str):
        if optimizer.lower() not in _OPTIMIZERS:
            raise ValueError(
                f"Unknown optimizer {optimizer!r}. Expected one of {sorted(_OPTIMIZERS)}, a "
                "keras.optimizers.Optimizer, or a zero-argument function returning one."
            )
        cls, kwargs, lr0 = _OPTIMIZERS[optimizer.lower()]
        return getattr(keras.optimizers, cls)(learning_rate=lr0 if lr is None else lr, **kwargs)
    opt = optimizer() if callable(optimizer) else optimizer
    if not isinstance(opt, keras.optimizers.Optimizer):
        raise TypeError(
            f"Expected an optimizer name, a keras.optimizers.Optimizer or a zero-argument factory "
            f"returning one; received {type(opt).__name__}."
        )
    if lr is not None:
        opt.learning_rate = lr
    return opt


def _build_and_compile(model_or_builder, optimizer, lr):
    """The model (built by the builder), compiled unless it was compiled and nothing overrides."""
    model = model_or_builder
    if not isinstance(model, keras.Model):
        model = model_or_builder()
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"The builder {model_or_builder!r} returned {type(model).__name__}; expected a "
                "keras.Model."
            )
    if model.compiled and model.optimizer is not None and optimizer is None and lr is None:
        return model
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=not ends_in_softmax(model))
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    model.compile(optimizer=_make_optimizer(optimizer or "adam", lr), loss=loss, metrics=metrics)
    return model


def _check_data(data) -> None:
    if missing := [n for n in ("x_train", "y_train", "x_val", "y_val") if not hasattr(data, n)]:
        raise TypeError(
            f"Expected a bnutils Dataset, received {type(data).__name__} lacking {missing}. "
            "Load one with bnutils.load_dataset()."
        )
    if len(data.x_train) == 0:
        raise ValueError("The dataset has no training examples.")


class _RunRecorder(keras.callbacks.Callback):
    """Wall times and steps, and a stop (not a crash) when the loss turns NaN or infinite."""

    def on_train_begin(self, logs=None):
        self.epoch_times, self.steps, self.diverged = [], 0, None
        self.start = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.t0 = epoch, time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        self.check(logs, "loss")

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_times.append(time.perf_counter() - self.t0)
        self.check(logs, "loss", "val_loss")

    def on_train_end(self, logs=None):
        total = time.perf_counter() - self.start
        self.timing = dict(epoch_times=self.epoch_times, total_time=total, steps=self.steps)

    def check(self, logs, *names):
        for name in names:
            value = (logs or {}).get(name)
            if value is not None and not self.diverged and not math.isfinite(float(value)):
                opt = self.model.optimizer
                self.diverged = (
                    f"{name} became {float(value)} in epoch {self.epoch + 1} (step "
                    f"{self.steps}) with optimizer {type(opt).__name__} and learning rate "
                    f"{_lr_value(opt)}. Training stopped there and the run is recorded with "
                    "diverged=True; lower the learning rate (or add BN) to train it."
                )
                self.model.stop_training = True


def _map_augment(ds, augment):
    if not callable(augment):
        raise TypeError(
            f"`augment` must be a Keras layer or a function (x, y) -> (x, y), received "
            f"{type(augment).__name__}."
        )
    if isinstance(augment, keras.layers.Layer):
        layer, augment = augment, lambda x, y: (layer(x, training=True), y)
    return ds.map(augment, num_parallel_calls=-1)  # -1: tf.data.AUTOTUNE


def train(
    model_or_builder: Any,
    data: Any,
    *,
    epochs: int,
    batch_size: int = 128,
    optimizer: str | Any | None = None,
    lr: float | None = None,
    seed: int = 0,
    results_dir: str | os.PathLike | None = None,
    run_name: str | None = None,
    config: dict | None = None,
    force: bool = False,
    callbacks: Sequence[Any] = (),
    verbose: int | None = None,
    augment: Callable | Any = None,
    measure: Callable[[Any, Any], Any] | None = None,
    save_model: bool = False,
) -> TrainResult:
    """Train (or load the finished run of) one model on one dataset with one seed.

    Args:
        model_or_builder: a zero-argument function returning a ``keras.Model`` (called after
            seeding), or a model. A model compiled before keeps its compile settings unless
            ``optimizer`` or ``lr`` is given; otherwise the loss is sparse categorical
            cross-entropy (from logits unless the model ends in a softmax).
        data: a :class:`bnutils.data.Dataset`: trains on ``x_train``/``y_train`` (integer
            labels), validates on ``x_val``/``y_val`` after every epoch.
        epochs, batch_size, seed: as in ``fit``; ``seed`` seeds weights, shuffling, dropout.
        optimizer: ``"sgd"``, ``"momentum"`` (SGD, 0.9), ``"adam"`` (default), an optimizer,
            or a zero-argument factory; ``lr``: its learning rate (default 0.01 for SGD, 0.001).
        results_dir: the run cache (default ``results/runs``; models in ``results/models``).
        run_name: readable prefix of the result file (default: the model's name).
        config: extra settings recorded with the run and part of its cache key.
        force: train even if this run is cached (``$BNUTILS_REFRESH_SINCE`` retrains the runs
            recorded before a time: :func:`bnutils.config.refresh_since`).
        callbacks: extra Keras callbacks; :class:`bnutils.callbacks.Tracker` records are
            saved and restored on a cache hit, other callbacks count in the key by their
            constructor arguments (see :func:`bnutils.cache.describe`), except those that only
            watch (``TensorBoard``, ``CSVLogger``, ``ModelCheckpoint``, ...).
        verbose: Keras verbosity (``None``: :func:`resolve_verbose`).
        augment: a Keras layer applied to training batches, or a function ``(x, y) -> (x, y)``
            mapped over them (a module-level function counts in the key by its name; a lambda
            is refused).
        measure: a function ``(model, data) -> dict`` of JSON values, called on the trained
            model (unless the run diverged); its result is saved as ``measured``, so that a
            run read from its record needs no weights. It counts in the key by its name, like
            ``augment``: after changing its code, pass ``force=True`` or a new ``run_name``.
        save_model: also save the model as ``<key>.keras``; a cache hit loads it. Models are
            not committed: a fresh clone that needs one trains the run again.

    Returns:
        A :class:`TrainResult`; ``from_cache`` tells whether anything was trained.

    Raises:
        ValueError: bad sizes, unknown optimizer names.
        TypeError: ``data`` is not a Dataset, the builder does not return a model.
    """
    _check_data(data)
    epochs = check_positive_int("epochs", epochs)
    batch_size = check_positive_int("batch_size", batch_size)
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"`config` must be a dict, received {type(config).__name__}.")
    callbacks, config = list(callbacks), config or {}
    trackers = [cb for cb in callbacks if isinstance(cb, Tracker)]
    runs_dir = Path(results_dir) if results_dir is not None else _config.results_dir("runs")
    models_dir = runs_dir / "models" if results_dir is not None else _config.results_dir("models")

    # The key describes the seeded, built and compiled model, so building comes first.
    set_seed(seed)
    model = _build_and_compile(model_or_builder, optimizer, lr)
    opt, metrics = model.optimizer, (model.get_compile_config() or {}).get("metrics")
    run = dict(epochs=epochs, batch_size=batch_size, seed=seed, augment=augment, config=config)
    if measure is not None:
        run["measure"] = measure
    keyed = [cb for cb in callbacks if not isinstance(cb, _OBSERVERS)]
    compiled = dict(optimizer=opt, loss=model.loss, metrics=metrics, callbacks=keyed)
    key = cache.run_key(model, data, run_name or model.name, **compiled, **run)
    model_path = models_dir / f"{key}.keras"
    cached = None
    if not force:
        saved_model = model_path if save_model else None
        since = _config.refresh_since()
        cached = cache.lookup(runs_dir, key, load_result, saved_model, since=since)
    if cached is not None:
        for tracker, saved in zip(trackers, cached.trackers, strict=False):
            tracker.load_dict(saved)
        log_line(f"run {key}: from its record")
        return cached

    train_ds = make_tf_dataset(data.x_train, data.y_train, batch_size, shuffle=True, seed=seed)
    train_ds = train_ds if augment is None else _map_augment(train_ds, augment)
    val = (data.x_val, data.y_val, max(batch_size, 256))
    val_ds = make_tf_dataset(*val, shuffle=False) if len(data.x_val) else None
    recorder = _RunRecorder()
    options = dict(callbacks=[recorder, *callbacks], verbose=resolve_verbose(verbose))
    fit = model.fit(train_ds, validation_data=val_ds, epochs=epochs, shuffle=False, **options)

    history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
    message = recorder.diverged and f"Run {key!r} diverged: {recorder.diverged}" or None
    if message:
        print(message)
    dataset = dict(train_size=len(data.x_train), val_size=len(data.x_val))
    dataset = {"name": getattr(data, "name", "?"), "scale": getattr(data, "scale", "?"), **dataset}
    record = dict(model_name=model.name, params=int(model.count_params()), lr=_lr_value(opt))
    record.update(optimizer=type(opt).__name__, optimizer_config=opt.get_config())
    record.update(loss=cache.describe(model.loss), batch_size=batch_size, epochs=epochs)
    augment_name = getattr(augment, "name", None) or getattr(augment, "__name__", None)
    record.update(dataset=dataset, augment=augment_name)
    record.update(callbacks=[type(cb).__name__ for cb in callbacks], user=config)
    record["profile"] = _config.get_profile().name
    curves = {c: history.get(c.removeprefix("train_"), []) for c in CURVES}
    env, per_epoch = env_info(), math.ceil(len(data.x_train) / batch_size)
    saved = dict(steps_per_epoch=per_epoch, diverged=bool(message), divergence_message=message)
    saved.update(versions=env["versions"], machine=env["machine"], created=env["date"])
    saved.update(trackers=[t.to_dict() for t in trackers], **curves, **recorder.timing)
    if save_model:  # before `measure`, which may change the model (e.g. precise BN)
        with atomic_path(model_path) as tmp:
            model.save(tmp)
    if measure is not None and not message:
        saved["measured"] = _measure(measure, model, data)
    run_name = key.rsplit("-", 1)[0]
    result = TrainResult(
        run_name=run_name, key=key, seed=seed, config=record, history=history, **saved
    )
    result.model_path = str(model_path) if save_model else None
    cache.store(result, runs_dir)
    result.model = model
    log_line(f"run {key}: trained in {result.total_time:.1f} s")
    return result


def _measure(measure, model, data) -> dict:
    out = measure(model, data)
    if not isinstance(out, dict):
        raise TypeError(
            f"`measure` must return a dict of JSON values (e.g. {{'test_accuracy': 0.9}}), "
            f"received {type(out).__name__} from {measure!r}."
        )
    return json_safe(out)


def _lr_value(optimizer):
    try:
        return float(np.asarray(optimizer.learning_rate))
    except (TypeError, ValueError):
        return str(optimizer.learning_rate)
