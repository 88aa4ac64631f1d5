"""bnutils.stats: seed summaries and paired t-tests, checked by hand, by tables and by SciPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from bnutils.stats import PairedComparison, Summary, paired_comparison, summarize

# two-sided 95% critical values of Student's t, from printed tables (10 significant digits)
T_975 = {1: 12.70620474, 2: 4.302652730, 4: 2.776445105, 9: 2.262157163, 30: 2.042272456}


@pytest.mark.parametrize("df, expected", sorted(T_975.items()))
def test_interval_uses_the_printed_t_quantiles(df, expected):
    values = np.linspace(0.8, 0.9, df + 1)
    s = summarize(values)
    assert s.half_width == pytest.approx(expected * s.sem, rel=1e-8)


def test_interval_matches_scipy_t_interval():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 8, 17, 60):
        values = rng.normal(0.85, 0.02, n)
        for confidence in (0.6, 0.9, 0.95, 0.99):
            s = summarize(values, confidence=confidence)
            ref = stats.t.interval(confidence, n - 1, loc=values.mean(), scale=stats.sem(values))
            np.testing.assert_allclose((s.ci_low, s.ci_high), ref, rtol=1e-12)


def test_summarize_by_hand():
    s = summarize([0.80, 0.82, 0.84, 0.86, 0.88])
    # mean .84; squared deviations .0016 + .0004 + 0 + .0004 + .0016 = .004; var = .004 / 4
    assert s.n == 5 and s.mean == pytest.approx(0.84)
    assert s.std == pytest.approx(math.sqrt(0.001))
    assert s.sem == pytest.approx(math.sqrt(0.001 / 5))
    assert s.half_width == pytest.approx(T_975[4] * math.sqrt(0.001 / 5), rel=1e-7)
    assert s.ci_low < s.mean < s.ci_high
    assert "±" in str(s) and "n=5" in str(s)
    wider = summarize([0.80, 0.82, 0.84, 0.86, 0.88], confidence=0.99)
    assert wider.half_width > s.half_width
    assert isinstance(summarize([1, 2]), Summary)


def test_summarize_edge_cases():
    one = summarize([0.9])
    assert one.n == 1 and one.mean == 0.9 and math.isnan(one.std) and math.isnan(one.ci_low)
    assert "no interval" in str(one)
    with pytest.raises(ValueError, match="NaN or infinite"):
        summarize([0.9, float("nan")])
    assert summarize([0.9, float("nan"), 0.7], nan_policy="omit").mean == pytest.approx(0.8)
    assert summarize({0: 0.5, 1: 0.7}).mean == pytest.approx(0.6)
    with pytest.raises(ValueError, match="at least one"):
        summarize([])
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        summarize([0.5, 0.6], confidence=1.0)
    with pytest.raises(ValueError, match="nan_policy"):
        summarize([0.5, 0.6], nan_policy="drop")


def test_paired_comparison_by_hand():
    a, b = [1.0, 2.0, 3.0], [0.5, 1.0, 3.5]
    # d = [0.5, 1.0, -0.5]: mean 1/3, sample variance 7/12, se = sqrt(7/36)
    r = paired_comparison(a, b)
    se = math.sqrt(7 / 36)
    t = (1 / 3) / se
    assert isinstance(r, PairedComparison) and r.n == 3 and r.df == 2
    assert r.mean_diff == pytest.approx(1 / 3) and r.std_diff == pytest.approx(math.sqrt(7 / 12))
    assert r.t == pytest.approx(t)
    assert r.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)  # df = 2 closed form
    assert r.ci_low == pytest.approx(1 / 3 - T_975[2] * se, rel=1e-7)
    assert r.ci_high == pytest.approx(1 / 3 + T_975[2] * se, rel=1e-7)
    assert (r.a_better, r.b_better, r.ties) == (2, 1, 0)
    assert "a better in 2 of 3" in str(r)
    # two pairs: df = 1, the Cauchy distribution, p = 1 - 2 atan(|t|) / pi
    two = paired_comparison([0.9, 0.8], [0.85, 0.78])
    assert two.p_value == pytest.approx(1 - 2 * math.atan(abs(two.t)) / math.pi, rel=1e-9)


def test_paired_comparison_pairs_by_seed_and_checks_inputs():
    r = paired_comparison({0: 0.90, 1: 0.80, 2: 0.85, 7: 0.1}, {2: 0.84, 1: 0.78, 0: 0.88, 5: 0.3})
    assert r.keys == [0, 1, 2] and r.unpaired == [7, 5]
    np.testing.assert_allclose(r.mean_diff, np.mean([0.02, 0.02, 0.01]))
    same = paired_comparison([0.5, 0.6], [0.4, 0.5])
    assert same.t == math.inf and same.p_value == 0.0 and same.ci_low == pytest.approx(0.1)
    equal = paired_comparison([0.5, 0.6], [0.5, 0.6])
    assert equal.t == 0.0 and equal.p_value == 1.0 and equal.ties == 2
    one = paired_comparison([0.5], [0.4])
    assert one.df == 0 and math.isnan(one.t) and math.isnan(one.p_value)
    with pytest.raises(ValueError, match="one value per seed"):
        paired_comparison([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="share no key"):
        paired_comparison({0: 1.0}, {1: 1.0})
    with pytest.raises(ValueError, match="not one of each"):
        paired_comparison({0: 1.0}, [1.0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        paired_comparison([1.0, float("nan")], [1.0, 2.0])


def test_paired_comparison_matches_scipy_ttest_rel():
    rng = np.random.default_rng(0)
    for n in (2, 3, 6, 20):
        a, b = rng.normal(0.85, 0.01, n), rng.normal(0.84, 0.01, n)
        ref = stats.ttest_rel(a, b)
        r = paired_comparison(a, b)
        assert r.t == pytest.approx(ref.statistic, rel=1e-12)
        assert r.p_value == pytest.approx(ref.pvalue, rel=1e-9)
        assert r.df == ref.df == n - 1
        np.testing.assert_allclose((r.ci_low, r.ci_high), ref.confidence_interval(0.95), rtol=1e-12)
