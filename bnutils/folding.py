"""Fold inference-mode batch normalization into the preceding Dense or convolution layer.

At inference a BN layer is a fixed per-channel affine map; when it directly follows a linear
layer (no activation in between) that map merges into the layer's kernel and bias::

    scale = gamma / sqrt(moving_variance + epsilon)
    kernel' = kernel * scale          (along the output-channel axis of the kernel)
    bias'   = (bias - moving_mean) * scale + beta

:func:`fold_batchnorm` rewrites the model with the package's one rewrite (``_graph.rewrite``;
nested models included), drops every foldable BN, copies all other weights and reports which
pairs it folded and why it kept the rest. The result is for inference only: it must not be trained.
"""

from __future__ import annotations

import dataclasses
import warnings

import keras
import numpy as np

from bnutils._graph import (
    LayerGraph,
    has_linear_activation,
    is_batchnorm,
    is_graph_model,
    linear_kind,
    require_graph_model,
    rewrite,
)
from bnutils.results import Report

__all__ = ["FoldReport", "fold_batchnorm"]

_L = keras.layers


@dataclasses.dataclass
class FoldReport(Report):
    """What :func:`fold_batchnorm` did.

    Attributes:
        folded: ``(producer, bn)`` layer names of each folded pair; layers inside nested
            models are written ``"submodel/layer"``.
        kept: ``(bn, reason)`` for every BN layer left in the model.
        reused: layers that could not be copied (no working ``get_config``) and are shared
            with the original model instead.
        layers_before: leaf layers (nested models counted by their layers) before folding.
        layers_after: leaf layers after folding.
        params_before: parameters before folding.
        params_after: parameters after folding.
    """

    folded: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    kept: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    reused: list[str] = dataclasses.field(default_factory=list)
    layers_before: int = 0
    layers_after: int = 0
    params_before: int = 0
    params_after: int = 0

    def __str__(self) -> str:
        lines = [
            f"Folded {len(self.folded)} BN layer(s), kept {len(self.kept)}; "
            f"layers {self.layers_before} -> {self.layers_after}, "
            f"parameters {self.params_before:,} -> {self.params_after:,}."
        ]
        lines += [f"  folded  {bn} into {producer}" for producer, bn in self.folded]
        lines += [f"  kept    {bn}: {reason}" for bn, reason in self.kept]
        lines += [f"  reused  {name} (shared with the original model)" for name in self.reused]
        return "\n".join(lines)


def fold_batchnorm(model: keras.Model, return_report: bool = False):
    """Return an inference-only copy of ``model`` with BN folded into the layer before it.

    A BN layer (``keras.layers.BatchNormalization`` or a subclass) is folded when it directly
    follows a ``Dense``, ``Conv1D/2D/3D``, ``Conv1D/2D/3DTranspose``, ``DepthwiseConv1D/2D``
    or ``SeparableConv1D/2D`` layer that has a linear activation, whose output nothing else
    uses, that is called only once, and when BN normalizes that layer's channel axis. Every
    other BN layer is kept with its weights; the original model is left untouched. Used in
    notebook 07.

    >>> folded, report = fold_batchnorm(model, return_report=True)

    Args:
        model: a built ``keras.Sequential`` or Functional model (nested models allowed).
        return_report: also return a :class:`FoldReport`.

    Returns:
        The folded model, or ``(folded_model, report)`` when ``return_report`` is true.

    Raises:
        TypeError: ``model`` is not a Sequential or Functional model (as for every transform).
        ValueError: a Sequential model without a known input shape.

    Warns:
        UserWarning: nothing was folded (no BN layer, or none that can fold).
    """
    _check(model)
    report = FoldReport()
    folded = _Folder(model, report).fold(model, prefix="")
    report.layers_before = _count_layers(model)
    report.layers_after = _count_layers(folded)
    report.params_before = int(model.count_params())
    report.params_after = int(folded.count_params())
    if not report.folded:  # nothing silent: a copy that changes nothing says so, as Keras does
        why = "it has no BatchNormalization layer (nested ones included)"
        if report.kept:
            why = f"kept {len(report.kept)} BN layer(s); see the report"
        warnings.warn(
            f"fold_batchnorm folded nothing in model {model.name!r}: {why}.", stacklevel=2
        )
    return (folded, report) if return_report else folded


def _check(model) -> None:
    require_graph_model(model, "Rebuild it with the Functional API to fold its BN layers.")
    if not model.built or not model.inputs:
        raise ValueError(
            f"Sequential model `{model.name}` has no known input shape. Start it with "
            "`keras.Input(shape)` or call `model.build(input_shape)` before folding."
        )


def _fold_parameters(producer, bn) -> dict[str, np.ndarray]:
    """The folded weights of a ``producer`` -> ``bn`` pair, in float64: ``"kernel"``
    (``"pointwise_kernel"`` for separable convolutions) and ``"bias"``; a ``ValueError`` for
    an unsupported producer or a channel mismatch."""
    kind = linear_kind(producer)
    if kind is None:
        raise ValueError(
            f"Expected a Dense or convolution layer before the BN layer, received "
            f"{type(producer).__name__} `{producer.name}`."
        )
    mean = np.asarray(bn.moving_mean, dtype=np.float64)
    gamma = 1.0 if bn.gamma is None else np.asarray(bn.gamma, dtype=np.float64)
    beta = 0.0 if bn.beta is None else np.asarray(bn.beta, dtype=np.float64)
    scale = gamma / np.sqrt(np.asarray(bn.moving_variance, dtype=np.float64) + bn.epsilon)
    scale = np.broadcast_to(scale, mean.shape)
    name = "pointwise_kernel" if kind == "separable" else "kernel"
    kernel = np.asarray(getattr(producer, name), dtype=np.float64)
    # Output channels: kernel (*k, filters, in) for transposed convolutions, (*k, in, dm) for
    # depthwise ones, (..., filters or units) for the others.
    shape = kernel.shape
    channels = {"transpose": shape[-2], "depthwise": shape[-2] * shape[-1]}.get(kind, shape[-1])
    if channels != scale.shape[0]:
        raise ValueError(
            f"`{producer.name}` has {channels} output channels but `{bn.name}` normalizes "
            f"{scale.shape[0]}; expected equal counts."
        )
    factor = scale.reshape(shape[-2:]) if kind == "depthwise" else scale
    factor = factor[:, None] if kind == "transpose" else factor
    bias = getattr(producer, "bias", None)
    bias = 0.0 if bias is None else np.asarray(bias, dtype=np.float64)
    return {name: kernel * factor, "bias": (bias - mean) * scale + beta}


def _fold_reason(producer, bn) -> str | None:
    """Why ``bn`` cannot fold into ``producer`` (called once, output used by ``bn`` only)."""
    kind = linear_kind(producer)
    if kind is None:
        return f"it follows {type(producer).__name__} `{producer.name}`, not a Dense or convolution"
    if not has_linear_activation(producer):
        act = getattr(producer.activation, "__name__", str(producer.activation))
        return f"`{producer.name}` applies activation `{act}` before the BN"
    if getattr(producer, "lora_enabled", False) or getattr(producer, "quantization_mode", None):
        return f"`{producer.name}` is LoRA-enabled or quantized"
    rank = len(producer.output.shape)
    last = kind == "dense" or getattr(producer, "data_format", None) != "channels_first"
    channel_axis = rank - 1 if last else 1
    if not isinstance(bn.axis, int) or bn.axis % rank != channel_axis:
        return (
            f"it normalizes axis {bn.axis} but the channel axis of `{producer.name}`'s output "
            f"is {channel_axis} (rank {rank})"
        )
    if getattr(bn, "moving_mean", None) is None:
        return "the BN layer is not built"
    return None


class _Folder:
    """Decides, per model level, which pairs fold, and copies the layers."""

    def __init__(self, model, report: FoldReport):
        self.graph, self.report = LayerGraph(model), report

    def _keep_reason(self, bn) -> str | None:
        g = self.graph
        if g.call_count(bn) > 1:
            return "the BN layer is called more than once (shared)"
        inputs = g.call_inputs(bn)
        if len(inputs) != 1:
            return "it receives more than one tensor"
        producer = inputs[0]
        if isinstance(producer, _L.InputLayer):
            return "it follows a model input, not a layer"
        if g.call_count(producer) > 1:
            return f"its producer `{producer.name}` is called more than once (shared)"
        if g.consumers(producer, 0) != [(bn, 0)]:
            return f"the output of `{producer.name}` is also used elsewhere"
        return _fold_reason(producer, bn)

    def fold(self, model, prefix: str):
        _check(model)
        fold_into, dropped = {}, set()  # id(producer) -> BN; ids of the BN layers folded
        for layer in model.layers:
            if is_batchnorm(layer):
                if reason := self._keep_reason(layer):
                    self.report.kept.append((prefix + layer.name, reason))
                else:
                    fold_into[id(self.graph.call_inputs(layer)[0])] = layer
                    dropped.add(id(layer))
        pending = {}  # id(copy) -> (original, BN folded into it)

        def clone(layer):  # the `clone` of `_graph.rewrite`
            if is_graph_model(layer):
                return self.fold(layer, f"{prefix}{layer.name}/")
            if not isinstance(layer, _L.Layer):
                return layer  # a keras.ops operation
            if id(layer) in dropped:
                return None  # folded: its input passes on
            bn = fold_into.get(id(layer))
            try:
                config = layer.get_config()
                new = type(layer).from_config(
                    config if bn is None else {**config, "use_bias": True}
                )
            except (NotImplementedError, TypeError, ValueError):
                if bn is not None:
                    raise
                self.report.reused.append(prefix + layer.name)
                return layer
            pending[id(new)] = (layer, bn)
            return new

        def after_call(new, out):  # weights, once the copy is built
            if id(new) in pending:
                old, bn = pending.pop(id(new))
                _set_weights(old, new, bn)
                if bn is not None:
                    self.report.folded.append((prefix + old.name, prefix + bn.name))
            return out, []

        return rewrite(model, clone, after_call)


def _set_weights(original, new, fold_bn) -> None:
    """Copy ``original``'s weights into its (built) copy, folded when ``fold_bn``."""
    if fold_bn is None:
        new.set_weights(original.get_weights())
        return
    params = _fold_parameters(original, fold_bn)
    if "pointwise_kernel" in params:
        new.depthwise_kernel.assign(np.asarray(original.depthwise_kernel))
    for name, value in params.items():
        variable = getattr(new, name)
        variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))


def _count_layers(model) -> int:
    """Leaf layers of ``model``, nested models counted by their layers, inputs not counted."""
    return sum(
        _count_layers(layer) if isinstance(layer, keras.Model) else 1
        for layer in model.layers
        if not isinstance(layer, _L.InputLayer)
    )
