"""Hyperparameter sweeps that resume after an interruption, and a KerasTuner search.

:func:`run_sweep` runs a trial function over the cartesian product of a grid and a list of
seeds. Every finished trial is written at once to its own JSON file (a temporary file, then
``os.replace``), so a sweep that was interrupted runs only its missing trials when called
again, and a finished sweep computes nothing. A trial whose loss or metric turns NaN (or
that raises ``FloatingPointError``) is recorded with ``diverged=True`` instead of stopping
the sweep.

:class:`SweepResult` turns the trials into plain rows (no pandas): one per trial
(:meth:`SweepResult.table`), or one per configuration with the mean and spread over seeds
(:meth:`SweepResult.aggregate`). :func:`usable_range` reads off the range of a parameter
(say the learning rate) that trains stably, for conclusions computed from the results.

:class:`TrainTrial` is the usual trial function: it maps a grid point onto
:func:`bnutils.training.train` and a model builder. :func:`keras_tuner_search` searches the
learning rate, batch size and BN momentum of a BN model with KerasTuner's random search.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import numbers
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnutils import config as _config

__all__ = [
    "SWEEP_FORMAT",
    "SweepResult",
    "TrainTrial",
    "TunerSearchResult",
    "UsableRange",
    "grid_points",
    "init_config",
    "keras_tuner_search",
    "load_sweep",
    "log_grid",
    "run_sweep",
    "usable_range",
]

SWEEP_FORMAT = 1
_TRAIN_KEYS = ("lr", "batch_size", "optimizer", "epochs")
_BN_KEYS = {"bn_momentum": "momentum", "renorm": "renorm", "bn_epsilon": "epsilon"}


# ---------------------------------------------------------------- grids


def log_grid(low: float, high: float, num: int, digits: int = 3) -> list[float]:
    """``num`` values spaced evenly on a log scale from ``low`` to ``high`` (both included).

    Values are rounded to ``digits`` significant digits so they read well as keys.

    Raises:
        ValueError: ``low`` or ``high`` not positive, ``low >= high`` or ``num < 2``.
    """
    if not (low > 0 and high > 0 and low < high) or int(num) < 2:
        raise ValueError(
            f"Expected 0 < low < high and num >= 2, received low={low!r}, high={high!r}, "
            f"num={num!r}."
        )
    return [float(f"{v:.{digits}g}") for v in np.geomspace(low, high, int(num))]


def grid_points(grid: Mapping[str, Sequence]) -> list[dict]:
    """The cartesian product of ``grid`` as a list of dicts, first key varying slowest.

    Raises:
        ValueError: the grid is empty or a key has no values.
        TypeError: a value is not a JSON scalar (number, string, bool, None) or a list of them.
    """
    grid = _check_grid(grid)
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def _json_value(value, where: str):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where) for v in value]
    raise TypeError(
        f"{where} must hold JSON values (numbers, strings, booleans, None or lists of them), "
        f"received {value!r} of type {type(value).__name__}. Use a name (e.g. the string "
        "'he_normal') and turn it into an object inside the trial function."
    )


def _check_grid(grid) -> dict[str, list]:
    if not isinstance(grid, Mapping) or not grid:
        raise ValueError(
            f"`grid` must be a non-empty dict mapping parameter names to lists of values, "
            f"received {grid!r}."
        )
    out = {}
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise ValueError(
                f"grid[{key!r}] must be a list of values, received {values!r}. Wrap a single "
                f"value in a list: grid[{key!r}] = [{values!r}]."
            )
        values = [_json_value(v, f"grid[{key!r}]") for v in values]
        if not values:
            raise ValueError(f"grid[{key!r}] is empty; expected at least one value.")
        out[str(key)] = values
    return out


def _check_seeds(seeds) -> list[int]:
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"`seeds` as a count must be >= 1, received {seeds}.")
        return list(range(int(seeds)))
    try:
        seeds = list(seeds)
    except TypeError:
        seeds = None
    if not seeds or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0
                        for s in seeds):
        raise ValueError(
            f"`seeds` must be a count (e.g. 3 for seeds 0, 1, 2) or a non-empty list of "
            f"non-negative integers, received {seeds!r}."
        )
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"`seeds` has repeated values: {seeds!r}.")
    return [int(s) for s in seeds]


# ---------------------------------------------------------------- trial records on disk


def _slug(text: str, limit: int = 60) -> str:
    s = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text).strip("_.")
    return s[:limit] or "trial"


def _trial_id(params: dict, seed: int, context) -> str:
    spec = json.dumps({"params": params, "seed": seed, "context": context}, sort_keys=True)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
    label = "_".join(f"{k}={v}" for k, v in params.items())
    return f"{_slug(label)}_s{seed}-{digest}"


def _clean(obj):
    """JSON-ready copy: NaN and infinities become ``None``."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def _write_json(path: Path, data: dict) -> None:
    """Write atomically: a reader sees the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(_clean(data), indent=1, allow_nan=False))
    os.replace(tmp, path)


def _read_trial(path: Path, params: dict, seed: int) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (record.get("format") != SWEEP_FORMAT or record.get("params") != params
            or record.get("seed") != seed or not isinstance(record.get("metrics"), dict)):
        return None
    record["metrics"] = {k: (math.nan if v is None else v) for k, v in record["metrics"].items()}
    return record


# ---------------------------------------------------------------- trial outputs


def _is_bad_number(value) -> bool:
    return (isinstance(value, (float, np.floating)) and not math.isfinite(value))


def _metrics_from(output) -> tuple[dict, bool, str | None]:
    """``(metrics, diverged, message)`` from what a trial function returned."""
    if hasattr(output, "val_accuracy") and hasattr(output, "diverged"):  # a TrainResult
        return _train_metrics(output), bool(output.diverged), output.divergence_message
    if isinstance(output, Mapping):
        metrics = {str(k): _json_value(v, "a trial's metrics") if not _is_bad_number(v)
                   else float(v) for k, v in output.items()}
        flag = bool(metrics.pop("diverged", False))
        message = metrics.pop("divergence_message", None)
    elif isinstance(output, numbers.Real) and not isinstance(output, bool):
        metrics, flag, message = {"value": float(output)}, False, None
    else:
        raise TypeError(
            f"A trial function must return a dict of metrics, a number or a TrainResult, "
            f"received {type(output).__name__}."
        )
    bad = [k for k, v in metrics.items() if _is_bad_number(v)]
    if bad and not flag:
        flag = True
        message = message or f"non-finite metrics: {', '.join(bad)}"
    return metrics, flag, message


def _train_metrics(result) -> dict:
    return {
        "val_accuracy": float(result.final_val_accuracy),
        "best_val_accuracy": float(result.best_val_accuracy),
        "val_loss": float(result.val_loss[-1]) if result.val_loss else math.nan,
        "train_loss": float(result.train_loss[-1]) if result.train_loss else math.nan,
        "train_accuracy": float(result.train_accuracy[-1]) if result.train_accuracy else math.nan,
        "epochs_run": int(result.epochs_run),
        "train_seconds": float(result.total_time),
        "val_accuracy_curve": [float(v) for v in result.val_accuracy],
    }


def _is_numeric_failure(error: BaseException) -> bool:
    if isinstance(error, FloatingPointError):
        return True
    text = str(error).lower()
    return type(error).__name__ == "InvalidArgumentError" and ("nan" in text or "inf" in text)


# ---------------------------------------------------------------- the runner


def run_sweep(
    name: str,
    grid: Mapping[str, Sequence],
    trial_fn: Callable[[dict, int], Any],
    seeds: int | Sequence[int],
    results_dir: str | os.PathLike | None = None,
    force: bool = False,
    *,
    context: Any = None,
    verbose: bool = True,
) -> SweepResult:
    """Run ``trial_fn(params, seed)`` over every grid point and seed, resuming finished work.

    Each finished trial is saved at once as ``<results_dir>/<trial id>.json``; the id hashes
    the parameters, the seed and ``context``. Calling the function again with the same
    arguments reads those files and runs only the trials that are missing (an interrupted
    sweep resumes; a finished one computes nothing).

    Args:
        name: the sweep's name (a folder under ``results/sweeps/`` by default).
        grid: parameter name -> list of values (JSON values); every combination is a
            configuration, the first key varying slowest.
        trial_fn: ``trial_fn(params: dict, seed: int)`` returning a dict of metrics, a number
            (stored as ``"value"``) or a :class:`bnutils.training.TrainResult`. A non-finite
            metric, a ``"diverged": True`` entry, a diverged TrainResult or a
            ``FloatingPointError`` marks the trial diverged; any other exception (and
            ``KeyboardInterrupt``) stops the sweep, with every trial finished so far saved.
        seeds: a count (``3`` means seeds 0, 1, 2) or a list of seeds.
        results_dir: folder of the trial files (default ``results/sweeps/<name>``).
        force: run every trial again and overwrite its file (a trial function with a
            cache of its own, like :class:`TrainTrial`, has its own ``force``).
        context: anything JSON-able that the results depend on but the grid does not show
            (data sizes, epochs, the model); it is part of every trial's id, so a change
            starts fresh trials. Default: ``trial_fn.context`` when it has one.
        verbose: print one line per trial run.

    Returns:
        A :class:`SweepResult` with one record per (configuration, seed), in grid order.

    Raises:
        ValueError: empty or malformed ``grid``, bad ``seeds`` or ``name``.
        TypeError: ``trial_fn`` is not callable or returns something unusable.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"`name` must be a non-empty string, received {name!r}.")
    if not callable(trial_fn):
        raise TypeError(
            f"`trial_fn` must be callable as trial_fn(params, seed), received "
            f"{type(trial_fn).__name__}."
        )
    grid = _check_grid(grid)
    seed_list = _check_seeds(seeds)
    if context is None:
        context = getattr(trial_fn, "context", None)
    context = _clean(context)
    folder = (Path(results_dir) if results_dir is not None
              else _config.results_dir("sweeps", _slug(name, 80)))
    folder.mkdir(parents=True, exist_ok=True)

    jobs = [(p, s) for p in grid_points(grid) for s in seed_list]
    records: list[dict | None] = []
    for params, seed in jobs:
        path = folder / f"{_trial_id(params, seed, context)}.json"
        records.append(None if force else _read_trial(path, params, seed))
    cached = sum(r is not None for r in records)
    todo = len(jobs) - cached
    if verbose:
        print(f"Sweep {name!r}: {len(jobs)} trials ({len(jobs) // len(seed_list)} configurations "
              f"x {len(seed_list)} seeds), {cached} already done, {todo} to run.")

    done = 0
    for i, (params, seed) in enumerate(jobs):
        if records[i] is not None:
            continue
        trial_id = _trial_id(params, seed, context)
        start = time.perf_counter()
        try:
            output = trial_fn(dict(params), seed)
            metrics, diverged, message = _metrics_from(output)
        except Exception as error:  # noqa: BLE001 - only numeric failures are recorded
            if not _is_numeric_failure(error):
                raise
            metrics, diverged = {}, True
            message = f"{type(error).__name__}: {error}"
        record = {
            "format": SWEEP_FORMAT, "sweep": name, "trial_id": trial_id, "params": params,
            "seed": seed, "context": context, "metrics": metrics, "diverged": diverged,
            "message": message, "seconds": time.perf_counter() - start,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        _write_json(folder / f"{trial_id}.json", record)
        records[i] = record
        done += 1
        if verbose:
            print(f"  [{cached + done}/{len(jobs)}] {_describe(params)} seed={seed}: "
                  f"{_headline(metrics, diverged)} ({record['seconds']:.1f} s)")
    return SweepResult(name=name, grid=grid, seeds=seed_list, trials=records,
                       computed=done, cached=cached, directory=str(folder))


def load_sweep(name: str, results_dir: str | os.PathLike | None = None) -> list[dict]:
    """Every trial record saved for sweep ``name`` (any grid, seeds or context), unordered.

    Raises:
        FileNotFoundError: no folder for that sweep.
    """
    folder = (Path(results_dir) if results_dir is not None
              else _config.results_dir("sweeps", _slug(name, 80), create=False))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"No saved sweep {name!r}: the folder {folder} does not exist. Run it with "
            "run_sweep() first."
        )
    out = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "params" in record and "seed" in record:
            out.append(record)
    return out


def _describe(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _headline(metrics: dict, diverged: bool) -> str:
    if diverged:
        return "DIVERGED"
    for key in ("val_accuracy", "accuracy", "value"):
        if isinstance(metrics.get(key), (int, float)):
            return f"{key}={metrics[key]:.4f}"
    scalars = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))]
    return ", ".join(f"{k}={v:.4g}" for k, v in scalars[:3]) or "done"


# ---------------------------------------------------------------- results


@dataclasses.dataclass
class SweepResult:
    """The trials of one sweep, in grid order (configurations, then seeds).

    Attributes:
        name: the sweep's name.
        grid: parameter name -> values.
        seeds: the seeds.
        trials: one record per trial: ``params``, ``seed``, ``metrics``, ``diverged``,
            ``message``, ``seconds``, ``trial_id``.
        computed: trials run by this call.
        cached: trials read from disk.
        directory: the folder of the trial files.
    """

    name: str
    grid: dict[str, list]
    seeds: list[int]
    trials: list[dict]
    computed: int = 0
    cached: int = 0
    directory: str | None = None

    @property
    def keys(self) -> list[str]:
        """The parameter names, in grid order."""
        return list(self.grid)

    def __len__(self) -> int:
        return len(self.trials)

    def table(self) -> list[dict]:
        """One flat row per trial: parameters, ``seed``, ``diverged`` and scalar metrics."""
        rows = []
        for t in self.trials:
            row = dict(t["params"])
            row["seed"] = t["seed"]
            row["diverged"] = bool(t["diverged"])
            row.update({k: v for k, v in t["metrics"].items() if not isinstance(v, list)})
            rows.append(row)
        return rows

    def aggregate(self, metric: str = "val_accuracy") -> list[dict]:
        """One row per configuration: mean and spread of ``metric`` over seeds.

        Diverged trials are left out of the statistics and counted in ``n_diverged``.

        Returns:
            Rows with the parameters plus ``n`` (seeds), ``n_diverged``,
            ``diverged_fraction``, ``mean``, ``std`` (sample, NaN for fewer than two
            values), ``min`` and ``max`` (NaN when every seed diverged).
        """
        groups: dict[str, list[dict]] = {}
        for t in self.trials:
            groups.setdefault(json.dumps(t["params"], sort_keys=True), []).append(t)
        rows = []
        for trials in groups.values():
            values = [float(t["metrics"][metric]) for t in trials
                      if not t["diverged"] and _finite(t["metrics"].get(metric))]
            n_div = sum(bool(t["diverged"]) for t in trials)
            if not values and n_div < len(trials):
                raise KeyError(
                    f"Metric {metric!r} not found in sweep {self.name!r}. Available: "
                    f"{sorted(self.metric_names())}."
                )
            arr = np.asarray(values, dtype=float)
            row = dict(trials[0]["params"])
            row.update({
                "n": len(trials), "n_diverged": n_div, "diverged_fraction": n_div / len(trials),
                "mean": float(arr.mean()) if arr.size else math.nan,
                "std": float(arr.std(ddof=1)) if arr.size > 1 else math.nan,
                "min": float(arr.min()) if arr.size else math.nan,
                "max": float(arr.max()) if arr.size else math.nan,
            })
            rows.append(row)
        return rows

    def metric_names(self) -> set[str]:
        """Every metric name some trial recorded."""
        return {k for t in self.trials for k in t["metrics"]}

    def where(self, **fixed) -> SweepResult:
        """The trials whose parameters equal ``fixed`` (e.g. ``where(norm="batch")``).

        Raises:
            KeyError: a name is not a grid parameter.
            ValueError: a value is not in the grid.
        """
        grid = dict(self.grid)
        for key, value in fixed.items():
            if key not in grid:
                raise KeyError(f"{key!r} is not a parameter of sweep {self.name!r}; "
                               f"expected one of {self.keys}.")
            value = _json_value(value, key)
            if value not in grid[key]:
                raise ValueError(f"{key}={value!r} is not in the grid; expected one of "
                                 f"{grid[key]}.")
            grid[key] = [value]
        trials = [t for t in self.trials
                  if all(t["params"][k] == grid[k][0] for k in fixed)]
        return dataclasses.replace(self, grid=grid, trials=trials)

    def best(self, metric: str = "val_accuracy", mode: str = "max") -> dict:
        """The aggregate row with the best mean ``metric`` among configurations that never
        diverged (all configurations when every one diverged at least once).

        Raises:
            ValueError: ``mode`` is not ``"max"`` or ``"min"``, or no configuration has a value.
        """
        if mode not in ("max", "min"):
            raise ValueError(f"`mode` must be 'max' or 'min', received {mode!r}.")
        rows = [r for r in self.aggregate(metric) if _finite(r["mean"])]
        stable = [r for r in rows if r["n_diverged"] == 0] or rows
        if not stable:
            raise ValueError(f"Every trial of sweep {self.name!r} diverged; no best {metric}.")
        pick = max if mode == "max" else min
        return pick(stable, key=lambda r: r["mean"])

    def pivot(self, rows: str, cols: str, metric: str = "val_accuracy", stat: str = "mean"):
        """A 2-D array of ``stat`` of ``metric`` over two parameters (for a heatmap).

        Any other parameter must have a single value (select one with :meth:`where`).

        Returns:
            ``(row_values, col_values, array)``; ``array[i, j]`` is NaN where nothing was
            measured (or every seed diverged, for ``stat="mean"``).
        """
        self._check_only(rows, cols)
        row_vals, col_vals = self.grid[rows], self.grid[cols]
        out = np.full((len(row_vals), len(col_vals)), np.nan)
        for r in self.aggregate(metric):
            out[row_vals.index(r[rows]), col_vals.index(r[cols])] = r[stat]
        return list(row_vals), list(col_vals), out

    def curve(self, key: str, metric: str = "val_accuracy") -> dict[str, np.ndarray]:
        """``metric`` against one parameter: arrays ``x``, ``mean``, ``std``, ``diverged_fraction``.

        Any other parameter must have a single value (select one with :meth:`where`).
        """
        self._check_only(key)
        rows = sorted(self.aggregate(metric), key=lambda r: r[key])
        return {"x": np.array([r[key] for r in rows]),
                **{c: np.array([r[c] for r in rows], dtype=float)
                   for c in ("mean", "std", "min", "max", "diverged_fraction")}}

    def to_table(self, metric: str = "val_accuracy", digits: int = 4):
        """The aggregate rows as a :class:`bnutils.evaluation.Table` (Markdown in Jupyter)."""
        from bnutils.evaluation import make_table

        cols = [*self.keys, "n", "n_diverged", "mean", "std"]
        return make_table(self.aggregate(metric), columns=cols, digits=digits)

    def _check_only(self, *keys: str) -> None:
        for key in keys:
            if key not in self.grid:
                raise KeyError(f"{key!r} is not a parameter of sweep {self.name!r}; "
                               f"expected one of {self.keys}.")
        others = {k: v for k, v in self.grid.items() if k not in keys and len(v) > 1}
        if others:
            raise ValueError(
                f"Sweep {self.name!r} also varies {sorted(others)}; expected one value each. "
                f"Select one with .where(), e.g. .where({next(iter(others))}="
                f"{others[next(iter(others))][0]!r})."
            )


def _finite(value) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(
        value, bool) and math.isfinite(value)


# ---------------------------------------------------------------- usable range


@dataclasses.dataclass(frozen=True)
class UsableRange:
    """The values of one parameter that train stably (see :func:`usable_range`).

    Attributes:
        key: the parameter.
        metric: the metric judged.
        threshold: the largest allowed drop below ``reference``.
        reference: the score stable trials are compared with.
        low, high: the ends of the usable range (``None`` when nothing is usable).
        values: the grid values from ``low`` to ``high``.
        stable: every stable value (may have gaps, unlike ``values``).
        best_value, best_score: the value with the best mean score, and that score.
        diverged: values at which at least one seed diverged.
    """

    key: str
    metric: str
    threshold: float
    reference: float
    low: float | None
    high: float | None
    values: tuple
    stable: tuple
    best_value: Any
    best_score: float
    diverged: tuple

    @property
    def found(self) -> bool:
        return self.low is not None

    @property
    def decades(self) -> float:
        """``log10(high / low)``: the width of the range in decades (0.0 for one value)."""
        if not self.found or not (self.low > 0 and self.high > 0):
            return math.nan
        return math.log10(self.high / self.low)

    def to_dict(self) -> dict:
        return _clean({**dataclasses.asdict(self), "decades": self.decades})

    def __str__(self) -> str:
        if not self.found:
            return f"no usable {self.key} (no value within {self.threshold} of {self.reference:.4f})"
        return (f"usable {self.key}: {self.low:g} to {self.high:g} ({self.decades:.2f} decades; "
                f"{self.metric} within {self.threshold} of {self.reference:.4f}, no divergence)")


def usable_range(
    results: SweepResult | Sequence[Mapping],
    key: str = "lr",
    threshold: float = 0.05,
    metric: str = "val_accuracy",
    reference: float | None = None,
    max_diverged_fraction: float = 0.0,
) -> UsableRange:
    """The contiguous range of ``key`` around the best value where training is stable.

    A value is *stable* when at most ``max_diverged_fraction`` of its seeds diverged and its
    mean ``metric`` is at least ``reference - threshold``. The usable range is the run of
    consecutive stable grid values (sorted by ``key``) that contains the best value.

    Args:
        results: a :class:`SweepResult` that varies only ``key`` (narrow it with
            :meth:`SweepResult.where`), or its :meth:`~SweepResult.aggregate` rows.
        key: the parameter.
        threshold: the largest drop of the mean ``metric`` below ``reference``.
        metric: the metric (higher is better).
        reference: the score to compare with; default the best stable mean in ``results``.
            Pass a common reference (e.g. the best of two sweeps) to compare sweeps fairly.
        max_diverged_fraction: share of diverged seeds still counted as stable.

    Returns:
        A :class:`UsableRange` (``found`` is False when no value qualifies).

    Raises:
        ValueError: ``results`` varies other parameters, or ``threshold`` is negative.
        KeyError: ``key`` is not a parameter.
    """
    if not threshold >= 0:
        raise ValueError(f"`threshold` must be >= 0, received {threshold!r}.")
    if isinstance(results, SweepResult):
        results._check_only(key)
        rows = results.aggregate(metric)
    else:
        rows = [dict(r) for r in results]
        if rows and key not in rows[0]:
            raise KeyError(f"{key!r} is not a column of the rows; columns: {sorted(rows[0])}.")
    rows = sorted(rows, key=lambda r: r[key])
    ok = [r["diverged_fraction"] <= max_diverged_fraction and _finite(r["mean"]) for r in rows]
    candidates = [r for r, good in zip(rows, ok, strict=True) if good]
    best = max(candidates, key=lambda r: r["mean"]) if candidates else None
    ref = float(reference) if reference is not None else (best["mean"] if best else math.nan)
    stable = [good and r["mean"] >= ref - threshold for r, good in zip(rows, ok, strict=True)]
    diverged = tuple(r[key] for r in rows if r["n_diverged"] > 0)
    if best is None or not any(stable):
        return UsableRange(key, metric, float(threshold), ref, None, None, (), (),
                           best[key] if best else None, best["mean"] if best else math.nan,
                           diverged)
    # Centre the run on the best value if it is stable, else on the best stable value.
    stable_rows = [i for i, s in enumerate(stable) if s]
    centre = rows.index(best) if stable[rows.index(best)] else max(
        stable_rows, key=lambda i: rows[i]["mean"])
    lo = hi = centre
    while lo > 0 and stable[lo - 1]:
        lo -= 1
    while hi < len(rows) - 1 and stable[hi + 1]:
        hi += 1
    return UsableRange(
        key=key, metric=metric, threshold=float(threshold), reference=ref,
        low=rows[lo][key], high=rows[hi][key],
        values=tuple(r[key] for r in rows[lo:hi + 1]),
        stable=tuple(r[key] for r, s in zip(rows, stable, strict=True) if s),
        best_value=best[key], best_score=float(best["mean"]), diverged=diverged,
    )


# ---------------------------------------------------------------- trials built on train()


def init_config(scale: float) -> dict:
    """A Keras initializer config: He-normal with its standard deviation times ``scale``.

    A config dict, not an initializer object, so each layer builds its own (seeded) one.
    """
    return {"class_name": "VarianceScaling",
            "config": {"scale": 2.0 * float(scale) ** 2, "mode": "fan_in",
                       "distribution": "truncated_normal"}}


class TrainTrial:
    """A trial function for :func:`run_sweep` that trains with :func:`bnutils.training.train`.

    A grid point is split into arguments of ``train`` and of the model builder:

    - ``lr``, ``batch_size``, ``optimizer``, ``epochs`` go to ``train``;
    - ``bn_momentum``, ``renorm``, ``bn_epsilon`` go into the builder's ``bn_kwargs``;
    - ``init_scale`` becomes ``kernel_initializer=init_config(init_scale)`` (He-normal with
      its standard deviation multiplied by ``init_scale``);
    - ``variant`` names one of ``variants``, a set of builder arguments (e.g.
      ``{"BN + renorm": {"norm": "batch", "bn_kwargs": {"renorm": True}}}``);
    - everything else (``norm``, ``widths``, ...) is a keyword argument of the builder.

    BN arguments are dropped for a configuration whose ``norm`` is not ``"batch"``, so a grid
    may cross ``norm`` with ``bn_momentum``.

    Args:
        data: a :class:`bnutils.data.Dataset`.
        builder: a function returning a ``keras.Model`` (default
            :func:`bnutils.models.build_mlp`).
        epochs: epochs per trial (a grid's ``epochs`` overrides it).
        batch_size, optimizer, lr: defaults of the ``train`` arguments.
        builder_kwargs: fixed keyword arguments of the builder.
        variants: name -> builder arguments, selected by a grid's ``variant``.
        evaluate: optional ``evaluate(model, result, params) -> dict`` whose metrics are
            added to the trial's (e.g. accuracy after precise BN). The model is saved with
            the run so that ``evaluate`` also works on a cached run.
        results_dir, force: passed to ``train`` (its own run cache).
        run_name: prefix of the cached runs' names.
    """

    def __init__(
        self,
        data: Any,
        builder: Callable[..., Any] | None = None,
        *,
        epochs: int,
        batch_size: int = 128,
        optimizer: str = "adam",
        lr: float | None = None,
        builder_kwargs: Mapping[str, Any] | None = None,
        variants: Mapping[str, Mapping[str, Any]] | None = None,
        evaluate: Callable[[Any, Any, dict], Mapping] | None = None,
        results_dir: str | os.PathLike | None = None,
        force: bool = False,
        run_name: str | None = None,
    ):
        if builder is None:
            from bnutils.models import build_mlp as builder
        if not callable(builder):
            raise TypeError(f"`builder` must be a function returning a keras.Model, received "
                            f"{type(builder).__name__}.")
        self.data = data
        self.builder = builder
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.optimizer = optimizer
        self.lr = lr
        self.builder_kwargs = dict(builder_kwargs or {})
        self.variants = {str(k): dict(v) for k, v in (variants or {}).items()}
        self.evaluate = evaluate
        self.results_dir = results_dir
        self.force = force
        self.run_name = run_name or getattr(builder, "__name__", "trial")

    @property
    def context(self) -> dict:
        """What the results depend on besides the grid point (part of every trial id)."""
        x = np.asarray(self.data.x_train)
        step = max(1, len(x) // 256)
        digest = hashlib.sha256(np.ascontiguousarray(x[::step]).tobytes()).hexdigest()[:12]
        return _clean({
            "builder": f"{getattr(self.builder, '__module__', '?')}."
                       f"{getattr(self.builder, '__qualname__', type(self.builder).__name__)}",
            "builder_kwargs": _describe_value(self.builder_kwargs),
            "variants": _describe_value(self.variants),
            "data": {"name": getattr(self.data, "name", "?"), "train": len(self.data.x_train),
                     "val": len(self.data.x_val), "digest": digest},
            "epochs": self.epochs, "batch_size": self.batch_size,
            "optimizer": str(self.optimizer), "lr": self.lr,
            "evaluate": None if self.evaluate is None else getattr(
                self.evaluate, "__qualname__", type(self.evaluate).__name__),
        })

    def split(self, params: Mapping[str, Any]) -> tuple[dict, dict]:
        """``(builder_kwargs, train_kwargs)`` for one grid point.

        Raises:
            KeyError: ``params["variant"]`` is not one of ``variants``.
        """
        build = dict(self.builder_kwargs)
        fit = {"epochs": self.epochs, "batch_size": self.batch_size,
               "optimizer": self.optimizer, "lr": self.lr}
        params = dict(params)
        if "variant" in params:
            name = params.pop("variant")
            if name not in self.variants:
                raise KeyError(f"Unknown variant {name!r}; expected one of "
                               f"{sorted(self.variants)} (the `variants` of this TrainTrial).")
            build.update(self.variants[name])
        bn = dict(build.get("bn_kwargs") or {})
        for key, value in params.items():
            if key in _TRAIN_KEYS:
                fit[key] = value
            elif key in _BN_KEYS:
                bn[_BN_KEYS[key]] = value
            elif key == "init_scale":
                build["kernel_initializer"] = init_config(value)
            else:
                build[key] = value
        if bn:
            build["bn_kwargs"] = bn
        if build.get("norm", "batch") != "batch":
            build.pop("bn_kwargs", None)
        if fit["lr"] is not None:
            fit["lr"] = float(fit["lr"])  # Keras rejects an int learning rate
        return build, fit

    def __call__(self, params: dict, seed: int) -> dict:
        from bnutils.training import train

        build, fit = self.split(params)
        result = train(functools.partial(self.builder, **build), self.data, seed=seed,
                       results_dir=self.results_dir, force=self.force, run_name=self.run_name,
                       save_model=self.evaluate is not None, **fit)
        metrics = _train_metrics(result)
        metrics["diverged"] = bool(result.diverged)
        if result.divergence_message:
            metrics["divergence_message"] = result.divergence_message
        if self.evaluate is not None and not result.diverged:
            metrics.update(self.evaluate(result.model, result, dict(params)))
        return metrics


def _describe_value(value):
    if isinstance(value, Mapping):
        return {str(k): _describe_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_describe_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return getattr(value, "__qualname__", repr(value))


# ---------------------------------------------------------------- KerasTuner


@dataclasses.dataclass
class TunerSearchResult:
    """What :func:`keras_tuner_search` found.

    Attributes:
        best: the best hyperparameters (``lr``, ``batch_size``, ``bn_momentum``).
        best_score: their validation accuracy (best epoch).
        trials: one dict per finished trial: ``trial_id``, the hyperparameters, ``score``,
            ``status``; best first.
        directory: the tuner's folder (rerunning with the same one resumes the search).
        seconds: wall time of this call.
        tuner: the ``keras_tuner`` tuner (not saved).
    """

    best: dict
    best_score: float
    trials: list[dict]
    directory: str
    seconds: float
    tuner: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return _clean({"best": self.best, "best_score": self.best_score,
                       "trials": self.trials, "directory": self.directory})

    def to_table(self, digits: int = 4):
        """The trials as a :class:`bnutils.evaluation.Table` (Markdown in Jupyter)."""
        from bnutils.evaluation import make_table

        return make_table(self.trials, digits=digits)


def keras_tuner_search(
    data: Any,
    profile: Any = None,
    *,
    builder: Callable[..., Any] | None = None,
    lr_range: tuple[float, float] = (1e-4, 3e-2),
    batch_sizes: Sequence[int] = (32, 64, 128, 256),
    momentums: Sequence[float] = (0.9, 0.99, 0.999),
    optimizer: str = "adam",
    max_trials: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
    directory: str | os.PathLike | None = None,
    project_name: str | None = None,
    overwrite: bool = False,
    verbose: int | None = None,
) -> TunerSearchResult:
    """Random search over learning rate, batch size and BN momentum of a BN model.

    Uses ``keras_tuner.RandomSearch`` (objective: validation accuracy). The learning rate is
    drawn log-uniformly from ``lr_range``; batch size and momentum from the given choices.
    The search state lives in ``directory``/``project_name``: calling again resumes it and
    trains only trials not yet finished (``overwrite=True`` starts over).

    Args:
        data: a :class:`bnutils.data.Dataset` (trains on ``x_train``, scores on ``x_val``).
        profile: a :class:`bnutils.config.Profile` giving ``tuner_trials`` and ``epochs``
            (default: the active profile).
        builder: ``builder(bn_momentum=...)`` returning a ``keras.Model``; default
            :func:`bnutils.models.build_mlp` with ``norm="batch"``.
        lr_range: ``(low, high)`` of the learning rate.
        batch_sizes, momentums: the choices.
        optimizer: ``"adam"``, ``"sgd"`` or ``"momentum"`` (SGD with momentum 0.9).
        max_trials, epochs: override the profile's ``tuner_trials`` and ``epochs``.
        seed: seeds the search and each trial's weights and shuffling.
        directory: the tuner's folder (default ``results/tuner``).
        project_name: subfolder (default ``bn_mlp_<profile name>_<hash of the search
            settings>``, so a changed search starts afresh instead of clashing).
        overwrite: discard an earlier search in the same folder.
        verbose: Keras verbosity (default chosen by :func:`bnutils.training.resolve_verbose`).

    Returns:
        A :class:`TunerSearchResult`.

    Raises:
        ImportError: ``keras-tuner`` or ``tensorboard`` is not installed.
        ValueError: bad ranges or choices.
    """
    missing = [pkg for pkg in ("keras_tuner", "tensorboard")
               if importlib.util.find_spec(pkg) is None]
    if missing:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"keras_tuner_search needs keras-tuner, which with the TensorFlow backend also "
            f"imports tensorboard; missing: {missing}. Install them with "
            "`pip install keras-tuner==1.4.8 tensorboard==2.21.0`."
        )
    import keras
    import keras_tuner as kt

    from bnutils.evaluation import ends_in_softmax
    from bnutils.pipeline import make_tf_dataset
    from bnutils.repro import set_seed
    from bnutils.training import resolve_verbose

    profile = profile if profile is not None else _config.get_profile()
    max_trials = int(max_trials if max_trials is not None else profile.tuner_trials)
    epochs = int(epochs if epochs is not None else profile.epochs)
    low, high = (float(v) for v in lr_range)
    if not 0 < low < high:
        raise ValueError(f"`lr_range` must be (low, high) with 0 < low < high, received "
                         f"{lr_range!r}.")
    batch_sizes = [int(b) for b in batch_sizes]
    momentums = [float(m) for m in momentums]
    if not batch_sizes or min(batch_sizes) < 1 or not momentums or not all(
            0 <= m < 1 for m in momentums):
        raise ValueError(
            f"Expected positive batch sizes and momentums in [0, 1), received "
            f"batch_sizes={batch_sizes!r}, momentums={momentums!r}."
        )
    optimizers = {"adam": lambda lr: keras.optimizers.Adam(learning_rate=lr),
                  "sgd": lambda lr: keras.optimizers.SGD(learning_rate=lr),
                  "momentum": lambda lr: keras.optimizers.SGD(learning_rate=lr, momentum=0.9)}
    if optimizer not in optimizers:
        raise ValueError(f"`optimizer` must be one of {sorted(optimizers)}, received "
                         f"{optimizer!r}.")
    if max_trials < 1 or epochs < 1:
        raise ValueError(f"max_trials and epochs must be >= 1, received {max_trials}, {epochs}.")
    if builder is None:
        from bnutils.models import build_mlp

        def builder(bn_momentum: float):
            return build_mlp(norm="batch", bn_kwargs={"momentum": bn_momentum})

    folder = Path(directory) if directory is not None else _config.results_dir("tuner")
    space = json.dumps([low, high, batch_sizes, momentums, optimizer, max_trials, epochs, seed,
                        len(data.x_train), len(data.x_val), getattr(builder, "__qualname__", "")])
    project = project_name or (f"bn_mlp_{getattr(profile, 'name', 'custom')}_"
                               f"{hashlib.sha256(space.encode()).hexdigest()[:8]}")
    verbose = resolve_verbose(verbose)

    class _BNHyperModel(kt.HyperModel):
        def build(self, hp):
            lr = hp.Float("lr", low, high, sampling="log")
            hp.Choice("batch_size", batch_sizes)
            momentum = hp.Choice("bn_momentum", momentums)
            set_seed(seed)
            model = builder(bn_momentum=momentum)
            model.compile(
                optimizer=optimizers[optimizer](lr),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=not ends_in_softmax(model)),
                metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            )
            return model

        def fit(self, hp, model, *args, **kwargs):
            train_ds = make_tf_dataset(data.x_train, data.y_train,
                                       batch_size=hp.get("batch_size"), shuffle=True, seed=seed)
            val_ds = make_tf_dataset(data.x_val, data.y_val, batch_size=256, shuffle=False)
            callbacks = [*kwargs.get("callbacks", []), keras.callbacks.TerminateOnNaN()]
            return model.fit(train_ds, validation_data=val_ds, epochs=epochs,
                             callbacks=callbacks, verbose=verbose, shuffle=False)

    start = time.perf_counter()
    tuner = kt.RandomSearch(
        _BNHyperModel(), objective=kt.Objective("val_accuracy", direction="max"),
        max_trials=max_trials, seed=seed, directory=str(folder), project_name=project,
        overwrite=overwrite, max_consecutive_failed_trials=max_trials,
    )
    tuner.search(verbose=verbose)
    trials = []
    for trial in tuner.oracle.get_best_trials(num_trials=len(tuner.oracle.trials)):
        score = trial.score
        trials.append({"trial_id": trial.trial_id, **trial.hyperparameters.values,
                       "score": math.nan if score is None else float(score),
                       "status": str(trial.status)})
    if not trials:
        raise RuntimeError(f"The tuner in {folder / project} finished no trial; see its log.")
    best = {k: v for k, v in trials[0].items() if k not in ("trial_id", "score", "status")}
    return TunerSearchResult(best=best, best_score=trials[0]["score"], trials=trials,
                             directory=str(folder / project),
                             seconds=time.perf_counter() - start, tuner=tuner)
