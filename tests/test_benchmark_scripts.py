"""The plumbing of benchmarks/bench_time_to_accuracy.py and bench_best_accuracy.py on tiny
generated data (the real runs are benchmarks, not tests)."""

from __future__ import annotations

import importlib.util
import json
import os
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
def tiny():
    rng = np.random.default_rng(0)
    x = rng.random((64, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    return types.SimpleNamespace(x_train=x[:48], y_train=y[:48], x_test=x[48:], y_test=y[48:])


def test_one_cycle_warms_up_to_its_peak_then_decays_to_nearly_zero():
    recipe = _load("_recipe")
    schedule = recipe.OneCycle(0.4, steps=100, warmup=0.25)
    lr = [float(schedule(step)) for step in range(101)]
    assert lr[0] == pytest.approx(0.4 / 25) and lr[25] == pytest.approx(0.4)
    assert all(a < b for a, b in zip(lr[:25], lr[1:26], strict=True))  # rising
    assert all(a > b for a, b in zip(lr[25:100], lr[26:101], strict=True))  # falling
    assert lr[100] == pytest.approx(0.4 / 1e4)
    assert recipe.OneCycle(**schedule.get_config()).get_config() == schedule.get_config()
    with pytest.raises(ValueError, match="received peak=0"):
        recipe.OneCycle(0, steps=10)


def test_smoothed_crossentropy_is_keras_label_smoothing_on_integer_labels():
    recipe = _load("_recipe")
    rng = np.random.default_rng(0)
    probs = keras.ops.softmax(rng.normal(size=(8, 10)).astype("float32"))
    labels = rng.integers(0, 10, 8)
    expected = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(
        keras.ops.one_hot(labels, 10), probs
    )
    got = recipe.SmoothedCrossentropy(0.1)(labels.reshape(-1, 1), probs)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    plain = recipe.SmoothedCrossentropy(0.0)(labels, probs)
    sparse = keras.losses.SparseCategoricalCrossentropy()(labels, probs)
    assert float(plain) == pytest.approx(float(sparse), rel=1e-5)


def test_the_recipes_twins_differ_only_in_bn_and_the_flip_tta_averages_mirror_images():
    recipe = _load("_recipe")
    with_bn, without = recipe.build(True, 0.4, 10), recipe.build(False, 0.1, 10)
    bns = {type(la) for la in with_bn.layers if isinstance(la, keras.layers.BatchNormalization)}
    assert bns == {FusedBatchNormalization}
    assert not any(isinstance(la, keras.layers.BatchNormalization) for la in without.layers)

    def convs(m):
        return [
            (la.filters, la.kernel_size, la.strides)
            for la in m.layers
            if "Conv" in type(la).__name__
        ]

    assert convs(with_bn) == convs(without)
    # a "model" that sees only the left half: mirroring changes its answer
    inputs = keras.Input((28, 28, 1))
    left = keras.layers.Cropping2D(((0, 0), (0, 14)))(inputs)
    flat = keras.layers.Flatten()(left)
    out = keras.layers.Dense(10, activation="softmax")(flat)
    model = keras.Model(inputs, out)
    rng = np.random.default_rng(1)
    data = types.SimpleNamespace(
        x_test=rng.random((32, 28, 28, 1), dtype=np.float32), y_test=rng.integers(0, 10, 32)
    )
    got = recipe.test_accuracy(model, data)
    p = model.predict(data.x_test, verbose=0) + model.predict(data.x_test[:, :, ::-1], verbose=0)
    assert got["test_accuracy_flip_tta"] == np.mean(p.argmax(-1) == data.y_test)


def test_best_accuracy_reuses_the_plan_saved_for_the_same_profile_and_budget(tmp_path):
    best = _load("bench_best_accuracy")
    path = tmp_path / "bench_best_accuracy.json"
    rows = [{"model": "bn", "planned epochs": 8}, {"model": "plain", "planned epochs": 9}]
    path.write_text(json.dumps({"profile": "full", "settings": {"budget_s": 1200}, "rows": rows}))
    assert best.saved_plan(path, "plain", "full", 1200) == 9
    assert best.saved_plan(path, "bn", "quick", 1200) is None  # another profile
    assert best.saved_plan(path, "bn", "full", 600) is None  # another budget
    assert best.saved_plan(tmp_path / "missing.json", "bn", "full", 1200) is None


@pytest.fixture(scope="module")
def tta():
    return _load("bench_time_to_accuracy")


@pytest.mark.slow
def test_time_to_target_stops_at_the_target_or_when_slower_than_the_best(tta, tiny):
    def fit(target, give_up):
        tracker = tta.TimeToTarget({"test": (tiny.x_test, tiny.y_test)}, target, give_up, every=1)
        model = keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                keras.layers.Flatten(),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
        model.compile("sgd", "sparse_categorical_crossentropy")
        model.fit(
            tiny.x_train, tiny.y_train, batch_size=8, epochs=3, verbose=0, callbacks=[tracker]
        )
        return tracker

    reached = fit(0.0, None)  # any accuracy reaches 0: stop at the first record after step 0
    assert reached.steps == [0, 1] and reached.reached() == (0, 0.0)
    late = fit(1.01, 0.0)  # unreachable, and any time is slower than 0 s
    assert late.steps == [0, 1] and late.reached() is None
    full = fit(1.01, None)
    assert full.steps[-1] == 18  # 6 steps x 3 epochs, never stopped


def _row(model, epochs, rate, seconds, accuracy=0.9):
    return {
        "model": model,
        "group": "BN" if "bn" in model else "no BN",
        "schedule epochs": epochs,
        "rate": rate,
        "seconds": seconds,
        "epochs": None if seconds is None else epochs,
        "best test accuracy": accuracy,
        "seconds per epoch": 100.0,
    }


def test_each_model_is_scored_at_its_fastest_point_and_groups_compared(tta):
    runs = [
        _row("cnn_adam", 5, 3e-3, 300.0),
        _row("cnn_adam", 5, 1e-3, None, 0.905),
        _row("resnet", 2, 0.1, 250.0),
        _row("resnet_bn", 1, 0.4, None, 0.89),
        _row("resnet_bn", 2, 0.4, 200.0),
        _row("resnet_bn", 2, 0.8, 180.0),
    ]
    rows = {r["model"]: r for r in tta.summarize(runs)}
    assert rows["resnet_bn"]["rate"] == 0.8 and rows["resnet"]["seconds"] == 250.0
    assert rows["BN vs no BN"]["seconds"] == round(180 / 250, 3)
    nothing = tta.summarize([_row("resnet_bn", 1, 0.4, None, 0.8), _row("resnet", 2, 0.1, 90.0)])
    assert nothing[-1]["seconds"] is None and nothing[0]["best test accuracy"] == 0.8


def test_the_grid_runs_short_schedules_first_and_gives_up_against_its_groups_best(
    tta, monkeypatch, tmp_path
):
    monkeypatch.setenv("BNUTILS_PROFILE", "full")  # --quick sets it to quick for the process
    seen = []
    secs = {("resnet_bn", 1): None, ("resnet_bn", 2): 200.0, ("resnet", 2): 260.0}

    def fake(model, rate, epochs, ds, cfg, seed, give_up_after=None):
        seen.append((model, epochs, rate, give_up_after))
        return _row(model, epochs, rate, secs.get((model, epochs), 300.0))

    monkeypatch.setattr(tta, "time_to_target", fake)
    import bnutils

    tiny_ds = types.SimpleNamespace(summary=lambda: "tiny")
    monkeypatch.setattr(
        bnutils, "load_dataset", lambda **k: types.SimpleNamespace(subset=lambda *a: tiny_ds)
    )
    out = tmp_path / "tta.json"
    report = tta.main(["--quick", "--output", str(out)])
    # quick grids: resnet_bn 1 and 2 epochs, resnet, cnn_adam and cnn_bn_adam 2; one rate each
    assert seen == [
        ("resnet_bn", 1, 0.4, None),
        ("resnet", 2, 0.05, None),  # 2 epochs: the models in rotated order
        ("cnn_adam", 2, 3e-3, 260.0),  # against the no-BN group's best so far
        ("cnn_bn_adam", 2, 3e-3, None),  # the BN group has no time yet
        ("resnet_bn", 2, 0.4, 300.0),  # against cnn_bn_adam's 300 s
    ]
    assert report["rows"][-1]["seconds"] == round(200 / 260, 3)
    saved = json.loads(out.read_text())
    assert saved["command"] == [
        "python",
        "benchmarks/bench_time_to_accuracy.py",
        "--quick",
        "--output",
        str(out),
    ]
    assert saved["profile"] == "quick" and saved["rows"] == report["rows"]
    assert os.environ["BNUTILS_PROFILE"] == "quick"  # the package's records follow --quick


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


def test_the_floor_times_every_candidate_it_counts_passes_for():
    floor = _load("_floor")
    report = floor.measure([(4, 6, 6, 3), (4, 3, 3, 5)], repeats=1, calls=1)
    rows = {r["candidate"]: r for r in report["rows"]}
    assert set(rows) == set(floor.PASSES)
    assert all(r["ms fwd+bwd"] > 0 and r["GB/s"] >= 0 for r in rows.values())
    assert report["activations"] == 4 * 6 * 6 * 3 + 4 * 3 * 3 * 5
    assert (
        report["extra passes"] == floor.PASSES["fused BN + ReLU"] - floor.PASSES["bias add + ReLU"]
    )
    cnn = _load("bench_bn_layers").build_cnn("fused")
    assert floor.bn_input_shapes(cnn, 128) == [
        (128, 28, 28, 32),
        (128, 28, 28, 32),
        (128, 14, 14, 64),
        (128, 14, 14, 64),
        (128, 7, 7, 128),
    ]


KERNEL_CATEGORIES = {
    "Conv2D": "conv fwd",
    "FusedConv2D": "conv fwd",
    "Conv2DBackpropFilter": "conv bwd",
    "Conv2DBackpropFilterWithBias": "conv bwd",
    "Conv2DBackpropInput": "conv bwd",
    "FusedBatchNormV3": "BN kernel fwd",
    "FusedBatchNormEx": "BN kernel fwd",
    "FusedBatchNormGradV3": "BN kernel bwd",
    "BiasAdd": "bias add",
    "BiasAddGrad": "bias add",
    "Relu": "ReLU",
    "ReluGrad": "ReLU",
    "MaxPool": "pooling",
    "MaxPoolGrad": "pooling",
}


@pytest.mark.parametrize("fname", ["bench_bn_profile.json", "bench_bn_profile_onednn_off.json"])
def test_profile_categories_hold_on_op_names_recorded_from_real_traces(fname):
    """The committed full runs of bench_bn_profile.py, with oneDNN (_MklNative* op types) and
    without it (TF_ENABLE_ONEDNN_OPTS=0): each recorded op name is categorized as today's
    code does, every kernel by what it computes, and "other" keeps at most 10% of op time."""
    import re

    prof = _load("bench_bn_profile")
    report = json.loads((repo_root() / "results" / fname).read_text())
    onednn = report["settings"]["TF_ENABLE_ONEDNN_OPTS"] != "0"
    types = {op["type"] for op in report["trace_ops"]}
    assert any(t.startswith("_Mkl") for t in types) == onednn
    kernels = set()
    for op in report["trace_ops"]:
        assert prof.categorize(op["example"]) == op["category"], op
        base = re.sub(r"^_Mkl(Native)?", "", op["type"])
        if base in KERNEL_CATEGORIES:
            kernels.add(base)
            assert op["category"] == KERNEL_CATEGORIES[base], op
    assert {"FusedBatchNormGradV3", "Conv2DBackpropInput"} <= kernels
    assert max(report["other_share"].values()) <= 0.10, report["other_share"]
