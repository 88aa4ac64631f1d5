"""Model builders: shapes, parameter counts, names, normalization placement, errors."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from bnutils.models import build_cnn, build_mlp, build_resnet
from bnutils.scratch import ScratchBatchNormalization

L = keras.layers


def _names(model):
    return [la.name for la in model.layers]


def _successor(model, name):
    """The layer that consumes ``name``'s output (single consumer expected)."""
    nodes = model.get_layer(name)._outbound_nodes
    assert len(nodes) == 1, f"{name} has {len(nodes)} consumers"
    return nodes[0].operation


def test_mlp_default_is_ioffe_szegedy_net():
    model = build_mlp()
    dense = [la for la in model.layers if isinstance(la, L.Dense)]
    assert [d.units for d in dense] == [100, 100, 100, 10]
    assert all(d.activation.__name__ == "sigmoid" for d in dense[:-1])
    assert dense[-1].activation.__name__ == "softmax"
    # 784*100+100 + 2*(100*100+100) + 100*10+10
    assert model.count_params() == 784 * 100 + 100 + 2 * (100 * 100 + 100) + 1010
    assert model.output.shape == (None, 10)


@pytest.mark.parametrize("position", ["before", "after"])
def test_mlp_batch_norm_placement_and_bias(position):
    model = build_mlp(norm="batch", bn_position=position, bn_kwargs={"momentum": 0.9})
    first, second = ("dense_1_bn", "dense_1_act") if position == "before" else \
        ("dense_1_act", "dense_1_bn")
    assert _successor(model, "dense_1").name == first
    assert _successor(model, first).name == second
    assert model.get_layer("dense_1").use_bias == (position == "after")
    assert model.get_layer("dense_1_bn").momentum == 0.9
    bns = [la for la in model.layers if isinstance(la, L.BatchNormalization)]
    assert len(bns) == 3
    base = build_mlp().count_params()
    # BN adds 4 weights per unit (2 trainable); "before" drops the Dense bias
    extra = 3 * 100 * 4 - (3 * 100 if position == "before" else 0)
    assert model.count_params() == base + extra


@pytest.mark.parametrize("norm, cls", [("layer", L.LayerNormalization),
                                       ("group", L.GroupNormalization)])
def test_other_norms(norm, cls):
    model = build_mlp(norm=norm, widths=(30, 12))
    layers = [la for la in model.layers if isinstance(la, cls)]
    assert len(layers) == 2
    if norm == "group":  # largest divisor of the width not above 32
        assert [la.groups for la in layers] == [30, 12]
        assert build_cnn(norm="group", groups=24).get_layer("block1_conv1_gn").groups == 16


def test_custom_bn_layer_and_synchronized():
    model = build_mlp(norm="batch", bn_layer=ScratchBatchNormalization)
    assert isinstance(model.get_layer("dense_2_bn"), ScratchBatchNormalization)
    model = build_cnn(norm="batch", synchronized=True)
    assert model.get_layer("block1_conv1_bn").synchronized


def test_cnn_shapes_names_and_dropout():
    model = build_cnn(input_shape=(32, 32, 3), dropout=0.25, weight_decay=1e-4)
    assert model.output.shape == (None, 10)
    assert model.get_layer("block2_pool").output.shape == (None, 8, 8, 64)
    assert {"block1_conv1", "block1_conv2", "block2_conv2", "dense_1", "flatten"} <= \
        set(_names(model))
    assert sum(isinstance(la, L.Dropout) for la in model.layers) == 3
    assert model.get_layer("block1_conv1").kernel_regularizer is not None
    # params: convs 3x3, a 8*8*64 -> 128 dense and the head
    expected = (3 * 3 * 3 * 32 + 32) + (9 * 32 * 32 + 32) + (9 * 32 * 64 + 64) + \
        (9 * 64 * 64 + 64) + (8 * 8 * 64 * 128 + 128) + (128 * 10 + 10)
    assert model.count_params() == expected


def test_cnn_with_bn_has_bias_free_convs():
    model = build_cnn(norm="batch")
    convs = [la for la in model.layers if isinstance(la, (L.Conv2D, L.Dense))][:-1]
    assert convs and all(not c.use_bias for c in convs)
    assert all(_successor(model, c.name).name == f"{c.name}_bn" for c in convs)


@pytest.mark.parametrize("preact", [True, False])
def test_resnet_structure(preact):
    model = build_resnet(preact=preact)
    assert model.output.shape == (None, 10)
    adds = [la for la in model.layers if isinstance(la, L.Add)]
    assert len(adds) == 6  # 3 stages x 2 blocks
    shortcuts = [la.name for la in model.layers if la.name.endswith("_shortcut")]
    assert shortcuts == ["stage2_block1_shortcut", "stage3_block1_shortcut"]
    assert model.get_layer("stage3_block2_add").output.shape == (None, 7, 7, 128)
    convs = [la for la in model.layers if isinstance(la, L.Conv2D)]
    assert all(not c.use_bias for c in convs)
    if preact:
        assert isinstance(model.get_layer("final_bn"), L.BatchNormalization)
        assert isinstance(_successor(model, "stage1_block1_bn0"), L.Activation)
    else:
        assert _successor(model, "stem_conv").name == "stem_bn"
        assert _successor(model, "stage1_block1_add").name == "stage1_block1_out"


def test_resnet_without_norm_and_with_bn_after():
    plain = build_resnet(norm=None, input_shape=(32, 32, 3))
    assert not any(isinstance(la, L.BatchNormalization) for la in plain.layers)
    assert all(c.use_bias for c in plain.layers if isinstance(c, L.Conv2D))
    after = build_resnet(preact=False, bn_position="after")
    assert _successor(after, "stage1_block1_act1").name == "stage1_block1_bn1"


def test_models_learn_a_separable_problem():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8, 8, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int32")
    for model in (build_mlp(input_shape=(8, 8, 1), num_classes=2, activation="relu",
                            norm="batch"),
                  build_cnn(input_shape=(8, 8, 1), num_classes=2, filters=(8,),
                            dense_units=(16,), norm="batch")):
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        history = model.fit(x, y, epochs=8, batch_size=32, verbose=0)
        assert history.history["accuracy"][-1] > 0.9, model.name
        assert history.history["loss"][-1] < history.history["loss"][0]


def test_logits_output_and_names():
    model = build_mlp(output_activation=None, name="my_net")
    assert model.name == "my_net" and model.get_layer("predictions").activation.__name__ == \
        "linear"
    assert build_mlp(norm="batch", bn_position="after").name == "mlp_bn_after"
    assert build_resnet(preact=False).name == "resnet_v1_bn"


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        build_mlp(norm="batchnorm")
    with pytest.raises(ValueError, match="bn_position='middle'"):
        build_cnn(norm="batch", bn_position="middle")
    with pytest.raises(ValueError, match="norm='layer'"):
        build_mlp(norm="layer", bn_kwargs={"momentum": 0.9})
    with pytest.raises(ValueError, match=r"\(height, width, channels\).*\(784,\)"):
        build_cnn(input_shape=(784,))
    with pytest.raises(ValueError, match="widths"):
        build_resnet(widths=())
    with pytest.raises(ValueError, match="dropout"):
        build_cnn(dropout=1.0)


def test_mlp_split_activation_is_the_same_function():
    fused = build_mlp(input_shape=(4, 4, 1), widths=(5, 5))
    split = build_mlp(input_shape=(4, 4, 1), widths=(5, 5), split_activation=True)
    assert [layer.name for layer in split.layers].count("dense_2_act") == 1
    assert split.get_layer("dense_1").activation.__name__ == "linear"
    split.set_weights(fused.get_weights())
    x = np.random.default_rng(0).normal(size=(3, 4, 4, 1)).astype("float32")
    np.testing.assert_allclose(split(x), fused(x), rtol=1e-6, atol=1e-7)
