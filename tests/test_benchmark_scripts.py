"""The plumbing of benchmarks/bench_time_to_accuracy.py and bench_best_accuracy.py on tiny
generated data (the real runs are benchmarks, not tests)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import keras
import numpy as np
import pytest

from bnutils.config import repo_root
from bnutils.layers import FusedBatchNormalization


def _load(name):
    folder = repo_root() / "benchmarks"
    if str(folder) not in sys.path:  # the scripts import their shared benchmarks/_harness.py
        sys.path.insert(0, str(folder))
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("bench_time_to_accuracy")


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    x = rng.random((64, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    return types.SimpleNamespace(x_train=x[:48], y_train=y[:48], x_test=x[48:], y_test=y[48:])


def test_variants_differ_only_in_their_bn_layers(bench):
    kinds = {}
    for variant in bench.VARIANTS:
        model = bench.build(variant, seed=0)
        kinds[variant] = {
            type(la) for la in model.layers if isinstance(la, keras.layers.BatchNormalization)
        }
    assert kinds == {
        "none": set(),
        "fused": {FusedBatchNormalization},
        "keras": {keras.layers.BatchNormalization},
    }
    with pytest.raises(ValueError, match="Unknown variant 'ghost'"):
        bench.build("ghost", seed=0)


@pytest.mark.slow
def test_a_run_stops_when_it_reaches_the_target(bench, tiny):
    one_class = types.SimpleNamespace(
        x_train=tiny.x_train,
        y_train=np.zeros(48, int),
        x_test=tiny.x_test,
        y_test=np.zeros(16, int),
    )
    r = bench.time_to_target(
        "none", 1e-2, one_class, target=0.5, max_epochs=3, batch_size=16, seed=0
    )
    assert r["reached"] and r["stopped"] == "reached" and r["epoch"] == 1
    assert r["seconds"] == r["train_seconds"][0] > 0


@pytest.mark.slow
def test_a_run_slower_than_the_best_so_far_gives_up(bench, tiny):
    r = bench.time_to_target(
        "fused", 1e-3, tiny, target=0.99, max_epochs=3, batch_size=16, seed=0, give_up_after=0.0
    )
    assert r["stopped"] == "slower than best" and not r["reached"]
    assert len(r["test_accuracy"]) == 1 and r["seconds"] is None


def _run(variant, lr, accs, secs, reached):
    return {
        "variant": variant,
        "lr": lr,
        "test_accuracy": accs,
        "train_seconds": secs,
        "reached": reached,
        "epoch": len(accs) if reached else None,
        "seconds": secs[-1] if reached else None,
        "seconds_per_epoch": secs[-1] / len(secs),
    }


def test_each_variant_is_scored_at_its_fastest_learning_rate(bench):
    runs = [
        _run("none", 1e-3, [0.85, 0.91], [40.0, 80.0], True),
        _run("none", 3e-3, [0.86, 0.90, 0.91], [40.0, 80.0, 120.0], True),
        _run("fused", 1e-3, [0.89, 0.90], [45.0, 90.0], False),
        _run("fused", 3e-3, [0.91], [44.0], True),
        _run("keras", 1e-3, [0.80, 0.88], [60.0, 120.0], False),
    ]
    rows = {r["variant"]: r for r in bench.summarize(runs, ("none", "fused", "keras"))}
    assert rows["none"]["best lr"] == 1e-3 and rows["none"]["seconds"] == 80.0
    assert rows["fused"]["best lr"] == 3e-3 and rows["fused"]["seconds vs no BN"] == 0.55
    # nothing reached: the best final accuracy stands in, and no ratio is claimed
    assert rows["keras"]["reached"] is False and rows["keras"]["seconds vs no BN"] is None
    assert rows["keras"]["final test accuracy"] == 0.88


@pytest.mark.slow
def test_time_budget_stops_before_an_epoch_that_would_overrun(tiny):
    best = _load("bench_best_accuracy")
    model = best.builder()
    assert any(isinstance(la, FusedBatchNormalization) for la in model.layers)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    budget = best.TimeBudget(0.0)
    hist = model.fit(
        tiny.x_train, tiny.y_train, epochs=3, batch_size=16, verbose=0, callbacks=[budget]
    )
    assert len(hist.history["loss"]) == 1 and budget.stopped_early
    # epochs of 10 s on a fake clock, budget 25 s: stop after the 2nd epoch, not in a 3rd
    ticks = iter([0.0, 0.0, 10.0, 10.0, 20.0, 20.0, 30.0])
    budget = best.TimeBudget(25.0, clock=lambda: next(ticks))
    budget.set_model(types.SimpleNamespace(stop_training=False))
    budget.on_train_begin()
    for epoch in range(3):
        budget.on_epoch_begin(epoch)
        budget.on_epoch_end(epoch)
        if budget.model.stop_training:
            break
    assert epoch == 1 and budget.stopped_early
    roomy = best.TimeBudget(3600.0)
    hist = model.fit(
        tiny.x_train, tiny.y_train, epochs=2, batch_size=16, verbose=0, callbacks=[roomy]
    )
    assert len(hist.history["loss"]) == 2 and not roomy.stopped_early


def test_each_variant_gives_up_against_its_own_best_time(bench, monkeypatch):
    """run(): a variant's later runs stop at the best time that variant already reached."""
    seen = []

    def fake(variant, lr, ds, target, max_epochs, batch_size, seed, give_up_after):
        seen.append((variant, lr, give_up_after))
        secs = {
            ("none", 1e-3): 80.0,
            ("fused", 1e-3): 30.0,
            ("none", 3e-3): 70.0,
            ("fused", 3e-3): 40.0,
        }[variant, lr]
        return _run(variant, lr, [target], [secs], True)

    monkeypatch.setattr(bench, "time_to_target", fake)
    monkeypatch.setattr(bench, "warm_up", lambda *a, **k: None)
    import bnutils

    tiny_ds = types.SimpleNamespace(summary=lambda: "tiny")
    fake_ds = types.SimpleNamespace(subset=lambda *a: tiny_ds)
    monkeypatch.setattr(bnutils, "load_dataset", lambda **k: fake_ds)
    report = bench.run(quick=True, variants=("none", "fused"), lrs=[1e-3, 3e-3])
    assert seen == [
        ("none", 1e-3, float("inf")),
        ("fused", 1e-3, float("inf")),
        ("fused", 3e-3, 30.0),
        ("none", 3e-3, 80.0),
    ]
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["none"]["seconds"] == 70.0 and rows["fused"]["seconds"] == 30.0
    assert rows["fused"]["seconds vs no BN"] == round(30 / 70, 3)


def test_the_result_file_records_the_command_line_it_was_run_with(bench, monkeypatch, tmp_path):
    """main() writes the arguments it was given, not the test runner's sys.argv."""

    def fake(variant, lr, ds, target, max_epochs, batch_size, seed, give_up_after):
        return _run(variant, lr, [target], [10.0], True)

    monkeypatch.setattr(bench, "time_to_target", fake)
    monkeypatch.setattr(bench, "warm_up", lambda *a, **k: None)
    import bnutils

    tiny_ds = types.SimpleNamespace(summary=lambda: "tiny")
    monkeypatch.setattr(
        bnutils, "load_dataset", lambda **k: types.SimpleNamespace(subset=lambda *a: tiny_ds)
    )
    out = tmp_path / "tta.json"
    report = bench.main(["--quick", "--lrs", "0.001", "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved["command"] == [
        "python",
        "benchmarks/bench_time_to_accuracy.py",
        "--quick",
        "--lrs",
        "0.001",
        "--output",
        str(out),
    ]
    assert saved["profile"] == "quick" and saved["rows"] == report["rows"]
    assert {"name", "date", "machine", "versions"} <= set(saved)


def test_harness_interleaves_in_rotating_order_and_follows_the_profile(monkeypatch, tmp_path):
    harness = _load("_harness")
    order = []
    fns = {k: (lambda k=k: order.append(k)) for k in "abc"}
    times = harness.interleaved(fns, repeats=3)
    assert order == list("abcbcacab")
    assert set(times) == {"wall", "cpu"} and all(len(v) == 3 for v in times["wall"].values())
    assert harness.paired_ratio({"a": [2.0, 4.0, 9.0], "b": [1.0, 1.0, 3.0]}, "a", "b") == 3.0
    assert harness.min_ratio({"a": [2.0, 4.0], "b": [1.0, 0.5]}, "a", "b") == 4.0
    # --quick in a full-profile shell still never writes over the full run's files
    monkeypatch.setenv("BNUTILS_PROFILE", "full")
    monkeypatch.setenv("BNUTILS_RESULTS", str(tmp_path))
    path = harness.save("bench_x", {"rows": []}, ["--quick"], quick=True)
    assert path == tmp_path / "quick" / "bench_x.json"
    saved = json.loads(path.read_text())
    assert saved["profile"] == "quick" and saved["command"] == [
        "python",
        "benchmarks/bench_x.py",
        "--quick",
    ]
    assert harness.save("bench_x", {"rows": []}, []).parent == tmp_path  # the full profile


def test_profile_breakdown_sorts_trace_events_by_what_they_compute():
    """Op names as TensorFlow's profiler writes them for bench_bn_profile's CNN."""
    prof = _load("bench_bn_profile")
    head, tape = "StatefulPartitionedCall/cnn_fused_1", "StatefulPartitionedCall/gradient_tape"
    cases = {
        f"{head}/block1_conv2_1/convolution:Conv2D": "conv fwd",
        f"{tape}/cnn_fused_1/block1_conv2_1/convolution/Conv2DBackpropFilter:Conv2DBackpropFilter": (
            "conv bwd"
        ),
        f"{head}/block1_conv1_bn_1/FusedBatchNormV3:FusedBatchNormV3": "BN kernel fwd",
        f"{tape}/cnn_fused_1/block1_conv1_bn_1/FusedBatchNormGradV3:FusedBatchNormGradV3": (
            "BN kernel bwd"
        ),
        f"{head}/block1_conv1_bn_1/AssignVariableOp_1:AssignVariableOp": "BN other fwd",
        f"{tape}/cnn_keras_1/block1_conv1_bn_1/batchnorm/mul/Mul:Mul": "BN other bwd",
        f"{head}/block1_conv1_act_1/Relu:Relu": "ReLU",
        f"{tape}/cnn_none_1/block1_conv1_1/BiasAdd/BiasAddGrad:BiasAddGrad": "bias add",
        f"{tape}/cnn_fused_1/block1_pool_1/MaxPool2d/MaxPoolGrad:MaxPoolGrad": "pooling",
        "StatefulPartitionedCall/sgd/AssignAddVariableOp_12:AssignAddVariableOp": "optimizer",
        f"{head}/avg_pool_1/Mean:Mean": "other",
        # oneDNN's rewrite (AVX-512 machines): the same ops as _MklNative<Op>
        f"{head}/block1_conv1_1/convolution:_MklNativeFusedConv2D": "conv fwd",
        f"{tape}/cnn_none_1/block1_conv1_1/c:_MklNativeConv2DBackpropFilterWithBias": "conv bwd",
        f"{head}/block1_conv1_bn_1/FusedBatchNormV3:_MklNativeFusedBatchNormEx": "BN kernel fwd",
        f"{tape}/cnn_fused_1/block1_pool_1/MaxPool2d/g:_MklNativeMaxPoolGrad": "pooling",
        "ExecutorState::Process": None,
        "ParallelFor": None,
    }
    assert {name: prof.categorize(name) for name in cases} == cases
    assert set(cases.values()) - {None} <= set(prof.CATEGORIES)
