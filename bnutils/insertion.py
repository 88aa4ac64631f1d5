"""``insert_batchnorm``: a copy of a Keras model with batch normalization after chosen layers.

The copy keeps every original weight and, at the moment of insertion, computes what the
original computes in inference mode (to float32 round-off; in our tests usually bit for bit):
each new BN layer starts with its moving statistics at their initial values (mean 0,
variance 1), ``gamma = sqrt(moving_variance + epsilon)`` (rounded so that
``gamma * rsqrt(moving_variance + epsilon)`` is 1.0 in float32, which cancels BN's
``1 / sqrt(1 + epsilon)`` factor) and ``beta = moving_mean + old bias``. Training then changes
all of them. Pass ``preserve_outputs=False`` for BN layers with their usual initial weights
instead (``gamma = 1``, ``beta = 0``; a removed bias is then dropped).

How the graph is rewritten:

- Sequential models give a Sequential model, Functional models a Functional one (with the same
  input/output structure: several inputs and outputs, dicts, branches and merges). Every layer is
  rebuilt from its config (``layer.__class__.from_config(layer.get_config())``) and gets the
  original's weights; Keras operations (``keras.ops.*`` in a functional graph) are reused.
- Nested Sequential/Functional sub-models are rewritten recursively (once, even if called
  several times). A nested subclassed model is copied as it is, and its layers are reported as
  skipped.
- Shared layers (one layer called at several places) stay shared: the copy is shared too and
  gets **one BN layer per call site** (each call sees different statistics), all with the same
  initial weights. If some call sites qualify and others do not (e.g. one is an output), the
  layer is skipped, so that the shared weights keep one meaning.
- ``position="before"`` (Ioffe & Szegedy): ``layer -> BN -> activation``; a fused activation
  (``Dense(64, activation="relu")``) is split into a linear layer, the BN layer
  (``<name>_bn``) and an ``Activation`` layer (``<name>_act``). ``position="after"``:
  ``layer (with its activation) -> BN``. The position refers to the layer's *own* activation:
  a linear layer followed by a separate ``Activation`` layer gets its BN right after it either way.
- ``remove_bias=True`` drops the bias of a layer whose output goes linearly into BN (BN subtracts
  the mean, so a bias there has no effect in training; with ``preserve_outputs`` its value moves
  into ``beta``). After a nonlinear activation the bias matters and is kept.

Layers skipped (and reported, with the reason): names in ``skip``; layers already followed by a
BN layer (directly or through an activation layer); output layers, i.e. layers whose output
reaches a model output through layers without weights that do not mix positions (activations,
dropout, reshape, flatten) only, unless ``include_output=True``.

This module reads Keras's functional graph (``Functional._nodes_by_depth``, ``Node``), which
is private Keras API, stable across Keras 3 releases so far.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import keras
import numpy as np
from keras import ops

from bnutils.scratch import ScratchBatchNormalization

__all__ = ["DEFAULT_LAYER_TYPES", "InsertionReport", "insert_batchnorm"]

_L = keras.layers
DEFAULT_LAYER_TYPES: tuple[type, ...] = (
    _L.Dense,
    _L.Conv1D, _L.Conv2D, _L.Conv3D,
    _L.SeparableConv1D, _L.SeparableConv2D,
    _L.DepthwiseConv1D, _L.DepthwiseConv2D,
    _L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose,
)
_ACTIVATION_LAYERS = (_L.Activation, _L.ReLU, _L.LeakyReLU, _L.ELU, _L.PReLU, _L.Softmax)
_TRANSPARENT_LAYERS = _ACTIVATION_LAYERS + (
    _L.Dropout, _L.SpatialDropout1D, _L.SpatialDropout2D, _L.SpatialDropout3D,
    _L.GaussianDropout, _L.AlphaDropout, _L.GaussianNoise, _L.Identity, _L.Reshape, _L.Flatten,
)
_POSITIONS = ("before", "after")


# ---------------------------------------------------------------- the report


@dataclasses.dataclass
class InsertionReport:
    """What :func:`insert_batchnorm` did, layer by layer.

    Layers inside nested models are named ``outer/inner``.

    Attributes:
        inserted: layer name -> names of the BN layers inserted after it (one per call site).
        skipped: layer name -> why no BN was inserted (only layers of the chosen types).
        removed_bias: names of the layers whose bias was removed (moved into ``beta``).
        split_activation: names of the layers whose fused activation became a separate layer.
        position: ``"before"`` or ``"after"``.
    """

    inserted: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    removed_bias: list[str] = dataclasses.field(default_factory=list)
    split_activation: list[str] = dataclasses.field(default_factory=list)
    position: str = "before"

    @property
    def bn_count(self) -> int:
        """Number of BN layers inserted."""
        return sum(len(v) for v in self.inserted.values())

    def __str__(self) -> str:
        rows = [(name, "inserted", ", ".join(bns)) for name, bns in self.inserted.items()]
        rows += [(name, "skipped", reason) for name, reason in self.skipped.items()]
        if not rows:
            return "InsertionReport: no layer of the chosen types."
        w0 = max(len("layer"), *(len(r[0]) for r in rows))
        lines = [
            f"InsertionReport: {self.bn_count} BN layer(s) inserted {self.position} the "
            f"activation, {len(self.skipped)} layer(s) skipped.",
            f"{'layer':<{w0}}  {'action':<8}  detail",
            f"{'-' * w0}  {'-' * 8}  {'-' * 6}",
        ]
        lines += [f"{a:<{w0}}  {b:<8}  {c}" for a, b, c in rows]
        return "\n".join(lines)


# ---------------------------------------------------------------- the public function


def insert_batchnorm(
    model: keras.Model,
    layer_types: Iterable[type] | type | None = None,
    skip: Iterable[str] | str = (),
    position: str = "before",
    include_output: bool = False,
    remove_bias: bool = True,
    preserve_outputs: bool = True,
    bn_layer: Callable[..., keras.layers.Layer] | None = None,
    return_report: bool = False,
    **bn_kwargs: Any,
) -> keras.Model | tuple[keras.Model, InsertionReport]:
    """Return a new model with a batch normalization layer after every chosen layer.

    The original model is not modified. See the module docstring for the rules.

    Args:
        model: a Sequential or Functional ``keras.Model``.
        layer_types: layer classes that get BN (subclasses included); default
            :data:`DEFAULT_LAYER_TYPES` (Dense and every convolution type).
        skip: names of layers that get no BN (at any nesting level).
        position: ``"before"`` (layer -> BN -> activation) or ``"after"`` (layer -> activation
            -> BN), relative to the layer's own activation.
        include_output: also normalize the model's output layers.
        remove_bias: drop the bias of layers whose output goes linearly into BN.
        preserve_outputs: initialize each BN so that the new model's inference outputs equal
            the original's (see the module docstring).
        bn_layer: BN class or factory, called as ``bn_layer(name=..., **bn_kwargs)``; default
            ``keras.layers.BatchNormalization`` (e.g. ``bnutils.FusedBatchNormalization``).
        return_report: also return an :class:`InsertionReport`.
        **bn_kwargs: arguments of every BN layer (``momentum``, ``epsilon``, ``renorm``,
            ``synchronized``, ...). ``axis`` defaults to 1 after ``channels_first`` layers.

    Returns:
        The new (uncompiled unless ``model`` was compiled) model, or ``(model, report)``
        with ``return_report=True``.

    Raises:
        TypeError: ``model`` is not a Sequential or Functional model, or an argument has the
            wrong type.
        ValueError: an argument has a wrong value (unknown position, names in ``skip`` that
            match no layer, BN arguments the BN class rejects), or a layer cannot be copied
            from its config.
    """
    _check_model(model)
    if position not in _POSITIONS:
        raise ValueError(
            f"Unknown position={position!r}. Expected 'before' (layer -> BN -> activation) or "
            "'after' (layer -> activation -> BN)."
        )
    if bn_layer is not None and not callable(bn_layer):
        raise TypeError(
            "Expected `bn_layer` to be a layer class or a factory callable(name=..., **kwargs), "
            f"received {bn_layer!r} of type {type(bn_layer).__name__}."
        )
    rewriter = _Rewriter(
        layer_types=_check_layer_types(layer_types),
        skip=_check_skip(skip, model),
        position=position,
        include_output=bool(include_output),
        remove_bias=bool(remove_bias),
        preserve_outputs=bool(preserve_outputs),
        bn_layer=bn_layer or keras.layers.BatchNormalization,
        bn_kwargs=bn_kwargs,
    )
    new_model = rewriter.rewrite(model, include_output=bool(include_output), prefix="")
    new_model.trainable = model.trainable
    if model.compiled:
        try:
            new_model.compile_from_config(model.get_compile_config())
        except Exception as e:  # noqa: BLE001 - compiling is a convenience only
            warnings.warn(
                f"The new model could not be compiled like the original ({e}); compile it "
                "yourself.",
                stacklevel=2,
            )
    if return_report:
        return new_model, rewriter.report
    return new_model


# ---------------------------------------------------------------- argument checks


def _is_graph_model(model: Any) -> bool:
    from keras.src.models.functional import Functional

    return isinstance(model, (keras.Sequential, Functional))


def _check_model(model: Any) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Expected a Sequential or Functional keras.Model, received "
            f"{type(model).__name__}: {model!r}."
        )
    if not _is_graph_model(model):
        raise TypeError(
            "Expected a Sequential or Functional model, received a subclassed model "
            f"`{type(model).__name__}` (named {model.name!r}). Its layers are wired inside "
            "`call()`, which insert_batchnorm cannot rewrite. Add the BatchNormalization "
            "layers in its `__init__`/`call` yourself, or rebuild it with keras.Sequential "
            "or the Functional API (keras.Model(inputs, outputs))."
        )


def _check_layer_types(layer_types: Any) -> tuple[type, ...]:
    if layer_types is None:
        return DEFAULT_LAYER_TYPES
    types = (layer_types,) if isinstance(layer_types, type) else tuple(layer_types)
    bad = [t for t in types if not (isinstance(t, type) and issubclass(t, keras.layers.Layer))]
    if bad or not types:
        raise TypeError(
            "Expected `layer_types` to be a non-empty sequence of keras.layers.Layer "
            f"subclasses (e.g. (keras.layers.Dense, keras.layers.Conv2D)), received "
            f"{layer_types!r}."
        )
    return types


def _all_layer_names(model: keras.Model) -> set[str]:
    names = set()
    for layer in model.layers:
        names.add(layer.name)
        if isinstance(layer, keras.Model):
            names |= _all_layer_names(layer)
    return names


def _check_skip(skip: Any, model: keras.Model) -> frozenset[str]:
    names = {skip} if isinstance(skip, str) else set(skip)
    if any(not isinstance(n, str) for n in names):
        raise TypeError(f"Expected `skip` to be layer names (strings), received {skip!r}.")
    unknown = names - _all_layer_names(model)
    if unknown:
        raise ValueError(
            f"`skip` names layers that are not in model {model.name!r}: {sorted(unknown)}. "
            "Check the names with model.summary()."
        )
    return frozenset(names)


# ---------------------------------------------------------------- helpers


def _is_linear(activation: Any) -> bool:
    return activation is None or getattr(activation, "__name__", activation) == "linear"


def _exact_gamma(moving_variance: np.ndarray, epsilon: float) -> np.ndarray:
    """``gamma`` with ``rsqrt(moving_variance + epsilon) * gamma == 1`` in float32.

    Computed with the backend's own ``rsqrt``; tries the float32 neighbours of
    ``sqrt(variance + epsilon)`` so the product rounds to exactly 1.0 where one exists. (A
    vectorized ``rsqrt`` may round a value differently at another memory alignment, so the
    product seen inside BN can still be one ulp off.)
    """
    var = ops.convert_to_tensor(np.asarray(moving_variance, "float32"))
    inv = ops.convert_to_numpy(ops.rsqrt(var + epsilon)).astype("float32")
    best = (np.float32(1.0) / inv).astype("float32")
    candidates = [best]
    for direction in (np.inf, 0.0):
        c = best
        for _ in range(3):
            c = np.nextafter(c, np.float32(direction)).astype("float32")
            candidates.append(c)
    gamma = best.copy()
    found = (inv * best).astype("float32") == np.float32(1.0)
    for c in candidates[1:]:
        ok = ~found & ((inv * c).astype("float32") == np.float32(1.0))
        gamma[ok] = c[ok]
        found |= ok
    return gamma


def _bn_like(layer: Any) -> bool:
    return all(getattr(layer, a, None) is not None
               for a in ("moving_mean", "moving_variance", "epsilon"))


def _copy_weights(old: keras.layers.Layer, new: keras.layers.Layer) -> None:
    """Copy ``old``'s weights into ``new``, matched by variable name (a removed bias is left)."""
    if not old.weights:
        return
    new_by_name = {v.name: v for v in new.weights}
    if len(new_by_name) == len(new.weights) and set(new_by_name) <= {v.name for v in old.weights}:
        for v in old.weights:
            if v.name in new_by_name:
                new_by_name[v.name].assign(v)
        return
    new.set_weights(old.get_weights())


# ---------------------------------------------------------------- the rewriter


class _Rewriter:
    """Holds the options, the report and the copies of the layers already rebuilt."""

    def __init__(self, layer_types, skip, position, include_output, remove_bias,
                 preserve_outputs, bn_layer, bn_kwargs):
        self.layer_types = layer_types
        self.skip = skip
        self.position = position
        self.include_output = include_output
        self.remove_bias = remove_bias
        self.preserve_outputs = preserve_outputs
        self.bn_layer = bn_layer
        self.bn_kwargs = dict(bn_kwargs)
        self.report = InsertionReport(position=position)
        self._bn_classes = (keras.layers.BatchNormalization, ScratchBatchNormalization) + (
            (bn_layer,) if isinstance(bn_layer, type) else ()
        )
        probe = self._make_bn("bnutils_probe_bn", None)
        self.bn_has_beta = bool(getattr(probe, "center", True))

    # -- decisions

    def _is_bn(self, layer: Any) -> bool:
        return isinstance(layer, self._bn_classes)

    def _is_target(self, layer: Any) -> bool:
        return isinstance(layer, self.layer_types) and not _is_graph_model(layer)

    def _site_reason(self, followed_by_bn: bool, is_output: bool, include_output: bool):
        if followed_by_bn:
            return "already followed by batch normalization"
        if is_output and not include_output:
            return "output layer (pass include_output=True to normalize it)"
        return None

    def _decide(self, layer, reasons: list, prefix: str) -> bool:
        """Whether ``layer`` gets BN, given the reasons against each of its call sites."""
        path = prefix + layer.name
        if layer.name in self.skip:
            self.report.skipped[path] = "listed in `skip`"
            return False
        blocked = [r for r in reasons if r is not None]
        if not blocked:
            return True
        if len(blocked) == len(reasons):
            self.report.skipped[path] = blocked[0]
        else:
            self.report.skipped[path] = (
                f"shared layer: {len(blocked)} of its {len(reasons)} call sites cannot get BN "
                f"({blocked[0]})"
            )
        return False

    # -- building blocks

    def _make_bn(self, name: str, layer: Any) -> keras.layers.Layer:
        kwargs = dict(self.bn_kwargs)
        if layer is not None:
            if getattr(layer, "data_format", None) == "channels_first" and "axis" not in kwargs:
                kwargs["axis"] = 1
            policy = getattr(layer, "dtype_policy", None)
            if policy is not None and "dtype" not in kwargs \
                    and policy.name != keras.config.dtype_policy().name:
                kwargs["dtype"] = policy
        try:
            bn = self.bn_layer(name=name, **kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"Could not create the BN layer with {getattr(self.bn_layer, '__name__', 'bn_layer')}"
                f"(name=..., **{kwargs}): {e}. Pass only arguments that the BN class accepts."
            ) from e
        if not isinstance(bn, keras.layers.Layer):
            raise TypeError(
                "Expected `bn_layer` to return a keras.layers.Layer, received "
                f"{type(bn).__name__}."
            )
        return bn

    def _clone(self, layer: keras.layers.Layer, config_changes: dict | None = None):
        config = layer.get_config()
        config.update(config_changes or {})
        try:
            return layer.__class__.from_config(config)
        except Exception as e:  # noqa: BLE001 - re-raised with advice
            raise ValueError(
                f"Could not copy layer `{layer.name}` of class `{type(layer).__name__}` from its "
                f"config ({type(e).__name__}: {e}). insert_batchnorm rebuilds every layer with "
                "`layer.__class__.from_config(layer.get_config())`: give the class a complete "
                "`get_config()` (and `from_config()` if needed)."
            ) from e

    def _init_bn(self, bn, bias: np.ndarray | None) -> None:
        if not self.preserve_outputs or not _bn_like(bn):
            return
        mean = ops.convert_to_numpy(bn.moving_mean).astype("float32")
        var = ops.convert_to_numpy(bn.moving_variance).astype("float32")
        if getattr(bn, "gamma", None) is not None:
            bn.gamma.assign(_exact_gamma(var, bn.epsilon))
        if getattr(bn, "beta", None) is not None:
            beta = mean if bias is None else (mean + bias).astype("float32")
            bn.beta.assign(beta)

    # -- one target layer

    class _Target:
        """The rebuilt copy of one layer that gets BN, and how its call sites are wrapped."""

        def __init__(self, rw: _Rewriter, layer, path: str):
            self.rw, self.old, self.path = rw, layer, path
            act = getattr(layer, "activation", None)
            self.split = rw.position == "before" and not _is_linear(act)
            linear_into_bn = rw.position == "before" or _is_linear(act)
            self.drop_bias = bool(rw.remove_bias and linear_into_bn and rw.bn_has_beta
                                  and getattr(layer, "use_bias", False))
            changes = {}
            if self.split:
                changes["activation"] = "linear"
            if self.drop_bias:
                changes["use_bias"] = False
            self.new = rw._clone(layer, changes)
            self.bias = None
            if self.drop_bias and rw.preserve_outputs and layer.built:
                self.bias = ops.convert_to_numpy(layer.bias).astype("float32")
            self.copied = False
            if self.split:
                rw.report.split_activation.append(path)
            if self.drop_bias:
                rw.report.removed_bias.append(path)

        def call(self, used: set, *args, **kwargs):
            out = self.new(*args, **kwargs)
            self.weights_from_old()
            bn = self.rw._make_bn(_unique(f"{self.old.name}_bn", used), self.old)
            out = bn(out)
            self.rw._init_bn(bn, self.bias)
            if self.split:
                act = keras.layers.Activation(self.old.activation,
                                              name=_unique(f"{self.old.name}_act", used))
                out = act(out)
            self.rw.report.inserted.setdefault(self.path, []).append(bn.name)
            return out

        def weights_from_old(self):
            if not self.copied and self.new.built:
                _copy_weights(self.old, self.new)
                self.copied = True

    # -- models

    def rewrite(self, model: keras.Model, include_output: bool, prefix: str) -> keras.Model:
        if isinstance(model, keras.Sequential):
            return self._rewrite_sequential(model, include_output, prefix)
        return self._rewrite_functional(model, include_output, prefix)

    def _copy_other(self, layer, cache: dict, include_output: bool, prefix: str):
        """The copy of a layer that gets no BN (nested models rewritten), cached per layer."""
        if id(layer) in cache:
            return cache[id(layer)]
        if not isinstance(layer, keras.layers.Layer):
            copy = layer  # a stateless keras operation
        elif _is_graph_model(layer):
            copy = self.rewrite(layer, include_output, f"{prefix}{layer.name}/")
        else:
            if isinstance(layer, keras.Model):  # subclassed sub-model: copied, not rewired
                for inner in layer._flatten_layers(include_self=False):
                    if self._is_target(inner):
                        self.report.skipped[f"{prefix}{layer.name}/{inner.name}"] = (
                            f"inside subclassed model `{type(layer).__name__}`, which cannot "
                            "be rewired"
                        )
            copy = self._clone(layer)
        cache[id(layer)] = copy
        return copy

    def _rewrite_sequential(self, model, include_output, prefix):
        layers = list(model.layers)
        n = len(layers)
        reasons = defaultdict(list)
        for i, layer in enumerate(layers):
            if not self._is_target(layer):
                continue
            j = i + 1
            while j < n and isinstance(layers[j], _ACTIVATION_LAYERS):
                j += 1
            followed = j < n and self._is_bn(layers[j])
            is_output = all(isinstance(x, _TRANSPARENT_LAYERS) for x in layers[i + 1:])
            reasons[id(layer)].append(self._site_reason(followed, is_output, include_output))
        # Inner models are outputs only if nothing follows them.
        inner_include = {
            id(layer): include_output or not all(
                isinstance(x, _TRANSPARENT_LAYERS) for x in layers[i + 1:])
            for i, layer in enumerate(layers) if _is_graph_model(layer)
        }

        used = {layer.name for layer in layers}
        targets, cache, new_layers, plan = {}, {}, [], []
        for layer in layers:
            if self._is_target(layer) and id(layer) not in targets and id(layer) not in cache:
                if self._decide(layer, reasons[id(layer)], prefix):
                    targets[id(layer)] = self._Target(self, layer, prefix + layer.name)
            if id(layer) in targets:
                t = targets[id(layer)]
                bn = self._make_bn(_unique(f"{layer.name}_bn", used), layer)
                new_layers += [t.new, bn]
                if t.split:
                    new_layers.append(keras.layers.Activation(
                        layer.activation, name=_unique(f"{layer.name}_act", used)))
                self.report.inserted.setdefault(t.path, []).append(bn.name)
                plan.append((t, bn))
            else:
                copy = self._copy_other(layer, cache, inner_include.get(id(layer), True), prefix)
                new_layers.append(copy)
                plan.append((layer, copy))

        first = model._layers[0] if model._layers else None
        if isinstance(first, keras.layers.InputLayer):
            new_layers.insert(0, self._clone(first))
        new_model = keras.Sequential(new_layers, name=model.name)
        if new_model.built:
            for old, new in plan:
                if isinstance(old, self._Target):
                    old.weights_from_old()
                    self._init_bn(new, old.bias)
                elif isinstance(old, keras.layers.Layer) and not _is_graph_model(old):
                    _copy_weights(old, new)
        return new_model

    def _rewrite_functional(self, model, include_output, prefix):
        nodes = [node for depth in sorted(model._nodes_by_depth, reverse=True)
                 for node in model._nodes_by_depth[depth]]
        output_ids = {id(t) for t in model.outputs}
        consumer_nodes = defaultdict(list)  # id(tensor) -> the nodes that take it as input
        for node in nodes:
            for t in node.input_tensors:
                consumer_nodes[id(t)].append(node)

        memo_out, memo_bn = {}, {}

        def reaches_output(t) -> bool:
            key = id(t)
            if key not in memo_out:
                memo_out[key] = key in output_ids or any(
                    isinstance(c.operation, _TRANSPARENT_LAYERS)
                    and any(reaches_output(o) for o in c.outputs)
                    for c in consumer_nodes.get(key, ()))
            return memo_out[key]

        def followed_by_bn(t) -> bool:
            key = id(t)
            if key not in memo_bn:
                memo_bn[key] = any(
                    self._is_bn(c.operation)
                    or (isinstance(c.operation, _ACTIVATION_LAYERS)
                        and any(followed_by_bn(o) for o in c.outputs))
                    for c in consumer_nodes.get(key, ()))
            return memo_bn[key]

        reasons, inner_include = defaultdict(list), defaultdict(bool)
        for node in nodes:
            op = node.operation
            if node.is_input or op is None:
                continue
            outs = node.outputs
            fb = any(followed_by_bn(o) for o in outs)
            ro = any(reaches_output(o) for o in outs)
            if self._is_target(op):
                reasons[id(op)].append(self._site_reason(fb, ro, include_output))
            elif _is_graph_model(op):
                inner_include[id(op)] |= include_output or not (ro or fb)

        used = {layer.name for layer in model.layers}
        tensors, targets, cache, decided, copied = {}, {}, {}, set(), set()
        for t in model.inputs:
            in_layer = t._keras_history.operation
            tensors[id(t)] = self._clone(in_layer).output
        for node in nodes:
            op = node.operation
            if node.is_input or op is None:
                continue
            args, kwargs = node.arguments.fill_in(tensors)
            if self._is_target(op) and id(op) not in decided:
                decided.add(id(op))
                if self._decide(op, reasons[id(op)], prefix):
                    targets[id(op)] = self._Target(self, op, prefix + op.name)
            if id(op) in targets:
                out = targets[id(op)].call(used, *args, **kwargs)
            else:
                copy = self._copy_other(op, cache, inner_include[id(op)], prefix)
                out = copy(*args, **kwargs)
                if isinstance(op, keras.layers.Layer) and not _is_graph_model(op) \
                        and id(op) not in copied:
                    copied.add(id(op))
                    _copy_weights(op, copy)
            for x, y in zip(node.outputs, keras.tree.flatten(out), strict=True):
                tensors[id(x)] = y

        def new_tensor(t):
            return tensors[id(t)]

        return keras.Model(
            inputs=keras.tree.map_structure(new_tensor, model.input),
            outputs=keras.tree.map_structure(new_tensor, model.output),
            name=model.name,
        )


def _unique(base: str, used: set) -> str:
    name, i = base, 0
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name
