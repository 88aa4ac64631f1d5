"""The one run cache: a training run is stored as JSON under a key that says what the run is.

The key hashes the *built* model (its architecture, with generated layer names replaced by
their order, and its initial weights), the data (:func:`bnutils._util.digest` of the training
and validation arrays) and the training settings (optimizer and loss configs, epochs, batch
size, seed, callbacks' settings, ...). How the builder is written does not count: two
builders that build the same model with the same weights and the same ``run_name`` share a
run. Changes the key cannot see (e.g. the code of a plain-function ``augment``) need
``force=True`` or a new ``run_name``; a lambda in the settings is refused.

>>> key = run_key(model, data, name="mlp", epochs=2, seed=0)
>>> lookup(directory, key, bnutils.training.load_result)  # the cached TrainResult, or None
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import inspect
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bnutils._util import atomic_write_json, digest, json_safe, slug

__all__ = ["FORMAT_VERSION", "describe", "lookup", "run_key", "store"]

FORMAT_VERSION = 2  # version 1 keyed runs on the builder's code: those runs are trained again


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def describe(obj: Any) -> Any:
    """``obj`` as JSON values for a cache key: models by architecture and weights, other Keras
    objects by class and config (without their generated ``name``), arrays by digest, objects
    with a ``fingerprint()`` method by it, dataclasses by their fields, functions by their
    qualified name (never by their code; lambdas are refused), other objects by the
    constructor arguments they store under the same names."""
    import keras

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.generic, np.ndarray)) and np.ndim(obj) == 0:
        return json_safe(obj)
    if isinstance(obj, np.ndarray):
        return {"array": digest(obj)}
    if isinstance(obj, dict):
        return {str(k): describe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [describe(v) for v in obj]
    if callable(getattr(obj, "fingerprint", None)):
        return describe(obj.fingerprint())
    if isinstance(obj, keras.Model):
        return _model_fingerprint(obj)
    get_config = getattr(obj, "get_config", None)
    if callable(get_config) and not isinstance(obj, type):
        try:
            config = {k: v for k, v in get_config().items() if k != "name"}
        except NotImplementedError as e:  # e.g. a custom Keras object without get_config
            raise _undescribable(obj, "its get_config() is not implemented") from e
        return {"class": _qualname(type(obj)), "config": json_safe(config)}
    if isinstance(obj, functools.partial):
        return {
            "partial": describe(obj.func),
            "args": describe(obj.args),
            "keywords": describe(obj.keywords),
        }
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(map(describe, obj), key=repr)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: describe(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"class": _qualname(type(obj)), "fields": fields}
    name = _qualname(obj if isinstance(obj, type) or inspect.isroutine(obj) else type(obj))
    if "<lambda>" in name or ("<locals>" in name and inspect.isroutine(obj)):
        raise ValueError(
            f"Cannot tell two {name!r} apart in a run's cache key: a lambda or a function "
            "defined inside another one is known only by its name. Define it at module level "
            "or give it a `fingerprint()` method that returns its settings."
        )
    if inspect.isroutine(obj) or isinstance(obj, type):
        return name
    # Any other object (a callback, a callable augmenter): its settings are the constructor's
    # arguments, read back from the same-named attributes; counters and other state a run
    # changes are not settings, nor is how much it prints.
    params = inspect.signature(type(obj).__init__).parameters
    names = [k for k in params if k not in {"self", "verbose", "args", "kwargs"}]
    if missing := [k for k in names if not hasattr(obj, k)]:
        raise _undescribable(obj, f"it keeps no attribute named like its arguments {missing}")
    return {"class": name, "settings": {k: describe(getattr(obj, k)) for k in names}}


def _undescribable(obj: Any, why: str) -> ValueError:
    """The error for an object whose settings a key cannot read: it could hit a stale run."""
    return ValueError(
        f"Cannot put a {type(obj).__name__} in a run's cache key: {why}, so a changed setting "
        "would go unseen and a stale run could be read back. Store each constructor argument "
        "under its own name (`self.patience = patience`), or give the class a `get_config()` "
        "or a `fingerprint()` method that returns its settings."
    )


def _layer_names(config: Any, out: list) -> list:
    """The layer (and seed generator) names of a Keras config, in order, nested included."""
    if isinstance(config, list):
        for v in config:
            _layer_names(v, out)
    elif isinstance(config, dict):
        if config.get("class_name") == "SeedGenerator":
            out.append(config["config"].get("name"))
        for k, v in config.items():
            if k == "layers" and isinstance(v, list):
                out.extend(e["config"].get("name") for e in v if isinstance(e, dict))
            _layer_names(v, out)
    return out


def _rename(obj: Any, canon: dict) -> Any:
    if isinstance(obj, dict):
        return {k: _rename(v, canon) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rename(v, canon) for v in obj]
    return canon.get(obj, obj) if isinstance(obj, str) else obj


def _model_fingerprint(model: Any) -> dict:
    """``model``'s class, architecture (``get_config()``, with layer names replaced by their
    order so that ``dense_7`` and ``dense`` match) and the digest of its current weights."""
    try:
        config = json_safe(model.get_config())
    except Exception:  # a subclassed model without get_config: its class and weights count
        config = None
    names = [n for n in dict.fromkeys([model.name, *_layer_names(config, [])]) if n]
    return {
        "class": _qualname(type(model)),
        "architecture": _rename(config, {n: f"layer{i}" for i, n in enumerate(names)}),
        "weights": digest(*[np.asarray(w) for w in model.get_weights()]),
    }


def run_key(model: Any, data: Any, name: str = "run", **settings: Any) -> str:
    """The cache key ``<slug(name)>-<12 hex>`` of training ``model`` (seeded and built, not
    trained yet) on ``data`` with ``settings`` (keyword arguments, as :func:`describe` puts
    them), under this :data:`FORMAT_VERSION`."""
    arrays = (data.x_train, data.y_train, data.x_val, data.y_val)
    spec = {"format": FORMAT_VERSION, "model": _model_fingerprint(model), "data": digest(*arrays)}
    text = json.dumps({**spec, "settings": describe(settings)}, sort_keys=True)
    return (
        f"{slug(name)[:48].strip('-.') or 'run'}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    )


def lookup(
    directory: str | os.PathLike,
    key: str,
    load: Callable[[Path], Any],
    model_path: str | os.PathLike | None = None,
    since: datetime.datetime | None = None,
):
    """The cached result of run ``key`` in ``directory`` read by ``load(path)``, or ``None``.

    ``load`` is ``bnutils.training.load_result``. An unreadable file (``load`` raises
    ``ValueError``) is warned about and ignored, and so is a record created before ``since``
    (see :func:`bnutils.config.refresh_since`). With ``model_path`` the run's saved model is
    loaded into ``.model`` as well (``None`` when it is missing: the run must be redone).
    """
    path = Path(directory) / f"{key}.json"
    if not path.is_file():
        return None
    try:
        result = load(path)
    except ValueError as e:
        warnings.warn(
            f"Ignoring the unreadable cached run {path} ({e}); training it again.", stacklevel=3
        )
        return None
    if since is not None and _created(result) < since:
        return None  # recorded before the refresh: train it again
    if model_path is not None:  # records do not store the model's path: it is the key's
        if not Path(model_path).is_file():
            return None  # the saved model is gone: train again
        result.model_path = str(model_path)
        result.load_model()
    return result


def _created(result: Any) -> datetime.datetime:
    try:
        when = datetime.datetime.fromisoformat(getattr(result, "created", "") or "")
    except ValueError:
        return datetime.datetime.min.replace(tzinfo=datetime.UTC)  # no time: older than any
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


def store(result: Any, directory: str | os.PathLike) -> Path:
    """Write ``result`` as ``<directory>/<result.key>.json`` atomically; sets ``result.path``."""
    path = atomic_write_json(Path(directory) / f"{result.key}.json", result.to_dict())
    result.path = str(path)
    return path
