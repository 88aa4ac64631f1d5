"""The BN doctor finds each bug it knows, and stays silent (above info) on healthy twins."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

import bnutils  # noqa: E402
from bnutils.doctor import DoctorReport, diagnose_batchnorm  # noqa: E402
from bnutils.precise import recalibrate_batchnorm  # noqa: E402

L = keras.layers


@pytest.fixture(scope="module")
def fmnist():
    return bnutils.load_dataset("fashion_mnist").subset(2000, 500, 10)


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(256, 8)) * 2 + 1).astype("float32")
    y = (x[:, 0] + x[:, 1] > 2).astype("int32")
    return x, y


def _mlp(momentum=0.9, bias=False, epsilon=1e-3, dropout=None):
    layers = [keras.Input((28, 28, 1)), L.Flatten(), L.Dense(64, use_bias=bias)]
    if dropout == "before_bn":
        layers.append(L.Dropout(0.5))
    layers += [
        L.BatchNormalization(momentum=momentum, epsilon=epsilon), L.ReLU(),
        L.Dense(32, use_bias=False), L.BatchNormalization(momentum=momentum, epsilon=epsilon),
        L.ReLU(),
    ]  # fmt: skip
    if dropout == "after_bn":
        layers.append(L.Dropout(0.5))
    layers.append(L.Dense(10, activation="softmax"))
    return keras.Sequential(layers)


def _fit(model, ds, epochs, batch_size=64, lr=1e-3, seed=0):
    bnutils.set_seed(seed)
    model.compile(
        keras.optimizers.Adam(lr), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    model.fit(ds.x_train, ds.y_train, batch_size=batch_size, epochs=epochs, verbose=0)
    return model


def _small_cnn(momentum=0.9, bias=False):
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(8, 3, use_bias=bias), L.BatchNormalization(momentum=momentum), L.ReLU(),
        L.MaxPooling2D(),
        L.Conv2D(16, 3, use_bias=bias), L.BatchNormalization(momentum=momentum), L.ReLU(),
        L.GlobalAveragePooling2D(), L.Dense(10, activation="softmax"),
    ])  # fmt: skip


def _variables(model):
    return [v.numpy().copy() for v in model.variables]


# ------------------------------------------------------------------ healthy twins


@pytest.mark.slow
def test_healthy_twins_get_nothing_above_info(fmnist):
    twins = {
        "mlp momentum 0.9": _fit(_mlp(0.9), fmnist, epochs=3),
        "mlp keras defaults, trained long enough": _fit(
            _mlp(0.99), fmnist, epochs=8, batch_size=32
        ),
        "cnn momentum 0.9": _fit(_small_cnn(0.9), fmnist, epochs=2),
    }
    for label, model in twins.items():
        before = _variables(model)
        report = diagnose_batchnorm(model, fmnist.x_val, fmnist.y_val)
        assert report.codes("warning") == [], f"{label}:\n{report}"
        assert report.ok
        assert all(r["mean_gap"] < 0.8 and r["variance_ratio"] < 2.5 for r in report.layers)
        for v, value in zip(model.variables, before, strict=True):
            np.testing.assert_array_equal(v.numpy(), value)


# ------------------------------------------------------------------ measured bugs


@pytest.mark.slow
def test_lagging_moving_statistics_and_the_recalibration_fix(fmnist):
    model = _fit(_mlp(0.99), fmnist, epochs=1, lr=1e-2)  # ~30 steps at momentum 0.99
    before = _variables(model)
    report = diagnose_batchnorm(model, fmnist.x_val, fmnist.y_val)
    assert "moving-stats-mismatch" in report.codes("warning"), str(report)
    (finding,) = report.by_code("moving-stats-mismatch")
    ev = finding.evidence
    assert ev["accuracy_recalibrated"] > ev["accuracy_moving"] + 0.05, ev
    assert ev["loss_recalibrated"] < ev["loss_moving"]
    assert max(ev["mean_gap"].values()) > 0.8 or max(ev["variance_ratio"].values()) > 2.5
    for v, value in zip(model.variables, before, strict=True):  # diagnosis changed nothing
        np.testing.assert_array_equal(v.numpy(), value)
    # The fix: precise BN on the training data; the finding goes away.
    recalibrate_batchnorm(model, fmnist.x_train, batch_size=64)
    assert "moving-stats-mismatch" not in diagnose_batchnorm(model, fmnist.x_val).codes()


def _custom_loop(model, ds, training, steps=40, batch_size=64):
    bnutils.set_seed(0)
    opt = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=training))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))

    data = bnutils.make_tf_dataset(ds.x_train, ds.y_train, batch_size, seed=0).repeat()
    for xb, yb in data.take(steps):
        train_step(xb, yb)
    return model


@pytest.mark.slow
def test_custom_loop_without_training_flag_never_updates_moving_stats(fmnist):
    buggy = _custom_loop(_mlp(0.9), fmnist, training=None)
    report = diagnose_batchnorm(buggy, fmnist.x_val, fmnist.y_val)
    assert report.codes("error") == ["moving-stats-never-updated"], str(report)
    (finding,) = report.by_code("moving-stats-never-updated")
    assert finding.evidence["n_layers"] == 2 and finding.severity == "error"
    twin = _custom_loop(_mlp(0.9), fmnist, training=True)
    assert diagnose_batchnorm(twin, fmnist.x_val, fmnist.y_val).codes("warning") == []


class _ForcedBN(L.Layer):
    """A custom layer that hard-codes training=True: the classic inference bug."""

    def __init__(self, force=True, **kwargs):
        super().__init__(**kwargs)
        self.force = force
        self.bn = L.BatchNormalization(momentum=0.9)

    def call(self, x, training=None):
        return self.bn(x, training=True if self.force else training)


def _toy_model(toy, block):
    inp = keras.Input((8,))
    out = L.Dense(2, activation="softmax")(block(L.Dense(16, use_bias=False)(inp)))
    model = keras.Model(inp, out)
    bnutils.set_seed(0)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(*toy, batch_size=32, epochs=3, verbose=0)
    return model


@pytest.mark.slow
def test_batch_dependent_inference_is_found_and_located(toy):
    x, y = toy
    forced = _toy_model(toy, _ForcedBN(name="forced"))
    report = diagnose_batchnorm(forced, x, y)
    (finding,) = report.by_code("batch-dependent-inference")
    assert finding.severity == "error" and finding.layer.startswith("forced/batch_normalization")
    assert finding.evidence["max_rel_change"] > 1e-2
    assert diagnose_batchnorm(_toy_model(toy, _ForcedBN(force=False)), x, y).ok

    # A functional graph that stored `base(x, training=True)`: plain `model(x)` is affected.
    def wrapped(training):
        base = keras.Sequential(
            [keras.Input((16,)), L.BatchNormalization(momentum=0.9)], name="base"
        )
        return lambda h: base(h, training=training)

    report = diagnose_batchnorm(_toy_model(toy, wrapped(True)), x, y)
    (finding,) = report.by_code("batch-dependent-inference")
    assert finding.layer.startswith("base/batch_normalization")
    assert finding.evidence["default_call_rel_change"] > 1e-2
    assert diagnose_batchnorm(_toy_model(toy, wrapped(None)), x, y).ok


@pytest.mark.slow
def test_training_false_in_a_graph_is_overridden_by_fit(toy):
    x, y = toy
    base = keras.Sequential(
        [
            keras.Input((8,)),
            L.Dense(16, use_bias=False),
            L.BatchNormalization(momentum=0.5),
            L.ReLU(),
        ],
        name="base",
    )
    inp = keras.Input((8,))
    model = keras.Model(inp, L.Dense(2, activation="softmax")(base(inp, training=False)))
    (finding,) = diagnose_batchnorm(model, x).by_code("training-false-overridden")
    assert finding.severity == "warning" and finding.layer.startswith("base/batch_normalization")
    # The finding is real: fit() updates the moving statistics despite training=False.
    bn = base.layers[1]
    model.compile("adam", "sparse_categorical_crossentropy")
    before = bn.moving_mean.numpy().copy()
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert not np.allclose(bn.moving_mean.numpy(), before)
    # The fix: freeze the BN layer itself (and compile again).
    bn.trainable = False
    assert not diagnose_batchnorm(model, x).by_code("training-false-overridden")
    model.compile("adam", "sparse_categorical_crossentropy")
    before = bn.moving_mean.numpy().copy()
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before)


# ------------------------------------------------------------------ structure and config


def test_redundant_bias_is_info_and_only_for_linear_layers(fmnist):
    x = fmnist.x_val[:64]
    report = diagnose_batchnorm(_mlp(bias=True), x)
    (finding,) = report.by_code("redundant-bias")
    assert finding.severity == "info" and finding.evidence["bias_parameters"] == 64
    report = diagnose_batchnorm(_small_cnn(bias=True), x)
    assert len(report.by_code("redundant-bias")) == 2
    assert not diagnose_batchnorm(_small_cnn(bias=False), x).by_code("redundant-bias")
    relu_first = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            L.Flatten(),
            L.Dense(16, activation="relu"),
            L.BatchNormalization(),
        ]
    )
    assert not diagnose_batchnorm(relu_first, x).by_code("redundant-bias")


def test_dropout_before_bn_with_measured_variance_shift(fmnist):
    x = fmnist.x_val[:256]
    report = diagnose_batchnorm(_mlp(dropout="before_bn"), x)
    (finding,) = report.by_code("dropout-before-bn")
    assert finding.severity == "warning"
    assert finding.evidence["variance_shift"] > 1.3, finding.evidence  # dropout 0.5
    assert not diagnose_batchnorm(_mlp(dropout="after_bn"), x).by_code("dropout-before-bn")


def test_bn_after_softmax_or_as_output():
    inp = keras.Input((6,))
    probs = L.Dense(3, activation="softmax")(inp)
    after_softmax = keras.Model(inp, L.Dense(2)(L.BatchNormalization()(probs)))
    as_output = keras.Sequential([keras.Input((6,)), L.Dense(3), L.BatchNormalization()])
    fine = keras.Sequential(
        [
            keras.Input((6,)),
            L.Dense(3, use_bias=False),
            L.BatchNormalization(),
            L.Activation("softmax"),
        ]
    )
    x = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    found = diagnose_batchnorm(after_softmax, x).by_code("bn-after-softmax-or-output")
    assert len(found) == 1 and found[0].evidence["activation"] == "softmax"
    found = diagnose_batchnorm(as_output, x).by_code("bn-after-softmax-or-output")
    assert len(found) == 1 and "last layer" in found[0].message
    assert not diagnose_batchnorm(fine, x).by_code("bn-after-softmax-or-output")
    both = keras.Sequential(
        [keras.Input((6,)), L.Dense(3, activation="softmax"), L.BatchNormalization()]
    )
    (finding,) = diagnose_batchnorm(both, x).by_code("bn-after-softmax-or-output")
    assert finding.evidence["is_output"] and finding.evidence["activation"] == "softmax"


def test_suspicious_momentum_and_pytorch_epsilon(fmnist):
    x = fmnist.x_val[:64]
    report = diagnose_batchnorm(_mlp(momentum=0.1), x)
    (finding,) = report.by_code("suspicious-momentum")
    assert finding.severity == "warning" and set(finding.evidence["momentum"].values()) == {0.1}
    report = diagnose_batchnorm(_mlp(momentum=0.9, epsilon=1e-5), x)
    assert [f.severity for f in report.by_code("suspicious-momentum")] == ["info"]
    assert not diagnose_batchnorm(_mlp(momentum=0.9), x).by_code("suspicious-momentum")


def test_model_without_batchnorm():
    model = keras.Sequential([keras.Input((4,)), L.Dense(3), L.Dense(2)])
    with pytest.warns(UserWarning, match="nothing to diagnose"):  # nothing silent
        report = diagnose_batchnorm(model, np.ones((8, 4), "float32"))
    assert report.codes() == ["no-batchnorm"] and report.ok and report.layers == []


# ------------------------------------------------------------------ subclassed models


class SubNet(keras.Model):
    def __init__(self, force=False):
        super().__init__()
        self.force = force
        self.dense = L.Dense(16, use_bias=False)
        self.bn = L.BatchNormalization(momentum=0.9)
        self.out = L.Dense(2, activation="softmax")

    def call(self, x, training=None):
        h = self.bn(self.dense(x), training=True if self.force else training)
        return self.out(keras.ops.relu(h))


@pytest.mark.slow
def test_subclassed_models_get_the_measured_checks(toy):
    x, y = toy
    untrained = SubNet()
    untrained(x[:2])
    report = diagnose_batchnorm(untrained, x, y)
    assert report.codes() == ["moving-stats-never-updated", "graph-unavailable"], str(report)
    bnutils.set_seed(0)
    trained = SubNet()
    trained.compile("adam", "sparse_categorical_crossentropy")
    trained.fit(x, y, batch_size=32, epochs=5, verbose=0)
    assert diagnose_batchnorm(trained, x, y).ok
    forced = SubNet(force=True)
    forced.compile("adam", "sparse_categorical_crossentropy")
    forced.fit(x, y, batch_size=32, epochs=2, verbose=0)
    (finding,) = diagnose_batchnorm(forced, x).by_code("batch-dependent-inference")
    assert finding.layer.startswith("batch_normalization")


# ------------------------------------------------------------------ inputs and report


def test_bad_inputs_raise_helpful_errors(toy, fmnist):
    x, y = toy
    model = _mlp()
    with pytest.raises(ValueError, match=r"Expected `x` of shape \(None, 28, 28, 1\)"):
        diagnose_batchnorm(model, fmnist.x_val[:8].reshape(8, -1))
    with pytest.raises(TypeError, match="Expected a Keras 3 `keras.Model`"):
        diagnose_batchnorm(L.BatchNormalization(), x)
    with pytest.raises(ValueError, match="at least 2 examples"):
        diagnose_batchnorm(model, fmnist.x_val[:1])
    with pytest.raises(ValueError, match="`y` has 3"):
        diagnose_batchnorm(model, fmnist.x_val[:8], y[:3])
    sub = SubNet()
    sub(x[:2])
    with pytest.raises(ValueError, match=r"Could not run model .* shape \(256, 5\)"):
        diagnose_batchnorm(sub, x[:, :5])


def test_report_table_dicts_and_order(fmnist):
    model = _mlp(momentum=0.1, bias=True)  # untrained: never updated (error) + warning + info
    report = diagnose_batchnorm(model, fmnist.x_val[:64], fmnist.y_val[:64])
    assert isinstance(report, DoctorReport)
    assert report.codes() == ["moving-stats-never-updated", "suspicious-momentum", "redundant-bias"]
    assert report.codes("error") == ["moving-stats-never-updated"] and not report.ok
    text = str(report)
    for f in report.findings:
        assert f.code in text and f.fix[:30] in text
    fields = {f.name for f in dataclasses.fields(report.findings[0])}
    assert fields == {"code", "severity", "layer", "message", "evidence", "fix"}
    with pytest.raises(ValueError, match="`min_severity` must be one of"):
        report.codes("fatal")


@pytest.mark.slow
def test_mobilenetv2_is_diagnosed():
    model = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), classes=10)
    x = np.random.default_rng(0).uniform(-1, 1, size=(8, 96, 96, 3)).astype("float32")
    report = diagnose_batchnorm(model, x)
    assert len(report.layers) == 52
    # Never trained, so never updated; nothing else is wrong with its architecture.
    assert report.codes() == ["moving-stats-never-updated"], str(report)
    assert report.seconds < 60


def test_gaussian_noise_before_bn_is_reported_with_its_stddev():
    inputs = keras.Input((6,))
    x = L.GaussianNoise(0.3)(L.Dense(8, use_bias=False)(inputs))
    model = keras.Model(inputs, L.Dense(2)(L.BatchNormalization()(x)))
    report = diagnose_batchnorm(model, np.ones((8, 6), "float32"))
    (finding,) = report.by_code("dropout-before-bn")
    assert finding.evidence["stddev"] == 0.3 and finding.evidence["rate"] is None
