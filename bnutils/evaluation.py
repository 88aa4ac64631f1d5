"""Evaluation of a trained classifier: test loss and accuracy, confusion matrix, time to a target.

Used in notebooks 05 and 06 and the benchmarks. Statistics over seeds are in :mod:`bnutils.stats`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from bnutils._graph import ends_in_softmax
from bnutils._util import check_choice, field, log_probabilities, nan_list

__all__ = ["confusion_matrix", "evaluate", "time_to_accuracy"]


def _split(data, split: str):
    if isinstance(data, tuple) and len(data) == 2:
        return np.asarray(data[0]), np.asarray(data[1])
    check_choice("split", split, ("test", "val", "train"))
    try:
        return getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
    except AttributeError as e:
        raise TypeError(
            f"Expected a bnutils Dataset or an (x, y) tuple, received {type(data).__name__}."
        ) from e


def evaluate(
    model, data, split: str = "test", batch_size: int = 512, return_predictions: bool = False
) -> dict:
    """Loss and accuracy of a classifier on one split (no ``compile`` needed).

    The model runs in inference mode. Its outputs are read as probabilities when it ends in a
    softmax (or its rows are non-negative and sum to 1), otherwise as logits; the loss is the
    mean sparse categorical cross-entropy.

    Args:
        model: a Keras classifier.
        data: a :class:`bnutils.data.Dataset` or an ``(x, y)`` tuple.
        split: ``"test"`` (default), ``"val"`` or ``"train"`` (ignored for a tuple).
        batch_size: prediction batch size.
        return_predictions: also return the predicted classes as ``"y_pred"``.

    Returns:
        ``{"loss", "accuracy", "n", "split"}`` (plus ``"y_pred"``).

    Raises:
        ValueError: outputs and labels disagree in number or classes.
    """
    x, y = _split(data, split)
    y = np.asarray(y).astype(np.int64).ravel()
    out = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)
    if out.ndim != 2 or len(out) != len(y):
        raise ValueError(
            f"Expected outputs of shape ({len(y)}, num_classes), received {out.shape}."
        )
    if y.size and (y.min() < 0 or y.max() >= out.shape[1]):
        raise ValueError(
            f"Labels span {y.min()}-{y.max()} but the model has {out.shape[1]} outputs."
        )
    log_p = log_probabilities(out, True if ends_in_softmax(model) else None)
    y_pred = out.argmax(axis=1)
    result = {
        "loss": float(-log_p[np.arange(len(y)), y].mean()),
        "accuracy": float((y_pred == y).mean()),
        "n": int(len(y)),
        "split": split if not isinstance(data, tuple) else "given",
    }
    if return_predictions:
        result["y_pred"] = y_pred
    return result


def confusion_matrix(
    y_true, y_pred, num_classes: int | None = None, normalize: str | None = None
) -> np.ndarray:
    """Counts of (true class, predicted class) pairs.

    Args:
        y_true: integer labels.
        y_pred: predicted integer classes (same length).
        num_classes: matrix size (default: largest label + 1).
        normalize: ``None`` (counts), ``"true"`` (rows sum to 1), ``"pred"`` (columns) or
            ``"all"``.

    Returns:
        An array of shape ``(num_classes, num_classes)``; rows are true classes.

    Raises:
        ValueError: lengths differ, labels out of range, unknown ``normalize``.
    """
    t = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_pred).astype(np.int64).ravel()
    if t.size != p.size:
        raise ValueError(f"y_true has {t.size} labels and y_pred {p.size}; expected equal lengths.")
    if num_classes is None:
        num_classes = int(max(t.max(initial=-1), p.max(initial=-1)) + 1)
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(
            f"Labels span {min(t.min(), p.min())}-{max(t.max(), p.max())}, expected 0-"
            f"{num_classes - 1} for num_classes={num_classes}."
        )
    cm = np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )
    if normalize is None:
        return cm
    axes = {"true": 1, "pred": 0, "all": None}
    check_choice("normalize", normalize, (None, *axes))
    total = cm.sum(axis=axes[normalize], keepdims=axes[normalize] is not None)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, cm / np.maximum(total, 1), 0.0)


def time_to_accuracy(results: Iterable, target: float, metric: str = "val_accuracy") -> list[dict]:
    """When each run first reached ``target`` on ``metric`` (by epoch, seconds and steps).

    Args:
        results: :class:`bnutils.training.TrainResult` objects (or their ``to_dict()``).
        target: the accuracy to reach.
        metric: the history entry compared with ``target``.

    Returns:
        One row per run: ``run_name``, ``seed``, ``reached``, ``epoch`` (1-based), ``seconds``
        (training wall time up to the end of that epoch) and ``steps``; the last three are
        ``None`` when the run never reached the target.

    Raises:
        ValueError: a run has no ``metric`` in its history.
    """
    rows = []
    for r in results:
        history = field(r, "history") or {}
        if metric not in history:
            raise ValueError(
                f"Run {field(r, 'run_name')!r} has no {metric!r} in its history; it has "
                f"{sorted(history)}."
            )
        curve = nan_list(history[metric])
        times = np.cumsum([float(t) for t in (field(r, "epoch_times") or [])])
        per_epoch = field(r, "steps_per_epoch")
        epoch = next((i + 1 for i, v in enumerate(curve) if v >= target), None)
        rows.append(
            {
                "run_name": field(r, "run_name"),
                "seed": field(r, "seed"),
                "reached": epoch is not None,
                "epoch": epoch,
                "seconds": float(times[epoch - 1]) if epoch and len(times) >= epoch else None,
                "steps": int(epoch * per_epoch) if epoch and per_epoch else None,
            }
        )
    return rows
