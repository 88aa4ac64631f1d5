"""bnutils.evaluation: the t distribution, summaries, paired tests, evaluate, tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnutils.evaluation import (
    Summary,
    confusion_matrix,
    evaluate,
    make_table,
    paired_comparison,
    summarize,
    summary_table,
    t_cdf,
    t_quantile,
    time_to_accuracy,
)

# two-sided 95% critical values of Student's t, from printed tables (10 significant digits)
T_975 = {1: 12.70620474, 2: 4.302652730, 4: 2.776445105, 9: 2.262157163, 30: 2.042272456}


@pytest.mark.parametrize("df, expected", sorted(T_975.items()))
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, rel=1e-8)
    assert t_quantile(0.025, df) == pytest.approx(-expected, rel=1e-8)


def test_t_distribution_closed_forms():
    for t in (-30.0, -2.5, -0.3, 0.0, 0.7, 4.0, 250.0):
        # df = 1 is the Cauchy distribution, df = 2 has a closed form too
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959963985, rel=1e-6)  # the normal limit
    assert t_quantile(0.5, 3) == 0.0
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="Degrees of freedom"):
        t_cdf(1.0, 0)


def test_t_against_scipy_when_available():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 8, 17, 60):
        for q in (0.6, 0.9, 0.975, 0.995):
            assert t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-9)


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


def test_summarize_edge_cases():
    one = summarize([0.9])
    assert one.n == 1 and one.mean == 0.9 and math.isnan(one.std) and math.isnan(one.ci_low)
    with pytest.raises(ValueError, match="NaN or infinite"):
        summarize([0.9, float("nan")])
    assert summarize([0.9, float("nan"), 0.7], nan_policy="omit").mean == pytest.approx(0.8)
    assert summarize({0: 0.5, 1: 0.7}).mean == pytest.approx(0.6)
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


def test_paired_comparison_by_hand():
    a, b = [1.0, 2.0, 3.0], [0.5, 1.0, 3.5]
    # d = [0.5, 1.0, -0.5]: mean 1/3, sample variance 7/12, se = sqrt(7/36)
    r = paired_comparison(a, b)
    se = math.sqrt(7 / 36)
    t = (1 / 3) / se
    assert r.n == 3 and r.df == 2
    assert r.mean_diff == pytest.approx(1 / 3) and r.std_diff == pytest.approx(math.sqrt(7 / 12))
    assert r.t == pytest.approx(t)
    assert r.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)  # df = 2 closed form
    assert r.ci_low == pytest.approx(1 / 3 - T_975[2] * se, rel=1e-7)
    assert r.ci_high == pytest.approx(1 / 3 + T_975[2] * se, rel=1e-7)
    assert (r.a_better, r.b_better, r.ties) == (2, 1, 0)
    assert "a better in 2 of 3" in str(r)


def test_paired_comparison_pairs_by_seed_and_checks_inputs():
    r = paired_comparison({0: 0.90, 1: 0.80, 2: 0.85, 7: 0.1}, {2: 0.84, 1: 0.78, 0: 0.88, 5: 0.3})
    assert r.keys == [0, 1, 2] and r.unpaired == [7, 5]
    np.testing.assert_allclose(r.mean_diff, np.mean([0.02, 0.02, 0.01]))
    same = paired_comparison([0.5, 0.6], [0.4, 0.5])
    assert same.t == math.inf and same.p_value == 0.0 and same.ci_low == pytest.approx(0.1)
    with pytest.raises(ValueError, match="one value per seed"):
        paired_comparison([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="share no key"):
        paired_comparison({0: 1.0}, {1: 1.0})


def test_paired_p_value_against_scipy_when_available():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.85, 0.01, 6), rng.normal(0.84, 0.01, 6)
    ref = stats.ttest_rel(a, b)
    r = paired_comparison(a, b)
    assert r.t == pytest.approx(ref.statistic) and r.p_value == pytest.approx(ref.pvalue)


def test_confusion_matrix_by_hand():
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], num_classes=3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    rows = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3, normalize="true")
    np.testing.assert_allclose(rows, [[0.5, 0.5, 0], [0, 1, 0], [1 / 3, 0, 2 / 3]])
    with pytest.raises(ValueError, match="expected 0-1"):
        confusion_matrix([0, 2], [0, 1], num_classes=2)
    with pytest.raises(ValueError, match="equal lengths"):
        confusion_matrix([0, 1], [0])


def test_evaluate_reads_logits_and_probabilities_alike():
    import keras

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)).astype("float32")
    y = rng.integers(0, 3, size=50)
    w, b = rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=3).astype("float32")
    logits = x @ w + b
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    want_loss = -log_p[np.arange(50), y].mean()
    want_acc = (logits.argmax(axis=1) == y).mean()
    for activation in (None, "softmax"):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation=activation)])
        model.set_weights([w, b])
        r = evaluate(model, (x, y), return_predictions=True)
        assert r["n"] == 50 and r["accuracy"] == pytest.approx(want_acc)
        assert r["loss"] == pytest.approx(want_loss, rel=1e-5)
        np.testing.assert_array_equal(r["y_pred"], logits.argmax(axis=1))


def _run(name, seed, val_acc, times, spe=10):
    return {"run_name": name, "seed": seed, "history": {"val_accuracy": val_acc},
            "epoch_times": times, "steps_per_epoch": spe}


def test_time_to_accuracy():
    rows = time_to_accuracy([_run("bn", 0, [0.5, 0.8, 0.9], [2.0, 1.0, 1.0]),
                             _run("bn", 1, [0.5, 0.6, None], [2.0, 1.5, 1.0])], target=0.8)
    assert rows[0] == {"run_name": "bn", "seed": 0, "reached": True, "epoch": 2,
                       "seconds": 3.0, "steps": 20}
    assert rows[1]["reached"] is False and rows[1]["epoch"] is None
    with pytest.raises(ValueError, match="no 'val_loss'"):
        time_to_accuracy([_run("bn", 0, [0.5], [1.0])], 0.5, metric="val_loss")


def test_tables():
    t = make_table([{"model": "bn", "acc": 0.91234, "ok": True}, {"model": "plain", "acc": None}])
    md = t.to_markdown()
    assert md.splitlines()[0] == "| model | acc | ok |"
    assert "| bn | 0.912 | yes |" in md and "| plain | n/a | n/a |" in md
    assert t._repr_markdown_() == md and t.to_dict()["rows"][0]["model"] == "bn"
    st = summary_table({"bn": [0.8, 0.9], "plain": [0.7, 0.75]})
    assert st.columns == ["configuration", "n", "mean", "std", "ci_low", "ci_high"]
    assert st.rows[1]["mean"] == pytest.approx(0.725)
    assert isinstance(summarize([1, 2]), Summary)
