"""``insert_batchnorm``: a copy of a Keras model with batch normalization after chosen layers.

The copy keeps every weight and computes, at first, what the original computes in inference
mode (each new BN starts as the identity, with ``beta`` = the removed bias). The graph is
rewritten by the package's one rewrite (``_graph.rewrite``); nested models too, and a
shared layer gets one BN per call site. Layers named in ``skip``, already followed by BN, at
the output (unless ``include_output``), inside a subclassed model, or shared with call sites
that do not qualify are skipped, with the reason in the report. Notebook 03 shows each rule.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any

import keras
import numpy as np
from keras import ops

from bnutils._graph import (
    ACTIVATION_LAYERS,
    DROPOUT_LAYERS,
    LINEAR_LAYERS,
    MODEL_OUTPUT,
    SHAPE_LAYERS,
    LayerGraph,
    has_linear_activation,
    is_batchnorm,
    is_graph_model,
    require_graph_model,
    rewrite,
    walk_layers,
)
from bnutils.results import Report

__all__ = ["DEFAULT_LAYER_TYPES", "InsertionReport", "insert_batchnorm"]

_L = keras.layers
#: The layer classes that get BN by default: Dense and every convolution type.
DEFAULT_LAYER_TYPES: tuple[type, ...] = LINEAR_LAYERS
# What an output passes through and is still the model's output: no weights, no mixing.
_TRANSPARENT_LAYERS = ACTIVATION_LAYERS + DROPOUT_LAYERS + SHAPE_LAYERS


@dataclasses.dataclass
class InsertionReport(Report):
    """What :func:`insert_batchnorm` did, layer by layer (nested layers named ``outer/inner``).

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
        w = max(len("layer"), *(len(r[0]) for r in rows))
        rows = [("layer", "action", "detail"), ("-" * w, "-" * 8, "-" * 6), *rows]
        head = (
            f"InsertionReport: {self.bn_count} BN layer(s) inserted {self.position} the "
            f"activation, {len(self.skipped)} layer(s) skipped."
        )
        return "\n".join([head, *(f"{a:<{w}}  {b:<8}  {c}" for a, b, c in rows)])


def insert_batchnorm(
    model: keras.Model,
    layer_types: Iterable[type] | type | None = None,
    skip: Iterable[str] | str = (),
    bn_position: str = "before",
    include_output: bool = False,
    remove_bias: bool = True,
    preserve_outputs: bool = True,
    bn_layer: Callable[..., keras.layers.Layer] | None = None,
    return_report: bool = False,
    **bn_kwargs: Any,
) -> keras.Model | tuple[keras.Model, InsertionReport]:
    """Return a new model with a batch normalization layer after every chosen layer (the
    original model is left as it is).

    >>> bn_model, report = insert_batchnorm(model, return_report=True)

    Args:
        model: a Sequential or Functional ``keras.Model``.
        layer_types: layer classes that get BN (subclasses included); default
            :data:`DEFAULT_LAYER_TYPES`.
        skip: names of layers that get no BN (at any nesting level).
        bn_position: ``"before"`` (layer -> BN -> activation) or ``"after"`` (layer -> activation
            -> BN), relative to the layer's own activation.
        include_output: also normalize the model's output layers.
        remove_bias: drop the bias of layers whose output goes linearly into BN.
        preserve_outputs: start each BN so that the inference outputs equal the original's.
        bn_layer: BN class or factory ``bn_layer(name=..., **bn_kwargs)``; default
            ``keras.layers.BatchNormalization``.
        return_report: also return an :class:`InsertionReport`.
        **bn_kwargs: arguments of every BN layer (``momentum``, ``epsilon``, ...); ``axis``
            defaults to 1 after ``channels_first`` layers.

    Returns:
        The new model (compiled like ``model`` if it was), or ``(model, report)``.

    Warns:
        UserWarning: no BN was inserted (no layer of ``layer_types``, or every one skipped).

    Raises:
        TypeError: ``model`` is not Sequential or Functional, or an argument's type is wrong.
        ValueError: an unknown ``bn_position``, names in ``skip`` that match no layer, BN arguments
            the BN class rejects, or a layer that cannot be copied from its config.
    """
    require_graph_model(
        model,
        "A subclassed model wires its layers inside `call()`, which insert_batchnorm cannot "
        "rewrite: add BatchNormalization there yourself, or rebuild it with keras.Sequential or "
        "keras.Model(inputs, outputs).",
    )
    if bn_position not in ("before", "after"):
        raise ValueError(
            f"Unknown bn_position={bn_position!r}. Expected 'before' (layer -> BN -> activation) or "
            "'after' (layer -> activation -> BN)."
        )
    if bn_layer is not None and not callable(bn_layer):
        raise TypeError(
            "Expected `bn_layer` to be a layer class or a factory callable(name=..., **kwargs), "
            f"received {bn_layer!r} of type {type(bn_layer).__name__}."
        )
    types = DEFAULT_LAYER_TYPES if layer_types is None else layer_types
    types = (types,) if isinstance(types, type) else tuple(types)
    if not types or not all(isinstance(t, type) and issubclass(t, _L.Layer) for t in types):
        raise TypeError(
            "Expected `layer_types` to be a non-empty sequence of keras.layers.Layer subclasses "
            f"(e.g. (keras.layers.Dense, keras.layers.Conv2D)), received {layer_types!r}."
        )
    skip = {skip} if isinstance(skip, str) else set(skip)
    if unknown := skip - {layer.name for _, layer in walk_layers(model)}:
        raise ValueError(
            f"`skip` names layers that are not in model {model.name!r}: "
            f"{sorted(map(str, unknown))}. Check the names with model.summary()."
        )
    inserter = _Inserter(
        model,
        layer_types=types,
        skip=skip,
        position=bn_position,
        include_output=bool(include_output),
        remove_bias=bool(remove_bias),
        preserve_outputs=bool(preserve_outputs),
        bn_layer=bn_layer or keras.layers.BatchNormalization,
        bn_kwargs=bn_kwargs,
    )
    new_model = inserter.rewrite(model, prefix="")
    report = inserter.report
    if not report.bn_count:  # nothing silent: a copy that changes nothing says so
        kinds = "Dense and convolution layers" if layer_types is None else "layer_types"
        why = f"all {len(report.skipped)} {kinds} were skipped (the report's `skipped` says why)"
        if not report.skipped:
            why = f"it has no {kinds}"
        warnings.warn(
            f"insert_batchnorm inserted nothing in model {model.name!r}: {why}.", stacklevel=2
        )
    return (new_model, report) if return_report else new_model


def _exact_gamma(moving_variance: np.ndarray, epsilon: float) -> np.ndarray:
    """``gamma`` with ``rsqrt(moving_variance + epsilon) * gamma == 1`` in float32: the
    backend's own ``rsqrt``, and the float32 neighbours of ``1 / rsqrt`` where it is not."""
    var = ops.convert_to_tensor(np.asarray(moving_variance, "float32"))
    inv = ops.convert_to_numpy(ops.rsqrt(var + epsilon)).astype("float32")
    best = (np.float32(1.0) / inv).astype("float32")
    gamma = best.copy()
    for ulps in (1, 2, 3, -1, -2, -3):
        candidate = (best.view(np.int32) + ulps).view(np.float32)
        better = (inv * gamma != np.float32(1.0)) & (inv * candidate == np.float32(1.0))
        gamma[better] = candidate[better]
    return gamma


def _copy_weights(old: keras.layers.Layer, new: keras.layers.Layer) -> None:
    """Copy ``old``'s weights into ``new``, matched by name where names are unique (so that a
    removed bias is left out)."""
    names = {v.name for v in new.weights}
    unique = len(names) == len(new.weights)
    new.set_weights([v.numpy() for v in old.weights if v.name in names or not unique])


def _from_config(layer: keras.layers.Layer, changes: dict | None = None):
    try:
        return layer.__class__.from_config({**layer.get_config(), **(changes or {})})
    except Exception as e:  # noqa: BLE001 - re-raised with advice
        raise ValueError(
            f"Could not copy layer `{layer.name}` of class `{type(layer).__name__}` from its "
            f"config ({type(e).__name__}: {e}). insert_batchnorm rebuilds every layer with "
            "`layer.__class__.from_config(layer.get_config())`: give the class a complete "
            "`get_config()` (and `from_config()` if needed)."
        ) from e


def _unique(base: str, used: set) -> str:
    names = [base, *(f"{base}_{i}" for i in range(1, len(used) + 2))]
    used.add(name := next(n for n in names if n not in used))
    return name


class _Placement:
    """Decides where BN goes: which call sites of the chosen layers may get one, and why not."""

    def __init__(self, model, skip: set, include_output: bool, bn_classes: tuple, report):
        self.graph = LayerGraph(model)
        self.skip = skip
        self.include_output = include_output
        self.bn_classes = bn_classes  # the BN class asked for, besides every is_batchnorm
        self.report = report
        # The layers of every Sequential model: the order where there is no graph (not built).
        models = [model, *(m for _, m in walk_layers(model))]
        seqs = [m for m in models if isinstance(m, keras.Sequential)]
        self.lists = {id(x): m.layers for m in seqs for x in m.layers}

    def _sites(self, layer) -> list[tuple[Any, int]]:
        if n := self.graph.call_count(layer):
            return [(layer, i) for i in range(n)]
        return [(layer, i) for i, x in enumerate(self.lists.get(id(layer), [])) if x is layer]

    def _next(self, site) -> list[tuple[Any, int]]:
        layer, i = site
        if self.graph.call_count(layer):
            return self.graph.consumers(layer, i)
        layers = self.lists.get(id(layer), [])
        return [(layers[i + 1], i + 1)] if i + 1 < len(layers) else [(MODEL_OUTPUT, 0)]

    def _leads_to(self, site, found: Callable, through: tuple) -> bool:
        """Whether the output of ``site`` reaches a ``found`` op, directly or via ``through``."""
        return any(
            found(op) or (isinstance(op, through) and self._leads_to((op, i), found, through))
            for op, i in self._next(site)
        )

    def _is_bn(self, op) -> bool:
        return is_batchnorm(op) or isinstance(op, self.bn_classes)

    def _reason(self, site) -> str | None:
        if self._leads_to(site, self._is_bn, ACTIVATION_LAYERS):
            return "already followed by batch normalization"
        if not self.include_output and self._leads_to(
            site, lambda op: op is MODEL_OUTPUT, _TRANSPARENT_LAYERS
        ):
            return "output layer (pass include_output=True to normalize it)"
        return None

    def gets_bn(self, layer, path: str) -> bool:
        """Whether every call of ``layer`` may get BN; if not, the reason goes in the report."""
        reasons = [self._reason(site) for site in self._sites(layer)]
        if layer.name in self.skip:
            reasons = ["listed in `skip`"]
        if blocked := [r for r in reasons if r is not None]:
            self.report.skipped[path] = (
                blocked[0]
                if len(blocked) == len(reasons)
                else f"shared layer: {len(blocked)} of its {len(reasons)} call sites cannot get "
                f"BN ({blocked[0]})"
            )
        return not blocked


class _Inserter:
    """Rewrites the model: copies each layer, adds BN where :class:`_Placement` allows."""

    def __init__(
        self,
        model: keras.Model,
        *,
        layer_types: tuple,
        skip: set,
        position: str,
        include_output: bool,
        remove_bias: bool,
        preserve_outputs: bool,
        bn_layer: Callable[..., keras.layers.Layer],
        bn_kwargs: dict,
    ):
        self.layer_types = layer_types
        self.position = position
        self.remove_bias = remove_bias
        self.preserve_outputs = preserve_outputs
        self.bn_layer = bn_layer
        self.bn_kwargs = bn_kwargs
        self.report = InsertionReport(position=position)
        bn_classes = (bn_layer,) if isinstance(bn_layer, type) else ()
        self.placement = _Placement(model, skip, include_output, bn_classes, self.report)
        self.bn_has_beta = bool(getattr(self._make_bn("bnutils_probe_bn", None), "center", True))
        self.old: dict[int, Any] = {}  # id(new layer) -> the layer it copies
        self.targets: dict[int, SimpleNamespace] = {}  # id(new layer) -> how it gets BN

    def _make_bn(self, name: str, layer: Any) -> keras.layers.Layer:
        kwargs = dict(self.bn_kwargs)
        if getattr(layer, "data_format", None) == "channels_first":
            kwargs.setdefault("axis", 1)
        policy = getattr(layer, "dtype_policy", None)
        if policy is not None and policy.name != keras.config.dtype_policy().name:
            kwargs.setdefault("dtype", policy)
        try:
            bn = self.bn_layer(name=name, **kwargs)
        except (TypeError, ValueError) as e:
            cls = getattr(self.bn_layer, "__name__", "bn_layer")
            raise ValueError(
                f"Could not create the BN layer with {cls}(name=..., **{kwargs}): {e}. Pass "
                "only arguments that the BN class accepts."
            ) from e
        if not isinstance(bn, keras.layers.Layer):
            raise TypeError(
                f"Expected `bn_layer` to return a keras.layers.Layer, received {type(bn).__name__}."
            )
        return bn

    def _init_bn(self, bn, bias: np.ndarray | None) -> None:
        if not self.preserve_outputs or getattr(bn, "moving_variance", None) is None:
            return
        mean = ops.convert_to_numpy(bn.moving_mean).astype("float32")
        var = ops.convert_to_numpy(bn.moving_variance).astype("float32")
        if getattr(bn, "gamma", None) is not None:
            bn.gamma.assign(_exact_gamma(var, bn.epsilon))
        if getattr(bn, "beta", None) is not None:
            bn.beta.assign(mean if bias is None else (mean + bias).astype("float32"))

    def _clone(self, layer, prefix: str):
        """The copy of ``layer`` (the ``clone`` of ``_graph.rewrite``)."""
        if not isinstance(layer, _L.Layer):
            return layer  # a keras.ops operation: stateless, reused
        path = prefix + layer.name
        if is_graph_model(layer):
            return self.rewrite(layer, path + "/")
        if isinstance(layer, keras.Model):  # subclassed: copied, not rewired
            for inner_path, inner in walk_layers(layer):
                if isinstance(inner, self.layer_types):
                    self.report.skipped[f"{path}/{inner_path}"] = (
                        f"inside subclassed model `{type(layer).__name__}`, which cannot be rewired"
                    )
        changes, target = {}, None
        if isinstance(layer, self.layer_types) and self.placement.gets_bn(layer, path):
            act = getattr(layer, "activation", None)
            split = self.position == "before" and not has_linear_activation(layer)
            drop_bias = self.remove_bias and self.bn_has_beta and getattr(layer, "use_bias", False)
            drop_bias = drop_bias and (self.position == "before" or has_linear_activation(layer))
            if split:
                changes["activation"] = "linear"
                self.report.split_activation.append(path)
            if drop_bias:
                changes["use_bias"] = False
                self.report.removed_bias.append(path)
            bias = None
            if drop_bias and self.preserve_outputs and layer.built:
                bias = ops.convert_to_numpy(layer.bias).astype("float32")
            target = SimpleNamespace(layer=layer, path=path, split=split, bias=bias, act=act)
        new = _from_config(layer, changes)
        self.old[id(new)] = layer
        if target is not None:
            self.targets[id(new)] = target
        return new

    # -- models

    def rewrite(self, model: keras.Model, prefix: str) -> keras.Model:
        used = {layer.name for layer in model.layers}

        def after_call(new, out):
            if (old := self.old.pop(id(new), None)) is not None and new.built:
                _copy_weights(old, new)  # once: a shared layer's later calls find no `old`
            if (t := self.targets.get(id(new))) is None:
                return out, []
            name = t.layer.name
            bn = self._make_bn(_unique(f"{name}_bn", used), t.layer)
            self.report.inserted.setdefault(t.path, []).append(bn.name)
            act = [_L.Activation(t.act, name=_unique(f"{name}_act", used))] if t.split else []
            if out is not None:  # None: an unbuilt Sequential model, nothing is called
                out = bn(out)
                self._init_bn(bn, t.bias)
                out = act[0](out) if act else out
            return out, [bn, *act]

        return rewrite(model, lambda layer: self._clone(layer, prefix), after_call)
