"""The one module that walks, queries and rewrites Keras model graphs; the others ask here.

* Layer kinds, the package's one table: BN layers (:func:`is_batchnorm`), the linear layers BN
  follows and folds into (:data:`LINEAR_LAYER_KINDS`, :func:`linear_kind`,
  :func:`has_linear_activation`), activations, dropout and shape-only layers.
* Reading: :func:`walk_layers`, :func:`find_batchnorm_layers`, :class:`LayerGraph`.
* Rewriting: :func:`rewrite`, the one caller of ``keras.models.clone_model`` (a copy made
  layer by layer, Sequential models included); insertion, folding, conversion and the
  builders use it.

Each use of private Keras API is in this file, with a one-line reason, so that a Keras upgrade
touches one file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

__all__ = [
    "ACTIVATION_LAYERS",
    "DROPOUT_LAYERS",
    "LINEAR_LAYERS",
    "LINEAR_LAYER_KINDS",
    "MODEL_OUTPUT",
    "SHAPE_LAYERS",
    "LayerGraph",
    "ends_in_softmax",
    "find_batchnorm_layers",
    "has_linear_activation",
    "is_batchnorm",
    "is_functional",
    "is_graph_model",
    "linear_kind",
    "require_graph_model",
    "rewrite",
    "walk_layers",
]

#: Stands for "the model's output" in :meth:`LayerGraph.consumers`.
MODEL_OUTPUT = "<model output>"

_L = keras.layers
#: The linear layers that BN follows and folds into, by kind (the more specific kinds first).
LINEAR_LAYER_KINDS: dict[str, tuple[type, ...]] = {
    "transpose": (_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose),
    "depthwise": (_L.DepthwiseConv1D, _L.DepthwiseConv2D),
    "separable": (_L.SeparableConv1D, _L.SeparableConv2D),
    "conv": (_L.Conv1D, _L.Conv2D, _L.Conv3D),
    "dense": (_L.Dense,),
}
LINEAR_LAYERS: tuple[type, ...] = tuple(t for ts in LINEAR_LAYER_KINDS.values() for t in ts)
#: Element-wise activation layers.
ACTIVATION_LAYERS = (_L.Activation, _L.ReLU, _L.LeakyReLU, _L.ELU, _L.PReLU, _L.Softmax)
#: Layers that drop or perturb values at training time only.
DROPOUT_LAYERS = (
    _L.Dropout,
    _L.SpatialDropout1D,
    _L.SpatialDropout2D,
    _L.SpatialDropout3D,
    _L.GaussianDropout,
    _L.AlphaDropout,
    _L.GaussianNoise,
)
#: Layers that move or pad values without computing on them.
SHAPE_LAYERS = (
    _L.Flatten,
    _L.Reshape,
    _L.Permute,
    _L.Identity,
    _L.ZeroPadding1D,
    _L.ZeroPadding2D,
    _L.ZeroPadding3D,
    _L.Cropping1D,
    _L.Cropping2D,
    _L.Cropping3D,
)


def linear_kind(layer: Any) -> str | None:
    """The key of ``layer``'s class in :data:`LINEAR_LAYER_KINDS`, or ``None``."""
    return next((k for k, types in LINEAR_LAYER_KINDS.items() if isinstance(layer, types)), None)


def has_linear_activation(layer: Any) -> bool:
    """Whether ``layer`` applies no activation of its own (``None`` or ``"linear"``)."""
    activation = getattr(layer, "activation", None)
    return activation is None or getattr(activation, "__name__", activation) == "linear"


def _sublayers(layer: Any) -> list:
    if isinstance(layer, keras.Model):
        return list(layer.layers)
    # Private: a plain Layer keeps the sublayers it tracks in `_layers`; there is no public list.
    return list(getattr(layer, "_layers", []) or [])


def walk_layers(model: Any) -> list[tuple[str, Any]]:
    """Every layer inside ``model`` as ``(path, layer)``, depth first, nested models included.

    ``path`` joins layer names from the outermost model down with ``/``. A layer shared by
    several models appears once.

    >>> [p for p, _ in walk_layers(model)]
    ['dense', 'block/conv', 'block/bn', ...]
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            f"Expected a Keras model or layer, received an object of type {type(model).__name__}."
        )
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def visit(layer, prefix: str) -> None:
        for child in _sublayers(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            found.append((f"{prefix}{child.name}", child))
            visit(child, f"{prefix}{child.name}/")

    visit(model, "")
    return found


def is_batchnorm(layer: Any) -> bool:
    """Whether ``layer`` is a BN layer: ``keras.layers.BatchNormalization`` or any subclass
    (the package's fused and ghost layers, a user's own) or the package's
    :class:`~bnutils.scratch.ScratchBatchNormalization`. The package's one BN predicate."""
    from bnutils.scratch import ScratchBatchNormalization  # keras.ops only; no cycle

    return isinstance(layer, (keras.layers.BatchNormalization, ScratchBatchNormalization))


def find_batchnorm_layers(model: Any) -> list[tuple[str, Any]]:
    """Every BatchNormalization layer inside ``model`` (nested included) as ``(path, layer)``.

    The one BN finder of the package. Order is forward order where ``model.layers`` gives it.

    Raises:
        TypeError: ``model`` is not a Keras layer or model.
    """
    return [(p, layer) for p, layer in walk_layers(model) if is_batchnorm(layer)]


def is_functional(model: Any) -> bool:
    """Whether ``model`` is a Functional model (``keras.Model(inputs, outputs)``)."""
    # Private: Keras exports no public `Functional` class; `keras.Model(inputs, outputs)` is one.
    from keras.src.models.functional import Functional

    return isinstance(model, Functional) and not isinstance(model, keras.Sequential)


def is_graph_model(model: Any) -> bool:
    """Whether ``model`` is Sequential or Functional (its wiring can be read and rewritten)."""
    return isinstance(model, keras.Sequential) or is_functional(model)


def require_graph_model(model: Any, fix: str, error: type[Exception] = TypeError) -> None:
    """Raise ``error`` naming what ``model`` is, with ``fix``, unless it is a graph model."""
    if not is_graph_model(model):
        what = type(model).__name__
        what = f"a subclassed model `{what}`" if isinstance(model, keras.Model) else what
        raise error(f"Expected a Sequential or Functional model, received {what}. {fix}")


def ends_in_softmax(model: Any) -> bool:
    """Whether ``model``'s last layer outputs probabilities (softmax) rather than logits."""
    layers = getattr(model, "layers", None)
    if not layers:
        return False
    last = layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return True
    return getattr(getattr(last, "activation", None), "__name__", "") == "softmax"


def _tensors(model: Any, which: str) -> list:
    """``model.inputs`` or ``model.outputs``; empty for unbuilt and subclassed models."""
    try:
        return list(getattr(model, which) or [])
    except (AttributeError, ValueError):
        return []


def _node_of(tensor):
    # Private: a symbolic tensor names the call (node) that produced it only in `_keras_history`.
    op, index, _ = tensor._keras_history
    # Private: the calls of an operation in functional graphs are its `_inbound_nodes`.
    return op._inbound_nodes[index]


def _call_tensors(node) -> list:
    # Private: the symbolic tensors passed to a call are kept in `node.arguments`.
    return list(node.arguments.keras_tensors)


class LayerGraph:
    """Who feeds whom in a Sequential/Functional model, across nested models.

    Only the calls that are part of the model's graph count (a layer also called elsewhere,
    or an old graph of a rebuilt Sequential model, is ignored).

    >>> g = LayerGraph(model)
    >>> [p.name for p in g.parents(model.get_layer("bn"))]
    ['conv']
    """

    def __init__(self, model: Any):
        self.model = model
        self.input_owner: dict[int, Any] = {}
        self._output_of: dict[int, list] = {}  # id(tensor) -> graph models it is an output of
        self._nodes: dict[int, Any] = {}
        graph_models = [model] + [m for _, m in walk_layers(model) if is_graph_model(m)]
        for m in graph_models:
            for t in _tensors(m, "inputs"):
                self.input_owner.setdefault(id(_node_of(t).operation), m)
            stack = []
            for t in _tensors(m, "outputs"):
                self._output_of.setdefault(id(t), []).append(m)
                stack.append(_node_of(t))
            # Private: `Node` (`operation`, `outputs`, `parent_nodes`) is how Keras records calls.
            while stack:  # every call that feeds an output is in the graph
                node = stack.pop()
                if id(node) not in self._nodes:
                    self._nodes[id(node)] = node
                    stack.extend(node.parent_nodes)
        self._next: dict[int, list] = {}  # id(node) -> the nodes that take its outputs
        for node in self._nodes.values():
            for parent in node.parent_nodes:
                self._next.setdefault(id(parent), []).append(node)
        self._children: dict[int, list] = {}
        for _, layer in walk_layers(model):
            if not is_graph_model(layer):
                for parent in self.parents(layer):
                    self._children.setdefault(id(parent), []).append(layer)

    def _calls(self, op: Any) -> list:
        # Private: the calls of an operation in functional graphs are its `_inbound_nodes`.
        return [n for n in getattr(op, "_inbound_nodes", None) or [] if id(n) in self._nodes]

    def call_count(self, layer: Any) -> int:
        """How many times ``layer`` is called in the graph (a shared layer: more than one)."""
        return len(self._calls(layer))

    def producers(self, op: Any) -> list:
        """The layers whose output ``op``'s output really is (looking through nested models)."""
        if is_graph_model(op) and (outs := _tensors(op, "outputs")):
            return [p for t in outs for p in self.producers(_node_of(t).operation)]
        if isinstance(op, keras.layers.InputLayer):
            owner = self.input_owner.get(id(op))
            if owner is not None and owner is not self.model and self._calls(owner):
                return self.parents(owner)
        return [op]

    def parents(self, layer: Any) -> list:
        """The layers feeding ``layer``, over all of its calls (nested models looked through)."""
        nodes = [pn for node in self._calls(layer) for pn in node.parent_nodes]
        return list({id(p): p for pn in nodes for p in self.producers(pn.operation)}.values())

    def children(self, layer: Any) -> list:
        """The layers that ``layer``'s output feeds (nested models looked through)."""
        return list({id(c): c for c in self._children.get(id(layer), [])}.values())

    def call_inputs(self, layer: Any, call: int = 0) -> list:
        """The operation producing each input tensor of call number ``call`` of ``layer``, in
        its own graph (an ``InputLayer`` or a nested model is returned as it is)."""
        return [_node_of(t).operation for t in _call_tensors(self._calls(layer)[call])]

    def consumers(self, layer: Any, call: int | None = None) -> list[tuple[Any, int]]:
        """``(layer, call number)`` of every call that takes the output of call ``call`` of
        ``layer`` (of any call when ``None``), looking into and out of nested models; a model
        output appears as ``(MODEL_OUTPUT, 0)``."""
        calls = self._calls(layer)
        out = [
            c for node in (calls if call is None else [calls[call]]) for c in self._consumers(node)
        ]
        return list({(id(op), i): (op, i) for op, i in out}.values())

    def _consumers(self, node) -> list[tuple[Any, int]]:
        out = []
        for child in self._next.get(id(node), []):
            op, args = child.operation, _call_tensors(child)
            inner = _tensors(op, "inputs") if is_graph_model(op) else []
            if inner and len(inner) == len(args):  # into a nested model
                for arg, t in zip(args, inner, strict=True):
                    if _node_of(arg) is node:
                        out.extend(self._consumers(_node_of(t)))
            else:
                out.append((op, self._calls(op).index(child)))
        for t in node.outputs:  # out of a nested model, or the model's output
            for m in self._output_of.get(id(t), []):
                calls = [] if m is self.model else self._calls(m)
                out.extend(c for call in calls for c in self._consumers(call))
                if not calls:
                    out.append((MODEL_OUTPUT, 0))
        return out

    def walk_back(self, layer: Any, through: type | tuple[type, ...] | Any) -> list:
        """Parents of ``layer``, looking through the layers for which ``through(layer)`` is true
        (or that are instances of ``through``, a class or a tuple of classes)."""
        if isinstance(through, (type, tuple)):
            types = through
            through = lambda p: isinstance(p, types)  # noqa: E731
        found, frontier, seen = [], self.parents(layer), set()
        while frontier:
            p = frontier.pop()
            if id(p) in seen:
                continue
            seen.add(id(p))
            if through(p):
                frontier.extend(self.parents(p))
            else:
                found.append(p)
        return found

    def output_layers(self) -> list:
        """The layers that produce the model's outputs (nested models looked through)."""
        return self.producers(self.model) if _tensors(self.model, "outputs") else []

    def called_training_flags(self) -> list[tuple[str, Any, Any]]:
        """``(path, layer, training)`` for every call, in the graph, of a layer or nested model
        with an explicit ``training=`` argument (Keras 3 ignores it under ``fit``,
        keras#20285); one entry per call."""
        out = []
        for path, layer in walk_layers(self.model):
            for node in self._calls(layer):
                # Private: the keyword arguments of a call are kept in `node.arguments.kwargs`.
                training = node.arguments.kwargs.get("training")
                if training is not None:
                    out.append((path, layer, training))
        return out


# ---------------------------------------------------------------- rewriting


def rewrite(
    model: Any,
    clone: Callable[[Any], Any],
    after_call: Callable[[Any, Any], tuple[Any, list]] | None = None,
) -> Any:
    """A copy of the Sequential or Functional ``model``, made layer by layer.

    The one place that calls ``keras.models.clone_model`` (and builds the Sequential copy that
    ``clone_model`` cannot give a call hook).

    Args:
        clone: ``clone(layer)`` returns the layer's copy (the layer itself to share it, a
            rewritten nested model), or ``None`` to drop a layer that takes one tensor and
            passes it on (e.g. a folded BN). Called once per layer.
        after_call: ``after_call(new, output)`` runs after each call of a copy, once the copy
            is built (to set its weights, or to call more layers on ``output``), and returns
            ``(output, extra_layers)``: the output passed on, and the layers it called (listed
            after ``new`` in a Sequential copy). For an unbuilt Sequential model ``output`` is
            ``None`` and nothing is called. Default: ``(output, [])``.

    Returns:
        The copy (a ``keras.Sequential`` for a Sequential model), frozen if ``model`` was, and
        compiled like ``model`` if it was (as ``clone_model`` does).
    """
    require_graph_model(model, "Rebuild it with the Functional API to rewrite it.")
    after_call = after_call or (lambda new, output: (output, []))
    dropped: set[int] = set()

    def clone_or_mark(layer):
        new = clone(layer)
        if new is None:
            dropped.add(id(layer))
            return layer  # never called: `call` passes its input on
        return new

    if isinstance(model, keras.Sequential):
        inputs = _tensors(model, "inputs") if model.built else []
        inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name) for t in inputs]
        copies, listed, x = {}, [], inputs
        for layer in model.layers:
            if id(layer) not in copies:
                copies[id(layer)] = clone_or_mark(layer)
            new = copies[id(layer)]
            if id(layer) in dropped:
                continue
            output, extra = after_call(new, new(*x) if x else None)
            listed.extend([new, *extra])
            x = [output] if output is not None else []
        copy = keras.Sequential(inputs + listed, name=model.name)
        if model.compiled:  # as clone_model does for the models it copies
            copy.compile_from_config(model.get_compile_config())
    else:

        def call(new, *args, **kwargs):
            if id(new) in dropped:
                return args[0] if args else kwargs["inputs"]
            return after_call(new, new(*args, **kwargs))[0]

        # Not `recursive=True`: Keras would not pass `call_function` to nested Sequential
        # models; `clone` rewrites the nested models it meets (with `rewrite`).
        copy = keras.models.clone_model(model, clone_function=clone_or_mark, call_function=call)
    if not model.trainable:
        copy.trainable = False
    return copy
