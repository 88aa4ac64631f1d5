"""bnutils.tuning: resumable sweeps, divergence records, aggregates, usable ranges, tuner."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest

from bnutils.data import load_dataset
from bnutils.tuning import (
    SweepResult,
    TrainTrial,
    init_config,
    keras_tuner_search,
    load_sweep,
    log_grid,
    run_sweep,
    usable_range,
)

GRID = {"lr": [0.001, 0.01, 0.1], "width": [8, 16]}


class FakeTrial:
    """A deterministic trial function that counts its calls and can fail at call ``fail_at``."""

    def __init__(self, fail_at: int | None = None, error: type[BaseException] = KeyboardInterrupt):
        self.calls: list[tuple[dict, int]] = []
        self.fail_at = fail_at
        self.error = error

    @staticmethod
    def score(params: dict, seed: int) -> float:
        return 0.5 + 0.1 * math.log10(params["lr"] * 1000) + params.get("width", 0) / 100 + seed / 1000

    def __call__(self, params: dict, seed: int) -> dict:
        if self.fail_at is not None and len(self.calls) + 1 == self.fail_at:
            raise self.error("stopped on purpose")
        self.calls.append((dict(params), seed))
        return {"val_accuracy": self.score(params, seed), "curve": [0.1, 0.2]}


def _by_key(result: SweepResult) -> dict:
    return {(json.dumps(t["params"], sort_keys=True), t["seed"]): t["metrics"]["val_accuracy"]
            for t in result.trials}


# ---------------------------------------------------------------- the runner


def test_interrupted_sweep_runs_only_missing_trials(tmp_path):
    total = 6 * 2
    stopping = FakeTrial(fail_at=5)
    with pytest.raises(KeyboardInterrupt):
        run_sweep("s", GRID, stopping, seeds=2, results_dir=tmp_path, verbose=False)
    assert len(stopping.calls) == 4
    assert len(list(tmp_path.glob("*.json"))) == 4, "each finished trial is saved at once"
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file is left behind"

    resumed = FakeTrial()
    result = run_sweep("s", GRID, resumed, seeds=2, results_dir=tmp_path, verbose=False)
    assert len(resumed.calls) == total - 4
    assert set(map(str, stopping.calls)).isdisjoint(map(str, resumed.calls))
    assert (result.computed, result.cached, len(result)) == (total - 4, 4, total)
    for (params, seed), value in _by_key(result).items():
        assert value == pytest.approx(FakeTrial.score(json.loads(params), seed))


def test_finished_sweep_is_not_recomputed_unless_forced(tmp_path, capsys):
    first = run_sweep("s", GRID, FakeTrial(), seeds=[3, 5], results_dir=tmp_path)
    assert "12 to run" in capsys.readouterr().out
    again = FakeTrial()
    second = run_sweep("s", GRID, again, seeds=[3, 5], results_dir=tmp_path)
    assert again.calls == [] and second.cached == 12 and second.computed == 0
    assert "12 already done, 0 to run" in capsys.readouterr().out
    assert _by_key(first) == _by_key(second)
    assert [t["params"] for t in second.trials] == [t["params"] for t in first.trials]

    forced = FakeTrial()
    run_sweep("s", GRID, forced, seeds=[3, 5], results_dir=tmp_path, force=True, verbose=False)
    assert len(forced.calls) == 12


def test_context_and_seeds_are_part_of_the_trial_identity(tmp_path):
    run_sweep("s", GRID, FakeTrial(), seeds=1, results_dir=tmp_path, context={"epochs": 1},
              verbose=False)
    other_context = FakeTrial()
    run_sweep("s", GRID, other_context, seeds=1, results_dir=tmp_path, context={"epochs": 2},
              verbose=False)
    assert len(other_context.calls) == 6
    more_seeds = FakeTrial()
    run_sweep("s", GRID, more_seeds, seeds=2, results_dir=tmp_path, context={"epochs": 2},
              verbose=False)
    assert [s for _, s in more_seeds.calls] == [1] * 6, "only the new seed runs"
    assert len(load_sweep("s", tmp_path)) == 18


def test_default_folder_is_under_results_sweeps(tmp_path):
    result = run_sweep("my sweep", {"lr": [0.01]}, FakeTrial(), seeds=1, verbose=False,
                       context=None)
    assert "sweeps" in result.directory and result.directory.endswith("my_sweep")
    assert len(load_sweep("my sweep")) == 1


def test_corrupt_trial_file_is_recomputed(tmp_path):
    run_sweep("s", {"lr": [0.01, 0.1], "width": [8]}, FakeTrial(), seeds=1,
              results_dir=tmp_path, verbose=False)
    victim = sorted(tmp_path.glob("*.json"))[0]
    victim.write_text("{not json")
    again = FakeTrial()
    run_sweep("s", {"lr": [0.01, 0.1], "width": [8]}, again, seeds=1, results_dir=tmp_path,
              verbose=False)
    assert len(again.calls) == 1
    json.loads(victim.read_text())


def test_divergence_is_recorded_and_the_sweep_goes_on(tmp_path):
    def trial(params, seed):
        if params["lr"] >= 1.0:
            return {"val_accuracy": float("nan"), "val_loss": float("inf")}
        if params["lr"] >= 0.1:
            raise FloatingPointError("loss overflowed")
        return {"val_accuracy": 0.8 + seed / 100}

    result = run_sweep("d", {"lr": [0.01, 0.1, 1.0]}, trial, seeds=2, results_dir=tmp_path,
                       verbose=False)
    flags = {t["params"]["lr"]: t["diverged"] for t in result.trials}
    assert flags == {0.01: False, 0.1: True, 1.0: True}
    messages = [t["message"] for t in result.trials if t["diverged"]]
    assert "FloatingPointError" in messages[0] and "val_accuracy" in messages[-1]
    saved = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert sum(s["diverged"] for s in saved) == 4
    assert all(v is None for s in saved if s["params"]["lr"] == 1.0 for v in s["metrics"].values())

    calls = []
    again = run_sweep("d", {"lr": [0.01, 0.1, 1.0]}, lambda p, s: calls.append(1), seeds=2,
                      results_dir=tmp_path, verbose=False)
    assert calls == [] and math.isnan(again.trials[-1]["metrics"]["val_accuracy"])
    rows = {r["lr"]: r for r in again.aggregate()}
    assert rows[1.0]["n_diverged"] == 2 and math.isnan(rows[1.0]["mean"])
    assert rows[0.01]["mean"] == pytest.approx(0.805)


def test_other_errors_stop_the_sweep_but_keep_finished_trials(tmp_path):
    failing = FakeTrial(fail_at=3, error=RuntimeError)
    with pytest.raises(RuntimeError, match="on purpose"):
        run_sweep("e", GRID, failing, seeds=1, results_dir=tmp_path, verbose=False)
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_input_validation(tmp_path):
    with pytest.raises(ValueError, match="non-empty dict"):
        run_sweep("x", {}, FakeTrial(), seeds=1, results_dir=tmp_path)
    with pytest.raises(ValueError, match="is empty"):
        run_sweep("x", {"lr": []}, FakeTrial(), seeds=1, results_dir=tmp_path)
    with pytest.raises(ValueError, match=r"Wrap a single value"):
        run_sweep("x", {"lr": 0.1}, FakeTrial(), seeds=1, results_dir=tmp_path)
    with pytest.raises(TypeError, match="JSON values"):
        run_sweep("x", {"init": [keras.initializers.HeNormal()]}, FakeTrial(), seeds=1,
                  results_dir=tmp_path)
    with pytest.raises(ValueError, match="seeds"):
        run_sweep("x", GRID, FakeTrial(), seeds=[1, 1], results_dir=tmp_path)
    with pytest.raises(TypeError, match="callable"):
        run_sweep("x", GRID, "trial", seeds=1, results_dir=tmp_path)
    with pytest.raises(TypeError, match="dict of metrics"):
        run_sweep("x", GRID, lambda p, s: "oops", seeds=1, results_dir=tmp_path, verbose=False)
    assert log_grid(1e-3, 1.0, 4) == [0.001, 0.01, 0.1, 1.0]
    with pytest.raises(ValueError, match="low < high"):
        log_grid(1.0, 0.1, 3)


# ---------------------------------------------------------------- results


def test_aggregate_where_pivot_and_best(tmp_path):
    result = run_sweep("a", GRID, FakeTrial(), seeds=3, results_dir=tmp_path, verbose=False)
    table = result.table()
    assert len(table) == 18 and "curve" not in table[0]
    rows = result.aggregate()
    assert len(rows) == 6
    for row in rows:
        values = [FakeTrial.score({"lr": row["lr"], "width": row["width"]}, s) for s in range(3)]
        assert row["mean"] == pytest.approx(np.mean(values))
        assert row["std"] == pytest.approx(np.std(values, ddof=1))
    best = result.best()
    assert (best["lr"], best["width"]) == (0.1, 16)

    narrow = result.where(width=8)
    assert len(narrow) == 9 and narrow.grid["width"] == [8]
    curve = narrow.curve("lr")
    np.testing.assert_allclose(curve["x"], [0.001, 0.01, 0.1])
    assert np.all(np.diff(curve["mean"]) > 0)
    with pytest.raises(ValueError, match="also varies"):
        result.curve("lr")
    with pytest.raises(ValueError, match="not in the grid"):
        result.where(width=9)

    rows_, cols, grid = result.pivot("lr", "width")
    assert rows_ == GRID["lr"] and cols == GRID["width"]
    assert grid[2, 1] == pytest.approx(best["mean"])
    assert "| lr | width |" in result.to_table().to_markdown()
    with pytest.raises(KeyError, match="Available"):
        result.aggregate("accuracy")


def _rows(accs, diverged=None, lrs=(1e-4, 1e-3, 1e-2, 1e-1, 1.0)):
    diverged = diverged or [0] * len(accs)
    return [{"lr": lr, "mean": a, "n": 2, "n_diverged": d, "diverged_fraction": d / 2}
            for lr, a, d in zip(lrs, accs, diverged, strict=True)]


def test_usable_range_is_the_stable_run_around_the_best():
    r = usable_range(_rows([0.60, 0.82, 0.85, 0.83, math.nan], [0, 0, 0, 0, 2]), threshold=0.05)
    assert (r.low, r.high, r.best_value) == (1e-3, 1e-1, 1e-2)
    assert r.decades == pytest.approx(2.0) and r.diverged == (1.0,)
    assert r.reference == pytest.approx(0.85)

    # A diverging seed disqualifies a value however good its mean.
    r = usable_range(_rows([0.80, 0.82, 0.90, 0.83, 0.84], [0, 0, 1, 0, 0]), threshold=0.05)
    assert r.best_value == 1.0 and (r.low, r.high) == (1e-1, 1.0)
    assert r.stable == (1e-4, 1e-3, 1e-1, 1.0), "stable values may have gaps; the range not"
    tolerant = usable_range(_rows([0.80, 0.82, 0.90, 0.83, 0.84], [0, 0, 1, 0, 0]),
                            threshold=0.05, max_diverged_fraction=0.5)
    assert (tolerant.low, tolerant.high, tolerant.best_value) == (1e-2, 1e-2, 1e-2)
    assert tolerant.decades == 0.0 and tolerant.stable == (1e-2,)

    # A common reference higher than this sweep's best can leave nothing usable.
    r = usable_range(_rows([0.60, 0.70, 0.72, 0.50, 0.40]), threshold=0.05, reference=0.85)
    assert not r.found and math.isnan(r.decades) and "no usable" in str(r)
    r = usable_range(_rows([0.60, 0.70, 0.72, 0.50, 0.40]), threshold=0.05, reference=0.75)
    assert (r.low, r.high) == (1e-3, 1e-2)
    nothing = usable_range(_rows([math.nan] * 5, [2] * 5))
    assert not nothing.found and nothing.best_value is None


def test_usable_range_reads_a_sweep_result(tmp_path):
    def trial(params, seed):
        lr = params["lr"]
        return {"val_accuracy": float("nan")} if lr > 0.5 else {"val_accuracy": 0.9 - abs(
            math.log10(lr) + 2) * 0.04}

    result = run_sweep("u", {"lr": log_grid(1e-5, 1.0, 6), "norm": ["batch"]}, trial, seeds=2,
                       results_dir=tmp_path, verbose=False)
    r = usable_range(result, "lr", threshold=0.05)
    assert (r.low, r.high) == (1e-3, 1e-1)
    assert r.diverged == (1.0,)
    assert json.loads(json.dumps(r.to_dict()))["decades"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="threshold"):
        usable_range(result, "lr", threshold=-1)


# ---------------------------------------------------------------- real training


@pytest.fixture(scope="module")
def data():
    return load_dataset("fashion_mnist").subset(256, 128, 128)


def tiny_mlp(norm=None, bn_kwargs=None, kernel_initializer="he_normal", width=16):
    layers = [keras.Input((28, 28, 1)), keras.layers.Flatten(),
              keras.layers.Dense(width, kernel_initializer=kernel_initializer,
                                 use_bias=norm is None)]
    if norm == "batch":
        layers.append(keras.layers.BatchNormalization(**(bn_kwargs or {})))
    layers += [keras.layers.Activation("relu"), keras.layers.Dense(10)]
    return keras.Sequential(layers, name="tiny_bn" if norm else "tiny")


def test_train_trial_maps_parameters(data):
    trial = TrainTrial(data, tiny_mlp, epochs=2, builder_kwargs={"width": 8})
    build, fit = trial.split({"lr": 0.1, "bn_momentum": 0.9, "renorm": True, "init_scale": 3.0,
                              "norm": "batch", "batch_size": 4})
    assert fit == {"epochs": 2, "batch_size": 4, "optimizer": "adam", "lr": 0.1}
    assert build["bn_kwargs"] == {"momentum": 0.9, "renorm": True}
    assert build["width"] == 8 and build["norm"] == "batch"
    init = keras.initializers.get(build["kernel_initializer"])
    w = np.asarray(init((400, 400)))
    assert w.std() == pytest.approx(3.0 * math.sqrt(2 / 400), rel=0.1)
    assert init_config(1.0)["config"]["scale"] == 2.0
    other = TrainTrial(data.subset(128, 128, 128), tiny_mlp, epochs=2)
    assert trial.context != other.context

    variants = {"BN + renorm": {"norm": "batch", "bn_kwargs": {"renorm": True}},
                "LN": {"norm": "layer"}}
    trial = TrainTrial(data, tiny_mlp, epochs=1, variants=variants)
    build, fit = trial.split({"variant": "BN + renorm", "bn_momentum": 0.9, "lr": 1})
    assert build == {"norm": "batch", "bn_kwargs": {"renorm": True, "momentum": 0.9}}
    assert isinstance(fit["lr"], float)
    build, _ = trial.split({"variant": "LN", "bn_momentum": 0.9})
    assert build == {"norm": "layer"}, "BN arguments are dropped without BN"
    with pytest.raises(KeyError, match="Unknown variant 'GN'"):
        trial.split({"variant": "GN"})
    assert trial.context != TrainTrial(data, tiny_mlp, epochs=1).context


def test_real_sweep_with_train_records_divergence(data, tmp_path):
    momenta = []

    def evaluate(model, result, params):
        bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        momenta.append(bn[0].momentum if bn else None)
        return {"n_bn": len(bn)}

    trial = TrainTrial(data, tiny_mlp, epochs=1, batch_size=64, optimizer="sgd",
                       evaluate=evaluate, results_dir=tmp_path / "runs")
    grid = {"lr": [0.05, 1e6], "norm": ["batch"], "bn_momentum": [0.5]}
    result = run_sweep("real", grid, trial, seeds=1, results_dir=tmp_path / "sweep",
                       verbose=False)
    ok, bad = result.trials
    assert not ok["diverged"] and 0.0 <= ok["metrics"]["val_accuracy"] <= 1.0
    assert ok["metrics"]["val_accuracy"] > 0.3, "a tiny MLP learns something in one epoch"
    assert ok["metrics"]["n_bn"] == 1 and momenta == [0.5]
    assert bad["diverged"] and "learning rate" in bad["message"]
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2

    # A new sweep over the same runs reads train()'s cache; evaluate still gets the model.
    again = run_sweep("real2", grid, trial, seeds=1, results_dir=tmp_path / "sweep2",
                      verbose=False)
    assert again.computed == 2 and momenta == [0.5, 0.5]
    assert again.trials[0]["metrics"]["val_accuracy"] == ok["metrics"]["val_accuracy"]


def test_keras_tuner_search_finds_best_and_resumes(data, tmp_path):
    from bnutils.config import get_profile

    models = []

    def builder(bn_momentum):
        models.append(tiny_mlp(norm="batch", bn_kwargs={"momentum": bn_momentum}))
        return models[-1]

    def trained() -> int:
        return sum(m.optimizer is not None and int(m.optimizer.iterations) > 0 for m in models)

    kwargs = dict(builder=builder, max_trials=2, epochs=1, directory=tmp_path, seed=1,
                  batch_sizes=(32, 64), momentums=(0.9, 0.99))
    result = keras_tuner_search(data, get_profile("quick"), **kwargs)
    assert len(result.trials) == 2 and trained() == 2
    scores = [t["score"] for t in result.trials]
    assert result.best_score == max(scores)
    assert 1e-4 <= result.best["lr"] <= 3e-2
    assert result.best["batch_size"] in (32, 64) and result.best["bn_momentum"] in (0.9, 0.99)
    assert json.loads(json.dumps(result.to_dict()))["best"] == result.best
    assert "bn_mlp_quick_" in result.directory

    again = keras_tuner_search(data, get_profile("quick"), **kwargs)
    assert trained() == 2, "a finished search trains nothing when called again"
    assert again.best == result.best and again.directory == result.directory
    with pytest.raises(ValueError, match="optimizer"):
        keras_tuner_search(data, get_profile("quick"), **kwargs, optimizer="lamb")
