"""Model builders used across the suite: an MLP, a VGG-style CNN and a small ResNet.

Every builder takes the same normalization arguments:

- ``norm``: ``None`` (no normalization), ``"batch"``, ``"layer"`` or ``"group"``;
- ``bn_position``: where the normalization sits relative to the activation, ``"before"``
  (``layer -> norm -> activation``, Ioffe & Szegedy's placement) or ``"after"``
  (``layer -> activation -> norm``);
- ``bn_layer``: the batch normalization class or factory (default
  ``keras.layers.BatchNormalization``; e.g. ``bnutils.FusedBatchNormalization`` or
  ``bnutils.ScratchBatchNormalization``), called as ``bn_layer(name=..., **bn_kwargs)``;
- ``bn_kwargs``: arguments for every BN layer (``momentum``, ``epsilon``, ...);
  ``synchronized=True`` is a shortcut for ``bn_kwargs={"synchronized": True}``;
- ``groups``: groups of ``norm="group"`` (the largest divisor of the channel count that does
  not exceed ``groups`` is used, so any width works).

Layers have readable names (``dense_1``, ``dense_1_bn``, ``dense_1_act``, ``block2_conv1``,
``stage2_block1_conv1`` ...). With ``norm`` and ``bn_position="before"`` the layer feeding the
normalization has ``use_bias=False`` (the normalization's ``beta`` replaces the bias). Without
``norm`` the activations are fused into the Dense/Conv layers, which is how a Keras user writes
a baseline (and what :func:`bnutils.insert_batchnorm` splits).

Every model ends in ``Dense(num_classes, name="predictions")`` with ``output_activation``
(``"softmax"`` by default; ``None`` gives logits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras

__all__ = ["NORMS", "build_cnn", "build_mlp", "build_resnet"]

NORMS = (None, "batch", "layer", "group")
_POSITIONS = ("before", "after")
_NORM_SUFFIX = {"batch": "bn", "layer": "ln", "group": "gn"}


# ---------------------------------------------------------------- shared helpers


def _check_common(
    norm: str | None, bn_position: str, bn_layer: Any, bn_kwargs: dict | None, groups: int
) -> None:
    if norm not in NORMS:
        raise ValueError(
            f"Unknown norm={norm!r}. Expected one of {list(NORMS)}: None for no normalization, "
            "'batch' for BatchNormalization, 'layer' for LayerNormalization or 'group' for "
            "GroupNormalization."
        )
    if bn_position not in _POSITIONS:
        raise ValueError(
            f"Unknown bn_position={bn_position!r}. Expected 'before' (layer -> norm -> "
            "activation) or 'after' (layer -> activation -> norm)."
        )
    if norm != "batch" and (bn_layer is not None or bn_kwargs):
        raise ValueError(
            f"`bn_layer` and `bn_kwargs` configure batch normalization, but norm={norm!r}. "
            "Pass norm='batch' to use them, or drop them."
        )
    if bn_layer is not None and not callable(bn_layer):
        raise TypeError(
            "Expected `bn_layer` to be a layer class or a factory callable(name=..., **kwargs), "
            f"received {bn_layer!r} of type {type(bn_layer).__name__}."
        )
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"Expected `groups` to be a positive integer, received {groups!r}.")


def _check_widths(name: str, widths: Sequence[int], allow_empty: bool = False) -> tuple:
    widths = tuple(widths)
    bad = [w for w in widths if isinstance(w, bool) or not isinstance(w, int) or w < 1]
    if bad or (not widths and not allow_empty):
        raise ValueError(
            f"Expected `{name}` to be a {'' if allow_empty else 'non-empty '}sequence of "
            f"positive integers, received {widths!r}."
        )
    return widths


def _group_count(groups: int, channels: int) -> int:
    """The largest divisor of ``channels`` that is at most ``groups``."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class _Norms:
    """Makes the normalization layers of one model (keeps the builders short)."""

    def __init__(
        self,
        norm: str | None,
        bn_layer: Callable[..., keras.layers.Layer] | None,
        bn_kwargs: dict | None,
        groups: int,
        synchronized: bool,
    ):
        self.norm = norm
        self.bn_layer = bn_layer or keras.layers.BatchNormalization
        self.bn_kwargs = dict(bn_kwargs or {})
        if synchronized:
            self.bn_kwargs["synchronized"] = True
        self.groups = groups

    @property
    def suffix(self) -> str:
        return _NORM_SUFFIX[self.norm]

    def __call__(self, name: str, channels: int) -> keras.layers.Layer:
        if self.norm == "batch":
            return self.bn_layer(name=name, **self.bn_kwargs)
        if self.norm == "layer":
            return keras.layers.LayerNormalization(name=name)
        return keras.layers.GroupNormalization(
            groups=_group_count(self.groups, channels), name=name
        )


def _norm_act(x, norms: _Norms, position: str, activation: Any, name: str, channels: int,
              norm_name: str | None = None, act_name: str | None = None):
    """``norm -> activation`` or ``activation -> norm`` (just the activation without norm)."""
    norm_name = norm_name or f"{name}_{norms.suffix if norms.norm else 'norm'}"
    act = keras.layers.Activation(activation, name=act_name or f"{name}_act")
    if norms.norm is None:
        return act(x)
    if position == "before":
        return act(norms(norm_name, channels)(x))
    return norms(norm_name, channels)(act(x))


def _head(x, num_classes: int, output_activation: str | None, kernel_initializer: Any):
    return keras.layers.Dense(
        num_classes,
        activation=output_activation,
        kernel_initializer=kernel_initializer,
        name="predictions",
    )(x)


def _default_name(kind: str, norm: str | None, position: str) -> str:
    if norm is None:
        return kind
    return f"{kind}_{_NORM_SUFFIX[norm]}" + ("_after" if position == "after" else "")


# ---------------------------------------------------------------- builders


def build_mlp(
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    widths: Sequence[int] = (100, 100, 100),
    activation: Any = "sigmoid",
    kernel_initializer: Any = "glorot_uniform",
    norm: str | None = None,
    bn_position: str = "before",
    bn_layer: Callable[..., keras.layers.Layer] | None = None,
    bn_kwargs: dict | None = None,
    groups: int = 32,
    synchronized: bool = False,
    output_activation: str | None = "softmax",
    split_activation: bool = False,
    name: str | None = None,
) -> keras.Model:
    """A fully connected network; the default is Ioffe & Szegedy's MNIST net (3 x 100 sigmoid).

    Layers: ``flatten``, then per hidden layer ``dense_i`` (+ ``dense_i_bn`` and
    ``dense_i_act`` with ``norm``), then ``predictions``.

    Args:
        input_shape: shape of one example (flattened first).
        num_classes: output units.
        widths: units of each hidden layer.
        activation: hidden activation.
        kernel_initializer: initializer of every kernel.
        norm, bn_position, bn_layer, bn_kwargs, groups, synchronized: see the module docstring.
        output_activation: activation of ``predictions`` (``None``: logits).
        split_activation: without ``norm``, give each hidden layer a separate
            ``dense_i_act`` Activation layer instead of fusing it into the Dense (the same
            function; useful to observe a unit's pre-activation, as notebook 04 does).
        name: model name (default ``"mlp"``, ``"mlp_bn"``, ``"mlp_bn_after"``, ...).

    Returns:
        An uncompiled functional ``keras.Model``.

    Raises:
        ValueError: an argument is out of range (the message says which).
    """
    _check_common(norm, bn_position, bn_layer, bn_kwargs, groups)
    widths = _check_widths("widths", widths, allow_empty=True)
    norms = _Norms(norm, bn_layer, bn_kwargs, groups, synchronized)
    use_bias = norm is None or bn_position == "after"

    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    x = keras.layers.Flatten(name="flatten")(inputs)
    for i, units in enumerate(widths, start=1):
        layer_name = f"dense_{i}"
        if norm is None and split_activation:
            x = keras.layers.Dense(units, name=layer_name, kernel_initializer=kernel_initializer)(x)
            x = keras.layers.Activation(activation, name=f"{layer_name}_act")(x)
            continue
        if norm is None:
            x = keras.layers.Dense(units, activation=activation, name=layer_name,
                                   kernel_initializer=kernel_initializer)(x)
            continue
        x = keras.layers.Dense(units, use_bias=use_bias, name=layer_name,
                               kernel_initializer=kernel_initializer)(x)
        x = _norm_act(x, norms, bn_position, activation, layer_name, units)
    outputs = _head(x, num_classes, output_activation, kernel_initializer)
    return keras.Model(inputs, outputs, name=name or _default_name("mlp", norm, bn_position))


def build_cnn(
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    filters: Sequence[int] = (32, 64),
    convs_per_block: int = 2,
    dense_units: Sequence[int] = (128,),
    activation: Any = "relu",
    kernel_initializer: Any = "he_normal",
    dropout: float = 0.0,
    weight_decay: float = 0.0,
    norm: str | None = None,
    bn_position: str = "before",
    bn_layer: Callable[..., keras.layers.Layer] | None = None,
    bn_kwargs: dict | None = None,
    groups: int = 32,
    synchronized: bool = False,
    output_activation: str | None = "softmax",
    name: str | None = None,
) -> keras.Model:
    """A small VGG-style CNN: blocks of 3x3 convolutions and 2x2 max pooling, then a dense head.

    The default is ``32-32-pool-64-64-pool-flatten-128-predictions``. Layers are named
    ``block{b}_conv{c}`` (+ ``_bn``/``_act``), ``block{b}_pool``, ``flatten``, ``dense_{i}``.
    Dense layers of the head are normalized like the convolutions.

    Args:
        input_shape: ``(height, width, channels)``, e.g. ``(28, 28, 1)`` or ``(32, 32, 3)``.
        num_classes: output units.
        filters: filters of the convolutions of each block (one block per entry).
        convs_per_block: convolutions per block.
        dense_units: units of each hidden dense layer of the head (may be empty).
        activation: hidden activation.
        kernel_initializer: initializer of every kernel.
        dropout: rate of a ``Dropout`` after every pooling and hidden dense layer (0: none).
        weight_decay: L2 factor on every kernel (0: none).
        norm, bn_position, bn_layer, bn_kwargs, groups, synchronized: see the module docstring.
        output_activation: activation of ``predictions`` (``None``: logits).
        name: model name (default ``"cnn"``, ``"cnn_bn"``, ...).

    Returns:
        An uncompiled functional ``keras.Model``.

    Raises:
        ValueError: an argument is out of range (the message says which).
    """
    _check_common(norm, bn_position, bn_layer, bn_kwargs, groups)
    input_shape = _check_image_shape(input_shape)
    filters = _check_widths("filters", filters)
    dense_units = _check_widths("dense_units", dense_units, allow_empty=True)
    _check_rates(dropout, weight_decay)
    if isinstance(convs_per_block, bool) or not isinstance(convs_per_block, int) \
            or convs_per_block < 1:
        raise ValueError(
            f"Expected `convs_per_block` to be a positive integer, received {convs_per_block!r}."
        )
    norms = _Norms(norm, bn_layer, bn_kwargs, groups, synchronized)
    use_bias = norm is None or bn_position == "after"
    reg = keras.regularizers.L2(weight_decay) if weight_decay else None
    common = {"kernel_initializer": kernel_initializer, "kernel_regularizer": reg}

    inputs = keras.Input(shape=input_shape, name="inputs")
    x = inputs
    for b, f in enumerate(filters, start=1):
        for c in range(1, convs_per_block + 1):
            layer_name = f"block{b}_conv{c}"
            if norm is None:
                x = keras.layers.Conv2D(f, 3, padding="same", activation=activation,
                                        name=layer_name, **common)(x)
            else:
                x = keras.layers.Conv2D(f, 3, padding="same", use_bias=use_bias,
                                        name=layer_name, **common)(x)
                x = _norm_act(x, norms, bn_position, activation, layer_name, f)
        x = keras.layers.MaxPooling2D(2, name=f"block{b}_pool")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"block{b}_dropout")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    for i, units in enumerate(dense_units, start=1):
        layer_name = f"dense_{i}"
        if norm is None:
            x = keras.layers.Dense(units, activation=activation, name=layer_name, **common)(x)
        else:
            x = keras.layers.Dense(units, use_bias=use_bias, name=layer_name, **common)(x)
            x = _norm_act(x, norms, bn_position, activation, layer_name, units)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"dense_{i}_dropout")(x)
    outputs = _head(x, num_classes, output_activation, kernel_initializer)
    return keras.Model(inputs, outputs, name=name or _default_name("cnn", norm, bn_position))


def build_resnet(
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    widths: Sequence[int] = (32, 64, 128),
    blocks_per_stage: int = 2,
    preact: bool = True,
    activation: Any = "relu",
    kernel_initializer: Any = "he_normal",
    dropout: float = 0.0,
    weight_decay: float = 0.0,
    norm: str | None = "batch",
    bn_position: str = "before",
    bn_layer: Callable[..., keras.layers.Layer] | None = None,
    bn_kwargs: dict | None = None,
    groups: int = 32,
    synchronized: bool = False,
    output_activation: str | None = "softmax",
    name: str | None = None,
) -> keras.Model:
    """A small ResNet: a 3x3 stem, stages of two-convolution residual blocks, global pooling.

    Each stage after the first halves the resolution (stride 2 in its first block, with a 1x1
    projection shortcut). With ``preact=True`` (He et al., 2016, "identity mappings") a block is
    ``x + conv(act(norm(conv(act(norm(x))))))`` and the network ends with ``norm -> act``;
    with ``preact=False`` (the original ResNet) a block is
    ``act(x + norm(conv(act(norm(conv(x))))))``. ``bn_position="after"`` swaps every
    ``norm -> act`` pair into ``act -> norm`` (in the original form the block's output
    activation then moves before the last norm). Unlike the other builders the default is
    ``norm="batch"``: residual networks are designed with it.

    Names: ``stem_conv``, ``stage{s}_block{b}_conv{i}``, ``..._bn{i}`` / ``..._act{i}``,
    ``..._shortcut`` (+ ``_bn``), ``..._add``, ``final_bn``, ``final_act``, ``avg_pool``.

    Args:
        input_shape: ``(height, width, channels)``.
        num_classes: output units.
        widths: filters of each stage.
        blocks_per_stage: residual blocks per stage.
        preact: pre-activation blocks (``True``) or the original post-activation ones.
        activation: hidden activation.
        kernel_initializer: initializer of every kernel.
        dropout: rate of a ``Dropout`` before ``predictions`` (0: none).
        weight_decay: L2 factor on every kernel (0: none).
        norm, bn_position, bn_layer, bn_kwargs, groups, synchronized: see the module docstring.
        output_activation: activation of ``predictions`` (``None``: logits).
        name: model name (default ``"resnet_bn"``, ``"resnet_v1_bn"``, ...).

    Returns:
        An uncompiled functional ``keras.Model``.

    Raises:
        ValueError: an argument is out of range (the message says which).
    """
    _check_common(norm, bn_position, bn_layer, bn_kwargs, groups)
    input_shape = _check_image_shape(input_shape)
    widths = _check_widths("widths", widths)
    _check_rates(dropout, weight_decay)
    if isinstance(blocks_per_stage, bool) or not isinstance(blocks_per_stage, int) \
            or blocks_per_stage < 1:
        raise ValueError(
            f"Expected `blocks_per_stage` to be a positive integer, received {blocks_per_stage!r}."
        )
    norms = _Norms(norm, bn_layer, bn_kwargs, groups, synchronized)
    use_bias = norm is None or bn_position == "after"
    reg = keras.regularizers.L2(weight_decay) if weight_decay else None
    suffix = norms.suffix if norm else "norm"

    def conv(x, f, kernel, stride, layer_name):
        return keras.layers.Conv2D(f, kernel, strides=stride, padding="same", use_bias=use_bias,
                                   kernel_initializer=kernel_initializer, kernel_regularizer=reg,
                                   name=layer_name)(x)

    def norm_act(x, f, prefix, i):
        return _norm_act(x, norms, bn_position, activation, prefix, f,
                         norm_name=f"{prefix}_{suffix}{i}", act_name=f"{prefix}_act{i}")

    def block(x, f, stride, prefix):
        shortcut = x
        if preact:
            x = norm_act(x, f, prefix, 0)
            if stride != 1 or shortcut.shape[-1] != f:
                shortcut = conv(x, f, 1, stride, f"{prefix}_shortcut")
            x = conv(x, f, 3, stride, f"{prefix}_conv1")
            x = norm_act(x, f, prefix, 1)
            x = conv(x, f, 3, 1, f"{prefix}_conv2")
            return keras.layers.Add(name=f"{prefix}_add")([shortcut, x])
        if stride != 1 or shortcut.shape[-1] != f:
            shortcut = conv(x, f, 1, stride, f"{prefix}_shortcut")
            if norm:
                shortcut = norms(f"{prefix}_shortcut_{suffix}", f)(shortcut)
        x = conv(x, f, 3, stride, f"{prefix}_conv1")
        x = norm_act(x, f, prefix, 1)
        x = conv(x, f, 3, 1, f"{prefix}_conv2")
        out_act = keras.layers.Activation(activation, name=f"{prefix}_out")
        if norm and bn_position == "after":
            x = norms(f"{prefix}_{suffix}2", f)(out_act(x))
            return keras.layers.Add(name=f"{prefix}_add")([shortcut, x])
        if norm:
            x = norms(f"{prefix}_{suffix}2", f)(x)
        return out_act(keras.layers.Add(name=f"{prefix}_add")([shortcut, x]))

    inputs = keras.Input(shape=input_shape, name="inputs")
    x = conv(inputs, widths[0], 3, 1, "stem_conv")
    if not preact:
        x = _norm_act(x, norms, bn_position, activation, "stem", widths[0],
                      norm_name=f"stem_{suffix}", act_name="stem_act")
    for s, f in enumerate(widths, start=1):
        for b in range(1, blocks_per_stage + 1):
            stride = 2 if (s > 1 and b == 1) else 1
            x = block(x, f, stride, f"stage{s}_block{b}")
    if preact:
        x = _norm_act(x, norms, bn_position, activation, "final", widths[-1],
                      norm_name=f"final_{suffix}", act_name="final_act")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = _head(x, num_classes, output_activation, kernel_initializer)
    kind = "resnet" if preact else "resnet_v1"
    return keras.Model(inputs, outputs, name=name or _default_name(kind, norm, bn_position))


def _check_image_shape(input_shape: Sequence[int]) -> tuple:
    shape = tuple(input_shape)
    if len(shape) != 3 or any(not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(
            "Expected `input_shape` to be (height, width, channels) of positive integers, e.g. "
            f"(28, 28, 1) or (32, 32, 3); received {input_shape!r}."
        )
    return shape


def _check_rates(dropout: float, weight_decay: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"Expected `dropout` in [0, 1), received {dropout!r}.")
    if weight_decay < 0.0:
        raise ValueError(f"Expected `weight_decay` >= 0, received {weight_decay!r}.")
