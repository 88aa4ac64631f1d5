"""Model builders: shapes, parameter counts, names, normalization placement, errors."""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest

from bnutils._graph import LayerGraph
from bnutils.layers import FusedBatchNormalization, GhostBatchNormalization
from bnutils.models import (
    build_cnn,
    build_mlp,
    build_resnet,
    build_resnet50,
    small_bn_mlp,
    small_bn_model,
)
from bnutils.scratch import ScratchBatchNormalization

L = keras.layers


def _names(model):
    return [la.name for la in model.layers]


def _successor(model, name):
    """The layer that consumes ``name``'s output (single consumer expected)."""
    children = LayerGraph(model).children(model.get_layer(name))
    assert len(children) == 1, f"{name} has {len(children)} consumers"
    return children[0]


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
    first, second = (
        ("dense_1_bn", "dense_1_act") if position == "before" else ("dense_1_act", "dense_1_bn")
    )
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


@pytest.mark.parametrize(
    "norm, cls", [("layer", L.LayerNormalization), ("group", L.GroupNormalization)]
)
def test_other_norms(norm, cls):
    model = build_mlp(norm=norm, widths=(30, 12))
    layers = [la for la in model.layers if isinstance(la, cls)]
    assert len(layers) == 2
    if norm == "group":  # largest divisor of the width not above 32
        assert [la.groups for la in layers] == [30, 12]
        assert build_cnn(norm="group", filters=(48,)).get_layer("block1_conv1_gn").groups == 24


def test_custom_bn_layer_and_synchronized():
    model = build_mlp(norm="batch", bn_layer=ScratchBatchNormalization)
    assert isinstance(model.get_layer("dense_2_bn"), ScratchBatchNormalization)
    model = build_cnn(norm="batch", synchronized=True)
    assert model.get_layer("block1_conv1_bn").synchronized


def test_cnn_shapes_names_and_dropout():
    model = build_cnn(input_shape=(32, 32, 3), dropout=0.25)
    assert model.output.shape == (None, 10)
    assert model.get_layer("block2_pool").output.shape == (None, 8, 8, 64)
    assert {"block1_conv1", "block1_conv2", "block2_conv2", "dense_1", "flatten"} <= set(
        _names(model)
    )
    assert sum(isinstance(la, L.Dropout) for la in model.layers) == 3
    # params: convs 3x3, a 8*8*64 -> 128 dense and the head
    expected = (
        (3 * 3 * 3 * 32 + 32)
        + (9 * 32 * 32 + 32)
        + (9 * 32 * 64 + 64)
        + (9 * 64 * 64 + 64)
        + (8 * 8 * 64 * 128 + 128)
        + (128 * 10 + 10)
    )
    assert model.count_params() == expected


def test_cnn_with_bn_has_bias_free_convs():
    model = build_cnn(norm="batch")
    convs = [la for la in model.layers if isinstance(la, (L.Conv2D, L.Dense))][:-1]
    assert convs and all(not c.use_bias for c in convs)
    assert all(_successor(model, c.name).name == f"{c.name}_bn" for c in convs)


def test_resnet_structure():
    model = build_resnet()
    assert model.output.shape == (None, 10)
    adds = [la for la in model.layers if isinstance(la, L.Add)]
    assert len(adds) == 6  # 3 stages x 2 blocks
    shortcuts = [la.name for la in model.layers if la.name.endswith("_shortcut")]
    assert shortcuts == ["stage2_block1_shortcut", "stage3_block1_shortcut"]
    assert model.get_layer("stage3_block2_add").output.shape == (None, 7, 7, 128)
    convs = [la for la in model.layers if isinstance(la, L.Conv2D)]
    assert all(not c.use_bias for c in convs)
    assert isinstance(model.get_layer("final_bn"), L.BatchNormalization)
    assert isinstance(_successor(model, "stage1_block1_bn0"), L.Activation)
    # pre-activation: the stem feeds the first block's norm and its identity shortcut
    stem_children = LayerGraph(model).children(model.get_layer("stem_conv"))
    assert {la.name for la in stem_children} == {"stage1_block1_bn0", "stage1_block1_add"}
    assert _successor(model, "stage3_block2_add").name == "final_bn"


def test_resnet_without_norm_and_with_bn_after():
    plain = build_resnet(norm=None, input_shape=(32, 32, 3))
    assert not any(isinstance(la, L.BatchNormalization) for la in plain.layers)
    assert all(c.use_bias for c in plain.layers if isinstance(c, L.Conv2D))
    after = build_resnet(bn_position="after")
    assert _successor(after, "stage1_block1_act1").name == "stage1_block1_bn1"


@pytest.mark.slow
def test_models_learn_a_separable_problem():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8, 8, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int32")
    for model in (
        build_mlp(input_shape=(8, 8, 1), num_classes=2, activation="relu", norm="batch"),
        build_cnn(
            input_shape=(8, 8, 1), num_classes=2, filters=(8,), dense_units=(16,), norm="batch"
        ),
    ):
        model.compile(
            keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        history = model.fit(x, y, epochs=8, batch_size=32, verbose=0)
        assert history.history["accuracy"][-1] > 0.9, model.name
        assert history.history["loss"][-1] < history.history["loss"][0]


def test_logits_output_and_names():
    model = build_mlp(output_activation=None, name="my_net")
    assert model.name == "my_net" and model.get_layer("predictions").activation.__name__ == "linear"
    assert build_mlp(norm="batch", bn_position="after").name == "mlp_bn_after"
    assert build_resnet(bn_position="after").name == "resnet_bn_after"


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


def test_cnn_blocks_global_pool_and_split_activation():
    kw = {
        "input_shape": (12, 12, 1),
        "filters": ((4, 4), (8,)),
        "dense_units": (),
        "global_pool": True,
    }
    split = build_cnn(**kw, split_activation=True)
    assert _names(split)[1:] == [
        "block1_conv1", "block1_conv1_act", "block1_conv2", "block1_conv2_act", "block1_pool",
        "block2_conv1", "block2_conv1_act", "avg_pool", "predictions",
    ]  # fmt: skip
    assert split.get_layer("block2_conv1").output.shape == (None, 6, 6, 8)  # no pool after it
    assert split.get_layer("block1_conv1").activation.__name__ == "linear"
    fused = build_cnn(**kw)
    assert not any(isinstance(la, L.Activation) for la in fused.layers)
    assert fused.get_layer("block1_conv1").activation.__name__ == "relu"
    assert (
        fused.count_params()
        == split.count_params()
        == (9 * 4 + 4) + (9 * 16 + 4) + (9 * 32 + 8) + (8 * 10 + 10)
    )
    split.set_weights(fused.get_weights())
    x = np.random.default_rng(0).normal(size=(3, 12, 12, 1)).astype("float32")
    np.testing.assert_allclose(split(x), fused(x), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="filters"):
        build_cnn(filters=((4, 0),))


def test_cnn_with_bn_factory_has_the_same_layout_as_its_split_twin():
    ghost = functools.partial(GhostBatchNormalization, 4)
    bn = build_cnn(filters=((4,), (8,)), dense_units=(), global_pool=True, norm="batch",
                   bn_layer=ghost, output_activation=None)  # fmt: skip
    plain = build_cnn(filters=((4,), (8,)), dense_units=(), global_pool=True,
                      split_activation=True, output_activation=None)  # fmt: skip
    assert isinstance(bn.get_layer("block2_conv1_bn"), GhostBatchNormalization)
    assert bn.get_layer("block2_conv1_bn").virtual_batch_size == 4
    assert [n for n in _names(bn) if not n.endswith("_bn")] == _names(plain)
    assert bn.get_layer("predictions").activation.__name__ == "linear"


@pytest.mark.slow
def test_resnet50_variants():
    keras.utils.set_random_seed(0)
    base = build_resnet50(input_shape=(32, 32, 3), num_classes=4)
    bns = [la.name for la in base.layers if isinstance(la, L.BatchNormalization)]
    assert len(bns) == 53 and base.output.shape == (None, 4)
    plain = build_resnet50(input_shape=(32, 32, 3), num_classes=4, norm=None)
    assert not any(isinstance(la, L.BatchNormalization) for la in plain.layers)
    assert plain.count_params() == base.count_params() - sum(
        base.get_layer(n).count_params() for n in bns
    )
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    assert np.all(np.isfinite(plain(x)))
    keras.utils.set_random_seed(0)  # the same initial weights as `base`
    fused = build_resnet50(input_shape=(32, 32, 3), num_classes=4, bn_layer=FusedBatchNormalization)
    assert all(type(fused.get_layer(n)) is FusedBatchNormalization for n in bns)
    np.testing.assert_allclose(
        fused(x, training=False), base(x, training=False), rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ValueError, match="norm"):
        build_resnet50(norm="layer")


@pytest.mark.parametrize("builder", [small_bn_model, small_bn_mlp])
def test_small_bn_nets_are_seeded_and_pass_synchronized(builder):
    synced = builder(True, input_shape=(8, 8, 1), seed=3)
    plain = builder(False, input_shape=(8, 8, 1), seed=3)
    other = builder(False, input_shape=(8, 8, 1), seed=4)
    bns = [la for la in synced.layers if isinstance(la, L.BatchNormalization)]
    assert [b.name for b in bns] == ["bn1", "bn2"] and all(b.synchronized for b in bns)
    assert not any(la.synchronized for la in plain.layers if isinstance(la, L.BatchNormalization))
    assert synced.name.endswith("_syncbn") and plain.name.endswith("_bn")
    for a, b in zip(synced.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(plain.get_weights(), other.get_weights(), strict=True)
        if a.ndim > 1
    )
    assert plain.layers[-1].activation.__name__ == "linear" and plain.output.shape == (None, 10)
