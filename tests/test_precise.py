"""Precise BN: recalibrated moving statistics equal the population statistics of BN inputs."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

import bnutils  # noqa: E402
from bnutils._graph import find_batchnorm_layers  # noqa: E402
from bnutils.precise import batchnorm_input_statistics, recalibrate_batchnorm  # noqa: E402

L = keras.layers


@pytest.fixture(scope="module")
def fmnist():
    return bnutils.load_dataset("fashion_mnist").subset(2000, 1000, 10)


def _lagging_mlp(ds):
    """Momentum 0.99 and ~30 steps: the moving statistics still hold most of their init."""
    bnutils.set_seed(0)
    model = keras.Sequential([
        keras.Input((28, 28, 1)), L.Flatten(),
        L.Dense(64, use_bias=False), L.BatchNormalization(momentum=0.99), L.ReLU(),
        L.Dense(32, use_bias=False), L.BatchNormalization(momentum=0.99), L.ReLU(),
        L.Dense(10, activation="softmax"),
    ])  # fmt: skip
    model.compile(
        keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    model.fit(ds.x_train, ds.y_train, batch_size=64, epochs=1, verbose=0)
    return model


def _reference_stats(model, x, batch_size):
    """NumPy forward in training mode: population stats of each BN input over all batches."""
    dense1, bn1, dense2 = model.layers[1], model.layers[2], model.layers[4]
    w1, w2 = dense1.kernel.numpy().astype(np.float64), dense2.kernel.numpy().astype(np.float64)
    gamma, beta = bn1.gamma.numpy().astype(np.float64), bn1.beta.numpy().astype(np.float64)
    flat = x.reshape(len(x), -1).astype(np.float64)
    h1_all, h2_all = [], []
    for s in range(0, len(x), batch_size):
        h1 = flat[s : s + batch_size] @ w1
        z = gamma * (h1 - h1.mean(0)) / np.sqrt(h1.var(0) + bn1.epsilon) + beta
        h1_all.append(h1)
        h2_all.append(np.maximum(z, 0.0) @ w2)
    return [np.concatenate(h1_all), np.concatenate(h2_all)], h2_all


@pytest.mark.slow
def test_recalibration_matches_population_statistics_and_improves_accuracy(fmnist):
    model = _lagging_mlp(fmnist)
    bns = [lay for _, lay in find_batchnorm_layers(model)]
    before = model.evaluate(fmnist.x_val, fmnist.y_val, verbose=0)[1]
    trainable_before = [v.numpy().copy() for v in model.trainable_variables]

    report = recalibrate_batchnorm(
        model, fmnist.x_train, num_batches=None, batch_size=50, shuffle=False
    )

    after = model.evaluate(fmnist.x_val, fmnist.y_val, verbose=0)[1]
    inputs, _ = _reference_stats(model, fmnist.x_train, 50)
    for bn, h in zip(bns, inputs, strict=True):
        np.testing.assert_allclose(bn.moving_mean.numpy(), h.mean(0), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(bn.moving_variance.numpy(), h.var(0), rtol=1e-3, atol=1e-4)
    assert report.num_batches == 40 and report.num_examples == 2000 and report.passes == 1
    assert [r.path for r in report.layers] == [bn.name for bn in bns]
    assert report.max_mean_gap > 0.5  # the EMA really lagged
    assert after > before + 0.05, (before, after)
    for v, old in zip(model.trainable_variables, trainable_before, strict=True):
        np.testing.assert_array_equal(v.numpy(), old)
    assert all("call" not in vars(bn) for bn in bns)  # the collection hooks are gone
    assert "mean gap" in str(report) and len(report.to_dict()["layers"]) == 2


@pytest.mark.slow
def test_variance_modes_pooled_vs_average_of_batch_variances(fmnist):
    model = _lagging_mlp(fmnist)
    bn1, bn2 = model.layers[2], model.layers[5]
    x = fmnist.x_train[:1000]
    inputs, _ = _reference_stats(model, x, 100)
    batches = [h.reshape(10, 100, -1) for h in inputs]  # (batch, example, channel)
    recalibrate_batchnorm(
        model,
        x,
        num_batches=None,
        batch_size=100,
        shuffle=False,
        variance="batch_mean",
        layers=[bn1, bn2],
    )
    batch_means = [bn.moving_variance.numpy().copy() for bn in (bn1, bn2)]
    recalibrate_batchnorm(
        model, x, num_batches=None, batch_size=100, shuffle=False, layers=[bn1.name, bn2]
    )
    for bn, b, batch_mean in zip((bn1, bn2), batches, batch_means, strict=True):
        np.testing.assert_allclose(batch_mean, b.var(1).mean(0), rtol=1e-3, atol=1e-4)
        between = b.mean(1).var(0)
        np.testing.assert_allclose(
            bn.moving_variance.numpy(), batch_mean + between, rtol=1e-3, atol=1e-4
        )
    # BN1's input (a linear map of the pixels) has batch means that really differ.
    assert np.median(batches[0].mean(1).var(0) / batch_means[0]) > 0.005


@pytest.mark.slow
def test_dataset_and_arrays_agree_and_num_batches_limits(fmnist):
    model = _lagging_mlp(fmnist)
    x, y = fmnist.x_train[:640], fmnist.y_train[:640]
    snapshot = [v.numpy().copy() for v in model.variables]
    recalibrate_batchnorm(model, (x, y), num_batches=3, batch_size=64, shuffle=False)
    from_arrays = [v.numpy().copy() for v in model.non_trainable_variables]
    for v, value in zip(model.variables, snapshot, strict=True):
        v.assign(value)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
    report = recalibrate_batchnorm(model, data, num_batches=3)
    assert report.num_batches == 3 and report.num_examples == 192
    for a, b in zip(from_arrays, model.non_trainable_variables, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6)


def _conv_model():
    """Conv -> BN in a nested model, a BN subclass, a frozen BN and a BN over axis 1."""

    class MyBN(L.BatchNormalization):
        pass

    base = keras.Sequential(
        [keras.Input((8, 8, 2)), L.Conv2D(4, 3, use_bias=False), MyBN(name="my_bn"), L.ReLU()],
        name="base",
    )
    inp = keras.Input((8, 8, 2))
    h = base(inp)
    h = L.Reshape((4, 36))(L.Permute((3, 1, 2))(h))
    h = L.BatchNormalization(axis=1, name="bn_axis1")(h)
    h = L.BatchNormalization(name="frozen")(L.Flatten()(h))
    out = L.Dense(3)(h)
    model = keras.Model(inp, out)
    model.get_layer("frozen").trainable = False
    return model


def test_nested_subclass_axis_and_frozen_layers():
    bnutils.set_seed(1)
    model = _conv_model()
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(96, 8, 8, 2)) * 3 + 2).astype("float32")
    paths = [p for p, _ in find_batchnorm_layers(model)]
    assert paths == ["base/my_bn", "bn_axis1", "frozen"]
    frozen = model.get_layer("frozen")
    frozen_before = frozen.moving_mean.numpy().copy()

    report = recalibrate_batchnorm(model, x, num_batches=None, batch_size=32, shuffle=False)

    assert report.skipped == ["frozen"] and len(report.layers) == 2
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), frozen_before)
    conv = model.get_layer("base").layers[0]
    probe = keras.Model(model.get_layer("base").inputs, conv.output)
    h = probe.predict(x, verbose=0).astype(np.float64)  # conv output: mode-independent
    my_bn = model.get_layer("base").get_layer("my_bn")
    np.testing.assert_allclose(my_bn.moving_mean.numpy(), h.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(my_bn.moving_variance.numpy(), h.var((0, 1, 2)), rtol=1e-3)
    # bn_axis1 normalizes the 4 channels of a (N, 4, 36) tensor over axes 0 and 2.
    assert model.get_layer("bn_axis1").moving_mean.shape == (4,)
    stats = batchnorm_input_statistics(model, x, training=True, batch_size=32, layers="bn_axis1")
    np.testing.assert_allclose(
        model.get_layer("bn_axis1").moving_mean.numpy(), stats[0].mean, rtol=1e-5, atol=1e-6
    )
    assert stats[0].count == 96 * 36 and stats[0].used_batch_stats is True

    # Named explicitly, a frozen layer is recalibrated too (it runs in inference mode, so
    # its new statistics need a second pass to reach the layers after it).
    report = recalibrate_batchnorm(model, x, num_batches=None, batch_size=32, layers=["frozen"])
    assert report.passes == 2
    assert not np.allclose(frozen.moving_mean.numpy(), frozen_before)


def test_masked_inputs_use_only_unmasked_positions():
    bnutils.set_seed(0)
    inp = keras.Input((5,), dtype="int32")
    emb = L.Embedding(10, 3, mask_zero=True)
    out = L.BatchNormalization()(emb(inp))
    model = keras.Model(inp, out)
    tokens = np.array([[1, 2, 0, 0, 0], [3, 4, 5, 0, 0], [6, 7, 8, 9, 0], [1, 1, 1, 1, 1]])
    recalibrate_batchnorm(model, tokens, num_batches=None, batch_size=4, shuffle=False)
    vectors = emb.embeddings.numpy()[tokens[tokens > 0]].astype(np.float64)
    bn = model.layers[-1]
    np.testing.assert_allclose(bn.moving_mean.numpy(), vectors.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), vectors.var(0), rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_inference_statistics_leave_the_model_unchanged(fmnist):
    model = _lagging_mlp(fmnist)
    snapshot = [v.numpy().copy() for v in model.variables]
    stats = batchnorm_input_statistics(model, fmnist.x_val[:300], training=False, batch_size=128)
    assert [s.used_batch_stats for s in stats] == [False, False]
    assert stats[0].count == 300  # the last, smaller batch is kept here
    h = fmnist.x_val[:300].reshape(300, -1) @ model.layers[1].kernel.numpy()
    np.testing.assert_allclose(stats[0].mean, h.mean(0), rtol=1e-4, atol=1e-5)
    batchnorm_input_statistics(model, fmnist.x_val[:300], training=True)
    for v, value in zip(model.variables, snapshot, strict=True):
        np.testing.assert_array_equal(v.numpy(), value)


@pytest.mark.slow
def test_bad_arguments_raise_helpful_errors(fmnist):
    model = _lagging_mlp(fmnist)
    x = fmnist.x_train[:64]
    with pytest.raises(ValueError, match="`batch_size` must be an integer >= 2"):
        recalibrate_batchnorm(model, x, batch_size=1)
    with pytest.raises(ValueError, match="`variance` must be one of"):
        recalibrate_batchnorm(model, x, variance="ema")
    with pytest.raises(ValueError, match="No BatchNormalization layer named 'nope'"):
        recalibrate_batchnorm(model, x, layers="nope")
    with pytest.raises(ValueError, match="not a BatchNormalization layer"):
        recalibrate_batchnorm(model, x, layers=[model.layers[1]])
    with pytest.raises(TypeError, match="Expected a Keras model"):
        recalibrate_batchnorm(object(), x)
    with pytest.raises(TypeError, match="Expected `data`"):
        recalibrate_batchnorm(model, 3.5)
    no_bn = keras.Sequential([keras.Input((4,)), L.Dense(2)], name="plain")
    with pytest.raises(ValueError, match="Nothing to recalibrate in model 'plain'.*has none"):
        recalibrate_batchnorm(no_bn, np.zeros((8, 4), "float32"))
    for layer in model.layers:
        layer.trainable = False
    with pytest.raises(ValueError, match="every one is frozen"):
        recalibrate_batchnorm(model, x)


def test_the_scratch_layer_is_found_recalibrated_and_diagnosed_like_keras_bn(fmnist):
    """One BN predicate: notebook 03's layer is a BN layer for every tool of the package."""
    from bnutils import diagnose_batchnorm, find_batchnorm_layers
    from bnutils.scratch import ScratchBatchNormalization

    def build(bn_class):
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                L.Flatten(),
                L.Dense(32),
                bn_class(name="bn"),
                L.ReLU(),
                L.Dense(10),
            ]
        )

    x = fmnist.x_train[:512]
    reports = {}
    for bn_class in (L.BatchNormalization, ScratchBatchNormalization):
        model = build(bn_class)
        assert [p for p, _ in find_batchnorm_layers(model)] == ["bn"]
        report = recalibrate_batchnorm(model, x, num_batches=None, batch_size=128, shuffle=False)
        reports[bn_class.__name__] = report
        assert [r.path for r in report.layers] == ["bn"] and report.num_batches == 4
        doctor = diagnose_batchnorm(model, fmnist.x_val[:256])
        assert "no BatchNormalization layer" not in str(doctor)
    keras_bn, scratch = reports.values()
    np.testing.assert_allclose(
        scratch.layers[0].new_mean, keras_bn.layers[0].new_mean, rtol=1e-5, atol=1e-6
    )
