"""The BN doctor: find the usual batch-normalization bugs in a Keras model, with evidence.

:func:`diagnose_batchnorm` inspects a model's BN layers (nested ones included), runs the
model on a sample ``x`` and returns a :class:`DoctorReport`: a list of findings, each with
a stable ``code``, a ``severity`` (``"error"``, ``"warning"`` or ``"info"``), the ``layer``
concerned, the measured ``evidence`` and a ``fix``.

=============================  ========  ===============================================
code                           severity  what was found
=============================  ========  ===============================================
batch-dependent-inference      error     an example's prediction changes with the rest
                                         of its batch under ``training=False``
moving-stats-never-updated     error     moving mean exactly 0 and variance exactly 1
moving-stats-mismatch          warning   moving statistics far from the statistics the
                                         layer's input really has on ``x``
dropout-before-bn              warning   a Dropout layer feeds a BN layer
bn-after-softmax-or-output     warning   BN after a softmax, or BN as the model's output
training-false-overridden      warning   ``base(x, training=False)`` in a Functional graph
                                         around trainable BN: fit() overrides the flag
suspicious-momentum            warning   momentum < 0.5 (PyTorch's 0.1 taken literally),
                               / info    epsilon 1e-5 (PyTorch's default)
redundant-bias                 info      Dense/Conv with a bias directly before BN
graph-unavailable              info      subclassed model: connectivity checks skipped
bn-unused                      info      a BN layer is never called on ``x``
no-batchnorm                   info      the model has no BN layer
=============================  ========  ===============================================

The thresholds of ``moving-stats-mismatch`` were measured on Fashion-MNIST (validation
images as ``x``). Healthy small MLPs and CNNs (momentum 0.9 or 0.99, trained for a few
hundred steps) kept every layer's RMS mean gap below 0.46 standard deviations and its
variance ratio below 2.1; lagging ones (momentum 0.99, about 30 steps) had a mean gap of at
least 1.7 (MLPs) or a variance ratio of at least 2.7 (MLPs; 35 and more for CNNs). The
defaults, 0.8 and 2.5, sit between the two. Models checked by the doctor are left exactly
as they were: every measurement restores all variables.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from bnutils.precise import (
    batchnorm_input_statistics,
    find_batchnorm_layers,
    recalibrate_batchnorm,
)

__all__ = ["SEVERITIES", "DoctorReport", "Finding", "diagnose_batchnorm"]

SEVERITIES = ("error", "warning", "info")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}

_FIXES = {
    "no-batchnorm": "Nothing to check. Add BN with `keras.layers.BatchNormalization()` after "
    "Dense/Conv layers if you want it.",
    "graph-unavailable": "Build the model with the Functional or Sequential API to have "
    "redundant-bias, dropout-before-bn and bn-after-softmax-or-output checked.",
    "batch-dependent-inference": "Do not call BN with `training=True` outside training: remove "
    "a hard-coded `training=True` (in a custom layer's call or in `base(x, training=True)`) "
    "and let Keras pass the flag; predict with `model(x, training=False)` or `model.predict`.",
    "moving-stats-never-updated": "Train with BN in training mode: in a custom loop call "
    "`model(x, training=True)` inside the GradientTape (and keep BN trainable while "
    "training). If the weights were trained that way but the statistics were lost (weights "
    "copied without them), `bnutils.recalibrate_batchnorm(model, x_train)` restores them; "
    "the `accuracy_recalibrated` evidence shows whether it helps.",
    "moving-stats-mismatch": "Train longer, lower the BN momentum (e.g. 0.9) for short runs, "
    "or recalibrate after training (precise BN): `bnutils.recalibrate_batchnorm(model, "
    "x_train, batch_size=<training batch size>)`.",
    "redundant-bias": "Harmless but wasted: BN subtracts the mean, which cancels the bias. "
    "Use `use_bias=False` on the layer before BN (BN's beta plays its role).",
    "dropout-before-bn": "Move Dropout after the last BN layer (e.g. before the classifier), "
    "or replace it by BN alone: dropout's train/test variance shift breaks BN's moving "
    "variance (Li et al., 2019).",
    "bn-after-softmax-or-output": "Put BN before the output activation (Dense -> BN -> "
    "softmax) or remove it: BN after softmax, or as the last layer, rescales the "
    "predictions themselves.",
    "bn-unused": "Remove the unused layers, or check that `call` really uses them.",
    "training-false-overridden": "Freeze the BN layers themselves: `for layer in "
    "base.layers: if isinstance(layer, keras.layers.BatchNormalization): layer.trainable = "
    "False`, then compile again. `base(x, training=False)` alone does not survive fit() in "
    "Keras 3.",
    "suspicious-momentum": "Keras momentum is PyTorch's 1 - momentum: PyTorch's 0.1 is Keras's "
    "0.9. Keras's defaults are momentum=0.99, epsilon=1e-3; keep epsilon=1e-5 only for "
    "weights ported from PyTorch.",
}

_DROPOUT_NAMES = ("Dropout", "GaussianDropout", "AlphaDropout")
_SHAPE_ONLY = (
    "Flatten", "Reshape", "Permute", "Identity", "ZeroPadding1D", "ZeroPadding2D",
    "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D",
)  # fmt: skip
_ELEMENTWISE = ("Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "Softmax")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem (or note) found by :func:`diagnose_batchnorm`.

    Attributes:
        code: a stable identifier, e.g. ``"moving-stats-mismatch"``.
        severity: ``"error"``, ``"warning"`` or ``"info"``.
        layer: the layer path(s) concerned (comma-separated), or ``None`` for the model.
        message: one sentence saying what was found.
        evidence: the measured numbers behind the finding.
        fix: what to do about it.
    """

    code: str
    severity: str
    layer: str | None
    message: str
    evidence: dict = dataclasses.field(default_factory=dict)
    fix: str = ""

    def to_dict(self) -> dict:
        """The finding as a plain dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DoctorReport:
    """The findings of :func:`diagnose_batchnorm`, worst first.

    Attributes:
        model_name: the model's name.
        findings: the findings, sorted by severity.
        layers: one row per BN layer: path, momentum, epsilon, trainable, and on ``x`` the
            RMS mean gap (std units) and variance ratio between moving and actual statistics.
        n_examples: examples of ``x`` used.
        seconds: time the diagnosis took.
    """

    model_name: str
    findings: list[Finding]
    layers: list[dict]
    n_examples: int
    seconds: float

    def codes(self, min_severity: str = "info") -> list[str]:
        """The distinct codes found at ``min_severity`` or worse, worst first."""
        limit = _RANK[_check_severity(min_severity)]
        out: list[str] = []
        for f in self.findings:
            if _RANK[f.severity] <= limit and f.code not in out:
                out.append(f.code)
        return out

    def by_code(self, code: str) -> list[Finding]:
        """The findings with this code."""
        return [f for f in self.findings if f.code == code]

    @property
    def ok(self) -> bool:
        """``True`` when nothing worse than ``info`` was found."""
        return not self.codes("warning")

    def to_dicts(self) -> list[dict]:
        """The findings as plain dicts (code, severity, layer, message, evidence, fix)."""
        return [f.to_dict() for f in self.findings]

    def __str__(self) -> str:
        head = (
            f"BN doctor: model {self.model_name!r}, {len(self.layers)} BN layer(s), "
            f"{self.n_examples} examples, {self.seconds:.1f} s: "
        )
        if not self.findings:
            return head + "no findings."
        counts = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
        head += ", ".join(f"{n} {s}(s)" for s, n in counts.items() if n)
        rows = [("severity", "code", "layer", "evidence")]
        for f in self.findings:
            layer = f.layer or "(model)"
            if len(layer) > 40:
                layer = layer[:37] + "..."
            rows.append((f.severity, f.code, layer, _format_evidence(f.evidence)))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [head]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
            if i > 0:
                f = self.findings[i - 1]
                lines.append(" " * (widths[0] + 2) + f"-> {f.message}")
                lines.append(" " * (widths[0] + 2) + f"   fix: {f.fix}")
        return "\n".join(lines)


def _format_evidence(evidence: dict, limit: int = 8) -> str:
    parts = []
    for key, value in list(evidence.items())[:limit]:
        if isinstance(value, float):
            parts.append(f"{key}={value:.3g}")
        elif isinstance(value, dict):
            inner = ", ".join(
                f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}"
                for k, v in list(value.items())[:3]
            )
            more = f", +{len(value) - 3}" if len(value) > 3 else ""
            parts.append(f"{key}={{{inner}{more}}}")
        else:
            parts.append(f"{key}={value}")
    return "; ".join(parts)


def _check_severity(severity: str) -> str:
    if severity not in _RANK:
        raise ValueError(f"Unknown severity {severity!r}; expected one of {list(SEVERITIES)}.")
    return severity


def _finding(code: str, severity: str, layer, message: str, evidence: dict | None = None):
    if isinstance(layer, (list, tuple)):
        layer = ", ".join(layer) if layer else None
    return Finding(code, _check_severity(severity), layer, message, evidence or {}, _FIXES[code])


# ------------------------------------------------------------------ input checks


def _check_inputs(model, x, y):
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(
            f"Expected a Keras 3 `keras.Model`, received an object of type "
            f"{type(model).__module__}.{type(model).__name__}. Pass the model itself (a "
            "Sequential, Functional or subclassed `keras.Model`)."
        )
    try:
        x = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise TypeError(
            f"Expected `x` to be a NumPy array of inputs, received {type(x).__name__} ({e})."
        ) from e
    if x.ndim < 1 or len(x) < 2:
        raise ValueError(
            f"Expected `x` with at least 2 examples along its first axis, received shape "
            f"{x.shape}. Pass a sample of inputs (a few hundred is plenty)."
        )
    inputs = _graph_inputs(model)
    if inputs is not None:
        if len(inputs) != 1:
            raise ValueError(
                f"Model {model.name!r} has {len(inputs)} inputs; diagnose_batchnorm supports "
                "single-input models only. Expected one input array `x`."
            )
        expected = tuple(inputs[0].shape)
        got = x.shape
        if len(expected) != len(got) or any(
            e is not None and e != g for e, g in zip(expected[1:], got[1:], strict=True)
        ):
            raise ValueError(
                f"Expected `x` of shape {expected} (first axis: examples) for model "
                f"{model.name!r}, received shape {got}. Fix: reshape `x` to "
                f"(n, {', '.join(str(e) for e in expected[1:])})."
            )
    else:
        try:
            model(x[:2], training=False)
        except Exception as e:
            raise ValueError(
                f"Could not run model {model.name!r} on `x` of shape {x.shape} "
                f"({type(e).__name__}: {e}). Expected inputs the model accepts; check the "
                "shape of `x` against what the model was trained on."
            ) from e
    if y is not None:
        y = np.asarray(y)
        if len(y) != len(x):
            raise ValueError(
                f"`x` has {len(x)} examples but `y` has {len(y)}; expected equal lengths."
            )
    return x, y


def _graph_inputs(model):
    """The model's symbolic inputs (Sequential/Functional), or ``None`` (subclassed)."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    return list(inputs)


# ------------------------------------------------------------------ the layer graph


class _Graph:
    """Who feeds whom, across nested Functional/Sequential models."""

    def __init__(self, model):
        import keras

        self.input_owner: dict[int, Any] = {}
        stack = [model]
        seen = set()
        while stack:
            m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            if isinstance(m, keras.Model):
                for t in _graph_inputs(m) or []:
                    op = t._keras_history.operation
                    self.input_owner.setdefault(id(op), m)
            stack.extend(getattr(m, "layers", []) if isinstance(m, keras.Model) else [])

    def producers(self, op) -> list:
        """The layers whose output ``op``'s output really is (through nested models)."""
        import keras

        if isinstance(op, keras.Model):
            outs = []
            for t in getattr(op, "outputs", None) or []:
                outs.extend(self.producers(t._keras_history.operation))
            return outs or [op]
        if isinstance(op, keras.layers.InputLayer):
            owner = self.input_owner.get(id(op))
            if owner is not None and getattr(owner, "_inbound_nodes", None):
                return self.parents(owner)
        return [op]

    def parents(self, layer) -> list:
        """The layers feeding ``layer``, over all of its calls."""
        out = []
        for node in getattr(layer, "_inbound_nodes", []) or []:
            for pnode in node.parent_nodes:
                out.extend(self.producers(pnode.operation))
        return list({id(p): p for p in out}.values())

    def walk_back(self, layer, through: tuple[str, ...]) -> list:
        """Parents of ``layer``, skipping layers whose class name is in ``through``."""
        found, frontier, seen = [], self.parents(layer), set()
        while frontier:
            p = frontier.pop()
            if id(p) in seen:
                continue
            seen.add(id(p))
            if type(p).__name__ in through and not _is_dropout(p):
                frontier.extend(self.parents(p))
            else:
                found.append(p)
        return found


def _is_dropout(layer) -> bool:
    return any(c.__name__ in _DROPOUT_NAMES for c in type(layer).__mro__)


def _activation_name(layer) -> str:
    if type(layer).__name__ == "Softmax":
        return "softmax"
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", "") if act is not None else ""


def _static_findings(model, bn_layers, graph: _Graph) -> list[Finding]:
    findings = []
    paths = {id(lay): p for p, lay in bn_layers}
    for path, bn in bn_layers:
        # redundant-bias: a linear Dense/Conv with a bias directly before BN.
        for p in graph.walk_back(bn, ("Identity",)):
            bias = getattr(p, "bias", None)
            has_kernel = getattr(p, "kernel", None) is not None or hasattr(p, "depthwise_kernel")
            if (
                getattr(p, "use_bias", False)
                and bias is not None
                and has_kernel
                and _activation_name(p) in ("", "linear")
                and _bias_on_bn_axis(p, bn)
            ):
                findings.append(_finding(
                    "redundant-bias", "info", path,
                    f"`{p.name}` ({type(p).__name__}) adds a bias that BN `{bn.name}` subtracts "
                    "again with the mean.",
                    {"bias_parameters": int(np.prod(bias.shape)), "source": p.name},
                ))
        # dropout-before-bn: Dropout feeding BN (through shape-only and activation layers).
        for p in graph.walk_back(bn, _SHAPE_ONLY + _ELEMENTWISE[:-1]):
            if _is_dropout(p):
                findings.append(_finding(
                    "dropout-before-bn", "warning", path,
                    f"`{p.name}` ({type(p).__name__}) feeds BN `{bn.name}`: BN's moving "
                    "variance is measured with dropout on and applied with it off.",
                    {"source": p.name, "rate": float(getattr(p, "rate", float("nan")))},
                ))
        # bn-after-softmax-or-output: softmax (or any output activation) before BN.
        for p in graph.walk_back(bn, _SHAPE_ONLY):
            if _activation_name(p) in ("softmax", "log_softmax"):
                findings.append(_finding(
                    "bn-after-softmax-or-output", "warning", path,
                    f"BN `{bn.name}` normalizes the softmax output of `{p.name}`.",
                    {"source": p.name, "activation": _activation_name(p)},
                ))
    # training=False stored in a Functional graph is overridden by fit() (Keras 3).
    findings.extend(_overridden_flags(model))
    # BN as the model's output (possibly after reshapes): merged with a softmax finding.
    for t in _graph_outputs(model):
        ends = graph.producers(t._keras_history.operation)
        while ends:
            op = ends.pop()
            if type(op).__name__ in _SHAPE_ONLY:
                ends.extend(graph.parents(op))
            elif id(op) in paths:
                path = paths[id(op)]
                same = [i for i, f in enumerate(findings)
                        if f.code == "bn-after-softmax-or-output" and f.layer == path]
                if same:
                    old = findings[same[0]]
                    findings[same[0]] = dataclasses.replace(
                        old, message=old.message[:-1] + ", and is the model's last layer.",
                        evidence={**old.evidence, "is_output": True},
                    )
                    continue
                before = [_activation_name(p) for p in graph.walk_back(op, _SHAPE_ONLY)]
                findings.append(_finding(
                    "bn-after-softmax-or-output", "warning", path,
                    f"BN `{op.name}` is the model's last layer: its output is the prediction.",
                    {"is_output": True, "output_shape": str(tuple(t.shape)),
                     "activation": ",".join(b for b in before if b) or "none"},
                ))
    return _dedupe(findings)


def _overridden_flags(model) -> list[Finding]:
    """Sub-models called with ``training=False`` in a graph while their BN stays trainable.

    In a Keras 3 Functional model the outer call's ``training`` wins over the one stored
    with a node, so ``fit()`` runs such BN layers in training mode (keras-team/keras#20285).
    Only ``layer.trainable = False`` keeps them in inference mode.
    """
    import keras

    findings = []
    for path, layer in _all_layers(model):
        for node in getattr(layer, "_inbound_nodes", []) or []:
            if node.arguments.kwargs.get("training") is not False:
                continue
            if isinstance(layer, keras.layers.BatchNormalization):
                inner = [(path, layer)]
            else:
                inner = [(f"{path}/{p}", lay) for p, lay in find_batchnorm_layers(layer)]
            live = [p for p, lay in inner if lay.trainable]
            if live:
                findings.append(_finding(
                    "training-false-overridden", "warning", live,
                    f"`{layer.name}` is called with training=False in the graph, but fit() "
                    f"passes training=True, which wins in Keras 3: {len(live)} trainable BN "
                    "layer(s) inside will normalize with batch statistics and update their "
                    "moving statistics.",
                    {"n_layers": len(live), "called_as": f"{layer.name}(..., training=False)"},
                ))
            break
    return findings


def _all_layers(model) -> list[tuple[str, Any]]:
    out, seen = [], set()

    def visit(layer, prefix):
        for child in getattr(layer, "layers", []) or []:
            if id(child) not in seen:
                seen.add(id(child))
                out.append((f"{prefix}{child.name}", child))
                visit(child, f"{prefix}{child.name}/")

    visit(model, "")
    return out


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen, out = set(), []
    for f in findings:
        key = (f.code, f.layer, f.message)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _graph_outputs(model) -> list:
    try:
        return list(model.outputs or [])
    except (AttributeError, ValueError):
        return []


def _bias_on_bn_axis(layer, bn) -> bool:
    """Whether the layer's bias runs along the axis BN normalizes per channel."""
    spec = getattr(bn, "input_spec", None)
    rank = getattr(spec, "ndim", None)
    axis = bn.axis if isinstance(bn.axis, int) else bn.axis[0]
    channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
    if rank is None:
        return axis == (1 if channels_first else -1)
    return axis % rank == (1 if channels_first else rank - 1)


def _config_findings(bn_layers) -> list[Finding]:
    findings = []
    low = {p: lay.momentum for p, lay in bn_layers if not 0.5 <= lay.momentum < 1.0}
    if low:
        findings.append(_finding(
            "suspicious-momentum", "warning", list(low),
            f"momentum {sorted(set(low.values()))} outside [0.5, 1): Keras keeps "
            "momentum * old + (1 - momentum) * batch, so a small value makes the moving "
            "statistics follow the last batch.",
            {"momentum": {p: float(m) for p, m in low.items()}},
        ))
    torch_eps = [p for p, lay in bn_layers if np.isclose(lay.epsilon, 1e-5, rtol=1e-3)]
    if torch_eps:
        findings.append(_finding(
            "suspicious-momentum", "info", torch_eps,
            "epsilon 1e-5 is PyTorch's default (Keras's is 1e-3): fine for weights ported from "
            "PyTorch, otherwise probably copied from PyTorch code.",
            {"epsilon": 1e-5, "n_layers": len(torch_eps)},
        ))
    return findings


# ------------------------------------------------------------------ measurements


def _layer_row(path, layer, stats) -> dict:
    eps = float(layer.epsilon)
    mm = np.asarray(layer.moving_mean.numpy(), np.float64)
    mv = np.asarray(layer.moving_variance.numpy(), np.float64)
    gap = np.abs(stats.mean - mm) / np.sqrt(mv + eps)
    log_ratio = np.log((stats.variance + eps) / (mv + eps))
    return {
        "layer": path,
        "momentum": float(layer.momentum),
        "epsilon": eps,
        "trainable": bool(layer.trainable),
        "never_updated": bool(np.all(mm == 0.0) and np.all(mv == 1.0)),
        "used_batch_stats": stats.used_batch_stats,
        "mean_gap": float(np.sqrt(np.mean(gap**2))),
        "max_mean_gap": float(gap.max()),
        "variance_ratio": float(np.exp(np.sqrt(np.mean(log_ratio**2)))),
    }


def _default_call_change(model, x) -> float:
    """Largest change between ``model(x)`` and ``model(x, training=False)``, relative."""
    import keras

    saved = [(v, np.array(v.numpy(), copy=True)) for v in model.variables]
    try:
        plain = keras.tree.flatten(model(x))[0]
    finally:
        for v, value in saved:
            v.assign(value)
    plain = np.asarray(keras.ops.convert_to_numpy(plain), np.float64)
    ref = _predict(model, x, len(x))
    scale = float(np.std(ref)) or 1.0
    return float(np.abs(plain - ref).max() / scale)


def _predict(model, x, batch_size: int) -> np.ndarray:
    import keras

    outs = []
    for s in range(0, len(x), batch_size):
        out = keras.tree.flatten(model(x[s : s + batch_size], training=False))[0]
        outs.append(np.asarray(keras.ops.convert_to_numpy(out), np.float64))
    return np.concatenate(outs)


def _score(pred: np.ndarray, y: np.ndarray | None) -> dict:
    """Accuracy and cross-entropy (classification) or MSE, as the outputs suggest."""
    if y is None:
        return {}
    pred2 = pred.reshape(len(pred), -1)
    y = np.asarray(y)
    k = pred2.shape[1]
    if k > 1 and (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)) and np.issubdtype(
        y.dtype, np.integer
    ):
        labels = y.reshape(-1)
    elif k > 1 and y.ndim == 2 and y.shape[1] == k:
        labels = y.argmax(axis=1)
    elif k == 1 and np.isin(np.unique(y), [0, 1]).all():
        p = pred2[:, 0]
        if p.min() < 0 or p.max() > 1:  # logits
            p = 1.0 / (1.0 + np.exp(-p))
        t = y.reshape(-1).astype(np.float64)
        loss = -np.mean(t * np.log(p + 1e-7) + (1 - t) * np.log(1 - p + 1e-7))
        return {"accuracy": float(np.mean((p > 0.5) == (t > 0.5))), "loss": float(loss)}
    else:
        return {"mse": float(np.mean((pred2 - y.reshape(pred2.shape)) ** 2))}
    probs = pred2
    if probs.min() < 0 or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        z = probs - probs.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(probs[np.arange(len(labels)), labels] + 1e-7))
    return {"accuracy": float(np.mean(probs.argmax(axis=1) == labels)), "loss": float(loss)}


def _recalibrated_effect(model, x, y, batch_size: int, seed: int) -> dict:
    """Scores with the moving statistics and with statistics recomputed on ``x``.

    Works on the model itself and restores every variable afterwards, which leaves it
    exactly as a copy would, for any model (subclassed ones included).
    """
    before = _predict(model, x, batch_size)
    saved = [(v, np.array(v.numpy(), copy=True)) for v in model.variables]
    try:
        recalibrate_batchnorm(
            model, x, num_batches=None, batch_size=min(batch_size, len(x)), seed=seed
        )
        after = _predict(model, x, batch_size)
    finally:
        for v, value in saved:
            v.assign(value)
    effect = {}
    for key, value in _score(before, y).items():
        effect[f"{key}_moving"] = value
    for key, value in _score(after, y).items():
        effect[f"{key}_recalibrated"] = value
    if before.ndim == 2 and before.shape[1] > 1:
        effect["predictions_changed"] = float(np.mean(before.argmax(1) != after.argmax(1)))
    return effect


# ------------------------------------------------------------------ the diagnosis


def diagnose_batchnorm(
    model,
    x,
    y=None,
    batch_size: int = 128,
    n_check: int = 16,
    mean_gap_threshold: float = 0.8,
    variance_ratio_threshold: float = 2.5,
    seed: int = 0,
) -> DoctorReport:
    """Check a model's batch normalization for the usual bugs and return the evidence.

    The model is left exactly as it was (every measurement restores its variables).

    Args:
        model: a built ``keras.Model`` (Sequential, Functional, subclassed, nested).
        x: a sample of inputs, ideally held-out data (a few hundred examples).
        y: the matching labels, optional: with them a moving-statistics problem is shown
            as the accuracy and loss before and after recalibration.
        batch_size: batch size of the measurement passes (use the training batch size).
        n_check: examples of ``x`` used by the batch-independence check.
        mean_gap_threshold: RMS over channels of ``|mean_x - moving_mean| /
            sqrt(moving_variance + eps)`` above which a layer's statistics are off.
        variance_ratio_threshold: the same for the variance (geometric RMS of the ratio of
            actual to moving variance, both sides).
        seed: seed of the batch compositions and of the recalibration's shuffle.

    Returns:
        A :class:`DoctorReport`; ``print(report)`` shows the table.

    Raises:
        TypeError: ``model`` is not a Keras 3 model, or ``x`` is not an array.
        ValueError: ``x`` does not have the model's input shape, has fewer than 2 examples,
            or ``y`` has a different length.
    """
    from bnutils.inference import check_batch_independence

    start = time.perf_counter()
    x, y = _check_inputs(model, x, y)
    bn_layers = find_batchnorm_layers(model)
    if not bn_layers:
        finding = _finding(
            "no-batchnorm", "info", None,
            f"Model {model.name!r} has no BatchNormalization layer (searched nested models "
            "through `model.layers`; BN created inside a subclassed `call` is not visible).",
            {"n_layers": len(model.layers)},
        )
        return DoctorReport(model.name, [finding], [], len(x), time.perf_counter() - start)

    findings: list[Finding] = []
    if _graph_inputs(model) is None:
        findings.append(_finding(
            "graph-unavailable", "info", None,
            f"Model {model.name!r} is subclassed: its layer connectivity is unknown, so only "
            "the measured checks ran.", {"n_bn_layers": len(bn_layers)},
        ))
    else:
        findings.extend(_static_findings(model, bn_layers, _Graph(model)))
    findings.extend(_config_findings(bn_layers))

    # What each BN layer receives at inference, and whether it used batch statistics.
    stats = batchnorm_input_statistics(
        model, x, training=False, batch_size=batch_size, strict=False
    )
    rows = [_layer_row(s.path, s.layer, s) for s in stats]
    called = {s.path for s in stats}
    unused = [p for p, _ in bn_layers if p not in called]
    if unused:
        findings.append(_finding(
            "bn-unused", "info", unused,
            "These BN layers are never called when the model runs on x.",
            {"n_layers": len(unused)},
        ))

    # batch-dependent-inference
    sample = x[: max(2, min(n_check, len(x)))]
    independence = check_batch_independence(
        model, sample, training=False, n_trials=2, seed=seed, batch_size=max(2, len(sample) // 4)
    )
    in_training = [r["layer"] for r in rows if r["used_batch_stats"]]
    if not independence.independent or in_training:
        findings.append(_finding(
            "batch-dependent-inference", "error", in_training or None,
            "Under training=False an example's prediction depends on the rest of its batch"
            + (": these BN layers normalized with batch statistics." if in_training else "."),
            {"max_rel_change": independence.max_rel_change,
             "batch_of_one_change": independence.batch_of_one_change,
             "n_examples": independence.n_examples,
             "layers_in_training_mode": len(in_training)},
        ))
    else:
        # `model(x)` without `training=` can differ from `training=False`: a Functional
        # graph keeps `base(x, training=True)` when the outer call passes no flag.
        change = _default_call_change(model, sample)
        if change > independence.tolerance:
            default_stats = batchnorm_input_statistics(
                model, sample, training=None, batch_size=len(sample)
            )
            layers = [s.path for s in default_stats if s.used_batch_stats]
            findings.append(_finding(
                "batch-dependent-inference", "error", layers or None,
                "`model(x)` without `training=` normalizes with batch statistics (a call "
                "stored with training=True in the graph); `model.predict` and "
                "`model(x, training=False)` do not.",
                {"default_call_rel_change": change, "n_examples": len(sample),
                 "layers_in_training_mode": len(layers)},
            ))

    # moving-stats-never-updated and moving-stats-mismatch
    never = [r for r in rows if r["never_updated"]]
    off = [
        r for r in rows
        if not r["never_updated"] and not r["used_batch_stats"] and (
            r["mean_gap"] > mean_gap_threshold or r["variance_ratio"] > variance_ratio_threshold
        )
    ]
    # With labels, show what recalibration (precise BN on x) would change.
    effect = {}
    if (never or off) and y is not None:
        effect = _recalibrated_effect(model, x, y, batch_size, seed)
    if never:
        findings.append(_finding(
            "moving-stats-never-updated", "error", [r["layer"] for r in never],
            f"{len(never)} of {len(rows)} BN layer(s) still hold their initial moving "
            "statistics (mean 0, variance 1): they were never run with training=True.",
            {"n_layers": len(never),
             "mean_gap": {r["layer"]: round(r["mean_gap"], 3) for r in never},
             **effect},
        ))
    if off:
        findings.append(_finding(
            "moving-stats-mismatch", "warning", [r["layer"] for r in off],
            f"{len(off)} BN layer(s) have moving statistics far from what their input has on x "
            f"(RMS mean gap > {mean_gap_threshold} std or variance ratio > "
            f"{variance_ratio_threshold}).",
            {"mean_gap": {r["layer"]: round(r["mean_gap"], 3) for r in off},
             "variance_ratio": {r["layer"]: round(r["variance_ratio"], 3) for r in off},
             **effect},
        ))

    # Dropout before BN: measure the variance shift it causes.
    dropout = [f for f in findings if f.code == "dropout-before-bn"]
    if dropout:
        names = sorted({f.layer for f in dropout})
        by_path = dict(bn_layers)
        train_stats = batchnorm_input_statistics(
            model, x, training=True, batch_size=batch_size, layers=[by_path[n] for n in names]
        )
        infer = {s.path: s for s in stats}
        shift = {}
        for s in train_stats:
            ratio = (s.variance + 1e-12) / (infer[s.path].variance + 1e-12)
            shift[s.path] = float(np.exp(np.mean(np.log(ratio))))
        findings = [
            dataclasses.replace(f, evidence={**f.evidence, "variance_shift": shift[f.layer]})
            if f.code == "dropout-before-bn" else f
            for f in findings
        ]

    findings.sort(key=lambda f: _RANK[f.severity])
    return DoctorReport(model.name, findings, rows, len(x), time.perf_counter() - start)
