"""Statistics over seeds on ``scipy.stats``: t intervals and paired t-tests (notebook 05)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import numpy as np
from scipy import stats as _st

from bnutils._util import check_choice

__all__ = ["PairedComparison", "Summary", "paired_comparison", "summarize"]

Values = Iterable[float] | Mapping[object, float]  # one value per seed, or seed -> value


def _values(values, nan_policy: str = "raise", what: str = "values") -> np.ndarray:
    vals = values.values() if isinstance(values, Mapping) else values
    arr = np.asarray(list(vals), dtype=float).ravel()
    check_choice("nan_policy", nan_policy, ("raise", "omit"))
    bad = ~np.isfinite(arr)
    if bad.any() and nan_policy == "raise":
        raise ValueError(
            f"{int(bad.sum())} of the {arr.size} {what} are NaN or infinite (a diverged run?). "
            "Drop them first, or pass nan_policy='omit' to ignore them."
        )
    if not (arr := arr[~bad]).size:
        raise ValueError(f"Expected at least one finite value in {what}, received none.")
    return arr


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean, std (``ddof=1``), standard error and t interval over seeds (NaN ones if n == 1)."""

    n: int
    mean: float
    std: float
    sem: float
    ci_low: float
    ci_high: float
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        """The "+-" of ``mean +- half_width``."""
        return (self.ci_high - self.ci_low) / 2.0

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.4f} (n=1, no interval)"
        return f"{self.mean:.4f} ± {self.half_width:.4f} ({self.confidence:.0%} CI, n={self.n})"


def summarize(values: Values, confidence: float = 0.95, nan_policy: str = "raise") -> Summary:
    """Mean, standard deviation and t confidence interval of ``values`` (one per seed).

    Args:
        values: numbers, or a mapping (e.g. seed -> accuracy) whose values are used.
        confidence: level of the interval.
        nan_policy: ``"raise"`` on NaN/inf values, or ``"omit"`` to drop them.

    Raises:
        ValueError: no finite values, NaN values with ``nan_policy="raise"``, bad confidence.
    """
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, received {confidence!r}.")
    arr = _values(values, nan_policy)
    n, mean = arr.size, float(arr.mean())
    std = float(arr.std(ddof=1)) if n > 1 else math.nan
    sem = std / math.sqrt(n)
    half = float(_st.t.ppf(0.5 + confidence / 2.0, n - 1)) * sem  # Student t; NaN if n == 1
    return Summary(n, mean, std, sem, mean - half, mean + half, float(confidence))


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """``a`` vs ``b`` on the same seeds: mean of ``a - b`` and its t interval, the paired t
    (``df = n - 1``) and two-sided p-value, wins ``a_better``/``b_better``/``ties``, and with
    mappings the seeds paired (``keys``) and left out (``unpaired``)."""

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

    def __str__(self) -> str:
        return (
            f"a - b = {self.mean_diff:+.4f} [{self.confidence:.0%} CI {self.ci_low:+.4f}, "
            f"{self.ci_high:+.4f}], t({self.df}) = {self.t:.3f}, p = {self.p_value:.4g}; "
            f"a better in {self.a_better} of {self.n}"
        )


def paired_comparison(a: Values, b: Values, confidence: float = 0.95) -> PairedComparison:
    """Paired t-test of two configurations run with the same seeds (as ``scipy.stats.ttest_rel``).

    Args:
        a, b: one value per seed: two sequences in the same seed order, or two mappings
            seed -> value (paired by key; keys in only one are listed in ``unpaired``).
        confidence: level of the interval of the mean difference.

    Raises:
        ValueError: sequences of different lengths, no common keys, non-finite values.
    """
    keys = unpaired = None
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys, unpaired = [k for k in a if k in b], [k for k in (*a, *b) if k not in a or k not in b]
        if not keys:
            raise ValueError(f"The mappings share no key (seed): a has {list(a)}, b {list(b)}.")
        a, b = [a[k] for k in keys], [b[k] for k in keys]
    elif isinstance(a, Mapping) or isinstance(b, Mapping):
        raise ValueError("Pass two sequences or two mappings (seed -> value), not one of each.")
    va, vb = _values(a, what="values of a"), _values(b, what="values of b")
    if va.size != vb.size:
        raise ValueError(f"a has {va.size} values, b {vb.size}: expected one value per seed.")
    s = summarize(d := va - vb, confidence)  # t interval of the mean difference
    # sem == 0 (identical differences): t is 0 or infinite, where scipy's ttest_rel gives NaN
    t = s.mean / s.sem if s.sem else 0.0 if s.mean == 0 else math.copysign(math.inf, s.mean)
    p = float(2.0 * _st.t.sf(abs(t), s.n - 1))  # two-sided; NaN when n == 1 (df = 0)
    means, ci = (float(va.mean()), float(vb.mean())), (s.ci_low, s.ci_high)
    counts = int((d > 0).sum()), int((d < 0).sum()), int((d == 0).sum())
    return PairedComparison(
        s.n, *means, s.mean, s.std, *ci, t, s.n - 1, p, *counts, s.confidence, keys, unpaired
    )
