"""Small helpers every module uses once: JSON values, atomic writes, digests, environment, checks.

Nothing here imports TensorFlow at import time.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_path",
    "atomic_write_json",
    "check_choice",
    "check_positive_int",
    "cpu_flags",
    "digest",
    "env_info",
    "field",
    "json_safe",
    "model_outputs",
    "log_line",
    "log_probabilities",
    "nan_list",
    "preserved_state",
    "Progress",
    "slug",
]


# ---------------------------------------------------------------- JSON


def nan_list(values: Iterable[Any]) -> list[float]:
    """The inverse of :func:`json_safe` for a list of numbers: ``None`` back to NaN."""
    return [math.nan if v is None else float(v) for v in values]


def json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON values: numpy scalars and arrays to Python, NaN/inf to ``None``,
    tuples to lists, paths and other objects to ``str``."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


# ---------------------------------------------------------------- atomic writes


_UMASK = os.umask(0o022)  # read once, at import (reading it means setting it), and restored
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    On an exception the temporary file or folder is removed and ``target`` is left as it was,
    so a failed write never leaves a half-written artifact. With ``directory=True`` the
    temporary path is an empty folder and an existing ``target`` folder is replaced last.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.partial-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=target.suffix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_UMASK)  # mkstemp/mkdtemp make them private
    if not (directory and target.exists()):
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``json_safe(obj)`` to ``path`` (indented, strict JSON) through a temporary file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")
    return Path(path)


# ---------------------------------------------------------------- digests and names


def digest(*arrays: Any) -> str:
    """A short hex digest of arrays' shapes, dtypes and bytes (the data fingerprint)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def slug(text: str) -> str:
    """``text`` as a file-name-safe slug: lower case, ``[a-z0-9_.-]`` only."""
    return re.sub(r"[^a-z0-9_.-]+", "-", str(text).lower()).strip("-") or "run"


# ---------------------------------------------------------------- environment


def cpu_flags(wanted: Sequence[str] = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma")):
    """The SIMD flags among ``wanted`` that this CPU reports (Linux ``/proc/cpuinfo``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in wanted if f in have]


def env_info() -> dict:
    """The one schema of run metadata: ``date`` (UTC, ISO 8601), ``machine`` and ``versions``."""
    import bnutils

    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "bnutils": bnutils.__version__,
    }
    for name in ("keras", "tensorflow"):
        module = sys.modules.get(name)
        if module is None:
            with contextlib.suppress(ImportError):
                module = __import__(name)
        versions[name] = getattr(module, "__version__", None)
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
    }
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return {"date": date, "machine": machine, "versions": versions}


# ---------------------------------------------------------------- job progress

LOG_ENV = "BNUTILS_LOG"  # the job log: `make run` points it at results/logs/run.log


def log_line(line: str, echo: bool = False) -> None:
    """Append ``line`` to the job log ``$BNUTILS_LOG`` (when set), and print it to stderr with
    ``echo``. Long jobs write one such line per finished run, so that a log says how far a job
    got when it was stopped."""
    if path := os.environ.get(LOG_ENV):
        stamp = datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{stamp} {line}\n")
    if echo:
        print(line, file=sys.stderr, flush=True)


class Progress:
    """The progress line of each finished run of a job of ``total`` runs: its index of the
    total, its name, its time and an estimate of the time left (from the runs trained so far;
    a run read from its record takes no time)."""

    def __init__(self, total: int, job: str, echo: bool = False):
        self.total = check_positive_int("total", total)
        self.job = job
        self.echo = echo
        self.index = 0
        self.trained_seconds: list[float] = []

    def done(self, name: str, seconds: float, from_record: bool = False) -> str:
        """Count one finished run, write its line (see :func:`log_line`) and return it."""
        self.index += 1
        if not from_record:
            self.trained_seconds.append(float(seconds))
        left = self.total - self.index
        if left == 0:
            eta = "done"
        elif self.trained_seconds:
            eta = f"about {_duration(left * float(np.mean(self.trained_seconds)))} left"
        else:
            eta = f"{left} to go"
        how = "from its record" if from_record else f"trained in {_duration(seconds)}"
        line = f"[{self.index}/{self.total}] {self.job}: {name}, {how}; {eta}"
        log_line(line, echo=self.echo)
        return line


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------- argument checks


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int`` of at least ``minimum``, or a ``ValueError`` that says so."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}, received {value!r} "
            f"({type(value).__name__})."
        )
    if value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, received {value}.")
    return int(value)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``, else a ``ValueError`` listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {', '.join(map(repr, choices))}; received {value!r}."
        )
    return value


# ---------------------------------------------------------------- model state


@contextlib.contextmanager
def preserved_state(model: Any, variables: Iterable[Any] | None = None) -> Iterator[Any]:
    """Snapshot ``model``'s variables (or ``variables``) and restore them on exit, even on error.

    >>> with preserved_state(model):
    ...     model(x, training=True)  # moving statistics change here, and are put back after
    """
    variables = list(model.variables if variables is None else variables)
    saved = [np.array(v.numpy(), copy=True) for v in variables]
    try:
        yield model
    finally:
        for v, value in zip(variables, saved, strict=True):
            v.assign(value)


# ---------------------------------------------------------------- results and models


def field(result: Any, name: str) -> Any:
    """A field of a run result given as a dict (a JSON record) or an object (``TrainResult``,
    a tracker); ``None`` when it has none."""
    from collections.abc import Mapping

    return result.get(name) if isinstance(result, Mapping) else getattr(result, name, None)


def log_probabilities(outputs: np.ndarray, probabilities: bool | None = None) -> np.ndarray:
    """Per-class log-probabilities of a classifier's ``(n, classes)`` outputs: of probabilities
    (clipped at 1e-12) or, for logits, a log-softmax. ``probabilities=None`` decides from the
    values (non-negative rows that sum to 1 are probabilities). The package's one conversion
    (``evaluation.evaluate``'s loss, the doctor's scores)."""
    out = np.asarray(outputs, dtype=np.float64)
    if probabilities is None:
        probabilities = out.min() >= 0.0 and np.allclose(out.sum(axis=1), 1.0, atol=1e-3)
    if probabilities:
        return np.log(np.clip(out, 1e-12, 1.0))
    shifted = out - out.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def model_outputs(model, x, training=False, batch_size: int | None = None) -> np.ndarray:
    """``model``'s outputs on ``x`` in batches, as one (examples, values) float64 array."""
    import keras

    step = batch_size or len(x)
    parts = []
    for s in range(0, len(x), step):
        outs = keras.tree.flatten(model(x[s : s + step], training=training))
        arrays = [np.asarray(keras.ops.convert_to_numpy(o), np.float64) for o in outs]
        parts.append(np.concatenate([a.reshape(len(a), -1) for a in arrays], axis=1))
    return np.concatenate(parts)
