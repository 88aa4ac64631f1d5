"""``train``: one seeded, timed, cached training run, recorded as a :class:`TrainResult`.

Every notebook trains through :func:`train`. It seeds everything, builds the model (from a
zero-argument builder, ideally), compiles it, feeds it through the ``tf.data`` pipeline and
records per-epoch curves, wall times, the step count, when a target accuracy was first reached,
and whether the run diverged. The result is written as JSON under ``results/runs/``, named by a
readable prefix and a hash of the run's configuration, so running a notebook again reuses every
finished run instead of training it again (``force=True`` trains anyway).

The cache key covers the builder (its code, arguments, closure and simple global values), or a
model instance's architecture and initial weights; the data (name, sizes, a digest); the
optimizer, learning rate, loss, batch size, epochs, seed, augmentation, distribution strategy;
the trackers and callback classes; ``config`` and ``run_name``. Changes it cannot see (e.g. an
edit inside a library function a builder calls) need ``force=True`` or a new ``run_name``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
import types
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnutils import config as _config
from bnutils.evaluation import ends_in_softmax

__all__ = ["FORMAT_VERSION", "TrainResult", "load_result", "resolve_verbose", "train"]

FORMAT_VERSION = 1
_DEFAULT_LR = {"sgd": 0.01, "momentum": 0.01, "nesterov": 0.01, "adam": 1e-3, "adamw": 1e-3,
               "rmsprop": 1e-3}
_METRIC_LISTS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


# ---------------------------------------------------------------- the result


@dataclasses.dataclass
class TrainResult:
    """Everything one training run produced, except (when loaded from the cache) the model.

    Attributes:
        run_name: readable name of the run.
        key: file stem ``<run_name>-<hash>``; the JSON is ``<results_dir>/<key>.json``.
        seed: the seed.
        config: the full configuration (model name and parameter counts, optimizer, lr,
            batch size, epochs, dataset name and sizes, profile, ``user`` config, ...).
        history: every per-epoch metric Keras logged (``loss``, ``accuracy``, ``val_...``).
        train_loss, train_accuracy, val_loss, val_accuracy: the four main curves.
        epoch_times: wall seconds of each epoch (training plus validation).
        total_time: wall seconds of the whole ``fit`` (tracing included).
        steps: optimizer steps taken; ``steps_per_epoch``: steps of one full epoch.
        target_accuracy: the target validation accuracy (``None``: none).
        target_epoch, target_seconds: epoch (1-based) and cumulative epoch seconds at which
            ``val_accuracy`` first reached the target (``None`` if never).
        diverged: the loss became NaN or infinite and training stopped.
        divergence_message: what happened, when ``diverged``.
        versions: Python, NumPy, Keras and TensorFlow versions.
        trackers: the records of the :class:`bnutils.callbacks.Tracker` callbacks, in order.
        created: UTC time the run finished.
        model_path: the saved ``.keras`` model, when ``save_model=True``.
        from_cache: the result was read from disk and nothing was trained (not saved).
        model: the trained model (not saved; ``None`` when loaded from the cache unless the
            run saved its model).
        path: the JSON file (not saved).
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
    target_accuracy: float | None = None
    target_epoch: int | None = None
    target_seconds: float | None = None
    diverged: bool = False
    divergence_message: str | None = None
    versions: dict = dataclasses.field(default_factory=dict)
    trackers: list = dataclasses.field(default_factory=list)
    created: str = ""
    model_path: str | None = None
    format_version: int = FORMAT_VERSION
    from_cache: bool = dataclasses.field(default=False, compare=False)
    model: Any = dataclasses.field(default=None, repr=False, compare=False)
    path: str | None = dataclasses.field(default=None, compare=False)

    _NOT_SAVED = ("from_cache", "model", "path")

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
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in self._NOT_SAVED}
        return _json_safe(d)

    @classmethod
    def from_dict(cls, d: dict) -> TrainResult:
        """Rebuild a result from :meth:`to_dict` output (``None`` in curves becomes NaN).

        Raises:
            ValueError: ``d`` lacks fields or was written by a newer format.
        """
        names = {f.name for f in dataclasses.fields(cls)} - set(cls._NOT_SAVED)
        missing = sorted(n for n in names if n not in d and n not in _OPTIONAL)
        if missing:
            raise ValueError(f"Not a saved TrainResult: the dict lacks {missing}.")
        if int(d.get("format_version", 1)) > FORMAT_VERSION:
            raise ValueError(
                f"The result was written by format {d['format_version']}; this bnutils reads "
                f"up to {FORMAT_VERSION}. Update bnutils or rerun with force=True."
            )
        kw = {n: d[n] for n in names if n in d}
        for n in _METRIC_LISTS:
            kw[n] = _nan_list(kw[n])
        kw["history"] = {k: _nan_list(v) for k, v in kw["history"].items()}
        return cls(**kw)

    def load_model(self, compile: bool = True):
        """Load the model saved with ``save_model=True`` (also sets :attr:`model`).

        Raises:
            FileNotFoundError: the run saved no model, or the file is gone.
        """
        import keras

        if not self.model_path or not Path(self.model_path).is_file():
            raise FileNotFoundError(
                f"Run {self.key!r} has no saved model (model_path={self.model_path!r}). Train "
                "it with save_model=True (add force=True if the run is already cached)."
            )
        try:
            self.model = keras.saving.load_model(self.model_path, compile=compile)
        except Exception:
            if not compile:
                raise
            self.model = keras.saving.load_model(self.model_path, compile=False)
        return self.model

    def summary(self) -> str:
        """One line: name, epochs, final and best validation accuracy, time, divergence."""
        status = "DIVERGED, " if self.diverged else ""
        cached = " (cached)" if self.from_cache else ""
        return (
            f"{self.run_name} seed={self.seed}: {status}{self.epochs_run} epochs, val_acc "
            f"{self.final_val_accuracy:.4f} (best {self.best_val_accuracy:.4f}), "
            f"{self.total_time:.1f} s{cached}"
        )


_OPTIONAL = {"target_accuracy", "target_epoch", "target_seconds", "diverged",
             "divergence_message", "versions", "trackers", "created", "model_path",
             "format_version"}


def _nan_list(values) -> list:
    return [math.nan if v is None else float(v) for v in values]


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def load_result(path: str | os.PathLike) -> TrainResult:
    """Read a :class:`TrainResult` from its JSON file (``from_cache`` is set)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read a training result from {path}: {e}") from e
    result = TrainResult.from_dict(data)
    result.from_cache = True
    result.path = str(path)
    return result


# ---------------------------------------------------------------- fingerprints (cache key)


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _const_fingerprint(c):
    if isinstance(c, types.CodeType):
        return _code_fingerprint(c)
    if isinstance(c, tuple):
        return [_const_fingerprint(v) for v in c]
    if isinstance(c, frozenset):  # its repr's order depends on the hash seed
        return sorted(json.dumps(_const_fingerprint(v), sort_keys=True) for v in c)
    return repr(c)


def _code_fingerprint(code: types.CodeType) -> dict:
    return {"code": hashlib.sha256(code.co_code).hexdigest()[:16],
            "consts": [_const_fingerprint(c) for c in code.co_consts],
            "names": list(code.co_names)}


def _layer_names(cfg, out: list) -> list:
    """The layer names of a model config, in order (nested models included)."""
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            if k == "layers" and isinstance(v, list):
                out.extend(e["config"]["name"] for e in v
                           if isinstance(e, dict) and isinstance(e.get("config"), dict)
                           and "name" in e["config"])
            _layer_names(v, out)
    elif isinstance(cfg, list):
        for v in cfg:
            _layer_names(v, out)
    return out


def _rename(obj, canon: dict):
    if isinstance(obj, dict):
        return {k: _rename(v, canon) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rename(v, canon) for v in obj]
    return canon.get(obj, obj) if isinstance(obj, str) else obj


def _model_fingerprint(model) -> dict:
    """Architecture and weights, with auto-generated layer names replaced by their order."""
    try:
        arch = json.loads(model.to_json())
    except Exception:  # subclassed models without get_config
        arch = f"{type(model).__module__}.{type(model).__qualname__}"
    else:
        names = dict.fromkeys([model.name, *_layer_names(arch, [])])
        arch = _rename(arch, {n: f"layer{i}" for i, n in enumerate(names)})
    return {"model": arch, "weights": _digest(*[np.asarray(w) for w in model.get_weights()])}


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _code_names(c)
    return names


def _fingerprint(obj, depth: int = 0, seen: frozenset = frozenset()):
    """A JSON-friendly description of ``obj`` that changes when its behaviour would."""
    if depth > 8:
        return type(obj).__qualname__
    nxt = functools.partial(_fingerprint, depth=depth + 1, seen=seen)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return nxt(obj.item())
    if isinstance(obj, np.ndarray):
        return {"array": _digest(obj)}
    if isinstance(obj, (list, tuple)):
        return [nxt(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((nxt(v) for v in obj), key=lambda v: json.dumps(v, sort_keys=True))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and _is_frozen(obj):
        return {"dataclass": nxt(type(obj)),
                "fields": {f.name: nxt(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        return {str(k): nxt(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, functools.partial):
        return {"partial": nxt(obj.func), "args": nxt(obj.args), "kwargs": nxt(obj.keywords)}
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, types.ModuleType):
        return f"module {obj.__name__}"
    if isinstance(obj, types.MethodType):
        return {"method": nxt(obj.__func__), "self": type(obj.__self__).__qualname__}
    if isinstance(obj, types.FunctionType):
        return _function_fingerprint(obj, depth, seen)
    import keras

    if isinstance(obj, keras.Model):
        return _model_fingerprint(obj)
    # Initializers etc. by their config: an unseeded Keras initializer draws a random
    # ``self.seed`` per process, which must not change the key (its config keeps seed=None).
    if isinstance(obj, (keras.layers.Layer, keras.optimizers.Optimizer, keras.losses.Loss,
                        keras.initializers.Initializer, keras.regularizers.Regularizer,
                        keras.constraints.Constraint)):
        try:
            cfg = obj.get_config()
        except Exception:
            cfg = {}
        cfg = {k: v for k, v in cfg.items() if k != "name"}
        return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", "config": nxt(cfg)}
    if callable(obj):
        state = {k: v for k, v in vars(obj).items() if not k.startswith("_")} \
            if hasattr(obj, "__dict__") else {}
        return {"callable": nxt(type(obj)), "state": nxt(state)}
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _function_fingerprint(fn: types.FunctionType, depth: int, seen: frozenset):
    name = f"{fn.__module__}.{fn.__qualname__}"
    if id(fn) in seen:
        return name
    seen = seen | {id(fn)}
    nxt = functools.partial(_fingerprint, depth=depth + 1, seen=seen)
    closure = [nxt(c.cell_contents) for c in (fn.__closure__ or ()) if _cell_filled(c)]
    global_values = {}
    for n in sorted(_code_names(fn.__code__)):
        if n not in fn.__globals__:
            continue
        v = fn.__globals__[n]
        local_fn = isinstance(v, types.FunctionType) and v.__module__ == fn.__module__
        frozen = dataclasses.is_dataclass(v) and not isinstance(v, type) and _is_frozen(v)
        if isinstance(v, (bool, int, float, str, type(None), tuple, list, dict, np.ndarray,
                          functools.partial)) or local_fn or frozen:
            global_values[n] = nxt(v)
    return {"function": name, "code": _code_fingerprint(fn.__code__),
            "defaults": nxt(fn.__defaults__), "kwdefaults": nxt(fn.__kwdefaults__),
            "closure": closure, "globals": global_values}


def _is_frozen(obj) -> bool:
    params = getattr(type(obj), "__dataclass_params__", None)
    return bool(params is not None and params.frozen)


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def _data_fingerprint(data) -> dict:
    step = max(1, len(data.x_train) // 512)
    return {
        "name": getattr(data, "name", "?"),
        "scale": getattr(data, "scale", "?"),
        "train": list(np.shape(data.x_train)),
        "val": list(np.shape(data.x_val)),
        "digest": _digest(data.x_train[::step], data.y_train, data.x_val[::step], data.y_val),
    }


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9_.-]+", "-", str(text).lower()).strip("-.")
    return s[:48] or "run"


def _default_name(model_or_builder) -> str:
    obj = model_or_builder
    while isinstance(obj, functools.partial):
        obj = obj.func
    name = getattr(obj, "name", None) or getattr(obj, "__name__", None) or type(obj).__name__
    return "run" if name == "<lambda>" else str(name)


# ---------------------------------------------------------------- setting up a run


def _in_jupyter() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def resolve_verbose(verbose: int | None = None) -> int:
    """The Keras ``verbose`` level to use: quiet under tests, progress bars interactively.

    ``None`` gives 0 when ``$BNUTILS_QUIET`` is set (not ``0``) or a pytest/nbval run is under
    way (``$PYTEST_CURRENT_TEST``), 1 (progress bars) in Jupyter or a terminal, else 2 (one
    line per epoch).
    """
    if verbose is not None:
        return int(verbose)
    if os.environ.get("BNUTILS_QUIET", "") not in ("", "0") or "PYTEST_CURRENT_TEST" in os.environ:
        return 0
    if _in_jupyter() or (hasattr(sys.stdout, "isatty") and sys.stdout.isatty()):
        return 1
    return 2


def _make_optimizer(optimizer, lr):
    import keras

    if isinstance(optimizer, keras.optimizers.Optimizer):
        if lr is not None:
            optimizer.learning_rate = lr
        return optimizer
    if isinstance(optimizer, str):
        key = optimizer.strip().lower()
        if key not in _DEFAULT_LR:
            raise ValueError(
                f"Unknown optimizer {optimizer!r}. Expected one of {sorted(_DEFAULT_LR)}, a "
                "keras.optimizers.Optimizer instance, or a zero-argument function returning one."
            )
        lr = _DEFAULT_LR[key] if lr is None else lr
        if key in ("sgd", "momentum", "nesterov"):
            return keras.optimizers.SGD(learning_rate=lr, momentum=0.0 if key == "sgd" else 0.9,
                                        nesterov=key == "nesterov")
        cls = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW,
               "rmsprop": keras.optimizers.RMSprop}[key]
        return cls(learning_rate=lr)
    if callable(optimizer):
        opt = optimizer()
        if not isinstance(opt, keras.optimizers.Optimizer):
            raise TypeError(
                f"The optimizer factory returned {type(opt).__name__}; expected a "
                "keras.optimizers.Optimizer."
            )
        return _make_optimizer(opt, lr)
    raise TypeError(
        f"Expected an optimizer name, a keras.optimizers.Optimizer or a zero-argument factory, "
        f"received {type(optimizer).__name__}."
    )


def _build_model(model_or_builder):
    import keras

    if isinstance(model_or_builder, keras.Model):
        return model_or_builder
    model = model_or_builder()
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"The builder {_default_name(model_or_builder)!r} returned "
            f"{type(model).__name__}; expected a keras.Model."
        )
    return model


def _check_data(data) -> None:
    needed = ("x_train", "y_train", "x_val", "y_val")
    missing = [n for n in needed if not hasattr(data, n)]
    if missing:
        raise TypeError(
            f"Expected a bnutils Dataset (with {', '.join(needed)}), received "
            f"{type(data).__name__} lacking {missing}. Load one with bnutils.load_dataset()."
        )
    if len(data.x_train) == 0:
        raise ValueError("The dataset has no training examples.")


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, received {value!r}.")
    return int(value)


def _first_reach(val_accuracy: Sequence[float], epoch_times: Sequence[float], target):
    if target is None:
        return None, None
    for i, v in enumerate(val_accuracy):
        if math.isfinite(v) and v >= target:
            return i + 1, float(sum(epoch_times[: i + 1]))
    return None, None


def _versions() -> dict:
    import keras
    import tensorflow as tf

    return {"python": platform.python_version(), "numpy": np.__version__,
            "keras": keras.__version__, "tensorflow": tf.__version__}


def _profile_name() -> str:
    try:
        return _config.get_profile().name
    except ValueError:
        return os.environ.get(_config.PROFILE_ENV, "?")


def _recorder_class():
    import keras

    class _RunRecorder(keras.callbacks.Callback):
        """Epoch wall times, and a stop (not a crash) when the loss turns NaN or infinite."""

        def __init__(self):
            super().__init__()
            self.epoch_times: list[float] = []
            self.diverged_at: tuple | None = None
            self._epoch = 0
            self._step = 0

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self._step += 1
            loss = (logs or {}).get("loss")
            if loss is not None and self.diverged_at is None and not math.isfinite(float(loss)):
                self.diverged_at = ("loss", float(loss), self._epoch + 1, self._step)
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_times.append(time.perf_counter() - self._t0)
            for name in ("loss", "val_loss"):
                value = (logs or {}).get(name)
                if value is not None and self.diverged_at is None and not math.isfinite(float(value)):
                    self.diverged_at = (name, float(value), epoch + 1, self._step)
                    self.model.stop_training = True

    return _RunRecorder


def _map_augment(ds, augment):
    import keras
    import tensorflow as tf

    if augment is None:
        return ds
    if isinstance(augment, keras.layers.Layer):
        return ds.map(lambda x, y: (augment(x, training=True), y),
                      num_parallel_calls=tf.data.AUTOTUNE)
    if callable(augment):
        return ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    raise TypeError(
        f"`augment` must be a Keras layer or a function (x, y) -> (x, y), received "
        f"{type(augment).__name__}."
    )


# ---------------------------------------------------------------- train


def train(
    model_or_builder: Any,
    data: Any,
    *,
    epochs: int,
    batch_size: int = 128,
    optimizer: str | Any | None = None,
    lr: float | None = None,
    seed: int = 0,
    target_accuracy: float | None = None,
    results_dir: str | os.PathLike | None = None,
    run_name: str | None = None,
    config: dict | None = None,
    force: bool = False,
    callbacks: Sequence[Any] = (),
    verbose: int | None = None,
    strategy: Any = None,
    loss: Any = None,
    augment: Callable | Any = None,
    save_model: bool = False,
) -> TrainResult:
    """Train (or load the finished run of) one model on one dataset with one seed.

    Args:
        model_or_builder: preferably a zero-argument function returning a ``keras.Model``
            (built after seeding, inside ``strategy.scope()``, and not at all on a cache hit);
            or a model, compiled or not (a compiled one keeps its compile settings unless
            ``optimizer``, ``lr`` or ``loss`` is given).
        data: a :class:`bnutils.data.Dataset`; trains on ``x_train`` / ``y_train`` (integer
            labels) and validates on ``x_val`` / ``y_val`` after every epoch.
        epochs: number of epochs.
        batch_size: the (global) batch size.
        optimizer: ``"sgd"``, ``"momentum"`` (SGD, 0.9), ``"nesterov"``, ``"adam"`` (default),
            ``"adamw"``, ``"rmsprop"``, an optimizer instance, or a zero-argument factory.
        lr: learning rate (default: 0.01 for the SGD family, 0.001 otherwise).
        seed: seeds weights, shuffling and dropout (:func:`bnutils.repro.set_seed`).
        target_accuracy: record when ``val_accuracy`` first reaches this value.
        results_dir: where results are cached (default ``results/runs``).
        run_name: readable prefix of the result file (default: the builder's or model's name).
        config: extra settings recorded with the run and part of its cache key.
        force: train even if a finished run with this configuration is cached.
        callbacks: extra Keras callbacks. :class:`bnutils.callbacks.Tracker` records are
            saved with the run and restored on a cache hit; other callbacks count in the key
            only by class and are not called on a cache hit.
        verbose: Keras verbosity; ``None`` chooses (see :func:`resolve_verbose`).
        strategy: a ``tf.distribute`` strategy; the model is built and compiled in its scope.
        loss: a Keras loss; default sparse categorical cross-entropy, from logits unless the
            model ends in a softmax.
        augment: a Keras layer applied to training batches (``training=True``), or a function
            ``(x, y) -> (x, y)`` mapped over them.
        save_model: also save the trained model as ``<key>.keras`` in ``results/models/``
            (in ``<results_dir>/models/`` when ``results_dir`` is given); a cache hit then
            loads it into ``.model``.

    Returns:
        A :class:`TrainResult`; ``from_cache`` tells whether anything was trained.

    Raises:
        ValueError: bad sizes, unknown optimizer names.
        TypeError: ``data`` is not a Dataset, the builder does not return a model.
    """
    import keras

    from bnutils.callbacks import Tracker
    from bnutils.pipeline import make_tf_dataset
    from bnutils.repro import set_seed

    _check_data(data)
    epochs = _check_positive_int("epochs", epochs)
    batch_size = _check_positive_int("batch_size", batch_size)
    if target_accuracy is not None and not 0.0 < float(target_accuracy) <= 1.0:
        raise ValueError(f"target_accuracy must lie in (0, 1], received {target_accuracy!r}.")
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"`config` must be a dict, received {type(config).__name__}.")
    callbacks = list(callbacks)
    trackers = [cb for cb in callbacks if isinstance(cb, Tracker)]

    runs_dir = Path(results_dir) if results_dir is not None else _config.results_dir("runs")
    runs_dir.mkdir(parents=True, exist_ok=True)
    models_dir = runs_dir / "models" if results_dir is not None else _config.results_dir("models")
    name = _slug(run_name or _default_name(model_or_builder))
    spec = {
        "format": FORMAT_VERSION,
        "model": _fingerprint(model_or_builder),
        "data": _data_fingerprint(data),
        "epochs": epochs,
        "batch_size": batch_size,
        "optimizer": _fingerprint(optimizer),
        "lr": repr(lr),
        "seed": seed,
        "loss": _fingerprint(loss),
        "augment": _fingerprint(augment),
        "strategy": None if strategy is None else type(strategy).__qualname__,
        "callbacks": [cb.fingerprint() if isinstance(cb, Tracker) else type(cb).__qualname__
                      for cb in callbacks],
        "config": _fingerprint(config or {}),
        "run_name": run_name,
    }
    key = f"{name}-{hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]}"
    path = runs_dir / f"{key}.json"
    model_path = models_dir / f"{key}.keras"

    if path.is_file() and not force:
        try:
            cached = _from_cache(path, target_accuracy, trackers, save_model, model_path)
        except ValueError as e:
            warnings.warn(f"Ignoring the unreadable cached run {path} ({e}); training it again.",
                          stacklevel=2)
            cached = None
        if cached is not None:
            return cached

    set_seed(seed)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = _build_model(model_or_builder)
        keep_compile = (getattr(model, "compiled", False) and model.optimizer is not None
                        and optimizer is None and lr is None and loss is None)
        if not keep_compile:
            opt = _make_optimizer("adam" if optimizer is None else optimizer, lr)
            if loss is None:
                loss = keras.losses.SparseCategoricalCrossentropy(
                    from_logits=not ends_in_softmax(model))
            model.compile(optimizer=opt, loss=loss,
                          metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])

    train_ds = _map_augment(
        make_tf_dataset(data.x_train, data.y_train, batch_size=batch_size, shuffle=True,
                        seed=seed),
        augment,
    )
    val_ds = (make_tf_dataset(data.x_val, data.y_val, batch_size=max(batch_size, 256),
                              shuffle=False) if len(data.x_val) else None)
    recorder = _recorder_class()()
    steps_before = _iterations(model)
    start = time.perf_counter()
    fit = model.fit(train_ds, validation_data=val_ds, epochs=epochs,
                    callbacks=[recorder, *callbacks], verbose=resolve_verbose(verbose),
                    shuffle=False)  # the tf.data pipeline shuffles, seeded
    total = time.perf_counter() - start

    history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
    diverged = recorder.diverged_at is not None
    message = None
    if diverged:
        what, value, epoch, step = recorder.diverged_at
        message = (
            f"Run {key!r} diverged: {what} became {value} in epoch {epoch} (step {step}) with "
            f"optimizer {type(model.optimizer).__name__} and learning rate "
            f"{_lr_value(model.optimizer)}. Training stopped there and the run is recorded "
            "with diverged=True; lower the learning rate (or add BN) to train it."
        )
        print(message)
    curves = {
        "train_loss": history.get("loss", []),
        "train_accuracy": _pick(history, "accuracy"),
        "val_loss": history.get("val_loss", []),
        "val_accuracy": _pick(history, "val_accuracy"),
    }
    target_epoch, target_seconds = _first_reach(curves["val_accuracy"], recorder.epoch_times,
                                                target_accuracy)
    n_replicas = getattr(strategy, "num_replicas_in_sync", 1) if strategy is not None else 1
    record = {
        "run_name": name,
        "model_name": model.name,
        "model_class": type(model).__name__,
        "params": int(model.count_params()),
        "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_weights)),
        "optimizer": type(model.optimizer).__name__,
        "optimizer_config": _json_safe(model.optimizer.get_config()),
        "lr": _lr_value(model.optimizer),
        "loss": _describe_loss(model.loss),
        "batch_size": batch_size,
        "epochs": epochs,
        "seed": seed,
        "dataset": {"name": getattr(data, "name", "?"), "scale": getattr(data, "scale", "?"),
                    "train_size": len(data.x_train), "val_size": len(data.x_val)},
        "augment": None if augment is None else _default_name(augment),
        "strategy": None if strategy is None else type(strategy).__name__,
        "replicas": int(n_replicas),
        "callbacks": [type(cb).__name__ for cb in callbacks],
        "profile": _profile_name(),
        "user": config or {},
    }
    result = TrainResult(
        run_name=name, key=key, seed=seed, config=record, history=history, **curves,
        epoch_times=list(recorder.epoch_times), total_time=total,
        steps=_iterations(model) - steps_before,
        steps_per_epoch=math.ceil(len(data.x_train) / batch_size),
        target_accuracy=None if target_accuracy is None else float(target_accuracy),
        target_epoch=target_epoch, target_seconds=target_seconds,
        diverged=diverged, divergence_message=message, versions=_versions(),
        trackers=[t.to_dict() for t in trackers],
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    if save_model:
        models_dir.mkdir(parents=True, exist_ok=True)
        model.save(model_path)
        result.model_path = str(model_path)
    _write_json(path, result.to_dict())
    result.model = model
    result.path = str(path)
    return result


def _from_cache(path: Path, target, trackers, save_model: bool, model_path: Path):
    """The cached result, or ``None`` when it must be trained again (model file missing)."""
    result = load_result(path)
    if save_model and not (result.model_path and Path(result.model_path).is_file()):
        if not model_path.is_file():
            return None
        result.model_path = str(model_path)
    result.target_accuracy = None if target is None else float(target)
    result.target_epoch, result.target_seconds = _first_reach(
        result.val_accuracy, result.epoch_times, target)
    for tracker, saved in zip(trackers, result.trackers, strict=False):
        tracker.load_dict(saved)
    if save_model:
        result.load_model()
    return result


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False))
    os.replace(tmp, path)


def _pick(history: dict, name: str) -> list:
    if name in history:
        return history[name]
    val = name.startswith("val_")
    for k, v in history.items():
        if "acc" in k and k.startswith("val_") == val:
            return v
    return []


def _lr_value(optimizer):
    lr = getattr(optimizer, "learning_rate", None)
    try:
        return float(np.asarray(lr))
    except (TypeError, ValueError):
        return str(lr)


def _describe_loss(loss):
    if loss is None or isinstance(loss, str):
        return loss
    try:
        cfg = loss.get_config()
        return {"class": type(loss).__name__,
                **{k: v for k, v in cfg.items() if k in ("from_logits", "reduction")}}
    except Exception:
        return getattr(loss, "__name__", type(loss).__name__)


def _iterations(model) -> int:
    """The optimizer's step counter as an int (``int()`` of it fails under tf.distribute)."""
    value = model.optimizer.iterations
    return int(np.asarray(value.numpy() if hasattr(value, "numpy") else value))
