"""Model builders used across the suite: MLP, VGG-style CNN, small ResNet, ResNet50, tiny BN nets.

Shared arguments: ``norm`` (``None``, ``"batch"``, ``"layer"``, ``"group"``: groups = the largest
divisor of the channels up to 32); ``bn_position`` ``"before"`` (``layer -> norm -> act``, the
layer without bias) or ``"after"``; ``bn_layer``, a BN class or factory called as
``bn_layer(name=..., **bn_kwargs)``; ``synchronized=True`` adds itself to ``bn_kwargs``. Without
``norm`` activations are fused into the Dense/Conv layers (what ``insert_batchnorm`` splits);
``split_activation=True`` gives separate ``*_act`` layers, the BN twin's layout (fused layers can
train slower). Models end in ``predictions``. Builders return an uncompiled functional
``keras.Model`` and raise ``ValueError`` naming an argument out of range.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import keras

from bnutils._graph import is_batchnorm, rewrite
from bnutils._util import check_choice, check_positive_int

__all__ = [
    "NORMS",
    "build_cnn",
    "build_mlp",
    "build_resnet",
    "build_resnet50",
    "small_bn_mlp",
    "small_bn_model",
]

NORMS = (None, "batch", "layer", "group")
_NORM_SUFFIX = {"batch": "bn", "layer": "ln", "group": "gn"}


# ---------------------------------------------------------------- shared helpers


def _check_widths(name: str, widths: Sequence[int], allow_empty: bool = False) -> tuple:
    widths = tuple(widths)
    if not widths and not allow_empty:
        raise ValueError(f"Expected `{name}` to be a non-empty sequence, received {widths!r}.")
    return tuple(check_positive_int(name, w) for w in widths)


def _check_image(input_shape: Sequence[int], dropout: float) -> tuple:
    shape = tuple(input_shape)
    if len(shape) != 3 or any(not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(
            "Expected `input_shape` to be (height, width, channels) of positive integers, e.g. "
            f"(28, 28, 1) or (32, 32, 3); received {input_shape!r}."
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"Expected `dropout` in [0, 1), received {dropout!r}.")
    return shape


class _Norms:
    """The normalization choices of one model (checked); makes its ``layer -> norm -> act``."""

    def __init__(self, norm, position, activation, bn_layer, bn_kwargs, sync, split=False):
        if norm not in NORMS:
            raise ValueError(f"Unknown norm={norm!r}. Expected one of {list(NORMS)} (None: none).")
        if position not in ("before", "after"):
            raise ValueError(
                f"Unknown bn_position={position!r}. Expected 'before' (layer -> norm -> "
                "activation) or 'after' (layer -> activation -> norm)."
            )
        if norm != "batch" and (bn_layer is not None or bn_kwargs):
            raise ValueError(
                f"`bn_layer` and `bn_kwargs` configure batch normalization, but norm={norm!r}. "
                "Pass norm='batch' to use them, or drop them."
            )
        if bn_layer is not None and not callable(bn_layer):
            raise TypeError(f"Expected `bn_layer` to be a class or factory, received {bn_layer!r}.")
        self.norm, self.position, self.activation, self.split = norm, position, activation, split
        self.bn_layer = bn_layer or keras.layers.BatchNormalization
        self.bn_kwargs = {**(bn_kwargs or {}), **({"synchronized": True} if sync else {})}
        self.suffix = _NORM_SUFFIX.get(norm, "norm")
        self.use_bias = norm is None or position == "after"

    def __call__(self, name: str, channels: int) -> keras.layers.Layer:
        if self.norm == "batch":
            return self.bn_layer(name=name, **self.bn_kwargs)
        if self.norm == "layer":
            return keras.layers.LayerNormalization(name=name)
        g = min(32, channels)
        while channels % g:  # the largest divisor of `channels` not above 32
            g -= 1
        return keras.layers.GroupNormalization(groups=g, name=name)

    def norm_act(self, x, name, channels, norm_name=None, act_name=None):
        """``norm -> activation`` or ``activation -> norm`` (just the activation without norm)."""
        act = keras.layers.Activation(self.activation, name=act_name or f"{name}_act")
        if self.norm is None:
            return act(x)
        norm = self(norm_name or f"{name}_{self.suffix}", channels)
        return act(norm(x)) if self.position == "before" else norm(act(x))

    def unit(self, x, make, name, channels):
        """``make(name=...)`` (a Dense or Conv2D partial), then its norm and activation."""
        if self.norm is None and not self.split:
            return make(name=name, activation=self.activation)(x)
        return self.norm_act(make(name=name, use_bias=self.use_bias)(x), name, channels)


def _model(inputs, x, n: _Norms, kind, name, classes, activation, init) -> keras.Model:
    """Adds ``predictions``; names the model (default ``kind``, ``kind_bn``, ``kind_bn_after``)."""
    head = keras.layers.Dense(classes, activation, kernel_initializer=init, name="predictions")
    if name is None and n.norm is not None:
        name = f"{kind}_{n.suffix}" + ("_after" if n.position == "after" else "")
    return keras.Model(inputs, head(x), name=name or kind)


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
    synchronized: bool = False,
    output_activation: str | None = "softmax",
    split_activation: bool = False,
    name: str | None = None,
) -> keras.Model:
    """A fully connected network; the default is Ioffe & Szegedy's MNIST net (3 x 100 sigmoid).

    Layers: ``flatten``, per hidden layer ``dense_i`` (+ ``dense_i_bn``, ``dense_i_act``), then
    ``predictions``. Used in notebooks 02-05.

    Args:
        input_shape: shape of one example (flattened first).
        num_classes: output units.
        widths: units of each hidden layer.
        activation, kernel_initializer: of the hidden layers.
        norm, bn_position, bn_layer, bn_kwargs, synchronized, split_activation: see the
            module docstring.
        output_activation: activation of ``predictions`` (``None``: logits).
        name: model name (default ``"mlp"``, ``"mlp_bn"``, ``"mlp_bn_after"``, ...).
    """
    widths = _check_widths("widths", widths, allow_empty=True)
    n = _Norms(norm, bn_position, activation, bn_layer, bn_kwargs, synchronized, split_activation)
    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    x = keras.layers.Flatten(name="flatten")(inputs)
    for i, units in enumerate(widths, start=1):
        dense = functools.partial(keras.layers.Dense, units, kernel_initializer=kernel_initializer)
        x = n.unit(x, dense, f"dense_{i}", units)
    return _model(inputs, x, n, "mlp", name, num_classes, output_activation, kernel_initializer)


def build_cnn(
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    filters: Sequence[int | Sequence[int]] = (32, 64),
    convs_per_block: int = 2,
    dense_units: Sequence[int] = (128,),
    activation: Any = "relu",
    kernel_initializer: Any = "he_normal",
    dropout: float = 0.0,
    norm: str | None = None,
    bn_position: str = "before",
    bn_layer: Callable[..., keras.layers.Layer] | None = None,
    bn_kwargs: dict | None = None,
    synchronized: bool = False,
    output_activation: str | None = "softmax",
    split_activation: bool = False,
    global_pool: bool = False,
    name: str | None = None,
) -> keras.Model:
    """A small VGG-style CNN: blocks of 3x3 convolutions and 2x2 max pooling, then a dense head.

    The default is ``32-32-pool-64-64-pool-flatten-128-predictions``. Layers are named
    ``block{b}_conv{c}`` (+ ``_bn``/``_act``), ``block{b}_pool``, ``flatten``, ``dense_{i}``; the
    head's dense layers are normalized like the convolutions. Used in notebooks 02-07.

    Args:
        input_shape: ``(height, width, channels)``.
        num_classes: output units.
        filters: one block per entry: an int is ``convs_per_block`` convolutions of that width, a
            sequence one convolution per width, e.g. ``((32, 32), (64, 64), (128,))``.
        convs_per_block: convolutions of a block given as an int.
        dense_units: units of each hidden dense layer of the head (may be empty).
        activation, kernel_initializer: of the hidden layers.
        dropout: rate of a ``Dropout`` after every pooling and hidden dense layer (0: none).
        norm, bn_position, bn_layer, bn_kwargs, synchronized, split_activation: see the
            module docstring.
        output_activation: activation of ``predictions`` (``None``: logits).
        global_pool: ``GlobalAveragePooling2D`` (``avg_pool``) instead of ``Flatten``, in place
            of the last block's max pooling.
        name: model name (default ``"cnn"``, ``"cnn_bn"``, ...).
    """
    input_shape = _check_image(input_shape, dropout)
    k = check_positive_int("convs_per_block", convs_per_block)
    blocks = [_check_widths("filters", f if isinstance(f, Sequence) else (f,) * k) for f in filters]
    if not blocks:
        raise ValueError(f"Expected `filters` to be a non-empty sequence, received {filters!r}.")
    dense_units = _check_widths("dense_units", dense_units, allow_empty=True)
    n = _Norms(norm, bn_position, activation, bn_layer, bn_kwargs, synchronized, split_activation)
    L, init = keras.layers, kernel_initializer

    inputs = keras.Input(shape=input_shape, name="inputs")
    x = inputs
    for b, widths in enumerate(blocks, start=1):
        for c, f in enumerate(widths, start=1):
            conv = functools.partial(L.Conv2D, f, 3, padding="same", kernel_initializer=init)
            x = n.unit(x, conv, f"block{b}_conv{c}", f)
        if global_pool and b == len(blocks):
            break
        x = L.MaxPooling2D(2, name=f"block{b}_pool")(x)
        x = L.Dropout(dropout, name=f"block{b}_dropout")(x) if dropout else x
    pool = L.GlobalAveragePooling2D(name="avg_pool") if global_pool else L.Flatten(name="flatten")
    x = pool(x)
    for i, units in enumerate(dense_units, start=1):
        dense = functools.partial(L.Dense, units, kernel_initializer=init)
        x = n.unit(x, dense, f"dense_{i}", units)
        x = L.Dropout(dropout, name=f"dense_{i}_dropout")(x) if dropout else x
    return _model(inputs, x, n, "cnn", name, num_classes, output_activation, kernel_initializer)


def build_resnet(
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    widths: Sequence[int] = (32, 64, 128),
    activation: Any = "relu",
    kernel_initializer: Any = "he_normal",
    norm: str | None = "batch",
    bn_position: str = "before",
    bn_layer: Callable[..., keras.layers.Layer] | None = None,
    bn_kwargs: dict | None = None,
    synchronized: bool = False,
    output_activation: str | None = "softmax",
    name: str | None = None,
) -> keras.Model:
    """A small pre-activation ResNet (He et al. 2016): a 3x3 stem, stages of 2 blocks, pooling.

    A block is ``x + conv(act(norm(conv(act(norm(x))))))``; each stage after the first halves
    the resolution (stride 2 and a 1x1 projection shortcut in its first block); the net ends with
    ``norm -> act -> avg_pool``. The default is ``norm="batch"``. Names: ``stem_conv``,
    ``stage{s}_block{b}_conv{i}``, ``..._bn{i}`` / ``..._act{i}``, ``..._shortcut``, ``..._add``,
    ``final_bn``, ``final_act``, ``avg_pool``.

    Args:
        input_shape: ``(height, width, channels)``.
        num_classes: output units.
        widths: filters of each stage.
        activation, kernel_initializer: of the hidden layers.
        norm, bn_position, bn_layer, bn_kwargs, synchronized: see the module docstring.
        output_activation: activation of ``predictions`` (``None``: logits).
        name: model name (default ``"resnet_bn"``, ``"resnet_bn_after"``, ...).
    """
    input_shape = _check_image(input_shape, 0.0)
    widths = _check_widths("widths", widths)
    n = _Norms(norm, bn_position, activation, bn_layer, bn_kwargs, synchronized)

    def conv(x, f, k, stride, nm):
        kw = {"use_bias": n.use_bias, "kernel_initializer": kernel_initializer}
        return keras.layers.Conv2D(f, k, strides=stride, padding="same", name=nm, **kw)(x)

    def norm_act(x, f, prefix, i=""):
        return n.norm_act(x, prefix, f, f"{prefix}_{n.suffix}{i}", f"{prefix}_act{i}")

    inputs = keras.Input(shape=input_shape, name="inputs")
    x = conv(inputs, widths[0], 3, 1, "stem_conv")
    for s, f in enumerate(widths, start=1):
        for b in (1, 2):
            p, stride = f"stage{s}_block{b}", 2 if (s > 1 and b == 1) else 1
            shortcut, x = x, norm_act(x, f, p, 0)
            if stride != 1 or shortcut.shape[-1] != f:
                shortcut = conv(x, f, 1, stride, f"{p}_shortcut")
            x = norm_act(conv(x, f, 3, stride, f"{p}_conv1"), f, p, 1)
            x = keras.layers.Add(name=f"{p}_add")([shortcut, conv(x, f, 3, 1, f"{p}_conv2")])
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(norm_act(x, widths[-1], "final"))
    return _model(inputs, x, n, "resnet", name, num_classes, output_activation, kernel_initializer)


def _without_bn(layer):
    """The ``clone`` of ``_graph.rewrite`` that drops every BN layer and copies the others."""
    if is_batchnorm(layer):
        return None
    if not isinstance(layer, keras.layers.Layer):
        return layer  # a keras.ops operation
    return layer.__class__.from_config(layer.get_config())


def build_resnet50(
    input_shape: Sequence[int] = (64, 64, 3),
    num_classes: int = 10,
    norm: str | None = "batch",
    bn_layer: type[keras.layers.BatchNormalization] | None = None,
    bn_kwargs: dict | None = None,
) -> keras.Model:
    """``keras.applications.ResNet50(weights=None)`` with logits, its BN layers swapped or removed.

    Used by ``benchmarks/bench_bn_layers.py``. Seed first (``bnutils.set_seed``) for fixed weights.

    Args:
        input_shape: ``(height, width, 3)``, at least 32 x 32.
        num_classes: output units (logits).
        norm: ``"batch"`` or ``None`` (each BN replaced by a pass-through layer of its name).
        bn_layer: a BN subclass every BN layer is rebuilt as (``bnutils.convert_batchnorm``).
        bn_kwargs: config overrides of the rebuilt BN layers, e.g. ``{"virtual_batch_size": 8}``.

    Returns:
        An uncompiled functional ``keras.Model``.

    Raises:
        ValueError: ``norm`` is not ``"batch"`` or ``None``, or BN options come without it.
    """
    norm = check_choice("norm", norm, ("batch", None))
    _Norms(norm, "before", None, bn_layer, bn_kwargs, False)  # checks the BN options
    kw = {"input_shape": tuple(input_shape), "classes": num_classes, "classifier_activation": None}
    base = keras.applications.ResNet50(weights=None, **kw)
    if norm is None:
        return rewrite(base, _without_bn)
    if bn_layer is None and not bn_kwargs:
        return base
    from bnutils.layers import convert_batchnorm

    return convert_batchnorm(base, bn_layer or keras.layers.BatchNormalization, **(bn_kwargs or {}))


# ---------------------------------------------------------------- tiny BN nets (notebook A1)


def small_bn_model(
    synchronized: bool = False,
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    width: int = 8,
    momentum: float = 0.9,
    seed: int = 0,
) -> keras.Model:
    """``Conv(width) -> bn1 -> ReLU -> MaxPool -> Conv(2 width) -> bn2 -> ReLU -> GAP -> Dense``.

    Logits, seeded initializers: the same ``seed`` gives the same weights under any
    ``tf.distribute`` strategy. Used in notebook A1 and ``scripts/multiworker_bn.py``.

    Args:
        synchronized: passed to both BN layers.
        input_shape, num_classes: image shape ``(H, W, C)`` and logits produced.
        width: filters of the first convolution.
        momentum: BN moving-average momentum.
        seed: initializer seed.
    """
    return _small_bn(False, synchronized, input_shape, num_classes, width, momentum, seed)


def small_bn_mlp(
    synchronized: bool = False,
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    width: int = 64,
    momentum: float = 0.99,
    seed: int = 0,
) -> keras.Model:
    """``Flatten -> (Dense(width) -> BN -> ReLU) x 2 -> Dense``, logits, seeded initializers.

    Per-feature statistics from small per-replica batches: where sync BN matters most (A1).

    Args:
        synchronized, input_shape, num_classes, momentum, seed: as in :func:`small_bn_model`.
        width: units of both hidden layers.
    """
    return _small_bn(True, synchronized, input_shape, num_classes, width, momentum, seed)


def _small_bn(dense, synchronized, input_shape, num_classes, width, momentum, seed):
    L, init = keras.layers, keras.initializers.GlorotUniform
    inputs = keras.Input(shape=tuple(input_shape))
    h = L.Flatten()(inputs) if dense else inputs
    for i in (1, 2):
        kw = {"use_bias": False, "kernel_initializer": init(seed + i)}
        h = L.Dense(width, **kw)(h) if dense else L.Conv2D(i * width, 3, padding="same", **kw)(h)
        h = L.BatchNormalization(momentum=momentum, synchronized=synchronized, name=f"bn{i}")(h)
        h = L.ReLU()(h)
        if not dense:
            h = L.MaxPooling2D()(h) if i == 1 else L.GlobalAveragePooling2D()(h)
    outputs = L.Dense(num_classes, kernel_initializer=init(seed + 3))(h)
    kind = "mlp" if dense else "cnn"
    return keras.Model(inputs, outputs, name=f"small_{kind}_{'syncbn' if synchronized else 'bn'}")
