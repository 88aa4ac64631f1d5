"""Check that a model's answer for one example does not depend on the batch around it.

At inference BN normalizes with its moving statistics; with ``training=True`` with the batch's,
so an answer changes with its batch (Dense -> BN maps a batch of one to ``beta``). Notebooks 07, A2.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bnutils._graph import find_batchnorm_layers
from bnutils._util import check_positive_int, model_outputs, preserved_state
from bnutils.results import Report

__all__ = ["BatchIndependenceReport", "check_batch_independence", "describe_bn_mode"]


@dataclasses.dataclass(frozen=True)
class BatchIndependenceReport(Report):
    """What :func:`check_batch_independence` measured: the largest change of an output between
    batch compositions, absolute and relative to ``output_scale`` (the outputs' std)."""

    max_abs_change: float
    max_rel_change: float
    batch_of_one_change: float
    n_examples: int
    independent: bool
    worst_index: int
    output_scale: float
    tolerance: float
    training: bool
    n_compositions: int

    def __str__(self) -> str:
        verdict = "do not depend" if self.independent else "DEPEND"
        return (
            f"Predictions (training={self.training}) {verdict} on the batch: over "
            f"{self.n_compositions} batch compositions of {self.n_examples} examples the largest "
            f"change is {self.max_abs_change:.3g} ({self.max_rel_change:.2%} of the output scale "
            f"{self.output_scale:.3g}; tolerance {self.tolerance:.0e}); a batch of one changes "
            f"outputs by {self.batch_of_one_change:.2%}; worst example: index {self.worst_index}."
        )


def check_batch_independence(
    model,
    x,
    training: bool = False,
    n_trials: int = 3,
    seed: int = 0,
    batch_size: int | None = None,
    tolerance: float = 1e-4,
) -> BatchIndependenceReport:
    """Predict every example of ``x`` inside different batches and compare the answers.

    ``model(x, training=training)`` on all of ``x`` is compared with ``n_trials`` seeded
    shufflings cut into batches of ``batch_size`` (``None``: ``max(2, len(x) // 4)``) and with
    each example alone; ``tolerance`` is the largest change relative to the outputs' spread
    still counted as independent (float32 round-off: ~1e-6). Variables are restored afterwards.

    Args:
        model: a Keras model (or any callable accepting ``training=``).
        x: inputs, first axis the examples (at least 2; a few dozen is plenty).
        training: the flag of every call (``True`` shows the training-mode pitfall).

    Raises:
        ValueError: fewer than two examples, or a bad ``n_trials`` / ``batch_size``.
    """
    x = np.asarray(x)
    n = len(x)
    if n < 2:
        raise ValueError(f"Expected at least 2 examples in `x` (first axis), received {n}.")
    check_positive_int("n_trials", n_trials, minimum=0)
    size = check_positive_int("batch_size", max(2, n // 4) if batch_size is None else batch_size)
    rng = np.random.default_rng(seed)
    with preserved_state(model):
        reference = model_outputs(model, x, training)
        changes = []  # per composition: the largest change of each example
        for _ in range(n_trials):
            order = rng.permutation(n)
            pred = model_outputs(model, x[order], training, size)[np.argsort(order)]
            changes.append(np.abs(pred - reference).max(axis=1))
        changes.append(np.abs(model_outputs(model, x, training, 1) - reference).max(axis=1))
    per_example = np.max(changes, axis=0)
    scale = float(np.nan_to_num(np.std(reference), posinf=0.0)) or 1.0  # 1.0: constant outputs
    max_abs = float(per_example.max())
    return BatchIndependenceReport(
        max_abs_change=max_abs,
        max_rel_change=max_abs / scale,
        batch_of_one_change=float(changes[-1].max()) / scale,
        n_examples=n,
        independent=bool(max_abs / scale <= tolerance),
        worst_index=int(per_example.argmax()),
        output_scale=scale,
        tolerance=float(tolerance),
        training=bool(training),
        n_compositions=n_trials + 1,
    )


def describe_bn_mode(model) -> str:
    """One line per BN layer (nested included): its ``trainable`` flag and the statistics it
    uses under ``training=True`` (a frozen BN runs in inference mode in Keras 3). Notebook 07."""
    rows = [
        f"{path:<32} trainable={str(bn.trainable):<5} under training=True uses "
        + ("batch statistics" if bn.trainable else "moving statistics (frozen)")
        for path, bn in find_batchnorm_layers(model)
    ]
    return "\n".join(rows) if rows else f"`{model.name}` has no BatchNormalization layer."
