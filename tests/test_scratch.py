"""ScratchBatchNormalization computes what keras.layers.BatchNormalization computes."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from bnutils.scratch import ScratchBatchNormalization

RNG = np.random.default_rng(1)


def _pair(shape, **kwargs):
    """A Keras BN and a scratch BN, built for ``shape`` with the same random weights."""
    keras_bn = keras.layers.BatchNormalization(**kwargs)
    scratch = ScratchBatchNormalization(**kwargs)
    keras_bn.build(shape)
    scratch.build(shape)
    channels = shape[kwargs.get("axis", -1)]
    weights = [RNG.normal(size=channels).astype("float32") for _ in keras_bn.weights]
    weights[-1] = np.abs(weights[-1]) + 0.5  # a valid moving variance
    keras_bn.set_weights(weights)
    scratch.set_weights(weights)
    return keras_bn, scratch


def _data(shape, n=32):
    return (RNG.normal(size=(n, *shape[1:])) * 3.0 + 2.0).astype("float32")


@pytest.mark.parametrize("shape", [(None, 7), (None, 5, 5, 3)], ids=["NC", "NHWC"])
@pytest.mark.parametrize("training", [False, True])
def test_same_outputs_as_keras(shape, training):
    keras_bn, scratch = _pair(shape)
    x = _data(shape)
    np.testing.assert_allclose(
        scratch(x, training=training), keras_bn(x, training=training), rtol=1e-5, atol=1e-5
    )
    # training mode normalizes with the batch statistics: mean 0 per channel before gamma/beta
    if training:
        y = (np.asarray(scratch(x, training=True)) - scratch.beta.numpy()) / scratch.gamma.numpy()
        np.testing.assert_allclose(y.reshape(-1, shape[-1]).mean(0), 0.0, atol=1e-4)


@pytest.mark.parametrize("shape", [(None, 7), (None, 4, 4, 3)], ids=["NC", "NHWC"])
def test_moving_statistics_after_50_steps(shape):
    keras_bn, scratch = _pair(shape, momentum=0.9, epsilon=1e-2)
    start = scratch.moving_mean.numpy().copy()
    for _ in range(50):
        x = _data(shape, n=16)
        np.testing.assert_allclose(
            scratch(x, training=True), keras_bn(x, training=True), rtol=1e-5, atol=1e-5
        )
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(
            getattr(scratch, name).numpy(), getattr(keras_bn, name).numpy(), rtol=1e-5, atol=1e-5
        )
    # after 50 steps of momentum 0.9 the moving mean has reached the data's mean (2)
    assert np.abs(scratch.moving_mean.numpy() - start).max() > 0.5
    np.testing.assert_allclose(scratch.moving_mean.numpy(), 2.0, atol=0.5)
    x = _data(shape)
    np.testing.assert_allclose(scratch(x), keras_bn(x), rtol=1e-5, atol=1e-5)


def test_moving_update_uses_the_biased_variance_and_keras_momentum():
    layer = ScratchBatchNormalization(momentum=0.8)
    x = np.array([[1.0], [2.0], [6.0]], "float32")
    layer(x, training=True)
    biased_var = x.var()  # numpy's default ddof=0
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.2 * x.mean(), rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.8 + 0.2 * biased_var, rtol=1e-6)


def test_frozen_layer_uses_moving_statistics_and_does_not_update():
    keras_bn, scratch = _pair((None, 4))
    scratch.trainable = keras_bn.trainable = False
    x = _data((None, 4))
    before = scratch.moving_mean.numpy().copy()
    np.testing.assert_allclose(
        scratch(x, training=True), keras_bn(x, training=True), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(scratch.moving_mean.numpy(), before)


def test_gradients_match_keras():
    import tensorflow as tf

    keras_bn, scratch = _pair((None, 6))
    x = tf.constant(_data((None, 6)))
    grads = []
    for layer in (keras_bn, scratch):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) ** 3)
        grads.append(tape.gradient(loss, [x, layer.gamma, layer.beta]))
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-4)


def test_channels_first_axis_and_no_center_scale():
    keras_bn, scratch = _pair((None, 3, 4, 4), axis=1, center=False, scale=False)
    x = _data((None, 3, 4, 4))
    for training in (True, False):
        np.testing.assert_allclose(
            scratch(x, training=training), keras_bn(x, training=training), rtol=1e-5, atol=1e-5
        )
    assert scratch.gamma is None and scratch.beta is None


def test_in_a_model_trains_and_round_trips_through_keras_files(tmp_path):
    inputs = keras.Input((5,))
    x = ScratchBatchNormalization(momentum=0.5, name="sbn")(keras.layers.Dense(4)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    model.compile("sgd", "mse")
    data = _data((None, 5), n=16)
    model.fit(data, np.zeros((16, 2)), epochs=1, verbose=0)
    assert not np.allclose(model.get_layer("sbn").moving_mean.numpy(), 0.0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.get_layer("sbn"), ScratchBatchNormalization)
    assert loaded.get_layer("sbn").momentum == 0.5
    np.testing.assert_allclose(loaded(data), model(data), rtol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="momentum"):
        ScratchBatchNormalization(momentum=1.5)
    with pytest.raises(ValueError, match="epsilon"):
        ScratchBatchNormalization(epsilon=0.0)
    with pytest.raises(ValueError, match=r"rank >= 2.*\(3,\)"):
        ScratchBatchNormalization()(np.zeros(3, "float32"))


# ---------------------------------------------------------------- Keras's arguments and config


KERAS_OPTIONS = dict(
    axis=1,
    momentum=0.7,
    epsilon=1e-2,
    beta_initializer="random_normal",
    gamma_initializer=keras.initializers.Constant(1.5),
    moving_variance_initializer="ones",
    beta_regularizer=keras.regularizers.L1(0.2),
    gamma_regularizer=keras.regularizers.L2(0.1),
    beta_constraint=keras.constraints.NonNeg(),
    gamma_constraint=keras.constraints.MaxNorm(2.0),
    name="bn",
)


def test_from_config_of_a_keras_layer_round_trips():
    keras_bn = keras.layers.BatchNormalization(**KERAS_OPTIONS)
    config = keras_bn.get_config()
    scratch = ScratchBatchNormalization.from_config(config)
    assert scratch.get_config() == config
    back = keras.layers.BatchNormalization.from_config(scratch.get_config())
    assert back.get_config() == config
    default = keras.layers.BatchNormalization().get_config()
    assert ScratchBatchNormalization.from_config(default).get_config() == default


def test_regularizers_add_the_same_losses_as_keras():
    keras_bn, scratch = _pair((None, 3, 4), **KERAS_OPTIONS)
    gamma, beta = scratch.gamma.numpy(), scratch.beta.numpy()
    expected = 0.1 * np.sum(gamma**2) + 0.2 * np.sum(np.abs(beta))
    assert len(scratch.losses) == 2
    np.testing.assert_allclose(sum(np.asarray(v) for v in scratch.losses), expected, rtol=1e-5)
    np.testing.assert_allclose(
        sum(np.asarray(v) for v in scratch.losses),
        sum(np.asarray(v) for v in keras_bn.losses),
        rtol=1e-6,
    )


def test_constraints_are_applied_in_training_like_keras():
    def model(layer):
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((3, 4)), layer])
        m.compile(keras.optimizers.SGD(1.0), loss=lambda y, p: keras.ops.mean(p))
        return m

    x = _data((None, 3, 4), n=8)
    models = [
        model(cls(**KERAS_OPTIONS))
        for cls in (keras.layers.BatchNormalization, ScratchBatchNormalization)
    ]
    for m in models:
        m.fit(x, np.zeros((8,)), batch_size=8, epochs=2, verbose=0, shuffle=False)
    beta = models[1].layers[0].beta.numpy()
    # the loss pushes beta down; NonNeg clips it at 0, and MaxNorm keeps |gamma| <= 2
    np.testing.assert_array_equal(beta, np.zeros_like(beta))
    assert np.linalg.norm(models[1].layers[0].gamma.numpy()) <= 2.0 + 1e-5
    for a, b in zip(models[0].weights, models[1].weights, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_keras_options_give_keras_outputs(training):
    keras_bn, scratch = _pair((None, 3, 4), **KERAS_OPTIONS)
    x = _data((None, 3, 4))
    for _ in range(3):
        np.testing.assert_allclose(
            scratch(x, training=training), keras_bn(x, training=training), rtol=1e-5, atol=1e-5
        )
    np.testing.assert_allclose(scratch.moving_mean.numpy(), keras_bn.moving_mean.numpy())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"synchronized": True}, r"synchronized=True.*expected synchronized=False.*keras\.layers"),
        ({"renorm": True}, r"renorm=True.*expected renorm=False.*keras\.layers"),
    ],
)
def test_unsupported_options_raise_a_helpful_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScratchBatchNormalization(**kwargs)
    config = keras.layers.BatchNormalization(**kwargs).get_config()
    with pytest.raises(TypeError, match=match):  # Keras wraps errors raised in from_config
        ScratchBatchNormalization.from_config(config)
