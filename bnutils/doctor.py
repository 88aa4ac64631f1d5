"""The BN doctor: find the usual batch-normalization bugs in a Keras model, with evidence.

:func:`diagnose_batchnorm` inspects the BN layers (nested included), runs the model on ``x``
and reports findings (code, severity, layer, evidence, fix); every variable is restored. Codes:

* error: ``batch-dependent-inference`` (with ``training=False`` a prediction changes with its
  batch), ``moving-stats-never-updated`` (moving mean 0 and variance 1 exactly);
* warning: ``moving-stats-mismatch`` (moving statistics far from those of the input on ``x``),
  ``dropout-before-bn``, ``bn-after-softmax-or-output``, ``training-false-overridden`` (fit()
  overrides ``base(x, training=False)``), ``suspicious-momentum`` (< 0.5; info: epsilon 1e-5);
* info: ``redundant-bias`` (a Dense/Conv bias right before BN), ``graph-unavailable``
  (subclassed: no wiring checks), ``bn-unused`` (never called on ``x``), ``no-batchnorm``.

Mismatch thresholds: RMS mean gap 0.8 std, variance ratio 2.5 (healthy Fashion-MNIST MLPs and
CNNs stayed below 0.46 and 2.1, lagging ones reached 1.7 or 2.7). Used in notebook A2.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import keras
import numpy as np

from bnutils._graph import (
    ACTIVATION_LAYERS,
    DROPOUT_LAYERS,
    SHAPE_LAYERS,
    LayerGraph,
    find_batchnorm_layers,
    has_linear_activation,
    is_batchnorm,
)
from bnutils._util import check_choice, log_probabilities, model_outputs, preserved_state
from bnutils.inference import check_batch_independence
from bnutils.precise import batchnorm_input_statistics, recalibrate_batchnorm
from bnutils.results import Report

__all__ = ["SEVERITIES", "DoctorReport", "Finding", "diagnose_batchnorm"]

SEVERITIES = ("error", "warning", "info")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}

_FIXES = {
    "no-batchnorm": "Nothing to check.",
    "graph-unavailable": "Build the model with the Functional or Sequential API to have its "
    "wiring checked (redundant-bias, dropout-before-bn, bn-after-softmax-or-output).",
    "batch-dependent-inference": "Remove a hard-coded `training=True` (in a custom layer's call "
    "or `base(x, training=True)`) and let Keras pass the flag; predict with `model.predict`.",
    "moving-stats-never-updated": "In a custom loop call `model(x, training=True)` inside the "
    "GradientTape; statistics lost later: `bnutils.recalibrate_batchnorm(model, x_train)`.",
    "moving-stats-mismatch": "Train longer, lower the BN momentum (e.g. 0.9) for short runs, or "
    "recalibrate (precise BN): `bnutils.recalibrate_batchnorm(model, x_train, batch_size=...)`.",
    "redundant-bias": "Harmless but wasted: BN subtracts the mean, which cancels the bias. Use "
    "`use_bias=False` on the layer before BN (BN's beta plays its role).",
    "dropout-before-bn": "Move Dropout after the last BN layer (e.g. before the classifier): "
    "dropout's train/test variance shift breaks BN's moving variance (Li et al., 2019).",
    "bn-after-softmax-or-output": "Put BN before the output activation (Dense -> BN -> softmax) "
    "or remove it: BN after softmax, or as the last layer, rescales the predictions themselves.",
    "bn-unused": "Remove the unused layers, or check that `call` really uses them.",
    "training-false-overridden": "Freeze the BN layers themselves (`layer.trainable = False` for "
    "each BN of the base), then compile again: `base(x, training=False)` does not survive fit().",
    "suspicious-momentum": "Keras momentum is PyTorch's 1 - momentum (PyTorch's 0.1 is Keras's "
    "0.9). Keras's defaults are 0.99 and epsilon=1e-3; keep 1e-5 only for PyTorch weights.",
}

_ELEMENTWISE = tuple(t for t in ACTIVATION_LAYERS if t is not keras.layers.Softmax)
_MEAN_GAP, _VARIANCE_RATIO = 0.8, 2.5  # moving-stats-mismatch thresholds (module docstring)


@dataclasses.dataclass(frozen=True)
class Finding:
    """A finding of :func:`diagnose_batchnorm`: a stable ``code``, a ``severity``, the ``layer``
    path(s) (comma-separated; ``None``: the model), a ``message``, ``evidence`` and a ``fix``."""

    code: str
    severity: str
    layer: str | None
    message: str
    evidence: dict = dataclasses.field(default_factory=dict)
    fix: str = ""


class _Findings(list):
    def add(self, code: str, severity: str, layer, message: str, evidence: dict) -> None:
        if isinstance(layer, (list, tuple)):
            layer = ", ".join(layer) or None
        self.append(Finding(code, severity, layer, message, evidence, _FIXES[code]))

    def amend(self, i: int, message: str | None = None, **evidence) -> None:
        f = self[i]
        new = {"message": message or f.message, "evidence": {**f.evidence, **evidence}}
        self[i] = dataclasses.replace(f, **new)


@dataclasses.dataclass
class DoctorReport(Report):
    """The ``findings`` of :func:`diagnose_batchnorm`, worst first; ``layers``: a row per BN layer
    (path, momentum, epsilon, trainable; on ``x``: ``mean_gap``, the RMS over channels of the mean
    gap in std, ``max_mean_gap``, and ``variance_ratio``, geometric RMS of actual/moving)."""

    model_name: str
    findings: list[Finding]
    layers: list[dict]
    n_examples: int
    seconds: float

    def codes(self, min_severity: str = "info") -> list[str]:
        """The distinct codes found at ``min_severity`` or worse, worst first."""
        limit = _RANK[check_choice("min_severity", min_severity, SEVERITIES)]
        return list(dict.fromkeys(f.code for f in self.findings if _RANK[f.severity] <= limit))

    def by_code(self, code: str) -> list[Finding]:
        """The findings with this code."""
        return [f for f in self.findings if f.code == code]

    @property
    def ok(self) -> bool:
        """``True`` when nothing worse than ``info`` was found."""
        return not self.codes("warning")

    def __str__(self) -> str:
        counts = [(sum(f.severity == s for f in self.findings), s) for s in SEVERITIES]
        summary = ", ".join(f"{n} {s}(s)" for n, s in counts if n) or "no findings."
        lines = [
            f"BN doctor: model {self.model_name!r}, {len(self.layers)} BN layer(s), "
            f"{self.n_examples} examples, {self.seconds:.1f} s: {summary}"
        ]
        rows = [("severity", "code", "layer")]
        rows += [(f.severity, f.code, _clip(f.layer or "(model)")) for f in self.findings]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        cells = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines += [cells[0] + "  evidence"] if self.findings else []
        pad = " " * (widths[0] + 2)
        for f, row in zip(self.findings, cells[1:], strict=True):
            evidence = "; ".join(f"{k}={_fmt(v)}" for k, v in list(f.evidence.items())[:8])
            lines += [f"{row}  {evidence}", f"{pad}-> {f.message}", f"{pad}   fix: {f.fix}"]
        return "\n".join(lines)


def _clip(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _fmt(value) -> str:
    """An evidence value: floats to 3 digits, dicts to their first 3 items."""
    if isinstance(value, dict):
        inner = ", ".join(f"{k}: {_fmt(v)}" for k, v in list(value.items())[:3])
        return f"{{{inner}{f', +{len(value) - 3}' if len(value) > 3 else ''}}}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _check_inputs(model, x, y):
    if not isinstance(model, keras.Model):
        kind = f"{type(model).__module__}.{type(model).__name__}"
        raise TypeError(f"Expected a Keras 3 `keras.Model`, received an object of type {kind}.")
    try:
        x = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise TypeError(f"Expected `x` to be a NumPy array, received {type(x).__name__}.") from e
    if x.ndim < 1 or len(x) < 2:
        raise ValueError(f"Expected `x` with at least 2 examples, received shape {x.shape}.")
    inputs = list(getattr(model, "inputs", None) or []) or None  # None: subclassed
    if inputs and len(inputs) > 1:
        raise ValueError(f"Model {model.name!r} has {len(inputs)} inputs; expected one (`x`).")
    want = tuple(inputs[0].shape) if inputs else x.shape
    if len(want) != x.ndim or any(e not in (None, g) for e, g in zip(want, x.shape, strict=False)):
        raise ValueError(
            f"Expected `x` of shape {want} (first axis: examples) for model {model.name!r}, "
            f"received shape {x.shape}. Fix: reshape `x` to (n, {', '.join(map(str, want[1:]))})."
        )
    if not inputs:
        try:
            model(x[:2], training=False)
        except Exception as e:
            msg = f"Could not run model {model.name!r} on `x` of shape {x.shape} ({e!r})."
            raise ValueError(msg + " Expected inputs the model accepts.") from e
    if y is not None and len(y := np.asarray(y)) != len(x):
        raise ValueError(f"`x` has {len(x)} examples but `y` has {len(y)}; expected equal lengths.")
    return x, y, inputs


def _activation(layer) -> str:
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    return getattr(getattr(layer, "activation", None), "__name__", "")


def _redundant_bias(p, bn) -> bool:
    """Whether ``p`` is a linear Dense/Conv whose bias runs along BN's channel axis."""
    linear = getattr(p, "kernel", None) is not None or hasattr(p, "depthwise_kernel")
    if not (getattr(p, "use_bias", False) and getattr(p, "bias", None) is not None and linear):
        return False
    rank = getattr(getattr(bn, "input_spec", None), "ndim", None)
    last = 1 if getattr(p, "data_format", "channels_last") == "channels_first" else -1
    on_axis = bn.axis == last if rank is None else bn.axis % rank == last % rank
    return on_axis and has_linear_activation(p)


def _structure_findings(model, bn_layers, found: _Findings) -> None:
    """What the wiring shows: bias, dropout or softmax before BN, BN output, training=False."""
    graph = LayerGraph(model)
    paths = {id(b): p for p, b in bn_layers}
    for path, bn in bn_layers:
        for p in graph.walk_back(bn, (keras.layers.Identity,)):
            if _redundant_bias(p, bn):
                msg = f"`{p.name}` ({type(p).__name__}) adds a bias that BN `{bn.name}` subtracts"
                ev = {"bias_parameters": int(np.prod(p.bias.shape)), "source": p.name}
                found.add("redundant-bias", "info", path, msg + " again with the mean.", ev)
        for p in graph.walk_back(bn, SHAPE_LAYERS + _ELEMENTWISE):
            if isinstance(p, DROPOUT_LAYERS):
                msg = f"`{p.name}` ({type(p).__name__}) feeds BN `{bn.name}`: BN's moving variance"
                msg += " is measured with dropout on and applied with it off."
                ev = {"source": p.name, "rate": getattr(p, "rate", None)}
                if not hasattr(p, "rate"):  # GaussianNoise: noise of this standard deviation
                    ev["stddev"] = getattr(p, "stddev", None)
                found.add("dropout-before-bn", "warning", path, msg, ev)
        for p in graph.walk_back(bn, SHAPE_LAYERS):
            if (act := _activation(p)) in ("softmax", "log_softmax"):
                msg = f"BN `{bn.name}` normalizes the softmax output of `{p.name}`."
                ev = {"source": p.name, "activation": act}
                found.add("bn-after-softmax-or-output", "warning", path, msg, ev)
    # fit()'s training=True wins over a stored training=False (keras-team/keras#20285).
    for path, layer, training in graph.called_training_flags():
        inner = [("", layer)] if is_batchnorm(layer) else find_batchnorm_layers(layer)
        live = [f"{path}/{p}".rstrip("/") for p, b in inner if b.trainable]
        if training is False and live:
            msg = f"`{layer.name}` is called with training=False in the graph, but fit() passes "
            msg += f"training=True, which wins in Keras 3: {len(live)} trainable BN layer(s) "
            msg += "inside will normalize with batch statistics and update their moving statistics."
            ev = {"n_layers": len(live), "called_as": f"{layer.name}(..., training=False)"}
            found.add("training-false-overridden", "warning", live, msg, ev)
    # BN as the model's output (possibly after reshapes), merged with a softmax finding.
    for out in graph.output_layers():
        for op in graph.walk_back(out, SHAPE_LAYERS) if isinstance(out, SHAPE_LAYERS) else [out]:
            if (path := paths.get(id(op))) is None:
                continue
            code = "bn-after-softmax-or-output"
            same = [i for i, f in enumerate(found) if f.code == code and f.layer == path]
            if same:
                msg = found[same[0]].message[:-1] + ", and is the model's last layer."
                found.amend(same[0], msg, is_output=True)
                continue
            acts = ",".join(a for p in graph.walk_back(op, SHAPE_LAYERS) if (a := _activation(p)))
            msg = f"BN `{op.name}` is the model's last layer: its output is the prediction."
            found.add(code, "warning", path, msg, {"is_output": True, "activation": acts or "none"})


def _config_findings(bn_layers, found: _Findings) -> None:
    low = {p: float(b.momentum) for p, b in bn_layers if not 0.5 <= b.momentum < 1.0}
    if low:
        msg = f"momentum {sorted(set(low.values()))} outside [0.5, 1): Keras keeps momentum * old "
        msg += "+ (1 - momentum) * batch, so the moving statistics follow the last batch."
        found.add("suspicious-momentum", "warning", list(low), msg, {"momentum": low})
    if eps := [p for p, b in bn_layers if np.isclose(b.epsilon, 1e-5, rtol=1e-3)]:
        msg = "epsilon 1e-5 is PyTorch's default (Keras's is 1e-3): fine for weights ported from "
        msg += "PyTorch, otherwise probably copied from PyTorch code."
        found.add("suspicious-momentum", "info", eps, msg, {"epsilon": 1e-5, "n_layers": len(eps)})


def _layer_row(s) -> dict:
    """Moving statistics of one BN layer against the statistics ``s`` of its input on ``x``."""
    eps = float(s.layer.epsilon)
    mm = np.asarray(s.layer.moving_mean.numpy(), np.float64)
    mv = np.asarray(s.layer.moving_variance.numpy(), np.float64)
    gap = np.abs(s.mean - mm) / np.sqrt(mv + eps)
    log_ratio = np.log((s.variance + eps) / (mv + eps))
    row = {"layer": s.path, "momentum": float(s.layer.momentum), "epsilon": eps}
    row.update(trainable=bool(s.layer.trainable), used_batch_stats=s.used_batch_stats)
    row.update(never_updated=bool(np.all(mm == 0.0) and np.all(mv == 1.0)))
    row.update(mean_gap=float(np.sqrt(np.mean(gap**2))), max_mean_gap=float(gap.max()))
    return {**row, "variance_ratio": float(np.exp(np.sqrt(np.mean(log_ratio**2))))}


def _score(pred: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy and cross-entropy (classification) or MSE, as the outputs and labels suggest."""
    k, ids = pred.shape[1], y.size == len(y) and np.issubdtype(y.dtype, np.integer)
    if k == 1 and np.isin(np.unique(y), [0, 1]).all():  # binary: probabilities or logits
        p = pred[:, 0] if 0 <= pred.min() and pred.max() <= 1 else 1 / (1 + np.exp(-pred[:, 0]))
        log_p = log_probabilities(np.stack([1 - p, p], axis=1), probabilities=True)
        labels = y.reshape(-1).astype(int)
    elif k > 1 and (ids or y.shape == pred.shape):  # class ids or one-hot
        labels = y.reshape(-1) if ids else y.argmax(axis=1)
        log_p = log_probabilities(pred)  # of probabilities, or a log-softmax of logits
    else:
        return {"mse": float(np.mean((pred - y.reshape(pred.shape)) ** 2))}
    loss = -np.mean(log_p[np.arange(len(labels)), labels])
    return {"accuracy": float(np.mean(log_p.argmax(axis=1) == labels)), "loss": float(loss)}


def _batch_dependence(model, sample, rows, seed: int, found: _Findings) -> None:
    """batch-dependent-inference under ``training=False``, and in a plain ``model(x)``."""
    ind = check_batch_independence(model, sample, False, 2, seed, max(2, len(sample) // 4))
    in_training = [r["layer"] for r in rows if r["used_batch_stats"]]
    ev = {"max_rel_change": ind.max_rel_change, "batch_of_one_change": ind.batch_of_one_change}
    if not ind.independent or in_training:
        msg = "Under training=False an example's prediction depends on the rest of its batch"
        msg += ": these BN layers normalized with batch statistics." if in_training else "."
        ev.update(n_examples=ind.n_examples, layers_in_training_mode=len(in_training))
        found.add("batch-dependent-inference", "error", in_training, msg, ev)
        return
    # A Functional graph keeps `base(x, training=True)` when the outer call passes no flag.
    with preserved_state(model):
        plain = model_outputs(model, sample, None)
    ref = model_outputs(model, sample, False)
    change = float(np.abs(plain - ref).max() / (float(np.std(ref)) or 1.0))
    if change > ind.tolerance:
        default = batchnorm_input_statistics(model, sample, None, len(sample))
        layers = [s.path for s in default if s.used_batch_stats]
        msg = "`model(x)` without `training=` normalizes with batch statistics (a call stored with "
        msg += "training=True in the graph); `model.predict` and `model(x, training=False)` do not."
        ev = {"default_call_rel_change": change, "n_examples": len(sample)}
        ev["layers_in_training_mode"] = len(layers)
        found.add("batch-dependent-inference", "error", layers, msg, ev)


def _moving_stats(model, x, y, stats, rows, batch_size: int, seed: int, found: _Findings) -> None:
    """moving-stats-never-updated and -mismatch; with labels, what precise BN would change."""
    never = {r["layer"]: round(r["mean_gap"], 3) for r in rows if r["never_updated"]}
    off = [r for r in rows if not (r["never_updated"] or r["used_batch_stats"])]
    off = [r for r in off if r["mean_gap"] > _MEAN_GAP or r["variance_ratio"] > _VARIANCE_RATIO]
    effect = {}
    if (never or off) and y is not None:  # scores with the moving statistics and after precise BN
        before = model_outputs(model, x, False, batch_size)
        with preserved_state(model):
            if layers := [s.layer for s in stats if s.layer.trainable]:
                recalibrate_batchnorm(model, x, None, min(batch_size, len(x)), layers, seed=seed)
            after = model_outputs(model, x, False, batch_size)
        effect = {f"{k}_moving": v for k, v in _score(before, y).items()}
        effect.update({f"{k}_recalibrated": v for k, v in _score(after, y).items()})
        if before.shape[1] > 1:
            effect["predictions_changed"] = float(np.mean(before.argmax(1) != after.argmax(1)))
    if never:
        msg = f"{len(never)} of {len(rows)} BN layer(s) still hold their initial moving statistics"
        msg += " (mean 0, variance 1): they were never run with training=True."
        ev = {"n_layers": len(never), "mean_gap": never, **effect}
        found.add("moving-stats-never-updated", "error", list(never), msg, ev)
    if off:
        msg = f"{len(off)} BN layer(s) have moving statistics far from what their input has on x "
        msg += f"(RMS mean gap > {_MEAN_GAP} std or variance ratio > {_VARIANCE_RATIO})."
        ev = {k: {r["layer"]: round(r[k], 3) for r in off} for k in ("mean_gap", "variance_ratio")}
        layers = [r["layer"] for r in off]
        found.add("moving-stats-mismatch", "warning", layers, msg, {**ev, **effect})


def diagnose_batchnorm(model, x, y=None, batch_size: int = 128, seed: int = 0) -> DoctorReport:
    """Check a model's batch normalization for the usual bugs; the model is left as it was.

    >>> print(diagnose_batchnorm(model, x_val, y_val))  # a row per finding, evidence and fix

    Args:
        model: a built ``keras.Model`` (Sequential, Functional, subclassed, nested).
        x: a sample of inputs, ideally held-out data (a few hundred examples).
        y: the matching labels, optional: with them a moving-statistics problem is shown as
            the accuracy and loss before and after recalibration (precise BN on ``x``).
        batch_size: batch size of the measurement passes (use the training batch size).
        seed: seed of the batch compositions and of the recalibration's shuffle.

    Returns:
        A :class:`DoctorReport`.

    Raises:
        TypeError: ``model`` is not a Keras 3 model, or ``x`` is not an array.
        ValueError: ``x`` lacks the model's input shape or 2 examples, or ``y`` its length.
    """
    start = time.perf_counter()
    x, y, inputs = _check_inputs(model, x, y)
    bn_layers = find_batchnorm_layers(model)
    found = _Findings()
    if not bn_layers:
        msg = f"Model {model.name!r} has no BatchNormalization layer (nested ones included)."
        warnings.warn(f"diagnose_batchnorm: nothing to diagnose. {msg}", stacklevel=2)
        found.add("no-batchnorm", "info", None, msg, {"n_layers": len(model.layers)})
        seconds = time.perf_counter() - start
        return DoctorReport(
            model_name=model.name,
            findings=list(found),
            layers=[],
            n_examples=len(x),
            seconds=seconds,
        )
    if inputs is None:
        msg = f"Model {model.name!r} is subclassed: only the measured checks ran."
        found.add("graph-unavailable", "info", None, msg, {"n_bn_layers": len(bn_layers)})
    else:
        _structure_findings(model, bn_layers, found)
    _config_findings(bn_layers, found)
    # What each BN layer receives at inference, and whether it used batch statistics.
    stats = batchnorm_input_statistics(model, x, training=False, batch_size=batch_size)
    rows = [_layer_row(s) for s in stats]
    if unused := [p for p, _ in bn_layers if p not in {s.path for s in stats}]:
        msg = "These BN layers are never called when the model runs on x."
        found.add("bn-unused", "info", unused, msg, {"n_layers": len(unused)})
    _batch_dependence(model, x[:16], rows, seed, found)
    _moving_stats(model, x, y, stats, rows, batch_size, seed, found)
    # Dropout before BN: the variance shift it causes (training over inference variance).
    if dropout := [i for i, f in enumerate(found) if f.code == "dropout-before-bn"]:
        layers = [dict(bn_layers)[found[i].layer] for i in dropout]
        infer = {s.path: s.variance + 1e-12 for s in stats}
        for s in batchnorm_input_statistics(model, x, True, batch_size, layers):
            shift = float(np.exp(np.mean(np.log((s.variance + 1e-12) / infer[s.path]))))
            for i in (i for i in dropout if found[i].layer == s.path):
                found.amend(i, variance_shift=shift)
    unique = {(f.code, f.layer, f.message): f for f in found}.values()
    findings = sorted(unique, key=lambda f: _RANK[f.severity])
    seconds = time.perf_counter() - start
    return DoctorReport(
        model_name=model.name, findings=findings, layers=rows, n_examples=len(x), seconds=seconds
    )
