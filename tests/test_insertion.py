"""insert_batchnorm: every layer type and topology, weight preservation, errors, training, saving."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from bnutils._graph import MODEL_OUTPUT, LayerGraph, find_batchnorm_layers, walk_layers
from bnutils.insertion import DEFAULT_LAYER_TYPES, InsertionReport, insert_batchnorm
from bnutils.models import build_cnn, build_mlp
from bnutils.scratch import ScratchBatchNormalization

L = keras.layers
RNG = np.random.default_rng(0)


def _rand(*shape):
    return RNG.normal(size=shape).astype("float32")


def _randomize_biases(model):
    """Give every bias a non-zero value, so that a lost or misplaced bias shows in the outputs."""
    for layer in _all_layers(model):
        bias = getattr(layer, "bias", None)
        if bias is not None:
            bias.assign(_rand(*bias.shape))


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _kernels(model):
    """{path: array} of every weight that is not a bias or a BN statistic."""
    out = {}
    for layer in _all_layers(model):
        if isinstance(layer, (L.BatchNormalization, ScratchBatchNormalization)):
            continue
        for v in layer.weights:
            if v.name != "bias":
                out[f"{layer.name}/{v.name}"] = np.asarray(v.numpy())
    return out


def _assert_kernels_kept(old, new):
    before, after = _kernels(old), _kernels(new)
    assert before, "the model has no kernels to compare"
    missing = set(before) - set(after)
    assert not missing, f"kernels lost: {missing}"
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def _assert_same_outputs(old, new, x, atol=1e-5):
    for a, b in zip(keras.tree.flatten(old(x)), keras.tree.flatten(new(x)), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=atol)


def _bn_layers(model):
    return [la for la in _all_layers(model) if isinstance(la, L.BatchNormalization)]


# ---------------------------------------------------------------- basic behaviour


def test_mlp_before_matches_the_built_bn_model_and_keeps_outputs():
    model = build_mlp()
    _randomize_biases(model)
    new, report = insert_batchnorm(model, return_report=True)
    reference = build_mlp(norm="batch")
    assert [la.name for la in new.layers] == [la.name for la in reference.layers]
    assert new.count_params() == reference.count_params()
    assert sorted(report.inserted) == ["dense_1", "dense_2", "dense_3"]
    assert report.removed_bias == report.split_activation == ["dense_1", "dense_2", "dense_3"]
    assert "predictions" in report.skipped
    for name in ("dense_1", "dense_2", "dense_3"):
        assert not new.get_layer(name).use_bias
        assert new.get_layer(f"{name}_act").activation.__name__ == "sigmoid"
        # the old bias now lives in beta
        np.testing.assert_array_equal(
            new.get_layer(f"{name}_bn").beta.numpy(), model.get_layer(name).bias.numpy()
        )
    _assert_kernels_kept(model, new)
    _assert_same_outputs(model, new, _rand(8, 28, 28, 1), atol=1e-6)


def test_original_model_is_untouched():
    model = build_cnn()
    names = [la.name for la in model.layers]
    weights = [w.copy() for w in model.get_weights()]
    insert_batchnorm(model)
    assert [la.name for la in model.layers] == names
    for a, b in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_after_position_keeps_bias_and_activation():
    model = build_mlp(activation="relu")
    _randomize_biases(model)
    new, report = insert_batchnorm(model, bn_position="after", return_report=True)
    assert report.removed_bias == [] and report.split_activation == []
    layer = new.get_layer("dense_1")
    assert layer.use_bias and layer.activation.__name__ == "relu"
    inbound = new.get_layer("dense_1_bn")._inbound_nodes[0].input_tensors[0]
    assert inbound._keras_history.operation is layer
    _assert_same_outputs(model, new, _rand(4, 28, 28, 1), atol=1e-6)


def test_linear_layer_then_activation_layer_gets_bn_in_between():
    inputs = keras.Input((6,))
    x = L.Dense(5, name="d")(inputs)
    x = L.Activation("tanh", name="t")(x)
    model = keras.Model(inputs, L.Dense(2, name="out")(x))
    _randomize_biases(model)
    for position in ("before", "after"):
        new, report = insert_batchnorm(model, bn_position=position, return_report=True)
        assert [la.name for la in new.layers][1:] == ["d", "d_bn", "t", "out"]
        assert report.removed_bias == ["d"]  # linear into BN either way
        _assert_same_outputs(model, new, _rand(3, 6), atol=1e-6)


def _layer_case(cls):
    """A tiny model around one layer of class ``cls``: (model, input)."""
    if cls is L.Dense:
        shape, layer = (6,), cls(4, activation="relu", name="target")
    elif cls in (L.Conv1D, L.SeparableConv1D, L.Conv1DTranspose):
        shape, layer = (8, 3), cls(4, 3, activation="relu", name="target")
    elif cls in (L.Conv2D, L.SeparableConv2D, L.Conv2DTranspose):
        shape, layer = (6, 6, 3), cls(4, 3, activation="relu", name="target")
    elif cls in (L.Conv3D, L.Conv3DTranspose):
        shape, layer = (4, 4, 4, 2), cls(3, 3, activation="relu", name="target")
    elif cls is L.DepthwiseConv1D:
        shape, layer = (8, 3), cls(3, activation="relu", name="target")
    elif cls is L.DepthwiseConv2D:
        shape, layer = (6, 6, 3), cls(3, activation="relu", name="target")
    else:  # pragma: no cover - a new default type needs a case here
        raise AssertionError(f"no test case for {cls.__name__}")
    inputs = keras.Input(shape)
    x = layer(inputs)
    x = L.Flatten()(x)
    model = keras.Model(inputs, L.Dense(2, name="out")(x))
    return model, _rand(2, *shape)


@pytest.mark.parametrize("cls", DEFAULT_LAYER_TYPES, ids=lambda c: c.__name__)
def test_every_default_layer_type(cls):
    model, x = _layer_case(cls)
    _randomize_biases(model)
    new, report = insert_batchnorm(model, return_report=True)
    assert report.inserted == {"target": ["target_bn"]}
    assert isinstance(new.get_layer("target"), cls)
    assert not new.get_layer("target").use_bias
    assert new.get_layer("target_act").activation.__name__ == "relu"
    channels = model.get_layer("target").output.shape[-1]
    assert new.get_layer("target_bn").gamma.shape == (channels,)
    _assert_kernels_kept(model, new)
    _assert_same_outputs(model, new, x)


def test_channels_first_layers_normalize_axis_1():
    inputs = keras.Input((3, 6, 6))
    x = L.Conv2D(4, 3, data_format="channels_first", name="conv")(inputs)
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(x)))
    new = insert_batchnorm(model)
    bn = new.get_layer("conv_bn")
    assert bn.axis == 1 and bn.gamma.shape == (4,)


# ---------------------------------------------------------------- topologies


def test_branches_and_merges():
    inputs = keras.Input((8,), name="x")
    a = L.Dense(6, activation="relu", name="a")(inputs)
    b = L.Dense(6, activation="elu", name="b")(inputs)
    added = L.Add(name="add")([a, b])
    c = L.Dense(4, activation="relu", name="c")(added)
    cat = L.Concatenate(name="cat")([c, a])
    model = keras.Model(inputs, L.Dense(3, name="out")(cat))
    _randomize_biases(model)
    new, report = insert_batchnorm(model, return_report=True)
    assert sorted(report.inserted) == ["a", "b", "c"]
    # "a" feeds both the Add and the Concatenate through its (single) BN + activation
    assert len(new.get_layer("a_act")._outbound_nodes) == 2
    _assert_kernels_kept(model, new)
    _assert_same_outputs(model, new, _rand(5, 8))


def test_several_inputs_and_outputs_keep_their_structure():
    ia = keras.Input((4,), name="a")
    ib = keras.Input((5,), name="b")
    h = L.Concatenate()(
        [L.Dense(6, activation="relu", name="da")(ia), L.Dense(6, activation="relu", name="db")(ib)]
    )
    h = L.Dense(8, activation="relu", name="trunk")(h)
    out1 = L.Dense(2, name="head1")(h)
    out2 = L.Activation("sigmoid", name="head2_act")(L.Dense(1, name="head2")(h))
    model = keras.Model({"a": ia, "b": ib}, {"y1": out1, "y2": out2})
    _randomize_biases(model)
    new, report = insert_batchnorm(model, return_report=True)
    assert sorted(report.inserted) == ["da", "db", "trunk"]
    assert {"head1", "head2"} <= set(report.skipped)  # head2 reaches an output via an activation
    x = {"a": _rand(3, 4), "b": _rand(3, 5)}
    out = new(x)
    assert set(out) == {"y1", "y2"}
    _assert_same_outputs(model, new, x)


def test_shared_layer_gets_one_bn_per_call_site():
    shared = L.Dense(5, activation="relu", name="shared")
    i1, i2 = keras.Input((4,), name="i1"), keras.Input((4,), name="i2")
    merged = L.Concatenate()([shared(i1), shared(i2)])
    model = keras.Model([i1, i2], L.Dense(2, name="out")(merged))
    _randomize_biases(model)
    new, report = insert_batchnorm(model, return_report=True)
    assert report.inserted == {"shared": ["shared_bn", "shared_bn_1"]}
    dense = [la for la in new.layers if la.name == "shared"]
    assert len(dense) == 1 and len(dense[0]._inbound_nodes) == 2  # still one shared kernel
    assert len(_bn_layers(new)) == 2
    x = [_rand(3, 4), _rand(3, 4)]
    _assert_same_outputs(model, new, x)
    # the two BN layers see different statistics in training
    new([x[0], 3.0 * x[1] + 1.0], training=True)
    m0, m1 = (new.get_layer(n).moving_mean.numpy() for n in ("shared_bn", "shared_bn_1"))
    assert np.abs(m0 - m1).max() > 1e-3


def test_shared_layer_with_an_output_call_site_is_skipped():
    shared = L.Dense(3, name="shared")
    inputs = keras.Input((3,))
    hidden = shared(inputs)
    model = keras.Model(inputs, shared(L.Activation("relu")(hidden)))
    new, report = insert_batchnorm(model, return_report=True)
    assert report.bn_count == 0
    assert "shared layer" in report.skipped["shared"]
    _assert_same_outputs(model, new, _rand(2, 3))


def test_nested_sequential_and_functional_models_are_rewritten():
    backbone = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.Conv2D(4, 3, activation="relu", name="conv"),
            L.Conv2D(4, 3, activation="relu", name="conv2"),
        ],
        name="backbone",
    )
    inner_in = keras.Input((64,))
    inner = keras.Model(inner_in, L.Dense(6, activation="relu", name="fc")(inner_in), name="head")
    inputs = keras.Input((8, 8, 1))
    x = L.Flatten()(backbone(inputs))
    model = keras.Model(inputs, L.Dense(2, name="out")(inner(x)))
    _randomize_biases(model)
    new, report = insert_batchnorm(model, return_report=True)
    assert sorted(report.inserted) == ["backbone/conv", "backbone/conv2", "head/fc"]
    assert isinstance(new.get_layer("backbone"), keras.Sequential)
    assert [la.name for la in new.get_layer("backbone").layers] == [
        "conv",
        "conv_bn",
        "conv_act",
        "conv2",
        "conv2_bn",
        "conv2_act",
    ]
    assert "fc_bn" in [la.name for la in new.get_layer("head").layers]
    _assert_kernels_kept(model, new)
    _assert_same_outputs(model, new, _rand(2, 8, 8, 1))


def test_nested_model_at_the_output_keeps_its_output_layer():
    inner_in = keras.Input((4,))
    h = L.Dense(4, activation="relu", name="h")(inner_in)
    inner = keras.Model(inner_in, L.Dense(2, name="logits")(h), name="inner")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, inner(inputs))
    _, report = insert_batchnorm(model, return_report=True)
    assert list(report.inserted) == ["inner/h"]
    assert "output layer" in report.skipped["inner/logits"]


def test_keras_ops_in_the_graph():
    inputs = keras.Input((4,))
    a = L.Dense(4, activation="relu", name="a")(inputs)
    x = keras.ops.add(a, keras.ops.multiply(inputs, 2.0))
    model = keras.Model(inputs, L.Dense(1, name="out")(x))
    _randomize_biases(model)
    new = insert_batchnorm(model)
    assert "a_bn" in [la.name for la in new.layers]
    _assert_same_outputs(model, new, _rand(3, 4))


def test_sequential_model_gives_a_sequential_model():
    model = keras.Sequential(
        [
            keras.Input((5,)),
            L.Dense(4, activation="relu", name="d1"),
            L.Dropout(0.1),
            L.Dense(3, name="d2"),
            L.Softmax(),
        ]
    )
    _randomize_biases(model)
    new, report = insert_batchnorm(model, return_report=True)
    assert isinstance(new, keras.Sequential)
    assert list(report.inserted) == ["d1"] and "output" in report.skipped["d2"]
    _assert_kernels_kept(model, new)
    _assert_same_outputs(model, new, _rand(2, 5))


def test_unbuilt_sequential_model():
    model = keras.Sequential([L.Dense(4, activation="relu", name="d1"), L.Dense(2, name="d2")])
    new = insert_batchnorm(model)
    assert [la.name for la in new.layers] == ["d1", "d1_bn", "d1_act", "d2"]
    assert new(_rand(3, 7)).shape == (3, 2)


# ---------------------------------------------------------------- choosing layers


def test_skip_layers_already_followed_by_bn_and_idempotence():
    inputs = keras.Input((6,))
    x = L.Dense(4, use_bias=False, name="has_bn")(inputs)
    x = L.Activation("relu")(L.BatchNormalization()(x))
    x = L.Dense(4, activation="relu", name="bn_after_act")(x)
    x = L.BatchNormalization()(L.ReLU()(x))
    model = keras.Model(inputs, L.Dense(2, name="out")(L.Dense(4, name="plain")(x)))
    new, report = insert_batchnorm(model, return_report=True)
    assert list(report.inserted) == ["plain"]
    assert report.skipped["has_bn"] == report.skipped["bn_after_act"]
    assert "already followed" in report.skipped["has_bn"]
    again, report2 = insert_batchnorm(new, return_report=True)
    assert report2.bn_count == 0 and len(again.layers) == len(new.layers)


def test_skip_by_name_layer_types_and_include_output():
    model = build_cnn()
    _, report = insert_batchnorm(model, skip=["block1_conv1", "dense_1"], return_report=True)
    assert report.skipped["block1_conv1"] == report.skipped["dense_1"] == "listed in `skip`"
    assert len(report.inserted) == 3
    _, report = insert_batchnorm(model, layer_types=[L.Conv2D], return_report=True)
    assert sorted(report.inserted) == [
        "block1_conv1",
        "block1_conv2",
        "block2_conv1",
        "block2_conv2",
    ]
    new, report = insert_batchnorm(model, include_output=True, return_report=True)
    assert "predictions" in report.inserted and not report.skipped
    # BN after softmax ("after" position here since predictions has softmax and no split)
    x = _rand(2, 28, 28, 1)
    _assert_same_outputs(model, new, x)


def test_bn_kwargs_are_passed_and_outputs_still_kept():
    model = build_mlp(activation="relu")
    _randomize_biases(model)
    new = insert_batchnorm(model, momentum=0.9, epsilon=0.05, center=True, renorm=True)
    bn = new.get_layer("dense_1_bn")
    assert (bn.momentum, bn.epsilon, bn.renorm) == (0.9, 0.05, True)
    # gamma compensates 1 / sqrt(1 + epsilon) (0.976 here) to float32 round-off
    inv = keras.ops.convert_to_numpy(keras.ops.rsqrt(bn.moving_variance + bn.epsilon))
    np.testing.assert_allclose(inv * bn.gamma.numpy(), np.ones(100), rtol=2e-7, atol=0)
    _assert_same_outputs(model, new, _rand(4, 28, 28, 1), atol=1e-6)


def test_synchronized_is_passed_through():
    new = insert_batchnorm(build_mlp(), synchronized=True)
    assert all(bn.synchronized for bn in _bn_layers(new)) and len(_bn_layers(new)) == 3


def test_nested_sequential_built_by_calling_it():
    block = keras.Sequential([L.Dense(5, activation="relu", name="inner")], name="block")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, L.Dense(2, name="out")(block(inputs)))
    _randomize_biases(model)
    new, report = insert_batchnorm(model, return_report=True)
    assert list(report.inserted) == ["block/inner"]
    _assert_same_outputs(model, new, _rand(4, 3))


def test_preserve_outputs_false_gives_default_bn_weights():
    model = build_mlp()
    _randomize_biases(model)
    new = insert_batchnorm(model, preserve_outputs=False)
    bn = new.get_layer("dense_1_bn")
    np.testing.assert_array_equal(bn.gamma.numpy(), np.ones(100))
    np.testing.assert_array_equal(bn.beta.numpy(), np.zeros(100))


def test_center_false_keeps_the_bias():
    model = build_mlp()
    new, report = insert_batchnorm(model, center=False, return_report=True)
    assert report.removed_bias == [] and new.get_layer("dense_1").use_bias


@pytest.mark.parametrize("kind", ["scratch", "factory", "fused"])
def test_custom_bn_layer(kind):
    if kind == "scratch":
        bn_layer, cls = ScratchBatchNormalization, ScratchBatchNormalization
    elif kind == "factory":

        def bn_layer(name, **kwargs):
            return L.BatchNormalization(name=name, momentum=0.5, **kwargs)

        cls = L.BatchNormalization
    else:
        layers = pytest.importorskip("bnutils.layers")
        bn_layer = cls = layers.FusedBatchNormalization
    model = build_mlp()
    _randomize_biases(model)
    new = insert_batchnorm(model, bn_layer=bn_layer)
    bns = [la for la in new.layers if la.name.endswith("_bn")]
    assert len(bns) == 3 and all(isinstance(b, cls) for b in bns)
    _assert_same_outputs(model, new, _rand(4, 28, 28, 1), atol=1e-6)
    if kind == "scratch":  # a scratch-BN model is recognized as already normalized
        assert insert_batchnorm(new, return_report=True)[1].bn_count == 0


def test_report_prints_a_table():
    _, report = insert_batchnorm(build_mlp(), return_report=True)
    assert isinstance(report, InsertionReport)
    text = str(report)
    assert "3 BN layer(s) inserted before" in text
    assert text.count("inserted") == 4 and "predictions" in text


# ---------------------------------------------------------------- errors


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = L.Dense(2)

    def call(self, x):
        return self.dense(x)


def test_subclassed_model_is_refused():
    with pytest.raises(TypeError, match=r"received a subclassed model `_Subclassed`"):
        insert_batchnorm(_Subclassed())
    with pytest.raises(TypeError, match="received ndarray"):
        insert_batchnorm(np.zeros(3))


def test_bad_arguments():
    model = build_mlp()
    with pytest.raises(ValueError, match="bn_position='middle'"):
        insert_batchnorm(model, bn_position="middle")
    with pytest.raises(ValueError, match=r"not in model .*\['dense_9'\]"):
        insert_batchnorm(model, skip=["dense_9"])
    with pytest.raises(TypeError, match="layer_types"):
        insert_batchnorm(model, layer_types=["Dense"])
    with pytest.raises(ValueError, match="momentun"):
        insert_batchnorm(model, momentun=0.9)
    with pytest.raises(TypeError, match="bn_layer"):
        insert_batchnorm(model, bn_layer="batchnorm")


class _NoConfig(L.Layer):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def call(self, x):
        return x * self.factor


def test_layer_that_cannot_be_copied_is_named():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, L.Dense(2)(_NoConfig(2.0)(inputs)))
    with pytest.raises(ValueError, match=r"(?s)class `_NoConfig`.*get_config"):
        insert_batchnorm(model)


def test_nested_subclassed_model_is_copied_and_reported():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, L.Dense(2, name="out")(_Configurable(name="sub")(inputs)))
    _randomize_biases(model)
    new, report = insert_batchnorm(model, return_report=True)
    assert report.bn_count == 0
    assert "subclassed model `_Configurable`" in report.skipped["sub/inner"]
    _assert_same_outputs(model, new, _rand(2, 4))


class _Configurable(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(3, activation="relu", name="inner")

    def call(self, x):
        return self.dense(x)

    def get_config(self):
        return {"name": self.name}


# ---------------------------------------------------------------- training and saving


def test_inserted_model_trains_saves_and_loads(tmp_path):
    model = build_cnn(input_shape=(12, 12, 1), filters=(4,), dense_units=(8,), num_classes=3)
    new = insert_batchnorm(model)
    new.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    bn = new.get_layer("block1_conv1_bn")
    before = bn.moving_mean.numpy().copy()
    x, y = _rand(16, 12, 12, 1) + 1.0, RNG.integers(0, 3, 16)
    new.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert not np.allclose(bn.moving_mean.numpy(), before)
    path = tmp_path / "inserted.keras"
    new.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), new.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )


@pytest.mark.slow
def test_compiled_model_stays_compiled():
    model = build_mlp()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    new = insert_batchnorm(model)
    assert new.compiled
    new.fit(_rand(8, 28, 28, 1), RNG.integers(0, 10, 8), verbose=0)


# ---------------------------------------------------------------- keras.applications


@pytest.mark.slow
def test_mobilenet_v2_already_has_bn():
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10
    )
    new, report = insert_batchnorm(model, return_report=True)
    assert report.bn_count == 0 and len(new.layers) == len(model.layers)
    convs = [la.name for la in model.layers if isinstance(la, (L.Conv2D, L.DepthwiseConv2D))]
    assert all("already followed" in report.skipped[c] for c in convs)
    assert "output layer" in report.skipped["predictions"]
    _assert_same_outputs(model, new, _rand(2, 32, 32, 3))


def test_vgg16_gets_bn_after_every_conv():
    model = keras.applications.VGG16(input_shape=(32, 32, 3), include_top=False, weights=None)
    _randomize_biases(model)
    new, report = insert_batchnorm(model, return_report=True)
    convs = [la.name for la in model.layers if isinstance(la, L.Conv2D)]
    assert len(convs) == 13 and sorted(report.inserted) == sorted(convs)
    _assert_kernels_kept(model, new)
    _assert_same_outputs(model, new, _rand(2, 32, 32, 3), atol=1e-4)


@pytest.mark.slow
def test_resnet50_and_efficientnet():
    resnet = keras.applications.ResNet50(input_shape=(64, 64, 3), weights=None, classes=10)
    new, report = insert_batchnorm(resnet, return_report=True)
    assert report.bn_count == 0 and len(new.layers) == len(resnet.layers)
    effnet = keras.applications.EfficientNetB0(input_shape=(32, 32, 3), weights=None, classes=10)
    new, report = insert_batchnorm(effnet, return_report=True)
    # only the squeeze-and-excitation convolutions lack BN
    assert report.bn_count == 32
    assert all("_se_" in name for name in report.inserted)
    _assert_same_outputs(effnet, new, _rand(2, 32, 32, 3))


# ---------------------------------------------------------------- the graph queries (_graph)


def _nested_model():
    inner_in = keras.Input((4,))
    x = L.BatchNormalization(name="ibn")(L.Dense(4, name="idense")(inner_in))
    inner = keras.Model(inner_in, L.Dense(3, name="iout")(x), name="inner")
    inputs = keras.Input((5,))
    y = inner(L.Dense(4, name="d")(inputs), training=False)
    return keras.Model(inputs, L.BatchNormalization(name="obn")(y))


def test_walk_layers_and_find_batchnorm_layers_see_nested_models():
    model = _nested_model()
    paths = [p for p, _ in walk_layers(model)]
    assert paths.index("d") < paths.index("inner/idense") < paths.index("obn")
    assert "inner/iout" in paths and "inner" in paths
    assert [p for p, _ in find_batchnorm_layers(model)] == ["inner/ibn", "obn"]
    with pytest.raises(TypeError, match="received an object of type ndarray"):
        walk_layers(np.zeros(2))


def test_layer_graph_looks_through_nested_models():
    model = _nested_model()
    layers = dict(walk_layers(model))
    g = LayerGraph(model)
    assert [p.name for p in g.parents(layers["inner/idense"])] == ["d"]
    assert [c.name for c in g.children(layers["d"])] == ["idense"]
    assert [p.name for p in g.parents(layers["obn"])] == ["iout"]
    assert [c.name for c in g.children(layers["inner/iout"])] == ["obn"]
    assert g.consumers(layers["d"]) == [(layers["inner/idense"], 0)]
    assert g.consumers(layers["inner/iout"]) == [(layers["obn"], 0)]
    assert g.consumers(layers["obn"]) == [(MODEL_OUTPUT, 0)]
    assert [op.name for op in g.call_inputs(layers["obn"])] == ["inner"]  # not looked through
    assert [x.name for x in g.output_layers()] == ["obn"]
    assert [(p, t) for p, _, t in g.called_training_flags()] == [("inner", False)]
    assert [p.name for p in g.walk_back(layers["obn"], (L.Dense,))] == ["ibn"]
    assert [p.name for p in g.walk_back(layers["obn"], lambda p: p.name == "iout")] == ["ibn"]


def test_layer_graph_counts_only_the_calls_in_the_graph():
    shared = L.Dense(2, name="shared")
    i1, i2 = keras.Input((2,)), keras.Input((2,))
    model = keras.Model([i1, i2], L.Add()([shared(i1), shared(i2)]))
    assert LayerGraph(model).call_count(shared) == 2
    seq = keras.Sequential([keras.Input((3,))])
    for name in ("a", "b", "c"):
        seq.add(L.Dense(2, name=name))  # each add() builds a new graph, with new calls
    g = LayerGraph(seq)
    assert len(seq.get_layer("a")._inbound_nodes) > 1 and g.call_count(seq.get_layer("a")) == 1
    assert g.consumers(seq.get_layer("a")) == [(seq.get_layer("b"), 0)]
    assert g.consumers(seq.get_layer("c")) == [(MODEL_OUTPUT, 0)]


def test_inserting_nothing_warns_and_says_why():
    inputs = keras.Input((4,))
    x = keras.layers.BatchNormalization()(keras.layers.Dense(3, name="dense")(inputs))
    already = keras.Model(inputs, keras.layers.Dense(2, name="out")(x))
    with pytest.warns(UserWarning, match=r"all 2 Dense and convolution layers were skipped"):
        insert_batchnorm(already)
    pooled = keras.Model(inputs, keras.layers.Activation("relu")(inputs))
    with pytest.warns(UserWarning, match="it has no layer_types"):
        insert_batchnorm(pooled, layer_types=[keras.layers.Conv2D])
