"""Fold inference-mode batch normalization into the preceding Dense or convolution layer.

At inference a BN layer is a fixed per-channel affine map,
``y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta``. When it directly
follows a linear layer (no activation in between) that map can be merged into that layer's
kernel and bias::

    scale = gamma / sqrt(moving_variance + epsilon)
    kernel' = kernel * scale          (along the output-channel axis of the kernel)
    bias'   = (bias - moving_mean) * scale + beta

:func:`fold_batchnorm` rebuilds a Sequential or Functional model (nested sub-models
included) with every foldable BN merged away, copies all other weights, and reports which
pairs it folded and why it kept the rest. The result is for inference only: the folded
layers no longer normalize with batch statistics, so it must not be trained.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["FoldReport", "fold_batchnorm", "fold_parameters"]


@dataclasses.dataclass
class FoldReport:
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


def fold_batchnorm(model, return_report: bool = False):
    """Return an inference-only copy of ``model`` with BN folded into the layer before it.

    A BN layer (``keras.layers.BatchNormalization`` or any subclass) is folded when it
    directly follows a ``Dense``, ``Conv1D/2D/3D``, ``Conv1D/2D/3DTranspose``,
    ``DepthwiseConv1D/2D`` or ``SeparableConv1D/2D`` layer that has a linear activation,
    whose output nothing else uses, that is called only once in the model, and when the BN
    normalizes that layer's channel axis. Every other BN layer is kept, with its weights.
    All weights are copied: the original model is left untouched.

    Args:
        model: a built ``keras.Sequential`` or Functional model (nested models allowed).
        return_report: also return a :class:`FoldReport`.

    Returns:
        The folded model, or ``(folded_model, report)`` when ``return_report`` is true.

    Raises:
        ValueError: ``model`` is not a built Sequential or Functional model.
    """
    report = FoldReport()
    folded = _fold_model(model, report, prefix="")
    report.layers_before = _count_layers(model)
    report.layers_after = _count_layers(folded)
    report.params_before = int(model.count_params())
    report.params_after = int(folded.count_params())
    return (folded, report) if return_report else folded


def fold_parameters(producer, bn) -> dict[str, np.ndarray]:
    """The folded weights of a ``producer`` -> ``bn`` pair, computed in float64.

    Args:
        producer: a built Dense or convolution layer (see :func:`fold_batchnorm`).
        bn: the built BN layer that follows it.

    Returns:
        A dict with the new ``"kernel"`` (``"pointwise_kernel"`` for separable
        convolutions, whose depthwise kernel is unchanged) and ``"bias"``.

    Raises:
        ValueError: the layers cannot be folded (unsupported producer, channel mismatch).
    """
    kind = _producer_kind(producer)
    if kind is None:
        raise ValueError(
            f"Expected a Dense or convolution layer before the BN layer, received "
            f"{type(producer).__name__} `{producer.name}`."
        )
    scale, shift = _bn_affine(bn)
    name = "pointwise_kernel" if kind == "separable" else "kernel"
    kernel = np.asarray(getattr(producer, name), dtype=np.float64)
    channels = _output_channels(producer, kind, kernel)
    if channels != scale.shape[0]:
        raise ValueError(
            f"`{producer.name}` has {channels} output channels but `{bn.name}` normalizes "
            f"{scale.shape[0]}; expected equal counts."
        )
    if kind == "transpose":  # kernel (*k, filters, in_channels)
        kernel = kernel * scale[:, None]
    elif kind == "depthwise":  # kernel (*k, in_channels, depth_multiplier)
        kernel = kernel * scale.reshape(kernel.shape[-2], kernel.shape[-1])
    else:  # Dense (in, units), Conv (*k, in, filters), separable pointwise (1.., in*dm, filters)
        kernel = kernel * scale
    bias = getattr(producer, "bias", None)
    bias = np.zeros(channels) if bias is None else np.asarray(bias, dtype=np.float64)
    return {name: kernel, "bias": bias * scale + shift}


def _fold_model(model, report: FoldReport, prefix: str):
    import keras

    if isinstance(model, keras.Sequential):
        return _fold_sequential(model, report, prefix)
    if _is_functional(model):
        return _fold_functional(model, report, prefix)
    raise ValueError(
        f"Expected a Sequential or Functional model, received a subclassed model "
        f"`{type(model).__name__}`. Rebuild it with the Functional API to fold its BN layers."
    )


def _is_functional(model) -> bool:
    from keras.src.models.functional import Functional

    return isinstance(model, Functional)


def _fold_sequential(model, report: FoldReport, prefix: str):
    import keras

    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(
            f"Sequential model `{model.name}` has no known input shape. Start it with "
            "`keras.Input(shape)` or call `model.build(input_shape)` before folding."
        )
    template = model.inputs[0]
    inputs = keras.Input(batch_shape=template.shape, dtype=template.dtype)
    x = inputs
    layers = list(model.layers)
    new_layers = []
    skip = set()
    for i, layer in enumerate(layers):
        if i in skip:
            continue
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        fold_bn = None
        if _is_bn(nxt):
            # Dense and convolutions keep the rank, so the BN input rank is x's rank.
            reason = _fold_reason(layer, nxt, len(x.shape))
            if reason is None:
                fold_bn = nxt
                skip.add(i + 1)
            else:
                report.kept.append((prefix + nxt.name, reason))
        if _is_bn(layer) and i == 0:
            report.kept.append((prefix + layer.name, "it is the first layer (no producer)"))
        new = _clone(layer, fold_bn, report, prefix)
        x = new(x)
        _set_weights(layer, new, fold_bn)
        if fold_bn is not None:
            report.folded.append((prefix + layer.name, prefix + fold_bn.name))
        new_layers.append(new)
    return keras.Sequential([inputs, *new_layers], name=model.name)


def _fold_functional(model, report: FoldReport, prefix: str):
    import keras

    nodes = [
        node
        for depth in sorted(model._nodes_by_depth, reverse=True)
        for node in model._nodes_by_depth[depth]
    ]
    producer_of, consumers, calls = {}, {}, {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for t in node.outputs:
            producer_of[id(t)] = node
        if not node.is_input:
            for t in node.input_tensors:
                consumers[id(t)] = consumers.get(id(t), 0) + 1
    output_ids = {id(t) for t in model.outputs}

    # Decide which (producer, BN) pairs fold: producer op id -> BN layer.
    fold_into, dropped = {}, set()
    for node in nodes:
        bn = node.operation
        if node.is_input or not _is_bn(bn):
            continue
        name = prefix + bn.name
        if calls[id(bn)] > 1:
            report.kept.append((name, "the BN layer is called more than once (shared)"))
            continue
        if len(node.input_tensors) != 1:
            report.kept.append((name, "it receives more than one tensor"))
            continue
        x = node.input_tensors[0]
        source = producer_of.get(id(x))
        if source is None or source.is_input:
            report.kept.append((name, "it follows a model input, not a layer"))
            continue
        producer = source.operation
        if calls[id(producer)] > 1:
            reason = f"its producer `{producer.name}` is called more than once (shared)"
        elif consumers.get(id(x), 0) > 1 or id(x) in output_ids:
            reason = f"the output of `{producer.name}` is also used elsewhere"
        else:
            reason = _fold_reason(producer, bn, len(x.shape))
        if reason is not None:
            report.kept.append((name, reason))
            continue
        fold_into[id(producer)] = bn
        dropped.add(id(bn))

    tensors, clones, copied = {}, {}, set()
    new_inputs = []
    for t in model.inputs:
        new = keras.Input(batch_shape=t.shape, dtype=t.dtype, sparse=t.sparse, name=t.name)
        tensors[id(t)] = new
        new_inputs.append(new)
    for node in nodes:
        op = node.operation
        if node.is_input:
            continue
        args, kwargs = node.arguments.fill_in(tensors)
        if id(op) in dropped:
            outputs = args[0]
        else:
            bn = fold_into.get(id(op))
            if id(op) not in clones:
                clones[id(op)] = _clone(op, bn, report, prefix)
            new = clones[id(op)]
            outputs = new(*args, **kwargs)
            if id(op) not in copied:  # a shared layer gets its weights once
                _set_weights(op, new, bn)
                copied.add(id(op))
            if bn is not None:
                report.folded.append((prefix + op.name, prefix + bn.name))
        for t, y in zip(node.outputs, keras.tree.flatten(outputs), strict=True):
            tensors[id(t)] = y
    outputs = [tensors[id(t)] for t in model.outputs]
    structure = getattr(model, "_outputs_struct", None)
    if structure is not None:
        outputs = keras.tree.pack_sequence_as(structure, outputs)
    elif len(outputs) == 1:
        outputs = outputs[0]
    inputs = new_inputs[0] if len(new_inputs) == 1 else new_inputs
    return keras.Model(inputs, outputs, name=model.name)


def _clone(layer, fold_bn, report: FoldReport, prefix: str):
    """A fresh, unbuilt copy of ``layer`` (a folded copy of a nested model)."""
    import keras

    if isinstance(layer, keras.Sequential) or _is_functional(layer):
        return _fold_model(layer, report, prefix + layer.name + "/")
    if not isinstance(layer, keras.layers.Layer):
        return layer  # a stateless keras.ops operation: calling it again is enough
    config = layer.get_config() if fold_bn is None else {**layer.get_config(), "use_bias": True}
    try:
        return type(layer).from_config(config)
    except (NotImplementedError, TypeError, ValueError):
        if fold_bn is not None:
            raise
        report.reused.append(prefix + layer.name)
        return layer


def _set_weights(original, new, fold_bn) -> None:
    """Copy ``original``'s weights into its (now built) copy, folded when ``fold_bn``."""
    import keras

    if new is original or not isinstance(original, keras.layers.Layer):
        return
    if isinstance(original, keras.Model):
        return  # folded recursively, weights already copied
    if fold_bn is None:
        new.set_weights(original.get_weights())
        return
    params = fold_parameters(original, fold_bn)
    if "pointwise_kernel" in params:
        new.depthwise_kernel.assign(np.asarray(original.depthwise_kernel))
    for name, value in params.items():
        variable = getattr(new, name)
        variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))


def _is_bn(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.BatchNormalization)


def _producer_kind(layer) -> str | None:
    from keras import layers as kl

    if isinstance(layer, (kl.Conv1DTranspose, kl.Conv2DTranspose, kl.Conv3DTranspose)):
        return "transpose"
    if isinstance(layer, (kl.DepthwiseConv1D, kl.DepthwiseConv2D)):
        return "depthwise"
    if isinstance(layer, (kl.SeparableConv1D, kl.SeparableConv2D)):
        return "separable"
    if isinstance(layer, (kl.Conv1D, kl.Conv2D, kl.Conv3D)):
        return "conv"
    if isinstance(layer, kl.Dense):
        return "dense"
    return None


def _fold_reason(producer, bn, rank: int) -> str | None:
    """Why ``bn`` cannot fold into ``producer`` (whose output has ``rank``), or ``None``."""
    import keras

    kind = _producer_kind(producer)
    if kind is None:
        return f"it follows {type(producer).__name__} `{producer.name}`, not a Dense or convolution"
    activation = getattr(producer, "activation", None)
    if activation is not None and activation is not keras.activations.linear:
        act = getattr(activation, "__name__", str(activation))
        return f"`{producer.name}` applies activation `{act}` before the BN"
    if getattr(producer, "lora_enabled", False) or getattr(producer, "quantization_mode", None):
        return f"`{producer.name}` is LoRA-enabled or quantized"
    if kind == "dense" or getattr(producer, "data_format", "channels_last") == "channels_last":
        channel_axis = rank - 1
    else:
        channel_axis = 1
    axis = bn.axis if isinstance(bn.axis, int) else None
    if axis is None or axis % rank != channel_axis:
        return (
            f"it normalizes axis {bn.axis} but the channel axis of `{producer.name}`'s output "
            f"is {channel_axis} (rank {rank})"
        )
    if getattr(bn, "moving_mean", None) is None:
        return "the BN layer is not built"
    return None


def _bn_affine(bn) -> tuple[np.ndarray, np.ndarray]:
    """Inference-mode BN as ``y = x * scale + shift`` (float64)."""
    mean = np.asarray(bn.moving_mean, dtype=np.float64)
    var = np.asarray(bn.moving_variance, dtype=np.float64)
    gamma = np.ones_like(mean) if bn.gamma is None else np.asarray(bn.gamma, dtype=np.float64)
    beta = np.zeros_like(mean) if bn.beta is None else np.asarray(bn.beta, dtype=np.float64)
    scale = gamma / np.sqrt(var + bn.epsilon)
    return scale, beta - mean * scale


def _output_channels(producer, kind: str, kernel: np.ndarray) -> int:
    if kind == "transpose":
        return int(kernel.shape[-2])
    if kind == "depthwise":
        return int(kernel.shape[-2] * kernel.shape[-1])
    return int(kernel.shape[-1])


def _count_layers(model) -> int:
    import keras

    count = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            count += _count_layers(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            count += 1
    return count
