"""Figures of the suite: learning curves over seeds, Figure-1 percentiles, bars with CIs.

Every figure is saved through :func:`save` (``figures/<name>.png``, like handson-ml3's
``save_fig``). Each ``plot_*`` function returns a Matplotlib ``Figure``, closed in pyplot so that
a notebook shows it once (make the call the last line of a cell, or ``display(fig)``); with
``name=`` it is saved first. Nothing calls ``plt.show()``, so all of it works headless (Agg).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnutils import config
from bnutils._util import field, nan_list
from bnutils.evaluation import confusion_matrix
from bnutils.stats import Summary, summarize

__all__ = [
    "plot_comparison",
    "plot_confusion_matrix",
    "plot_learning_curves",
    "plot_moving_stats",
    "plot_percentiles",
    "save",
]

_LABELS = {
    "val_accuracy": "validation accuracy",
    "val_loss": "validation loss",
    "train_accuracy": "training accuracy",
    "train_loss": "training loss",
    "accuracy": "training accuracy",
    "loss": "training loss",
}


def save(fig, name: str, dpi: int = 100, directory: str | os.PathLike | None = None) -> Path:
    """Save ``fig`` as ``<directory>/<name>.png``; every figure of the suite goes through here.

    Args:
        fig: a Matplotlib figure.
        name: file stem, e.g. ``"04_fig1_percentiles"``.
        dpi: resolution.
        directory: default :func:`bnutils.config.figures_dir` (``figures/quick/`` when quick).

    Returns:
        The path of the PNG.

    Raises:
        ValueError: ``name`` is not a plain file stem.
    """
    if not isinstance(name, str) or not name or Path(name).name != name or "." in name:
        raise ValueError(f"Expected a file stem such as '05_test_accuracy', received {name!r}.")
    folder = Path(directory) if directory is not None else config.figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=dpi)
    return path


def _subplots(ncols: int = 1, width: float = 5.0, height: float = 3.6, **kwargs):
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False, **kwargs)[1][0]


def _finish(axes, name: str | None, title: str | None = None):
    import matplotlib.pyplot as plt

    fig = axes[0].figure
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if name is not None:
        save(fig, name)
    plt.close(fig)  # returned, not auto-shown: the notebook displays it once
    return fig


def _curve(run, metric: str) -> np.ndarray:
    """``metric`` of a TrainResult, its ``to_dict()`` or a Keras ``History`` (``train_loss`` is
    Keras's ``loss``)."""
    history = field(run, "history") or {}
    for key in (metric, metric.removeprefix("train_")):
        values = field(run, key)
        values = history.get(key) if values is None else values
        if values is not None:
            return np.asarray(nan_list(values), dtype=float)
    raise ValueError(
        f"Run {field(run, 'run_name')!r} has no curve {metric!r}; use one of train_loss, "
        f"train_accuracy, val_loss, val_accuracy or a history key ({sorted(history)})."
    )


def _stack(curves: Sequence[np.ndarray]) -> np.ndarray:
    """Curves of different lengths (diverged runs stop early) padded with NaN."""
    out = np.full((len(curves), max(len(c) for c in curves)), np.nan)
    for i, c in enumerate(curves):
        out[i, : len(c)] = c
    return out


def _group(runs) -> dict[str, list]:
    if isinstance(runs, Mapping):
        return {str(k): list(v) if isinstance(v, (list, tuple)) else [v] for k, v in runs.items()}
    groups: dict[str, list] = {}
    for r in runs:
        groups.setdefault(str(field(r, "run_name")), []).append(r)
    return groups


def plot_learning_curves(
    runs: Mapping[str, Any] | Sequence[Any],
    metrics: str | Sequence[str] = ("val_accuracy", "train_loss"),
    name: str | None = None,
    title: str | None = None,
):
    """Mean curve per epoch and a +-1 standard deviation band over seeds, per configuration.

    Args:
        runs: ``{label: [run, ...]}`` (one run per seed; a single run is fine), or a flat list
            of runs grouped by ``run_name``. A run is a :class:`bnutils.training.TrainResult`,
            its ``to_dict()``, or the Keras ``History`` that ``model.fit`` returns.
        metrics: one subplot per metric (``val_accuracy``, ``train_loss``...).
        name: save the figure through :func:`save` under this name.
        title: figure title.

    Raises:
        ValueError: no runs, or a run without one of the metrics.
    """
    from matplotlib.ticker import MaxNLocator

    groups = _group(runs)
    if not groups or not any(groups.values()):
        raise ValueError("plot_learning_curves needs at least one run, received none.")
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    axes = _subplots(ncols=len(metrics))
    for ax, metric in zip(axes, metrics, strict=True):
        for label, group in groups.items():
            curves = _stack([_curve(r, metric) for r in group])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
                mean, std = np.nanmean(curves, axis=0), np.nanstd(curves, axis=0)
            xs = np.arange(1, curves.shape[1] + 1)
            marker = "o" if len(xs) < 15 else None
            (line,) = ax.plot(xs, mean, marker=marker, ms=3, label=f"{label} (n={len(group)})")
            if len(group) > 1:
                ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
        ax.set(xlabel="epoch", ylabel=_LABELS.get(metric, metric))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no fractional epochs
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return _finish(axes, name, title)


def _percentile_rows(tracker) -> tuple[np.ndarray, np.ndarray, list]:
    steps, values, pct = (field(tracker, k) for k in ("steps", "values", "percentiles"))
    return np.asarray(steps), np.asarray(values, dtype=float).reshape(-1, len(pct)), list(pct)


def plot_percentiles(
    trackers: Mapping[str, Any], name: str | None = None, title: str | None = None
):
    """Ioffe & Szegedy Figure 1(b, c): percentiles of a sigmoid's input over training.

    Args:
        trackers: ``{label: ActivationPercentiles}`` (or its ``to_dict()``), e.g.
            ``{"without BN": t0, "with BN": t1}``; one panel each, sharing the y axis.
        name: save the figure through :func:`save` under this name.
        title: figure title.
    """
    if not trackers:
        raise ValueError("plot_percentiles needs at least one tracker, received none.")
    axes = _subplots(ncols=len(trackers), width=4.5, sharey=True)
    for ax, (label, tracker) in zip(axes, trackers.items(), strict=True):
        steps, values, pct = _percentile_rows(tracker)
        for j, p in enumerate(pct):
            style = "-" if p == 50 else "--"
            ax.plot(steps, values[:, j], label=f"{p:g}th percentile", linestyle=style)
        ax.set(title=label, xlabel="training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("sigmoid input")
    axes[0].legend(fontsize="small")
    return _finish(axes, name, title)


def plot_comparison(
    groups: Mapping[str, Sequence[float] | Summary],
    ylabel: str = "test accuracy",
    name: str | None = None,
    title: str | None = None,
):
    """Bars of the mean per configuration, 95% t-interval error bars, and the values as dots.

    Args:
        groups: ``{label: values over seeds}`` or ``{label: Summary}`` (any confidence).
        ylabel: what the values are.
        name: save the figure through :func:`save` under this name.
        title: figure title (default: the interval's level).
    """
    if not groups:
        raise ValueError("plot_comparison needs at least one group, received none.")
    labels = list(groups)
    summaries = [g if isinstance(g, Summary) else summarize(g) for g in groups.values()]
    means = np.array([s.mean for s in summaries])
    err = np.array([0.0 if math.isnan(s.half_width) else s.half_width for s in summaries])
    axes = _subplots(width=max(4.0, 1.2 * len(labels) + 2))
    ax, pos = axes[0], np.arange(len(labels))
    ax.bar(pos, means, yerr=err, capsize=6, color=[f"C{i}" for i in pos], alpha=0.7)
    lows = list(means - err)
    for i, g in enumerate(groups.values()):
        if not isinstance(g, Summary):
            vals = np.asarray(list(g), dtype=float)
            jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(1)
            ax.scatter(pos[i] + jitter, vals, color="k", s=12, zorder=3)
            lows.extend(vals[np.isfinite(vals)])
    ax.set_xticks(pos, labels, rotation=20 if len(labels) > 3 else 0)
    lo, hi = float(np.nanmin(lows)), float(np.nanmax(means + err))
    pad = max(hi - lo, 1e-3) * 0.5  # zoomed on the data, not from 0
    ax.set(ylabel=ylabel, ylim=(lo - pad, hi + pad * 0.5))
    ax.set_title(title or f"mean and {summaries[0].confidence:.0%} CI")
    ax.grid(axis="y", alpha=0.3)
    return _finish(axes, name)


def plot_confusion_matrix(
    cm_or_labels,
    y_pred=None,
    class_names: Sequence[str] | None = None,
    normalize: bool = True,
    name: str | None = None,
    title: str | None = None,
):
    """A confusion matrix as a heat map (rows: true class, columns: predicted).

    Args:
        cm_or_labels: a square count matrix, or the true labels (then pass ``y_pred``).
        y_pred: predicted classes, when ``cm_or_labels`` holds the true labels.
        class_names: tick labels.
        normalize: show row fractions (recall per class) instead of counts.
        name: save the figure through :func:`save` under this name.
        title: figure title.
    """
    if y_pred is None:
        cm = np.asarray(cm_or_labels)
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
            raise ValueError(f"Expected a square confusion matrix, received shape {cm.shape}.")
    else:
        n = len(class_names) if class_names is not None else None
        cm = confusion_matrix(cm_or_labels, y_pred, num_classes=n)
    k, rows = cm.shape[0], cm.sum(axis=1, keepdims=True)
    shown = np.where(rows > 0, cm / np.maximum(rows, 1), 0.0) if normalize else cm
    axes = _subplots(width=0.55 * k + 2.5, height=0.5 * k + 1.8)
    ax = axes[0]
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set(xlabel="predicted", ylabel="true")
    top = shown.max() if shown.size else 1
    for (i, j), v in np.ndenumerate(shown):
        color = "white" if v > 0.6 * top else "black"
        text = f"{v:.2f}" if normalize else str(int(v))
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    ax.figure.colorbar(im, ax=ax, fraction=0.046)
    return _finish(axes, name, title)


def plot_moving_stats(tracker, name: str | None = None, title: str | None = None):
    """The BN layers' moving mean and variance (averaged over channels) over training.

    Args:
        tracker: a :class:`bnutils.callbacks.MovingStatsTracker` (or its ``to_dict()``).
        name: save the figure through :func:`save` under this name.
        title: figure title.
    """
    steps, stats = field(tracker, "steps"), field(tracker, "stats")
    if not stats:
        raise ValueError("The tracker recorded nothing; train with it as a callback first.")
    axes = _subplots(ncols=2)
    for layer, s in stats.items():
        axes[0].plot(steps, s["mean"], label=layer)
        axes[1].plot(steps, s["variance"], label=layer)
    for ax, what in zip(axes, ("moving mean", "moving variance"), strict=True):
        ax.set(xlabel="training step", ylabel=f"{what} (mean over channels)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return _finish(axes, name, title)
