"""bnutils.sweeps: sweeps on train()'s run cache, divergence records, aggregates, usable ranges."""

from __future__ import annotations

import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest

from bnutils.data import load_dataset
from bnutils.sweeps import (
    SweepResult,
    TrainTrial,
    init_config,
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
        return (
            0.5 + 0.1 * math.log10(params["lr"] * 1000) + params.get("width", 0) / 100 + seed / 1000
        )

    def __call__(self, params: dict, seed: int) -> dict:
        if self.fail_at is not None and len(self.calls) + 1 == self.fail_at:
            raise self.error("stopped on purpose")
        self.calls.append((dict(params), seed))
        return {"val_accuracy": self.score(params, seed), "curve": [0.1, 0.2]}


def _by_key(result: SweepResult) -> dict:
    return {
        (json.dumps(t["params"], sort_keys=True), t["seed"]): t["metrics"]["val_accuracy"]
        for t in result.trials
    }


# ---------------------------------------------------------------- the runner


def test_a_sweep_is_quiet_unless_asked_and_its_lines_reach_the_job_log(
    capsys, tmp_path, monkeypatch
):
    log = tmp_path / "run.log"
    monkeypatch.setenv("BNUTILS_LOG", str(log))
    run_sweep("quiet sweep", {"lr": [0.1]}, FakeTrial(), seeds=1)
    assert capsys.readouterr().err == ""
    assert "[1/1] sweep quiet sweep" in log.read_text()


def test_every_trial_runs_in_grid_order_and_the_sweep_is_saved(capsys):
    trial = FakeTrial()
    result = run_sweep("my sweep", GRID, trial, seeds=[3, 5], verbose=True)
    err = capsys.readouterr().err  # one progress line per trial
    assert "[1/12] sweep my sweep: " in err and "; done" in err.splitlines()[-1]
    assert "from its record" not in err
    assert (result.computed, result.cached, len(result.trials)) == (12, 0, 12)
    assert [s for _, s in trial.calls] == [3, 5] * 6
    assert [p for p, _ in trial.calls[::2]] == [
        {"lr": lr, "width": w} for lr in GRID["lr"] for w in GRID["width"]
    ], "the first key varies slowest"
    for (params, seed), value in _by_key(result).items():
        assert value == pytest.approx(FakeTrial.score(json.loads(params), seed))

    assert "sweeps" in result.path and result.path.endswith("my-sweep.json")
    saved = load_sweep("my sweep")
    assert _by_key(saved) == _by_key(result) and saved.grid == result.grid
    assert [t["params"] for t in saved.trials] == [t["params"] for t in result.trials]
    with pytest.raises(FileNotFoundError, match="run_sweep"):
        load_sweep("never run")
    Path(result.path).write_text('{"name": "my sweep"}')  # not a sweep any more
    with pytest.raises(ValueError, match="run_sweep"):
        load_sweep("my sweep")


def test_divergence_is_recorded_and_the_sweep_goes_on():
    def trial(params, seed):
        if params["lr"] >= 1.0:
            return {"val_accuracy": float("nan"), "val_loss": float("inf")}
        if params["lr"] >= 0.1:
            raise FloatingPointError("loss overflowed")
        return {"val_accuracy": 0.8 + seed / 100}

    result = run_sweep("d", {"lr": [0.01, 0.1, 1.0]}, trial, seeds=2, verbose=False)
    flags = {t["params"]["lr"]: t["diverged"] for t in result.trials}
    assert flags == {0.01: False, 0.1: True, 1.0: True}
    messages = [t["message"] for t in result.trials if t["diverged"]]
    assert "FloatingPointError" in messages[0] and "val_accuracy" in messages[-1]

    saved = json.loads(Path(result.path).read_text())
    assert sum(t["diverged"] for t in saved["trials"]) == 4
    assert all(
        v is None
        for t in saved["trials"]
        if t["params"]["lr"] == 1.0
        for v in t["metrics"].values()
    ), "NaN is saved as null"
    again = load_sweep("d")
    assert math.isnan(again.trials[-1]["metrics"]["val_accuracy"]), "and read back as NaN"
    rows = {r["lr"]: r for r in again.aggregate()}
    assert rows[1.0]["n_diverged"] == 2 and math.isnan(rows[1.0]["mean"])
    assert rows[0.01]["mean"] == pytest.approx(0.805)


def test_other_errors_stop_the_sweep():
    failing = FakeTrial(fail_at=3, error=RuntimeError)
    with pytest.raises(RuntimeError, match="on purpose"):
        run_sweep("e", GRID, failing, seeds=1, verbose=False)
    assert len(failing.calls) == 2
    with pytest.raises(FileNotFoundError):
        load_sweep("e")


def test_input_validation():
    with pytest.raises(ValueError, match="non-empty dict"):
        run_sweep("x", {}, FakeTrial(), seeds=1)
    with pytest.raises(ValueError, match="is empty"):
        run_sweep("x", {"lr": []}, FakeTrial(), seeds=1)
    with pytest.raises(ValueError, match=r"Wrap a single value"):
        run_sweep("x", {"lr": 0.1}, FakeTrial(), seeds=1)
    with pytest.raises(TypeError, match="JSON values"):
        run_sweep("x", {"init": [keras.initializers.HeNormal()]}, FakeTrial(), seeds=1)
    with pytest.raises(ValueError, match="seeds"):
        run_sweep("x", GRID, FakeTrial(), seeds=[1, 1])
    with pytest.raises(ValueError, match="seeds"):
        run_sweep("x", GRID, FakeTrial(), seeds=0)
    with pytest.raises(TypeError, match="callable"):
        run_sweep("x", GRID, "trial", seeds=1)
    with pytest.raises(TypeError, match="dict of metrics"):
        run_sweep("x", GRID, lambda p, s: "oops", seeds=1, verbose=False)
    with pytest.raises(TypeError, match="dict of metrics"):
        run_sweep("n", {"lr": [0.1]}, lambda p, s: 0.5, seeds=1, verbose=False)
    single = run_sweep("n", {"lr": [0.1]}, lambda p, s: {"value": 0.5}, seeds=1)
    assert single.trials[0]["metrics"] == {"value": 0.5}
    assert log_grid(1e-3, 1.0, 4) == [0.001, 0.01, 0.1, 1.0]
    with pytest.raises(ValueError, match="low < high"):
        log_grid(1.0, 0.1, 3)


# ---------------------------------------------------------------- results


def test_aggregate_where_pivot_and_best():
    result = run_sweep("a", GRID, FakeTrial(), seeds=3, verbose=False)
    rows = result.aggregate()
    assert len(rows) == 6
    for row in rows:
        values = [FakeTrial.score({"lr": row["lr"], "width": row["width"]}, s) for s in range(3)]
        assert row["mean"] == pytest.approx(np.mean(values))
        assert row["std"] == pytest.approx(np.std(values, ddof=1))
    best = result.best()
    assert (best["lr"], best["width"]) == (0.1, 16)

    narrow = result.where(width=8)
    assert len(narrow.trials) == 9 and narrow.grid["width"] == [8]
    curve = narrow.curve("lr")
    np.testing.assert_allclose(curve["x"], [0.001, 0.01, 0.1])
    assert np.all(np.diff(curve["mean"]) > 0)
    with pytest.raises(ValueError, match="also varies"):
        result.curve("lr")
    with pytest.raises(ValueError, match="not in the grid"):
        result.where(width=9)
    with pytest.raises(KeyError, match="not a parameter"):
        result.where(depth=2)

    rows_, cols, grid = result.pivot("lr", "width")
    assert rows_ == GRID["lr"] and cols == GRID["width"]
    assert grid[2, 1] == pytest.approx(best["mean"])
    assert "| lr | width |" in result.to_table().to_markdown()
    with pytest.raises(KeyError, match="Available"):
        result.aggregate("accuracy")


def _rows(accs, diverged=None, lrs=(1e-4, 1e-3, 1e-2, 1e-1, 1.0)):
    diverged = diverged or [0] * len(accs)
    return [
        {"lr": lr, "mean": a, "n": 2, "n_diverged": d, "diverged_fraction": d / 2}
        for lr, a, d in zip(lrs, accs, diverged, strict=True)
    ]


def test_usable_range_is_the_stable_run_around_the_best():
    r = usable_range(_rows([0.60, 0.82, 0.85, 0.83, math.nan], [0, 0, 0, 0, 2]), threshold=0.05)
    assert (r.low, r.high, r.best_value) == (1e-3, 1e-1, 1e-2)
    assert r.decades == pytest.approx(2.0) and r.diverged == (1.0,)
    assert r.reference == pytest.approx(0.85) and r.best_score == pytest.approx(0.85)
    assert str(r).startswith("usable lr: 0.001 to 0.1 (2.00 decades")

    # A diverging seed disqualifies a value however good its mean, and breaks the range.
    r = usable_range(_rows([0.80, 0.82, 0.90, 0.83, 0.84], [0, 0, 1, 0, 0]), threshold=0.05)
    assert r.best_value == 1.0 and (r.low, r.high) == (1e-1, 1.0)
    one = usable_range(_rows([0.70, 0.90, 0.70, 0.70, 0.70]), threshold=0.05)
    assert (one.low, one.high) == (1e-3, 1e-3) and one.decades == 0.0

    # A common reference higher than this sweep's best can leave nothing usable.
    r = usable_range(_rows([0.60, 0.70, 0.72, 0.50, 0.40]), threshold=0.05, reference=0.85)
    assert not r.found and math.isnan(r.decades) and "no usable" in str(r)
    r = usable_range(_rows([0.60, 0.70, 0.72, 0.50, 0.40]), threshold=0.05, reference=0.75)
    assert (r.low, r.high) == (1e-3, 1e-2)
    nothing = usable_range(_rows([math.nan] * 5, [2] * 5))
    assert not nothing.found and nothing.best_value is None

    # The floor: a sweep in which nothing learns (near chance) has no usable range.
    near_chance = _rows([0.10, 0.12, 0.13, 0.11, 0.10])
    assert not usable_range(near_chance).found
    r = usable_range(near_chance, floor=0.0)
    assert (r.low, r.high) == (1e-4, 1.0)
    low = _rows([0.40, 0.49, 0.53, 0.51, 0.45])
    assert (usable_range(low).low, usable_range(low).high) == (1e-2, 1e-1), "0.49 < the floor"
    assert usable_range(low, floor=0.0).low == 1e-3


def test_usable_range_reads_a_sweep_result():
    def trial(params, seed):
        lr = params["lr"]
        if lr > 0.5:
            return {"val_accuracy": float("nan")}
        return {"val_accuracy": 0.9 - abs(math.log10(lr) + 2) * 0.04}

    grid = {"lr": log_grid(1e-5, 1.0, 6), "norm": ["batch"]}
    result = run_sweep("u", grid, trial, seeds=2, verbose=False)
    r = usable_range(result, "lr", threshold=0.05)
    assert (r.low, r.high) == (1e-3, 1e-1)
    assert r.diverged == (1.0,)
    assert json.loads(json.dumps(r.to_dict()))["decades"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="threshold"):
        usable_range(result, "lr", threshold=-1)
    with pytest.raises(KeyError, match="not a parameter"):
        usable_range(result, "batch_size")


# ---------------------------------------------------------------- real training


@pytest.fixture(scope="module")
def data():
    return load_dataset("fashion_mnist").subset(256, 128, 128)


def tiny_mlp(norm=None, bn_kwargs=None, kernel_initializer="he_normal", width=16):
    layers = [
        keras.Input((28, 28, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(width, kernel_initializer=kernel_initializer, use_bias=norm is None),
    ]
    if norm == "batch":
        layers.append(keras.layers.BatchNormalization(**(bn_kwargs or {})))
    layers += [keras.layers.Activation("relu"), keras.layers.Dense(10)]
    return keras.Sequential(layers, name="tiny_bn" if norm else "tiny")


def test_train_trial_maps_parameters(data):
    trial = TrainTrial(data, tiny_mlp, epochs=2, builder_kwargs={"width": 8})
    point = {"lr": 0.1, "bn_momentum": 0.9, "renorm": True, "init_scale": 3.0, "norm": "batch"}
    build, fit = trial.split({**point, "batch_size": 4})
    assert fit == {"epochs": 2, "batch_size": 4, "lr": 0.1}
    assert build["bn_kwargs"] == {"momentum": 0.9, "renorm": True}
    assert build["width"] == 8 and build["norm"] == "batch"
    init = keras.initializers.get(build["kernel_initializer"])
    w = np.asarray(init((400, 400)))
    assert w.std() == pytest.approx(3.0 * math.sqrt(2 / 400), rel=0.1)
    assert init_config(1.0)["config"]["scale"] == 2.0

    variants = {
        "BN + renorm": {"norm": "batch", "bn_kwargs": {"renorm": True}},
        "LN": {"norm": "layer"},
    }
    trial = TrainTrial(data, tiny_mlp, epochs=1, variants=variants, optimizer="sgd")
    build, fit = trial.split({"variant": "BN + renorm", "bn_momentum": 0.9, "lr": 1})
    assert build == {"norm": "batch", "bn_kwargs": {"renorm": True, "momentum": 0.9}}
    assert isinstance(fit["lr"], float) and fit["optimizer"] == "sgd"
    build, _ = trial.split({"variant": "LN", "bn_momentum": 0.9})
    assert build == {"norm": "layer"}, "BN arguments are dropped without BN"
    with pytest.raises(KeyError, match="Unknown variant 'GN'"):
        trial.split({"variant": "GN"})
    with pytest.raises(TypeError, match="epochs"):
        TrainTrial(data, tiny_mlp)


@pytest.mark.slow
def test_reruns_and_resumed_sweeps_hit_the_run_cache(data, capsys):
    trial = TrainTrial(data, tiny_mlp, epochs=1, batch_size=64, optimizer="sgd")
    grid = {"lr": [0.01, 0.05], "norm": ["batch"]}
    first = run_sweep("cache", grid, trial, seeds=1, verbose=False)
    assert (first.computed, first.cached) == (2, 0)

    calls = []

    def stopping(params, seed):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append((params["lr"], seed))
        return trial(params, seed)

    with pytest.raises(KeyboardInterrupt):  # more seeds, interrupted after three trials
        run_sweep("cache", grid, stopping, seeds=2, verbose=False)
    assert calls == [(0.01, 0), (0.01, 1), (0.05, 0)]

    resumed = run_sweep("cache", grid, trial, seeds=2, verbose=False)
    assert [t["from_cache"] for t in resumed.trials] == [True, True, True, False]
    assert (resumed.computed, resumed.cached) == (1, 3), "only the missing trial trains"
    again = run_sweep("cache", grid, trial, seeds=2, verbose=True)
    assert (again.computed, again.cached) == (0, 4), "a finished sweep trains nothing"
    assert capsys.readouterr().err.count("from its record") == 4
    assert _by_key(again) == _by_key(resumed)
    assert _by_key(first).items() <= _by_key(again).items()
    assert _by_key(load_sweep("cache")) == _by_key(again)

    # The run cache knows the data: the same grid on other data trains again.
    other = TrainTrial(
        data.subset(128, 128, 128), tiny_mlp, epochs=1, batch_size=64, optimizer="sgd"
    )
    assert run_sweep("other", {"lr": [0.01], "norm": ["batch"]}, other, seeds=1).computed == 1


_MOMENTA = []


def _bn_momentum(model, data):
    """A sweep's `measure`: called inside the run, its numbers saved in the run's record."""
    bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    _MOMENTA.append(bn[0].momentum if bn else None)
    return {"n_bn": len(bn)}


def test_real_sweep_with_train_records_divergence(data):
    momenta = _MOMENTA
    momenta.clear()
    trial = TrainTrial(
        data, tiny_mlp, epochs=1, batch_size=64, optimizer="sgd", measure=_bn_momentum
    )
    grid = {"lr": [0.05, 1e6], "norm": ["batch"], "bn_momentum": [0.5]}
    result = run_sweep("real", grid, trial, seeds=1, verbose=False)
    ok, bad = result.trials
    assert not ok["diverged"] and 0.0 <= ok["metrics"]["val_accuracy"] <= 1.0
    assert ok["metrics"]["val_accuracy"] > 0.3, "a tiny MLP learns something in one epoch"
    assert ok["metrics"]["n_bn"] == 1 and momenta == [0.5]
    assert bad["diverged"] and "learning rate" in bad["message"]
    assert "n_bn" not in bad["metrics"], "measure is not called on a diverged run"

    # A new sweep over the same runs reads their records: nothing is trained or measured again.
    again = run_sweep("real2", grid, trial, seeds=1, verbose=False)
    assert (again.computed, again.cached) == (0, 2) and momenta == [0.5]
    assert again.trials[0]["metrics"]["val_accuracy"] == ok["metrics"]["val_accuracy"]
    assert again.trials[0]["metrics"]["n_bn"] == 1, "the measured numbers come from the record"
    assert again.trials[1]["diverged"]
