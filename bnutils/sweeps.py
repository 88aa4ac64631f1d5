"""Grid sweeps over seeds (on ``train``'s run cache) and usable ranges. Notebooks 05 and 06."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import numbers
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from bnutils import config
from bnutils._util import Progress, atomic_write_json, check_positive_int, json_safe, slug
from bnutils.results import make_table
from bnutils.training import CURVES, train

__all__ = [
    "SweepResult",
    "TrainTrial",
    "UsableRange",
    "init_config",
    "load_sweep",
    "log_grid",
    "run_sweep",
    "usable_range",
]

_TRAIN_KEYS = ("lr", "batch_size", "optimizer", "epochs")
_BN_KEYS = {"bn_momentum": "momentum", "renorm": "renorm", "bn_epsilon": "epsilon"}
_FLAGS = ("best_val_accuracy", "total_time", "diverged", "divergence_message", "from_cache")


def log_grid(low: float, high: float, num: int) -> list[float]:
    """``num`` values log-spaced from ``low`` to ``high``, to 3 significant digits."""
    num = check_positive_int("num", num, minimum=2)
    if not 0 < low < high:
        raise ValueError(f"Expected 0 < low < high, received low={low!r}, high={high!r}.")
    return [float(f"{v:.3g}") for v in np.geomspace(low, high, num)]


def init_config(scale: float) -> dict:
    """A Keras initializer config: He-normal with its standard deviation times ``scale``."""
    cfg = {"scale": 2.0 * float(scale) ** 2, "mode": "fan_in", "distribution": "truncated_normal"}
    return {"class_name": "VarianceScaling", "config": cfg}


def _check_grid(grid: Any) -> dict[str, list]:
    if not isinstance(grid, Mapping) or not grid:
        raise ValueError(f"`grid` must be a non-empty dict of name -> values, received {grid!r}.")
    out = {}
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise ValueError(f"grid[{key!r}] = {values!r}: Wrap a single value in a list.")
        if not (values := list(values)):
            raise ValueError(f"grid[{key!r}] is empty; expected at least one value.")
        if bad := [v for v in values if isinstance(json_safe(v), str) and not isinstance(v, str)]:
            raise TypeError(f"grid[{key!r}] must hold JSON values, received {bad[0]!r}.")
        out[str(key)] = json_safe(values)
    return out


def _finite(value: Any, other: bool = False) -> bool:  # ``other``: for what is not a number
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return math.isfinite(value) if number else other


def _train_metrics(result: Any) -> dict:
    """The last value of each curve of a :class:`bnutils.training.TrainResult`, and its flags."""
    out = {k: getattr(result, k)[-1] if getattr(result, k) else math.nan for k in CURVES}
    return {**out, **{k: getattr(result, k) for k in _FLAGS}}


def _record(trial_fn: Callable, params: dict, seed: int) -> dict:
    """One trial: ``params``, ``seed``, ``metrics``, ``diverged``, ``message``, ``from_cache``."""
    try:
        out = trial_fn(dict(params), seed)
    except Exception as error:  # a numeric failure is a result; anything else stops the sweep
        text = f"{type(error).__name__}: {error}"
        tf_nan = text.startswith("InvalidArgumentError") and ("nan" in text or "inf" in text)
        if not (tf_nan or isinstance(error, FloatingPointError)):
            raise
        out = {"diverged": True, "divergence_message": text}
    if hasattr(out, "val_accuracy") and hasattr(out, "diverged"):  # a TrainResult
        out = _train_metrics(out)
    elif not isinstance(out, Mapping):
        raise TypeError(
            f"trial_fn must return a dict of metrics or a TrainResult; got {type(out).__name__}."
        )
    metrics = {str(k): v.item() if isinstance(v, np.generic) else v for k, v in out.items()}
    diverged, cached = bool(metrics.pop("diverged", 0)), bool(metrics.pop("from_cache", 0))
    message = metrics.pop("divergence_message", None)
    if not diverged and (bad := [k for k, v in metrics.items() if not _finite(v, True)]):
        diverged, message = True, f"non-finite metrics: {', '.join(bad)}"
    record = {"params": params, "seed": seed, "metrics": metrics, "diverged": diverged}
    return {**record, "message": message, "from_cache": cached}


class TrainTrial:
    """A :func:`run_sweep` trial that trains ``builder`` on ``data`` with ``train``. Notebook 06.

    Grid keys ``lr``, ``batch_size``, ``optimizer``, ``epochs`` override ``**fit`` (``train``'s
    arguments, ``epochs`` required); ``bn_momentum``, ``renorm``, ``bn_epsilon`` go to the
    builder's ``bn_kwargs`` (dropped unless ``norm`` is ``"batch"``); ``init_scale`` makes
    ``init_config(init_scale)`` kernels; ``variant`` picks from ``variants``; other keys, like
    ``builder_kwargs``, are builder arguments. ``measure(model, data) -> dict`` adds metrics,
    computed inside the run and saved in its record (``train``'s ``measure``).
    """

    def __init__(
        self,
        data: Any,
        builder: Callable[..., Any],
        builder_kwargs: Mapping[str, Any] | None = None,
        variants: Mapping[str, Mapping[str, Any]] | None = None,
        measure: Callable[[Any, Any], dict] | None = None,
        **fit: Any,
    ):
        if not callable(builder) or "epochs" not in fit:
            raise TypeError(
                "Expected TrainTrial(data, builder, epochs=..., **train_kwargs) with a callable "
                f"builder, received builder={builder!r} and train arguments {sorted(fit)}."
            )
        self.data = data
        self.builder = builder
        self.measure = measure
        self.fit = fit
        self.builder_kwargs = dict(builder_kwargs or {})
        self.variants = {str(k): dict(v) for k, v in (variants or {}).items()}

    def split(self, params: Mapping[str, Any]) -> tuple[dict, dict]:
        """``(builder_kwargs, train_kwargs)`` for one grid point (``KeyError``: unknown variant)."""
        build, fit, params = dict(self.builder_kwargs), dict(self.fit), dict(params)
        if "variant" in params:
            if (name := params.pop("variant")) not in self.variants:
                raise KeyError(f"Unknown variant {name!r}; expected one of {list(self.variants)}.")
            build.update(self.variants[name])
        bn = dict(build.get("bn_kwargs") or {})
        if "init_scale" in params:
            params["kernel_initializer"] = init_config(params.pop("init_scale"))
        for key, value in params.items():
            into = fit if key in _TRAIN_KEYS else bn if key in _BN_KEYS else build
            into[_BN_KEYS.get(key, key)] = value
        if bn:
            build["bn_kwargs"] = bn
        if build.get("norm", "batch") != "batch":
            build.pop("bn_kwargs", None)
        if fit.get("lr") is not None:
            fit["lr"] = float(fit["lr"])  # Keras rejects an int learning rate
        return build, fit

    def __call__(self, params: dict, seed: int) -> dict:
        build, fit = self.split(params)
        name = getattr(self.builder, "__name__", None)
        builder = functools.partial(self.builder, **build)
        if self.measure is not None:
            fit["measure"] = self.measure
        result = train(builder, self.data, seed=seed, run_name=name, **fit)
        return {**_train_metrics(result), **result.measured}


def _sweep_path(name: str, create: bool = True):
    return config.results_dir("sweeps", create=create) / f"{slug(name)}.json"


def run_sweep(
    name: str, grid: Mapping, trial_fn: Callable, seeds: int | Sequence, *, verbose: bool = False
) -> SweepResult:
    """Run ``trial_fn(params, seed)`` for every grid point and seed; save it for :func:`load_sweep`.

    Args:
        name: the sweep's file is ``results/sweeps/<slug of name>.json``.
        grid: parameter -> list of JSON values; the first key varies slowest.
        trial_fn: returns a dict of metrics or a ``TrainResult``. A non-finite metric,
            ``"diverged": True`` or a ``FloatingPointError`` marks the trial diverged.
        seeds: a count (``3``: seeds 0, 1, 2) or a list of distinct seeds.
        verbose: also print each trial's progress line to stderr; the line is written to the
            job log ``$BNUTILS_LOG`` when that is set, as ``make run`` does (and echoes it).
    """
    if not isinstance(name, str) or not name.strip() or not callable(trial_fn):
        raise TypeError(
            f"Need a name and a callable trial_fn(params, seed), received {name!r}, {trial_fn!r}."
        )
    grid = _check_grid(grid)
    if not isinstance(seeds, Iterable):
        seeds = range(check_positive_int("seeds", seeds))
    seeds = [check_positive_int("seeds[i]", s, minimum=0) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"`seeds` must be a count or distinct seeds, received {seeds}.")
    points = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]
    trials = []
    progress = Progress(len(points) * len(seeds), f"sweep {name}", echo=verbose)
    for params, seed in itertools.product(points, seeds):
        start = time.perf_counter()
        trials.append(t := _record(trial_fn, params, seed))
        score = t["metrics"].get("val_accuracy", math.nan)
        state = "DIVERGED" if t["diverged"] else f"val. accuracy {score:.4f}"
        label = f"{json.dumps(params)} seed {seed} ({state})"
        progress.done(label, time.perf_counter() - start, from_record=t["from_cache"])
    cached = sum(t["from_cache"] for t in trials)
    result = SweepResult(
        name=name,
        grid=grid,
        seeds=seeds,
        trials=trials,
        computed=len(trials) - cached,
        cached=cached,
    )
    result.path = str(atomic_write_json(_sweep_path(name), dataclasses.asdict(result)))
    return result


def load_sweep(name: str) -> SweepResult:
    """The sweep ``name`` as :func:`run_sweep` saved it last; ``FileNotFoundError`` if none."""
    if not (path := _sweep_path(name, create=False)).is_file():
        raise FileNotFoundError(f"No saved sweep {name!r}: no file {path}. Run run_sweep() first.")
    try:
        saved = json.loads(path.read_text())
        for t in saved["trials"]:
            t["metrics"] = {k: math.nan if v is None else v for k, v in t["metrics"].items()}
        return SweepResult(**{**saved, "path": str(path)})
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{path} is not a sweep saved by this version of bnutils ({type(e).__name__}: {e}); "
            f"run run_sweep({name!r}, ...) again to rewrite it."
        ) from e


@dataclasses.dataclass
class SweepResult:
    """A sweep's trials in grid order; ``computed`` ran now, ``train``'s cache answered ``cached``."""

    name: str
    grid: dict[str, list]
    seeds: list[int]
    trials: list[dict]
    computed: int = 0
    cached: int = 0
    path: str | None = None

    def aggregate(self, metric: str = "val_accuracy") -> list[dict]:
        """Per configuration: its parameters, ``n``, ``n_diverged``, ``diverged_fraction``, and
        ``mean`` and sample ``std`` of ``metric`` over the seeds that did not diverge (or NaN)."""
        groups: dict[str, list[dict]] = {}
        for t in self.trials:
            groups.setdefault(json.dumps(t["params"], sort_keys=True), []).append(t)
        rows = []
        for trials in groups.values():
            ok = [t["metrics"].get(metric) for t in trials if not t["diverged"]]
            a = np.array([v for v in ok if _finite(v)] or [math.nan])
            if ok and np.isnan(a).all():
                names = sorted({k for t in self.trials for k in t["metrics"]})
                raise KeyError(f"Metric {metric!r} not in sweep {self.name!r}. Available: {names}.")
            n, n_div = len(trials), len(trials) - len(ok)
            std = float(a.std(ddof=1)) if a.size > 1 else math.nan
            row = {"n": n, "n_diverged": n_div, "diverged_fraction": n_div / n}
            rows.append({**trials[0]["params"], **row, "mean": float(a.mean()), "std": std})
        return rows

    def where(self, **fixed: Any) -> SweepResult:
        """The trials whose parameters equal ``fixed`` (e.g. ``where(norm="batch")``)."""
        self._check_only(*fixed, *self.grid)  # every key may vary
        grid = {**self.grid, **{k: [json_safe(v)] for k, v in fixed.items()}}
        if bad := [k for k in fixed if grid[k][0] not in self.grid[k]]:
            raise ValueError(f"{bad[0]}={fixed[bad[0]]!r} is not in the grid {self.grid[bad[0]]}.")
        trials = [t for t in self.trials if all(t["params"][k] == grid[k][0] for k in fixed)]
        return dataclasses.replace(self, grid=grid, trials=trials)

    def best(self, metric: str = "val_accuracy") -> dict:
        """The :meth:`aggregate` row of highest mean, preferring configurations never diverged."""
        rows = [r for r in self.aggregate(metric) if _finite(r["mean"])]
        if not (stable := [r for r in rows if r["n_diverged"] == 0] or rows):
            raise ValueError(f"Every trial of sweep {self.name!r} diverged; no best {metric}.")
        return max(stable, key=lambda r: r["mean"])

    def pivot(self, rows: str, cols: str, metric: str = "val_accuracy"):
        """``(row_values, col_values, mean metric array)`` (NaN where every seed diverged)."""
        self._check_only(rows, cols)
        row_vals, col_vals = self.grid[rows], self.grid[cols]
        out = np.full((len(row_vals), len(col_vals)), np.nan)
        for r in self.aggregate(metric):
            out[row_vals.index(r[rows]), col_vals.index(r[cols])] = r["mean"]
        return list(row_vals), list(col_vals), out

    def curve(self, key: str, metric: str = "val_accuracy") -> dict[str, np.ndarray]:
        """Arrays ``x`` (the values of ``key``), ``mean``, ``std`` and ``diverged_fraction``."""
        self._check_only(key)
        rows = sorted(self.aggregate(metric), key=lambda r: r[key])
        out = {c: np.array([r[c] for r in rows], dtype=float) for c in ("mean", "std")}
        out["diverged_fraction"] = np.array([r["diverged_fraction"] for r in rows])
        return {"x": np.array([r[key] for r in rows]), **out}

    def to_table(self, metric: str = "val_accuracy"):
        """The :meth:`aggregate` rows as a :class:`bnutils.results.Table`."""
        cols = [*list(self.grid), "n", "n_diverged", "mean", "std"]
        return make_table(self.aggregate(metric), columns=cols, digits=4)

    def _check_only(self, *keys: str) -> None:
        if missing := [k for k in keys if k not in self.grid]:
            raise KeyError(f"{missing[0]!r} is not a parameter; expected one of {list(self.grid)}.")
        if varied := [k for k, v in self.grid.items() if k not in keys and len(v) > 1]:
            raise ValueError(
                f"Sweep {self.name!r} also varies {varied}; expected one value each. Select "
                f"one with .where(), e.g. .where({varied[0]}={self.grid[varied[0]][0]!r})."
            )


@dataclasses.dataclass(frozen=True)
class UsableRange:
    """What :func:`usable_range` found; ``low``, ``high`` are ``None`` when nothing is usable."""

    key: str
    low: Any
    high: Any
    best_value: Any
    best_score: float
    diverged: tuple
    reference: float
    decades: float = math.nan

    found = property(lambda self: self.low is not None, doc="Whether any value is usable.")

    def to_dict(self) -> dict:
        return json_safe(dataclasses.asdict(self))

    def __str__(self) -> str:
        if not self.found:
            return f"no usable {self.key} (reference {self.reference:.4f})"
        return f"usable {self.key}: {self.low:g} to {self.high:g} ({self.decades:.2f} decades)"


def usable_range(
    results: SweepResult | Sequence[Mapping],
    key: str = "lr",
    threshold: float = 0.05,
    metric: str = "val_accuracy",
    reference: float | None = None,
    floor: float = 0.5,
) -> UsableRange:
    """The usable range of ``key``: the consecutive usable grid values around the best one.

    The suite's one definition (notebooks 05 and 06, the README): a value is usable when no seed
    diverged and its mean ``metric`` is at least ``reference - threshold`` and ``floor``.
    ``results``: a :class:`SweepResult` varying only ``key`` (see :meth:`SweepResult.where`) or
    its :meth:`~SweepResult.aggregate` rows; ``reference`` defaults to their best stable mean.
    """
    if not threshold >= 0:
        raise ValueError(f"`threshold` must be >= 0, received {threshold!r}.")
    if isinstance(results, SweepResult):
        results._check_only(key)
        results = results.aggregate(metric)
    rows = sorted((dict(r) for r in results), key=lambda r: r[key])
    clean = [r for r in rows if r["n_diverged"] == 0 and _finite(r["mean"])]
    best = max(clean, key=lambda r: r["mean"], default={key: None, "mean": math.nan})
    reference = best["mean"] if reference is None else float(reference)
    good = [r in clean and r["mean"] >= max(reference - threshold, floor) for r in rows]
    lo = hi = rows.index(best) if any(good) else None
    while lo and good[lo - 1]:
        lo -= 1
    while hi is not None and hi + 1 < len(rows) and good[hi + 1]:
        hi += 1
    low, high = (None, None) if lo is None else (rows[lo][key], rows[hi][key])
    decades = math.log10(high / low) if lo is not None and low > 0 and high > 0 else math.nan
    diverged = tuple(r[key] for r in rows if r["n_diverged"] > 0)
    return UsableRange(
        key=key,
        low=low,
        high=high,
        best_value=best[key],
        best_score=best["mean"],
        diverged=diverged,
        reference=reference,
        decades=decades,
    )
