"""bnutils.layers: fused BN equals Keras's BN, ghost BN a NumPy reference; noisy BN; conversion."""

from __future__ import annotations

import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from bnutils._graph import find_batchnorm_layers
from bnutils.layers import (
    FusedBatchNormalization,
    GhostBatchNormalization,
    NoisyBatchNormalization,
    convert_batchnorm,
)

# (input shape, axis): small batches so that the biased / unbiased variance difference shows.
FUSED_CASES = [
    ((2, 5, 6, 3), -1),
    ((4, 3, 5, 6), 1),
    ((8, 4, 4, 5), 3),
    ((3, 6, 2, 2), -3),
    ((2, 7), -1),
    ((5, 4), 1),
    ((4, 6, 3), -1),
    ((2, 3, 2, 2, 4), -1),
]


def _data(shape, seed=0, scale=3.0, shift=1.5, dtype="float32"):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * scale + shift).astype(dtype)


def _pair(shape, axis=-1, seed=1, **kwargs):
    """A Keras BN and a fused BN built on ``shape`` with the same random weights."""
    keras_bn = keras.layers.BatchNormalization(axis=axis, **kwargs)
    fused_bn = FusedBatchNormalization(axis=axis, **kwargs)
    keras_bn.build(shape)
    fused_bn.build(shape)
    rng = np.random.default_rng(seed)
    weights = [rng.uniform(0.5, 1.5, size=w.shape).astype("float32") for w in keras_bn.weights]
    keras_bn.set_weights(weights)
    fused_bn.set_weights(weights)
    return keras_bn, fused_bn


def _op_types(layer, x, training, **call_kwargs):
    fn = tf.function(lambda t: layer(t, training=training, **call_kwargs))
    graph = fn.get_concrete_function(tf.TensorSpec(x.shape, x.dtype)).graph
    return {op.type for op in graph.get_operations()}


def _train_steps(layer, xs):
    step = tf.function(lambda t: layer(t, training=True))
    for x in xs:
        y = step(x)
    return y


# ---------------------------------------------------------------- fused: same numbers as Keras


@pytest.mark.parametrize("shape,axis", FUSED_CASES)
def test_fused_matches_keras_outputs_and_moving_stats(shape, axis):
    keras_bn, fused_bn = _pair(shape, axis, momentum=0.9)
    assert "FusedBatchNormV3" in _op_types(fused_bn, _data(shape), training=True)
    assert "FusedBatchNormV3" in _op_types(fused_bn, _data(shape), training=False)
    xs = [_data(shape, seed=s) for s in range(100)]
    y_keras = _train_steps(keras_bn, xs)
    y_fused = _train_steps(fused_bn, xs)
    np.testing.assert_allclose(y_fused, y_keras, atol=1e-5)
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(
            getattr(fused_bn, name).numpy(), getattr(keras_bn, name).numpy(), rtol=1e-5, atol=1e-7
        )
    x = _data(shape, seed=123)
    np.testing.assert_allclose(fused_bn(x, training=False), keras_bn(x, training=False), atol=1e-5)


@pytest.mark.parametrize("shape,axis", [((6, 7), -1), ((4, 3, 5, 2), 1), ((3, 4, 4, 2), -1)])
def test_fused_with_unknown_dimensions(shape, axis):
    keras_bn, fused_bn = _pair(shape, axis, momentum=0.5)
    dims = [None] * len(shape)  # every dimension unknown but the channels
    dims[axis] = shape[axis]
    spec = tf.TensorSpec(dims, "float32")
    steps = {
        layer: tf.function(lambda t, la=layer: la(t, training=True), input_signature=[spec])
        for layer in (keras_bn, fused_bn)
    }
    for seed in range(3):
        x = _data(shape, seed=seed)
        np.testing.assert_allclose(steps[fused_bn](x), steps[keras_bn](x), atol=1e-5)
    np.testing.assert_allclose(
        fused_bn.moving_variance.numpy(), keras_bn.moving_variance.numpy(), rtol=1e-5
    )


def test_fused_moving_variance_uses_biased_batch_variance():
    # One update from var=1 with momentum 0: the moving variance is the batch variance itself.
    x = _data((2, 3, 1, 4), seed=5)
    layer = FusedBatchNormalization(momentum=0.0)
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_variance.numpy(), x.var(axis=(0, 1, 2)), rtol=1e-5)
    # ... and that differs from the kernel's unbiased variance by n / (n - 1) = 6 / 5.
    assert not np.allclose(layer.moving_variance.numpy(), x.var(axis=(0, 1, 2), ddof=1), rtol=1e-2)


@pytest.mark.parametrize("shape,axis", [((4, 3, 3, 5), -1), ((3, 4, 2, 2), 1), ((6, 5), -1)])
@pytest.mark.parametrize("training", [True, False])
def test_fused_gradients_match_keras(shape, axis, training):
    keras_bn, fused_bn = _pair(shape, axis)
    x = tf.constant(_data(shape, seed=3))
    w = tf.constant(_data(shape, seed=4, shift=0.0))  # a random linear loss

    def grads(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x, training=training)) * w)
        return tape.gradient(loss, [x, layer.gamma, layer.beta])

    for g_fused, g_keras in zip(grads(fused_bn), grads(keras_bn), strict=True):
        scale = np.abs(g_keras.numpy()).max()
        np.testing.assert_allclose(g_fused, g_keras, rtol=1e-4, atol=1e-4 * scale)


def test_fused_trainable_false_runs_in_inference_mode():
    keras_bn, fused_bn = _pair((4, 3, 3, 2))
    x = _data((4, 3, 3, 2), seed=8)
    before = [w.numpy().copy() for w in fused_bn.weights]
    fused_bn.trainable = False
    keras_bn.trainable = False
    y = fused_bn(x, training=True)
    np.testing.assert_allclose(y, keras_bn(x, training=True), atol=1e-5)
    np.testing.assert_allclose(y, fused_bn(x, training=False), atol=1e-6)
    for old, new in zip(before, fused_bn.weights, strict=True):
        np.testing.assert_array_equal(new.numpy(), old)


@pytest.mark.parametrize("center,scale", [(False, True), (True, False), (False, False)])
def test_fused_without_center_or_scale(center, scale):
    shape = (3, 4, 4, 3)
    keras_bn, fused_bn = _pair(shape, center=center, scale=scale, momentum=0.5)
    assert len(fused_bn.weights) == 2 + center + scale
    xs = [_data(shape, seed=s) for s in range(5)]
    np.testing.assert_allclose(_train_steps(fused_bn, xs), _train_steps(keras_bn, xs), atol=1e-5)
    np.testing.assert_allclose(fused_bn(xs[0]), keras_bn(xs[0]), atol=1e-5)
    np.testing.assert_allclose(
        fused_bn.moving_variance.numpy(), keras_bn.moving_variance.numpy(), rtol=1e-5
    )


@pytest.mark.parametrize(
    "shape,kwargs,call_kwargs",
    [
        ((4, 3, 5, 2), {"axis": 2}, {}),  # unusual axis
        ((4, 3, 5, 2), {"renorm": True}, {}),
        ((4, 5, 3), {}, {"mask": np.array([[1, 1, 0, 1, 0]] * 4, bool)}),
        ((4, 3), {"dtype": "float64"}, {}),
    ],
)
def test_fused_falls_back_to_keras(shape, kwargs, call_kwargs):
    keras_bn, fused_bn = _pair(shape, **kwargs)
    dtype = kwargs.get("dtype", "float32")
    x = _data(shape, dtype=dtype)
    for training in (True, False):
        assert "FusedBatchNormV3" not in _op_types(fused_bn, x, training, **call_kwargs)
    for training in (True, False):
        np.testing.assert_allclose(
            fused_bn(x, training=training, **call_kwargs),
            keras_bn(x, training=training, **call_kwargs),
            atol=1e-5,
        )
    np.testing.assert_allclose(fused_bn.moving_mean.numpy(), keras_bn.moving_mean.numpy())


@pytest.mark.parametrize("policy,tol", [("mixed_float16", 4e-3), ("mixed_bfloat16", 3e-2)])
def test_fused_mixed_precision(policy, tol):
    shape = (4, 3, 3, 4)
    keras_bn, fused_bn = _pair(shape, dtype=policy, momentum=0.8)
    x = tf.cast(_data(shape), keras.mixed_precision.Policy(policy).compute_dtype)
    assert "FusedBatchNormV3" in _op_types(fused_bn, x, training=True)
    assert fused_bn.gamma.dtype == "float32" and fused_bn.moving_mean.dtype == "float32"
    xs = [x * (1.0 + 0.1 * s) for s in range(10)]
    y_fused = _train_steps(fused_bn, xs)
    y_keras = _train_steps(keras_bn, xs)
    assert y_fused.dtype == y_keras.dtype == x.dtype
    np.testing.assert_allclose(
        tf.cast(y_fused, "float32"), tf.cast(y_keras, "float32"), rtol=tol, atol=tol
    )
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(
            getattr(fused_bn, name).numpy(), getattr(keras_bn, name).numpy(), rtol=1e-5
        )
    y_inf = fused_bn(x, training=False)
    np.testing.assert_allclose(
        tf.cast(y_inf, "float32"),
        tf.cast(keras_bn(x, training=False), "float32"),
        rtol=tol,
        atol=tol,
    )

    def grad(layer):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(layer(x, training=True), "float32") ** 2)
        return tape.gradient(loss, [layer.gamma, layer.beta])

    for g_fused, g_keras in zip(grad(fused_bn), grad(keras_bn), strict=True):
        assert g_fused.dtype == "float32"
        np.testing.assert_allclose(g_fused, g_keras, rtol=10 * tol, atol=10 * tol)


def test_fused_trains_like_keras_in_fit():
    def build(bn_cls):
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.Conv2D(4, 3, use_bias=False),
                bn_cls(momentum=0.9),
                keras.layers.ReLU(),
                keras.layers.Flatten(),
                keras.layers.Dense(3),
            ]
        )

    x = _data((32, 8, 8, 1), seed=11)
    y = np.arange(32) % 3
    models = {}
    for cls in (keras.layers.BatchNormalization, FusedBatchNormalization):
        model = build(cls)
        model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        models[cls] = model
    for w_keras, w_fused in zip(
        models[keras.layers.BatchNormalization].weights,
        models[FusedBatchNormalization].weights,
        strict=True,
    ):
        np.testing.assert_allclose(w_fused.numpy(), w_keras.numpy(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- weights, config, saving


def _model(bn_layer, input_shape=(6, 6, 2)):
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(3, 3, use_bias=False, name="conv")(inputs)
    x = bn_layer(x)
    outputs = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs)


def _train_a_little(model, seed=0):
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x = _data((16, *model.input_shape[1:]), seed=seed)
    model.fit(x, np.zeros((16, 2)), batch_size=8, epochs=1, verbose=0)
    return x


def test_weights_and_config_move_between_keras_and_fused(tmp_path):
    keras_model = _model(keras.layers.BatchNormalization(name="bn", momentum=0.7, epsilon=1e-4))
    x = _train_a_little(keras_model)
    bn = keras_model.get_layer("bn")
    fused = FusedBatchNormalization.from_config(bn.get_config())
    assert fused.get_config() == bn.get_config()
    fused_model = _model(fused)
    names = [w.path.split("/")[-1] for w in fused.weights]
    assert names == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert [w.shape for w in fused.weights] == [w.shape for w in bn.weights]
    # an object-based TF checkpoint of the Keras model restores into the fused one ...
    path = tf.train.Checkpoint(model=keras_model).write(str(tmp_path / "keras_ckpt"))
    tf.train.Checkpoint(model=fused_model).read(path).assert_existing_objects_matched()
    np.testing.assert_allclose(
        fused_model.predict(x, verbose=0), keras_model.predict(x, verbose=0), atol=1e-5
    )
    # ... and back, after training the fused model.
    _train_a_little(fused_model, seed=1)
    back = _model(keras.layers.BatchNormalization.from_config(fused.get_config()))
    back.set_weights(fused_model.get_weights())
    np.testing.assert_allclose(
        back.predict(x, verbose=0), fused_model.predict(x, verbose=0), atol=1e-5
    )


@pytest.mark.parametrize(
    "bn_class,kwargs",
    [(FusedBatchNormalization, {}), (GhostBatchNormalization, {"virtual_batch_size": 4})],
)
def test_convert_batchnorm_swaps_class_and_keeps_weights(bn_class, kwargs):
    inner = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.Conv2D(3, 1), keras.layers.BatchNormalization()]
    )
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.BatchNormalization(name="outer_bn")(keras.layers.Conv2D(3, 3)(inputs))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inner(x)))
    x = _train_a_little_gap(model)
    converted = convert_batchnorm(model, bn_class, **kwargs)
    bns = [la for _, la in find_batchnorm_layers(converted)]
    assert len(bns) == 2 and all(type(la) is bn_class for la in bns)
    originals = find_batchnorm_layers(model)
    assert len(originals) == 2
    assert all(type(la) is keras.layers.BatchNormalization for _, la in originals)
    np.testing.assert_allclose(
        converted.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )
    back = convert_batchnorm(converted, keras.layers.BatchNormalization)
    assert "virtual_batch_size" not in back.get_layer("outer_bn").get_config()
    np.testing.assert_allclose(back.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    with pytest.raises(ValueError, match="BatchNormalization"):
        convert_batchnorm(model, keras.layers.LayerNormalization)


def test_convert_batchnorm_reports_what_it_converted_and_warns_when_nothing():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(3, 3)(inputs))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    converted, report = convert_batchnorm(model, FusedBatchNormalization, return_report=True)
    assert isinstance(converted, keras.Model)
    assert report.converted == [("bn", "BatchNormalization")]
    assert "Converted 1 BN layer(s) to FusedBatchNormalization" in str(report)
    assert report.to_dict()["bn_layer"] == "FusedBatchNormalization"
    shared = keras.layers.BatchNormalization(name="shared_bn")  # called twice: one entry
    nested = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.BatchNormalization()])
    y = keras.layers.Add()([shared(inputs), shared(nested(inputs))])
    twice = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _, report = convert_batchnorm(twice, FusedBatchNormalization, return_report=True)
    assert len(report.converted) == 2, report.converted
    plain = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    with pytest.warns(UserWarning, match="converted nothing in model"):
        _, empty = convert_batchnorm(plain, return_report=True)
    assert empty.converted == []


def _train_a_little_gap(model):
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x = _data((16, *model.input_shape[1:]))
    model.fit(x, np.ones((16, 3)), batch_size=8, epochs=1, verbose=0)
    return x


@pytest.mark.parametrize(
    "make_bn",
    [
        lambda: FusedBatchNormalization(name="bn", momentum=0.8),
        lambda: GhostBatchNormalization(4, name="bn", momentum=0.8),
    ],
    ids=["fused", "ghost"],
)
def test_keras_file_round_trip_and_export(make_bn, tmp_path):
    model = _model(make_bn())
    x = _train_a_little(model)
    assert isinstance(model.get_layer("bn"), keras.layers.BatchNormalization)
    expected = model.predict(x, verbose=0)

    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert type(loaded.get_layer("bn")) is type(model.get_layer("bn"))
    assert loaded.get_layer("bn").get_config() == model.get_layer("bn").get_config()
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)

    model.export(str(tmp_path / "saved"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "saved"))
    np.testing.assert_allclose(reloaded.serve(tf.constant(x)), expected, atol=1e-5)


def test_layers_are_batch_normalization_subclasses():
    assert issubclass(FusedBatchNormalization, keras.layers.BatchNormalization)
    assert issubclass(GhostBatchNormalization, keras.layers.BatchNormalization)
    config = GhostBatchNormalization(16, momentum=0.5).get_config()
    assert config["virtual_batch_size"] == 16
    assert GhostBatchNormalization.from_config(config).virtual_batch_size == 16


# ---------------------------------------------------------------- ghost BN


def _ghost_reference(x, gamma, beta, vbs, axis, eps):
    """Ghost BN by hand: per group of ``vbs`` consecutive examples, biased moments."""
    axis = axis % x.ndim
    out = np.empty_like(x, dtype=np.float64)
    means, variances = [], []
    bshape = [1] * x.ndim
    bshape[axis] = -1
    red = tuple(a for a in range(x.ndim) if a != axis)
    for start in range(0, len(x), vbs):
        chunk = x[start : start + vbs].astype(np.float64)
        mean, var = chunk.mean(axis=red), chunk.var(axis=red)
        means.append(mean)
        variances.append(var)
        normed = (chunk - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + eps)
        out[start : start + vbs] = normed * gamma.reshape(bshape) + beta.reshape(bshape)
    return out, np.mean(means, axis=0), np.mean(variances, axis=0)


@pytest.mark.parametrize(
    "shape,axis,vbs", [((12, 5), -1, 4), ((8, 3, 3, 2), -1, 2), ((6, 3, 4, 4), 1, 3)]
)
def test_ghost_matches_numpy_reference(shape, axis, vbs):
    momentum, eps = 0.8, 1e-3
    layer = GhostBatchNormalization(vbs, axis=axis, momentum=momentum, epsilon=eps)
    layer.build(shape)
    rng = np.random.default_rng(2)
    gamma = rng.uniform(0.5, 2, size=layer.gamma.shape).astype("float32")
    beta = rng.normal(size=layer.beta.shape).astype("float32")
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    moving_mean = np.zeros(gamma.shape)
    moving_var = np.ones(gamma.shape)
    scales = np.arange(1, shape[0] + 1, dtype="float32").reshape((-1,) + (1,) * (len(shape) - 1))
    for step in range(5):
        # Groups with very different statistics, so that per-group normalization shows.
        x = _data(shape, seed=step) * scales
        y = layer(x, training=True)
        ref, batch_mean, batch_var = _ghost_reference(x, gamma, beta, vbs, axis, eps)
        np.testing.assert_allclose(y, ref, atol=1e-4)
        moving_mean = moving_mean * momentum + batch_mean * (1 - momentum)
        moving_var = moving_var * momentum + batch_var * (1 - momentum)
        np.testing.assert_allclose(layer.moving_mean.numpy(), moving_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.moving_variance.numpy(), moving_var, rtol=1e-5)
        # the whole-batch statistics would give other numbers
        assert not np.allclose(y, _ghost_reference(x, gamma, beta, len(x), axis, eps)[0], atol=1e-2)

    keras_bn = keras.layers.BatchNormalization(axis=axis, epsilon=eps)
    keras_bn.build(shape)
    keras_bn.set_weights([w.numpy() for w in layer.weights])
    x = _data(shape, seed=99)
    np.testing.assert_allclose(layer(x, training=False), keras_bn(x, training=False), atol=1e-6)


def test_ghost_gradients_equal_keras_bn_per_virtual_batch():
    shape, vbs = (8, 3, 3, 2), 4
    ghost = GhostBatchNormalization(vbs)
    keras_bn = keras.layers.BatchNormalization()
    ghost.build(shape)
    keras_bn.build(shape)
    keras_bn.set_weights([np.full(2, v, "float32") for v in (1.5, -0.5, 0.0, 1.0)])
    ghost.set_weights(keras_bn.get_weights())
    x = tf.constant(_data(shape, seed=6))
    w = tf.constant(_data(shape, seed=7, shift=0.0))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y_ghost = ghost(x, training=True)
        y_split = tf.concat([keras_bn(x[i : i + vbs], training=True) for i in (0, 4)], axis=0)
        loss_ghost = tf.reduce_sum(y_ghost * w)
        loss_split = tf.reduce_sum(y_split * w)
    np.testing.assert_allclose(y_ghost, y_split, atol=1e-5)
    targets = [x, ghost.gamma, ghost.beta]
    split_targets = [x, keras_bn.gamma, keras_bn.beta]
    for g, r in zip(
        tape.gradient(loss_ghost, targets), tape.gradient(loss_split, split_targets), strict=True
    ):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_ghost_with_whole_batch_equals_keras_bn():
    shape = (6, 4, 4, 3)
    ghost = GhostBatchNormalization(6, momentum=0.9)
    keras_bn = keras.layers.BatchNormalization(momentum=0.9)
    xs = [_data(shape, seed=s) for s in range(10)]
    np.testing.assert_allclose(_train_steps(ghost, xs), _train_steps(keras_bn, xs), atol=1e-5)
    for a, b in zip(ghost.weights, keras_bn.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


def test_ghost_rejects_indivisible_batch():
    layer = GhostBatchNormalization(4)
    with pytest.raises(ValueError, match=r"batch size 6 .*virtual_batch_size=4"):
        layer(_data((6, 3)), training=True)
    layer(_data((6, 3)), training=False)  # inference does not care

    step = tf.function(
        lambda t: layer(t, training=True), input_signature=[tf.TensorSpec((None, 3))]
    )
    step(_data((8, 3)))  # dynamic batch that divides: fine
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"\[6\] \[is not .*virtual_batch_size=4"
    ):
        step(_data((6, 3)))


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((0,), {}, "virtual_batch_size.*integer >= 1"),
        ((2.5,), {}, "virtual_batch_size.*integer >= 1"),
        ((None,), {}, "virtual_batch_size.*integer >= 1"),
        ((4,), {"renorm": True}, "renorm"),
        ((4,), {"synchronized": True}, "synchronized"),
    ],
)
def test_ghost_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        GhostBatchNormalization(*args, **kwargs)


def test_ghost_rejects_batch_axis_and_masks():
    with pytest.raises(ValueError, match="axis=0"):
        GhostBatchNormalization(2, axis=0).build((4, 3))
    layer = GhostBatchNormalization(2)
    with pytest.raises(ValueError, match="mask"):
        layer(_data((4, 5, 3)), training=True, mask=np.ones((4, 5), bool))


def test_ghost_mixed_precision():
    layer = GhostBatchNormalization(2, dtype="mixed_float16", momentum=0.0)
    x = _data((4, 3, 3, 2))
    y = layer(x.astype("float16"), training=True)
    assert y.dtype == "float16" and layer.moving_mean.dtype == "float32"
    x16 = x.astype("float16").astype("float32")
    ref, mean, var = _ghost_reference(x16, np.ones(2), np.zeros(2), 2, -1, 1e-3)
    np.testing.assert_allclose(tf.cast(y, "float32"), ref, atol=5e-3, rtol=5e-3)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5)


# ---------------------------------------------------------------- noisy BN


def test_noisy_bn_is_identity_in_inference():
    layer = NoisyBatchNormalization(shift=2.0, scale=3.0, seed=1)
    x = np.random.default_rng(1).normal(size=(16, 5)).astype("float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x)), x)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)


def test_noisy_bn_adds_a_per_channel_affine_distortion_that_changes_each_step():
    layer = NoisyBatchNormalization(shift=0.5, scale=1.0, seed=3)
    x = np.random.default_rng(2).normal(size=(32, 4)).astype("float32")
    step = tf.function(lambda t: layer(t, training=True))
    y1, y2 = step(x).numpy(), step(x).numpy()
    for y in (y1, y2):
        assert not np.allclose(y, x)
        for c in range(4):  # y[:, c] = s_c * x[:, c] + m_c exactly
            s, m = np.polyfit(x[:, c], y[:, c], 1)
            np.testing.assert_allclose(y[:, c], s * x[:, c] + m, atol=1e-5)
            assert 1 / 2.0 - 1e-6 <= s <= 2.0 + 1e-6 and abs(m) <= 0.5 + 1e-6
    assert not np.allclose(y1, y2), "the noise must be redrawn every step"
    means = (y1 - x).mean(axis=0)
    assert np.all(np.abs(means) > 0), "non-zero mean shift"


def test_noisy_bn_on_conv_inputs_and_bad_arguments():
    layer = NoisyBatchNormalization(shift=0.0, scale=1.0, seed=0)
    x = np.ones((8, 3, 3, 2), dtype="float32")
    ratio = keras.ops.convert_to_numpy(layer(x, training=True)) / x
    assert np.allclose(ratio, ratio[:1, :1, :1, :])  # one draw per channel for the whole batch
    assert not np.allclose(ratio[..., 0], ratio[..., 1])  # differs between channels
    with pytest.raises(ValueError, match="non-negative"):
        NoisyBatchNormalization(shift=-1.0)
    with pytest.raises(ValueError, match="integer"):
        NoisyBatchNormalization(axis=1.5)
    with pytest.raises(ValueError, match=r"rank >= 2.*\(8,\)"):
        NoisyBatchNormalization()(np.ones(8, "float32"))


def test_noisy_bn_serializes(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(5),
            keras.layers.BatchNormalization(),
            NoisyBatchNormalization(shift=0.3, scale=0.2, seed=7, name="noisy"),
        ]
    )
    path = tmp_path / "noisy.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.get_layer("noisy")
    assert isinstance(layer, NoisyBatchNormalization)
    assert (layer.shift, layer.scale, layer.seed) == (0.3, 0.2, 7)
    x = np.random.default_rng(0).normal(size=(4, 5)).astype("float32")
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=0, atol=1e-6
    )


# ---------------------------------------------------------------- the benchmark's plumbing


def _load_benchmark():
    import importlib.util

    from bnutils.config import repo_root

    folder = repo_root() / "benchmarks"
    if str(folder) not in sys.path:  # the script imports its shared benchmarks/_harness.py
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("bench_bn_layers", folder / "bench_bn_layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_benchmark_builds_each_variant_and_reports_ratios():
    bench = _load_benchmark()
    expected = {
        "none": None,
        "keras": keras.layers.BatchNormalization,
        "fused": FusedBatchNormalization,
        "ghost": GhostBatchNormalization,
    }
    for variant, cls in expected.items():
        model = bench.build_cnn(variant, input_shape=(8, 8, 1), virtual_batch_size=4)
        bns = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
        assert len(bns) == (0 if cls is None else 5)
        assert all(type(la) is cls for la in bns)
    x, y = _data((16, 8, 8, 1)), np.arange(16) % 10
    report = bench.bench_model(
        "tiny",
        lambda v: bench.build_cnn(v, input_shape=(8, 8, 1), virtual_batch_size=4),
        x,
        y,
        batch_size=8,
        repeats=2,
        calls={1: 2, 4: 1},
        variants=("none", "fused"),
    )
    assert report["steps_per_epoch"] == 2
    assert report["train_ratio_vs_none"]["none"] == 1.0
    assert set(report["train_step_ms"]) == {"none", "fused"}
    assert set(report["latency_ms"]) == {"batch_1", "batch_4"}
    for stats in report["train_step_ms"].values():
        assert len(stats["runs"]) == 2 and 0 < stats["min"] <= stats["median"]
    rows = bench._rows({"tiny": report})
    assert [r["bn"] for r in rows] == ["none", "fused"]
    with pytest.raises(ValueError, match="Unknown models"):
        bench.run(quick=True, models=("vgg",))


def test_convert_keeps_compile_settings_and_shared_layers():
    seq = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization()]
    )
    seq.compile(optimizer="sgd", loss="mse")
    converted = convert_batchnorm(seq, FusedBatchNormalization)
    assert converted.compiled and converted.get_compile_config() == seq.get_compile_config()
    # a layer used both in the outer model and inside a nested one stays one layer
    shared = keras.layers.Dense(4, name="shared")
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, keras.layers.BatchNormalization()(shared(inner_in)), name="inner")
    outer_in = keras.Input((4,))
    outer = keras.Model(outer_in, inner(shared(outer_in)))
    copy = convert_batchnorm(outer, FusedBatchNormalization)
    assert len(copy.weights) == len(outer.weights)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    np.testing.assert_allclose(
        copy.predict(x, verbose=0), outer.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
