"""Evaluation and the statistics of comparisons: test accuracy, seed summaries, paired tests.

* :func:`evaluate` - test (or validation) loss and accuracy of a model, without ``compile``.
* :func:`summarize` - mean, standard deviation and a t-based confidence interval over seeds.
* :func:`paired_comparison` - two configurations run with the same seeds: the mean difference,
  its confidence interval, the paired t statistic and p-value, and how often ``a`` won.
* :func:`confusion_matrix`, :func:`time_to_accuracy` and :func:`make_table` /
  :func:`summary_table` (rows that print as Markdown in a notebook).

The Student t distribution is computed here (regularized incomplete beta function), so the
statistics need neither SciPy nor TensorFlow; the tests cross-check it against tables.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "PairedComparison",
    "Summary",
    "Table",
    "confusion_matrix",
    "ends_in_softmax",
    "evaluate",
    "make_table",
    "paired_comparison",
    "summarize",
    "summary_table",
    "t_cdf",
    "t_quantile",
    "time_to_accuracy",
]


# ---------------------------------------------------------------- Student t distribution


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz method)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            delta = d * c
            h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_bt = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
              + a * math.log(x) + b * math.log1p(-x))
    bt = math.exp(log_bt)
    if x < (a + 1.0) / (a + b + 2.0):
        return bt * _betacf(a, b, x) / a
    return 1.0 - bt * _betacf(b, a, 1.0 - x) / b


def _check_df(df) -> float:
    if isinstance(df, bool) or not isinstance(df, (int, float, np.integer, np.floating)) or not df > 0:
        raise ValueError(f"Degrees of freedom must be a positive number, received {df!r}.")
    return float(df)


def _t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """The cumulative distribution function of Student's t.

    Args:
        t: the point.
        df: degrees of freedom (positive).

    Returns:
        P(T <= t).
    """
    df = _check_df(df)
    t = float(t)
    if math.isnan(t):
        return math.nan
    tail = 0.5 * _t_two_sided_p(t, df)
    return 1.0 - tail if t > 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The inverse CDF of Student's t (e.g. ``t_quantile(0.975, 4) == 2.776...``).

    Args:
        q: a probability in (0, 1).
        df: degrees of freedom (positive).

    Raises:
        ValueError: ``q`` outside (0, 1) or a bad ``df``.
    """
    df = _check_df(df)
    q = float(q)
    if not 0.0 < q < 1.0:
        raise ValueError(f"The probability q must lie strictly between 0 and 1, received {q!r}.")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    if q == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            return math.inf
    for _ in range(200):  # bisection: exact to the last few bits
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------- summaries


def _as_values(values, nan_policy: str, what: str = "values") -> np.ndarray:
    arr = np.asarray(list(values.values()) if isinstance(values, Mapping) else list(values),
                     dtype=float).ravel()
    if nan_policy not in ("raise", "omit"):
        raise ValueError(f"nan_policy must be 'raise' or 'omit', received {nan_policy!r}.")
    bad = ~np.isfinite(arr)
    if bad.any():
        if nan_policy == "raise":
            raise ValueError(
                f"{int(bad.sum())} of the {arr.size} {what} are NaN or infinite (a diverged "
                "run?). Drop them first, or pass nan_policy='omit' to ignore them."
            )
        arr = arr[~bad]
    if arr.size == 0:
        raise ValueError(f"Expected at least one finite value in {what}, received none.")
    return arr


def _check_confidence(confidence) -> float:
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, received {confidence!r}.")
    return float(confidence)


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean and spread of one quantity over seeds.

    Attributes:
        n: number of values.
        mean: their mean.
        std: sample standard deviation (``ddof=1``; NaN when ``n == 1``).
        sem: standard error of the mean.
        ci_low, ci_high: the t-based confidence interval of the mean (NaN when ``n == 1``).
        confidence: its level, e.g. 0.95.
    """

    n: int
    mean: float
    std: float
    sem: float
    ci_low: float
    ci_high: float
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        """Half the width of the confidence interval (the "+-" of ``mean +- half_width``)."""
        return (self.ci_high - self.ci_low) / 2.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.4f} (n=1, no interval)"
        return f"{self.mean:.4f} ± {self.half_width:.4f} ({self.confidence:.0%} CI, n={self.n})"


def summarize(values: Iterable[float] | Mapping[Any, float], confidence: float = 0.95,
              nan_policy: str = "raise") -> Summary:
    """Mean, standard deviation and t confidence interval of ``values`` (one per seed).

    Args:
        values: numbers, or a mapping (e.g. seed -> accuracy) whose values are used.
        confidence: level of the interval.
        nan_policy: ``"raise"`` (default) on NaN/inf values, or ``"omit"`` to drop them.

    Returns:
        A :class:`Summary`.

    Raises:
        ValueError: no finite values, NaN values with ``nan_policy="raise"``, bad confidence.
    """
    confidence = _check_confidence(confidence)
    arr = _as_values(values, nan_policy)
    n = arr.size
    mean = float(arr.mean())
    if n < 2:
        return Summary(n, mean, math.nan, math.nan, math.nan, math.nan, confidence)
    std = float(arr.std(ddof=1))
    sem = std / math.sqrt(n)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sem
    return Summary(n, mean, std, sem, mean - half, mean + half, confidence)


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """Configuration ``a`` against ``b`` over the same seeds (differences are ``a - b``).

    Attributes:
        n: number of pairs.
        mean_a, mean_b: the two means over the pairs.
        mean_diff: mean of ``a - b``.
        std_diff: sample standard deviation of the differences.
        ci_low, ci_high: confidence interval of the mean difference.
        t: paired t statistic; ``df``: its degrees of freedom (``n - 1``).
        p_value: two-sided p-value of "no difference".
        a_better, b_better, ties: in how many pairs ``a > b``, ``a < b``, ``a == b``.
        confidence: level of the interval.
        keys: the pairing keys (seeds) when mappings were given, else ``None``.
        unpaired: keys present in only one of the mappings (left out).
    """

    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    std_diff: float
    ci_low: float
    ci_high: float
    t: float
    df: int
    p_value: float
    a_better: int
    b_better: int
    ties: int
    confidence: float = 0.95
    keys: list | None = None
    unpaired: list | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (
            f"a - b = {self.mean_diff:+.4f} [{self.confidence:.0%} CI {self.ci_low:+.4f}, "
            f"{self.ci_high:+.4f}], t({self.df}) = {self.t:.3f}, p = {self.p_value:.4g}; "
            f"a better in {self.a_better} of {self.n}"
        )


def paired_comparison(
    a: Sequence[float] | Mapping[Any, float],
    b: Sequence[float] | Mapping[Any, float],
    confidence: float = 0.95,
) -> PairedComparison:
    """Paired comparison of two configurations run with the same seeds.

    Args:
        a, b: one value per seed, either two sequences in the same seed order, or two
            mappings seed -> value (paired by key; keys in only one of them are left out and
            listed in ``unpaired``).
        confidence: level of the interval of the mean difference.

    Returns:
        A :class:`PairedComparison`.

    Raises:
        ValueError: sequences of different lengths, no common keys, non-finite values.
    """
    confidence = _check_confidence(confidence)
    keys = unpaired = None
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys = [k for k in a if k in b]
        unpaired = [k for k in a if k not in b] + [k for k in b if k not in a]
        if not keys:
            raise ValueError(
                f"The two mappings share no key: a has {list(a)}, b has {list(b)}. Expected "
                "the same seeds in both."
            )
        va = _as_values([a[k] for k in keys], "raise", "values of a")
        vb = _as_values([b[k] for k in keys], "raise", "values of b")
    elif isinstance(a, Mapping) or isinstance(b, Mapping):
        raise ValueError("Pass two sequences or two mappings (seed -> value), not one of each.")
    else:
        va = _as_values(a, "raise", "values of a")
        vb = _as_values(b, "raise", "values of b")
        if va.size != vb.size:
            raise ValueError(
                f"a has {va.size} values and b has {vb.size}; a paired comparison needs one "
                "value per seed in each, in the same seed order."
            )
    d = va - vb
    n = d.size
    mean_diff = float(d.mean())
    counts = int((d > 0).sum()), int((d < 0).sum()), int((d == 0).sum())
    if n < 2:
        std = ci_low = ci_high = t = p = math.nan
    else:
        std = float(d.std(ddof=1))
        sem = std / math.sqrt(n)
        if sem == 0.0:
            t = 0.0 if mean_diff == 0.0 else math.copysign(math.inf, mean_diff)
            p = 1.0 if mean_diff == 0.0 else 0.0
            ci_low = ci_high = mean_diff
        else:
            t = mean_diff / sem
            p = _t_two_sided_p(t, n - 1)
            half = t_quantile(0.5 + confidence / 2.0, n - 1) * sem
            ci_low, ci_high = mean_diff - half, mean_diff + half
    return PairedComparison(
        n=n, mean_a=float(va.mean()), mean_b=float(vb.mean()), mean_diff=mean_diff,
        std_diff=std, ci_low=ci_low, ci_high=ci_high, t=t, df=n - 1, p_value=p,
        a_better=counts[0], b_better=counts[1], ties=counts[2], confidence=confidence,
        keys=keys, unpaired=unpaired,
    )


# ---------------------------------------------------------------- model evaluation


def ends_in_softmax(model) -> bool:
    """Whether ``model``'s last layer outputs probabilities (softmax) rather than logits."""
    import keras

    layers = getattr(model, "layers", None)
    if not layers:
        return False
    last = layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return True
    return getattr(getattr(last, "activation", None), "__name__", "") == "softmax"


def _split(data, split: str):
    if isinstance(data, tuple) and len(data) == 2:
        return np.asarray(data[0]), np.asarray(data[1])
    if split not in ("test", "val", "train"):
        raise ValueError(f"split must be 'test', 'val' or 'train', received {split!r}.")
    try:
        return getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
    except AttributeError as e:
        raise TypeError(
            f"Expected a bnutils Dataset or an (x, y) tuple, received {type(data).__name__}."
        ) from e


def evaluate(model, data, split: str = "test", batch_size: int = 512,
             return_predictions: bool = False) -> dict:
    """Loss and accuracy of a classifier on one split (no ``compile`` needed).

    The model runs in inference mode. Its outputs are read as probabilities when it ends in a
    softmax (or its rows are non-negative and sum to 1), otherwise as logits; the loss is the
    mean sparse categorical cross-entropy.

    Args:
        model: a Keras classifier.
        data: a :class:`bnutils.data.Dataset` or an ``(x, y)`` tuple.
        split: ``"test"`` (default), ``"val"`` or ``"train"`` (ignored for a tuple).
        batch_size: prediction batch size.
        return_predictions: also return the predicted classes as ``"y_pred"``.

    Returns:
        ``{"loss", "accuracy", "n", "split"}`` (plus ``"y_pred"``).

    Raises:
        ValueError: outputs and labels disagree in number or classes.
    """
    x, y = _split(data, split)
    y = np.asarray(y).astype(np.int64).ravel()
    out = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)
    if out.ndim != 2 or len(out) != len(y):
        raise ValueError(
            f"Expected outputs of shape ({len(y)}, num_classes), received {out.shape}."
        )
    if y.size and (y.min() < 0 or y.max() >= out.shape[1]):
        raise ValueError(
            f"Labels span {y.min()}-{y.max()} but the model has {out.shape[1]} outputs."
        )
    is_prob = ends_in_softmax(model) or (
        out.min() >= 0.0 and np.allclose(out.sum(axis=1), 1.0, atol=1e-3)
    )
    if is_prob:
        log_p = np.log(np.clip(out, 1e-12, 1.0))
    else:
        shifted = out - out.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    y_pred = out.argmax(axis=1)
    result = {
        "loss": float(-log_p[np.arange(len(y)), y].mean()),
        "accuracy": float((y_pred == y).mean()),
        "n": int(len(y)),
        "split": split if not isinstance(data, tuple) else "given",
    }
    if return_predictions:
        result["y_pred"] = y_pred
    return result


def confusion_matrix(y_true, y_pred, num_classes: int | None = None,
                     normalize: str | None = None) -> np.ndarray:
    """Counts of (true class, predicted class) pairs.

    Args:
        y_true: integer labels.
        y_pred: predicted integer classes (same length).
        num_classes: matrix size (default: largest label + 1).
        normalize: ``None`` (counts), ``"true"`` (rows sum to 1), ``"pred"`` (columns) or
            ``"all"``.

    Returns:
        An array of shape ``(num_classes, num_classes)``; rows are true classes.

    Raises:
        ValueError: lengths differ, labels out of range, unknown ``normalize``.
    """
    t = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_pred).astype(np.int64).ravel()
    if t.size != p.size:
        raise ValueError(f"y_true has {t.size} labels and y_pred {p.size}; expected equal lengths.")
    if num_classes is None:
        num_classes = int(max(t.max(initial=-1), p.max(initial=-1)) + 1)
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(
            f"Labels span {min(t.min(), p.min())}-{max(t.max(), p.max())}, expected 0-"
            f"{num_classes - 1} for num_classes={num_classes}."
        )
    cm = np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )
    if normalize is None:
        return cm
    axes = {"true": 1, "pred": 0, "all": None}
    if normalize not in axes:
        raise ValueError(f"normalize must be None, 'true', 'pred' or 'all', received {normalize!r}.")
    total = cm.sum(axis=axes[normalize], keepdims=axes[normalize] is not None)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, cm / np.maximum(total, 1), 0.0)


def _get(result, name: str):
    return result.get(name) if isinstance(result, Mapping) else getattr(result, name, None)


def time_to_accuracy(results: Iterable, target: float, metric: str = "val_accuracy") -> list[dict]:
    """When each run first reached ``target`` on ``metric`` (by epoch, seconds and steps).

    Args:
        results: :class:`bnutils.training.TrainResult` objects (or their ``to_dict()``).
        target: the accuracy to reach.
        metric: the history entry compared with ``target``.

    Returns:
        One row per run: ``run_name``, ``seed``, ``reached``, ``epoch`` (1-based), ``seconds``
        (training wall time up to the end of that epoch) and ``steps``; the last three are
        ``None`` when the run never reached the target.

    Raises:
        ValueError: a run has no ``metric`` in its history.
    """
    rows = []
    for r in results:
        history = _get(r, "history") or {}
        if metric not in history:
            raise ValueError(
                f"Run {_get(r, 'run_name')!r} has no {metric!r} in its history; it has "
                f"{sorted(history)}."
            )
        curve = [math.nan if v is None else float(v) for v in history[metric]]
        times = np.cumsum([float(t) for t in (_get(r, "epoch_times") or [])])
        per_epoch = _get(r, "steps_per_epoch")
        epoch = next((i + 1 for i, v in enumerate(curve) if v >= target), None)
        rows.append({
            "run_name": _get(r, "run_name"),
            "seed": _get(r, "seed"),
            "reached": epoch is not None,
            "epoch": epoch,
            "seconds": float(times[epoch - 1]) if epoch and len(times) >= epoch else None,
            "steps": int(epoch * per_epoch) if epoch and per_epoch else None,
        })
    return rows


# ---------------------------------------------------------------- tables


def _fmt(value, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


@dataclasses.dataclass
class Table:
    """Rows of results that display as a Markdown table in a notebook.

    Attributes:
        rows: one dict per row.
        columns: the column order.
        digits: decimals shown for floats.
    """

    rows: list[dict]
    columns: list[str]
    digits: int = 3

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(_fmt(row.get(c), self.digits) for c in self.columns)
                         + " |")
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __str__(self) -> str:
        return self.to_markdown()

    def to_dict(self) -> dict:
        """``{"columns": [...], "rows": [...]}``, the layout ``tools/results_table.py`` reads."""
        return {"columns": list(self.columns), "rows": [dict(r) for r in self.rows]}


def make_table(rows: Iterable[Mapping], columns: Sequence[str] | None = None,
               digits: int = 3) -> Table:
    """A :class:`Table` from dict rows (columns: the given order, else first-seen order)."""
    rows = [dict(r) for r in rows]
    if columns is None:
        columns = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
    return Table(rows=rows, columns=list(columns), digits=digits)


def summary_table(groups: Mapping[str, Iterable[float]], confidence: float = 0.95,
                  label: str = "configuration", digits: int = 4,
                  nan_policy: str = "raise") -> Table:
    """One row per group: ``n``, mean, std and the confidence interval (see :func:`summarize`)."""
    rows = []
    for name, values in groups.items():
        s = summarize(values, confidence=confidence, nan_policy=nan_policy)
        rows.append({label: name, "n": s.n, "mean": s.mean, "std": s.std,
                     "ci_low": s.ci_low, "ci_high": s.ci_high})
    return make_table(rows, digits=digits)
