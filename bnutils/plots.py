"""Figures of the suite: learning curves over seeds, Figure-1 percentiles, bars with CIs.

Every function returns a Matplotlib ``Figure`` and, given ``path=``, saves it as a PNG
(100 dpi). The figure is closed in pyplot before it is returned, so a notebook shows it exactly
once: make the call the last line of a cell (or ``display(fig)``). Nothing here calls
``plt.show()``, so the functions work headless (Agg) as well.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnutils.evaluation import Summary, confusion_matrix, summarize

__all__ = [
    "plot_comparison",
    "plot_confusion_matrix",
    "plot_gradient_norms",
    "plot_learning_curves",
    "plot_moving_stats",
    "plot_percentiles",
]

_LABELS = {
    "val_accuracy": "validation accuracy",
    "val_loss": "validation loss",
    "train_accuracy": "training accuracy",
    "train_loss": "training loss",
    "accuracy": "training accuracy",
    "loss": "training loss",
}


def _subplots(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6,
              **kwargs):
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                        **kwargs)


def _finish(fig, path: str | os.PathLike | None, title: str | None = None):
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    plt.close(fig)  # returned, not auto-shown: the notebook displays it once
    return fig


def _get(run, name: str):
    return run.get(name) if isinstance(run, Mapping) else getattr(run, name, None)


def _curve(run, metric: str) -> np.ndarray:
    values = _get(run, metric)
    if values is None:
        values = (_get(run, "history") or {}).get(metric)
    if values is None:
        raise ValueError(
            f"Run {_get(run, 'run_name')!r} has no curve {metric!r}; use one of "
            f"train_loss, train_accuracy, val_loss, val_accuracy or a history key."
        )
    return np.asarray([math.nan if v is None else v for v in values], dtype=float)


def _stack(curves: Sequence[np.ndarray]) -> np.ndarray:
    """Curves of different lengths (diverged runs stop early) padded with NaN."""
    n = max(len(c) for c in curves)
    out = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        out[i, : len(c)] = c
    return out


def _group(runs) -> dict[str, list]:
    if isinstance(runs, Mapping):
        return {str(k): list(v) if isinstance(v, (list, tuple)) else [v] for k, v in runs.items()}
    groups: dict[str, list] = {}
    for r in runs:
        groups.setdefault(str(_get(r, "run_name")), []).append(r)
    return groups


def _x_axis(group: list, x: str, n: int) -> tuple[np.ndarray, str]:
    epochs = np.arange(1, n + 1)
    if x == "epoch":
        return epochs, "epoch"
    if x == "steps":
        spe = _get(group[0], "steps_per_epoch") or 1
        return epochs * spe, "optimizer steps"
    if x == "seconds":
        times = _stack([np.cumsum(_get(r, "epoch_times") or []) for r in group])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
            return np.nanmean(times, axis=0)[:n], "wall time (s)"
    raise ValueError(f"x must be 'epoch', 'steps' or 'seconds', received {x!r}.")


def plot_learning_curves(runs: Mapping[str, Sequence[Any]] | Sequence[Any],
                         metrics: str | Sequence[str] = ("val_accuracy", "train_loss"),
                         x: str = "epoch", path: str | os.PathLike | None = None,
                         title: str | None = None, log_loss: bool = False):
    """Mean curve and a +-1 standard deviation band over seeds, for several configurations.

    Args:
        runs: ``{label: [TrainResult, ...]}`` (one result per seed), or a flat list of
            results grouped by ``run_name``. ``to_dict()`` dicts work too.
        metrics: one subplot per metric (``val_accuracy``, ``train_loss``...).
        x: ``"epoch"``, ``"steps"`` or ``"seconds"`` (mean cumulative epoch time).
        path: save the figure here as PNG.
        title: figure title.
        log_loss: log scale for loss panels.

    Returns:
        The ``Figure``.

    Raises:
        ValueError: no runs, an unknown metric or x axis.
    """
    groups = _group(runs)
    if not groups or not any(groups.values()):
        raise ValueError("plot_learning_curves needs at least one run, received none.")
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    fig, axes = _subplots(ncols=len(metrics))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for label, group in groups.items():
            curves = _stack([_curve(r, metric) for r in group])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
                mean = np.nanmean(curves, axis=0)
                std = np.nanstd(curves, axis=0) if len(group) > 1 else np.zeros_like(mean)
            xs, xlabel = _x_axis(group, x, curves.shape[1])
            (line,) = ax.plot(xs, mean, marker="o" if len(xs) < 15 else None, ms=3,
                              label=f"{label} (n={len(group)})")
            if len(group) > 1:
                ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2,
                                linewidth=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_LABELS.get(metric, metric))
        if log_loss and "loss" in metric:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    return _finish(fig, path, title)


def _percentile_rows(tracker) -> tuple[np.ndarray, np.ndarray, list]:
    if isinstance(tracker, Mapping):
        steps, values, pct = tracker["steps"], tracker["values"], tracker["percentiles"]
    else:
        steps, values, pct = tracker.steps, tracker.values, tracker.percentiles
    values = np.asarray(values, dtype=float).reshape(-1, len(pct))
    return np.asarray(steps), values, list(pct)


def plot_percentiles(trackers: Mapping[str, Any], path: str | os.PathLike | None = None,
                     title: str | None = None, sharey: bool = True):
    """Ioffe & Szegedy Figure 1(b, c): percentiles of a sigmoid's input over training.

    Args:
        trackers: ``{label: ActivationPercentiles}`` (or its ``to_dict()``), e.g.
            ``{"without BN": t0, "with BN": t1}``; one panel each, side by side.
        path: save the figure here as PNG.
        title: figure title.
        sharey: the panels share the y axis (the comparison the figure makes).

    Returns:
        The ``Figure``.
    """
    if not trackers:
        raise ValueError("plot_percentiles needs at least one tracker, received none.")
    fig, axes = _subplots(ncols=len(trackers), width=4.5, sharey=sharey)
    for ax, (label, tracker) in zip(axes[0], trackers.items(), strict=True):
        steps, values, pct = _percentile_rows(tracker)
        for j, p in enumerate(pct):
            ax.plot(steps, values[:, j], label=f"{p:g}th percentile",
                    linestyle="-" if p == 50 else "--")
        ax.set_title(label)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("sigmoid input")
    axes[0][0].legend(fontsize="small")
    return _finish(fig, path, title)


def plot_comparison(groups: Mapping[str, Sequence[float] | Summary], ylabel: str = "test accuracy",
                    path: str | os.PathLike | None = None, title: str | None = None,
                    confidence: float = 0.95, show_points: bool = True,
                    zoom: bool = True):
    """Bars of the mean per configuration with confidence-interval error bars.

    Args:
        groups: ``{label: values over seeds}`` or ``{label: Summary}``.
        ylabel: what the values are.
        path: save the figure here as PNG.
        title: figure title.
        confidence: level of the error bars (for raw values).
        show_points: overlay the individual values.
        zoom: start the y axis near the data instead of at 0.

    Returns:
        The ``Figure``.
    """
    if not groups:
        raise ValueError("plot_comparison needs at least one group, received none.")
    labels = list(groups)
    summaries = [g if isinstance(g, Summary) else summarize(g, confidence=confidence)
                 for g in groups.values()]
    means = np.array([s.mean for s in summaries])
    err = np.array([0.0 if math.isnan(s.half_width) else s.half_width for s in summaries])
    fig, axes = _subplots(width=max(4.0, 1.2 * len(labels) + 2))
    ax = axes[0][0]
    pos = np.arange(len(labels))
    ax.bar(pos, means, yerr=err, capsize=6, color=[f"C{i}" for i in pos], alpha=0.7)
    lows = list(means - err)
    if show_points:
        for i, g in enumerate(groups.values()):
            if not isinstance(g, Summary):
                vals = np.asarray(list(g), dtype=float)
                jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else [0.0]
                ax.scatter(pos[i] + np.asarray(jitter), vals, color="k", s=12, zorder=3)
                lows.extend(vals[np.isfinite(vals)])
    ax.set_xticks(pos, labels, rotation=20 if len(labels) > 3 else 0)
    ax.set_ylabel(ylabel)
    if zoom:
        lo, hi = float(np.nanmin(lows)), float(np.nanmax(means + err))
        pad = max(hi - lo, 1e-3) * 0.5
        ax.set_ylim(lo - pad, hi + pad * 0.5)
    conf = summaries[0].confidence
    ax.set_title(title or f"mean and {conf:.0%} CI")
    ax.grid(axis="y", alpha=0.3)
    return _finish(fig, path, None)


def plot_confusion_matrix(cm_or_labels, y_pred=None, class_names: Sequence[str] | None = None,
                          normalize: bool = True, path: str | os.PathLike | None = None,
                          title: str | None = None):
    """A confusion matrix as a heat map (rows: true class, columns: predicted).

    Args:
        cm_or_labels: a square count matrix, or the true labels (then pass ``y_pred``).
        y_pred: predicted classes, when ``cm_or_labels`` holds the true labels.
        class_names: tick labels.
        normalize: show row fractions (recall per class) instead of counts.
        path: save the figure here as PNG.
        title: figure title.

    Returns:
        The ``Figure``.
    """
    if y_pred is None:
        cm = np.asarray(cm_or_labels)
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
            raise ValueError(f"Expected a square confusion matrix, received shape {cm.shape}.")
    else:
        n = len(class_names) if class_names is not None else None
        cm = confusion_matrix(cm_or_labels, y_pred, num_classes=n)
    k = cm.shape[0]
    shown = cm
    if normalize:
        rows = cm.sum(axis=1, keepdims=True)
        shown = np.where(rows > 0, cm / np.maximum(rows, 1), 0.0)
    fig, axes = _subplots(width=0.55 * k + 2.5, height=0.5 * k + 1.8)
    ax = axes[0][0]
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = shown.max() if shown.size else 1
    for i in range(k):
        for j in range(k):
            text = f"{shown[i, j]:.2f}" if normalize else str(int(shown[i, j]))
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if shown[i, j] > 0.6 * top else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _finish(fig, path, title)


def plot_moving_stats(tracker, path: str | os.PathLike | None = None, title: str | None = None):
    """The BN layers' moving mean and variance (averaged over channels) over training.

    Args:
        tracker: a :class:`bnutils.callbacks.MovingStatsTracker` (or its ``to_dict()``).
        path: save the figure here as PNG.
        title: figure title.
    """
    steps = _get(tracker, "steps")
    stats = _get(tracker, "stats")
    if not stats:
        raise ValueError("The tracker recorded nothing; train with it as a callback first.")
    fig, axes = _subplots(ncols=2)
    for layer, s in stats.items():
        axes[0][0].plot(steps, s["mean"], label=layer)
        axes[0][1].plot(steps, s["variance"], label=layer)
    for ax, what in zip(axes[0], ("moving mean", "moving variance"), strict=True):
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{what} (mean over channels)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    return _finish(fig, path, title)


def plot_gradient_norms(trackers: Mapping[str, Any], path: str | os.PathLike | None = None,
                        title: str | None = None, layers: Sequence[str] | None = None):
    """Per-layer gradient norms over training, one panel per tracker (log scale).

    Args:
        trackers: ``{label: GradientNormTracker}`` (or its ``to_dict()``).
        path: save the figure here as PNG.
        title: figure title.
        layers: the layers to draw (default: all, and ``total``).
    """
    if not trackers:
        raise ValueError("plot_gradient_norms needs at least one tracker, received none.")
    fig, axes = _subplots(ncols=len(trackers), width=4.5, sharey=True)
    for ax, (label, tracker) in zip(axes[0], trackers.items(), strict=True):
        steps, norms = _get(tracker, "steps"), _get(tracker, "norms")
        for layer, values in norms.items():
            if layers is None or layer in layers:
                ax.plot(steps, values, label=layer, linewidth=2 if layer == "total" else 1)
        ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gradient norm")
    axes[0][0].legend(fontsize="x-small")
    return _finish(fig, path, title)
