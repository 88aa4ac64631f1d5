"""BN folding: equal inference outputs for every producer kind, topology and two applications."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from bnutils.folding import FoldReport, fold_batchnorm
from bnutils.folding import _fold_parameters as fold_parameters

L = keras.layers
RTOL = 1e-4  # of the output scale (standard deviation of the original outputs)


def _bn_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _bn_layers(layer)
        elif isinstance(layer, L.BatchNormalization):
            yield layer


def _randomize_bn(model, seed=0):
    """Non-trivial statistics, so that a wrong fold cannot pass as the identity."""
    rng = np.random.default_rng(seed)
    for bn in _bn_layers(model):
        c = bn.moving_mean.shape[0]
        bn.moving_mean.assign(rng.normal(0.0, 0.5, c))
        bn.moving_variance.assign(rng.uniform(0.3, 2.5, c))
        if bn.gamma is not None:
            bn.gamma.assign(rng.uniform(0.5, 1.5, c))
        if bn.beta is not None:
            bn.beta.assign(rng.normal(0.0, 0.3, c))
    return model


def _assert_folds_exactly(model, x, n_folded, n_kept=0):
    before = [w.copy() for w in model.get_weights()]
    folded, report = fold_batchnorm(model, return_report=True)
    expected = np.asarray(model(x, training=False))
    got = np.asarray(folded(x, training=False))
    scale = expected.std()
    assert scale > 0
    np.testing.assert_allclose(got, expected, rtol=0, atol=RTOL * scale)
    assert len(report.folded) == n_folded, str(report)
    assert len(report.kept) == n_kept, str(report)
    assert len(list(_bn_layers(folded))) == n_kept
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)  # the original is untouched
    return folded, report


def _single(producer, input_shape, bn_axis=-1):
    inputs = keras.Input(input_shape)
    outputs = L.BatchNormalization(axis=bn_axis)(producer(inputs))
    return _randomize_bn(keras.Model(inputs, outputs))


PRODUCERS = {
    "dense": (lambda: L.Dense(5), (7,)),
    "dense_3d": (lambda: L.Dense(5, use_bias=False), (4, 7)),
    "conv1d": (lambda: L.Conv1D(5, 3), (12, 3)),
    "conv2d_nobias": (lambda: L.Conv2D(5, 3, use_bias=False), (9, 9, 3)),
    "conv2d_groups": (lambda: L.Conv2D(6, 3, groups=3), (9, 9, 3)),
    "conv3d": (lambda: L.Conv3D(4, 2), (5, 5, 5, 2)),
    "separable1d": (lambda: L.SeparableConv1D(5, 3, depth_multiplier=2), (12, 3)),
    "separable2d_nobias": (
        lambda: L.SeparableConv2D(5, 3, depth_multiplier=2, use_bias=False),
        (9, 9, 3),
    ),
    "depthwise1d": (lambda: L.DepthwiseConv1D(3, depth_multiplier=3), (12, 3)),
    "depthwise2d": (lambda: L.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False), (9, 9, 3)),
    "conv1d_transpose": (lambda: L.Conv1DTranspose(5, 3, strides=2), (6, 3)),
    "conv2d_transpose": (lambda: L.Conv2DTranspose(5, 3, strides=2, use_bias=False), (5, 5, 3)),
    "conv3d_transpose": (lambda: L.Conv3DTranspose(4, 2), (4, 4, 4, 2)),
}


@pytest.mark.parametrize("kind", sorted(PRODUCERS))
def test_every_producer_kind_folds_exactly(kind):
    make, shape = PRODUCERS[kind]
    model = _single(make(), shape)
    x = np.random.default_rng(1).normal(size=(3, *shape)).astype("float32")
    folded, _ = _assert_folds_exactly(model, x, n_folded=1)
    assert len(folded.layers) == len(model.layers) - 1


def _cpu_runs_nchw_conv() -> bool:
    """Whether TensorFlow can execute a channels-first Conv2D here. On some CPUs (seen on an
    AVX2 machine without AVX-512) it raises "The Conv2D op currently only supports the NHWC
    tensor format on the CPU"."""
    import tensorflow as tf

    try:
        tf.nn.conv2d(tf.ones((1, 1, 3, 3)), tf.ones((1, 1, 1, 1)), 1, "VALID", data_format="NCHW")
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
        return False
    return True


@pytest.mark.parametrize(
    "make",
    [
        lambda: L.Conv2D(4, 3, data_format="channels_first"),
        lambda: L.Conv2DTranspose(4, 3, data_format="channels_first"),
        lambda: L.DepthwiseConv2D(3, depth_multiplier=2, data_format="channels_first"),
    ],
)
def test_channels_first_folds_on_axis_1(make):
    # 9x9 inputs keep the output width different from the channel count: Keras 3.15's
    # TensorFlow `ops.add` treats a (1, C, 1, 1) bias as NHWC when C equals the width.
    layer = make()
    if not isinstance(layer, L.DepthwiseConv2D) and not _cpu_runs_nchw_conv():
        pytest.skip(
            "TensorFlow cannot execute a channels_first Conv2D on this CPU (it "
            "reports NHWC-only support); the folding of axis 1 is untestable here"
        )
    model = _single(layer, (3, 9, 9), bn_axis=1)
    x = np.random.default_rng(2).normal(size=(2, 3, 9, 9)).astype("float32")
    _assert_folds_exactly(model, x, n_folded=1)


def test_bn_on_wrong_axis_is_kept():
    model = _single(L.Conv2D(8, 3), (8, 8, 3), bn_axis=1)  # axis 1 is a spatial axis here
    x = np.random.default_rng(3).normal(size=(2, 8, 8, 3)).astype("float32")
    _, report = _assert_folds_exactly(model, x, n_folded=0, n_kept=1)
    assert "axis" in report.kept[0][1]


def test_unfoldable_positions_are_kept_with_reasons():
    inputs = keras.Input((8, 8, 3))
    first = L.BatchNormalization(name="bn_input")(inputs)  # follows the input
    a = L.Conv2D(4, 3, padding="same", activation="relu", name="conv_relu")(first)
    a = L.BatchNormalization(name="bn_after_relu")(a)  # after an activation
    b = L.Conv2D(4, 3, padding="same", name="conv_shared_out")(first)
    b_bn = L.BatchNormalization(name="bn_branch")(b)  # b is also used by the Add below
    merged = L.Add(name="add")([a, b_bn, b])
    merged = L.BatchNormalization(name="bn_after_add")(merged)  # after a merge
    c = L.Conv2D(4, 1, name="conv_ok")(merged)
    c = L.BatchNormalization(name="bn_ok")(c)
    model = _randomize_bn(keras.Model(inputs, c))
    x = np.random.default_rng(4).normal(size=(2, 8, 8, 3)).astype("float32")
    _, report = _assert_folds_exactly(model, x, n_folded=1, n_kept=4)
    assert report.folded == [("conv_ok", "bn_ok")]
    reasons = dict(report.kept)
    assert set(reasons) == {"bn_input", "bn_after_relu", "bn_branch", "bn_after_add"}
    assert "relu" in reasons["bn_after_relu"]
    assert "used elsewhere" in reasons["bn_branch"]
    assert "Add" in reasons["bn_after_add"]


def test_shared_producer_is_not_folded():
    conv = L.Conv2D(4, 3, padding="same")
    inputs = keras.Input((6, 6, 4))
    y = L.BatchNormalization()(conv(inputs))
    y = conv(y)  # the same kernel is used twice: folding would change both calls
    model = _randomize_bn(keras.Model(inputs, y))
    x = np.random.default_rng(5).normal(size=(2, 6, 6, 4)).astype("float32")
    _, report = _assert_folds_exactly(model, x, n_folded=0, n_kept=1)
    assert "more than once" in report.kept[0][1]


def test_residual_functional_model():
    inputs = keras.Input((8, 8, 4))
    y = L.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    y = L.BatchNormalization()(y)
    y = L.ReLU()(y)
    y = L.Conv2D(4, 3, padding="same")(y)
    y = L.BatchNormalization()(y)
    y = L.ReLU()(L.Add()([inputs, y]))
    outputs = L.Dense(3)(L.GlobalAveragePooling2D()(y))
    model = _randomize_bn(keras.Model(inputs, outputs))
    x = np.random.default_rng(6).normal(size=(3, 8, 8, 4)).astype("float32")
    _assert_folds_exactly(model, x, n_folded=2)


def test_sequential_and_nested_submodels():
    block = keras.Sequential(
        [keras.Input((8, 8, 4)), L.Conv2D(6, 3, padding="same"), L.BatchNormalization(), L.ReLU()],
        name="seq_block",
    )
    inner_in = keras.Input((8, 8, 6))
    inner_out = L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same")(inner_in))
    inner = keras.Model(inner_in, inner_out, name="func_block")
    inputs = keras.Input((8, 8, 3))
    y = L.BatchNormalization()(L.Conv2D(4, 1)(inputs))
    y = inner(block(y))
    y = L.BatchNormalization()(L.Dense(5)(L.Flatten()(y)))
    model = _randomize_bn(keras.Model(inputs, y))
    x = np.random.default_rng(7).normal(size=(3, 8, 8, 3)).astype("float32")
    folded, report = _assert_folds_exactly(model, x, n_folded=4)
    assert any(p.startswith("seq_block/") for p, _ in report.folded)
    assert any(p.startswith("func_block/") for p, _ in report.folded)
    assert report.layers_after == report.layers_before - 4

    seq = _randomize_bn(
        keras.Sequential(
            [keras.Input((10,)), L.Dense(8), L.BatchNormalization(), L.ReLU(), L.Dense(2)]
        )
    )
    x_seq = np.random.default_rng(11).normal(size=(4, 10)).astype("float32")
    folded_seq, _ = _assert_folds_exactly(seq, x_seq, n_folded=1)
    assert isinstance(folded_seq, keras.Sequential)


def test_bn_subclass_and_missing_gamma_beta_fold():
    class MyBN(L.BatchNormalization):  # e.g. a Ghost or fused BN variant
        pass

    inputs = keras.Input((7,))
    y = MyBN(center=False)(L.Dense(6)(inputs))
    y = L.BatchNormalization(scale=False)(L.Dense(4)(y))
    model = _randomize_bn(keras.Model(inputs, y))
    x = np.random.default_rng(8).normal(size=(4, 7)).astype("float32")
    _assert_folds_exactly(model, x, n_folded=2)


def test_fold_parameters_match_the_bn_formula():
    model = _single(L.Dense(3), (2,))
    dense, bn = model.layers[1], model.layers[2]
    params = fold_parameters(dense, bn)
    x = np.random.default_rng(9).normal(size=(5, 2))
    direct = x @ params["kernel"] + params["bias"]
    np.testing.assert_allclose(direct, np.asarray(model(x.astype("float32"))), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Dense or convolution"):
        fold_parameters(L.ReLU(), bn)


def test_report_prints_and_bad_models_are_refused():
    model = _single(L.Dense(3), (2,))
    _, report = fold_batchnorm(model, return_report=True)
    assert isinstance(report, FoldReport)
    assert "into dense" in str(report)

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="subclassed model `Sub`"):
        fold_batchnorm(Sub())
    with pytest.raises(ValueError, match="no known input shape"):
        fold_batchnorm(keras.Sequential([L.Dense(2), L.BatchNormalization()]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MobileNetV2", "ResNet50"])
def test_keras_applications_fold_exactly(name):
    keras.utils.set_random_seed(0)
    if name == "MobileNetV2":
        model = keras.applications.MobileNetV2(
            weights=None,
            input_shape=(64, 64, 3),
            alpha=0.35,
            classes=10,
            classifier_activation=None,
        )
    else:
        model = keras.applications.ResNet50(
            weights=None, input_shape=(64, 64, 3), classes=10, classifier_activation=None
        )
    _randomize_bn(model)
    n_bn = len(list(_bn_layers(model)))
    x = np.random.default_rng(10).uniform(-1, 1, size=(2, 64, 64, 3)).astype("float32")
    folded, report = _assert_folds_exactly(model, x, n_folded=n_bn)
    assert n_bn > 50
    assert report.params_after < report.params_before
    assert len(folded.layers) == len(model.layers) - n_bn


def test_bnutils_bn_layers_fold():
    layers = pytest.importorskip("bnutils.layers")
    inputs = keras.Input((6, 6, 3))
    y = layers.FusedBatchNormalization()(L.Conv2D(4, 3)(inputs))
    y = layers.GhostBatchNormalization(virtual_batch_size=2)(L.Conv2D(5, 1)(L.ReLU()(y)))
    y = layers.FusedBatchNormalization()(L.ReLU()(y))  # after an activation: kept
    model = _randomize_bn(keras.Model(inputs, y))
    x = np.random.default_rng(12).normal(size=(4, 6, 6, 3)).astype("float32")
    folded, _ = _assert_folds_exactly(model, x, n_folded=2, n_kept=1)
    assert isinstance(folded.layers[-1], layers.FusedBatchNormalization)


def test_folding_nothing_warns_and_says_why():
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, keras.layers.Dense(3)(inputs), name="plain")
    with pytest.warns(UserWarning, match="folded nothing in model 'plain': it has no BatchNorm"):
        fold_batchnorm(plain)
    hidden = keras.layers.Dense(3, activation="relu")(inputs)
    kept = keras.Model(inputs, keras.layers.BatchNormalization()(hidden), name="kept")
    with pytest.warns(UserWarning, match="kept 1 BN layer"):
        fold_batchnorm(kept)
