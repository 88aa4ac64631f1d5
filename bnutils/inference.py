"""Check that a model's answer for one example does not depend on the batch around it.

At inference a BN layer normalizes with the moving statistics learned in training, so each
example's prediction is a function of that example alone. Called in training mode
(``model(x, training=True)``) BN normalizes with the statistics of the current batch
instead: the same image gets a different answer in a different batch, and a batch of one
through a Dense layer is normalized to exactly ``beta``: the same output for every
input. :func:`check_batch_independence` measures exactly that.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["BatchIndependenceReport", "check_batch_independence", "describe_bn_mode"]


@dataclasses.dataclass(frozen=True)
class BatchIndependenceReport:
    """The result of :func:`check_batch_independence`.

    Attributes:
        max_abs_change: the largest absolute change of any output of any example between
            its prediction in the whole batch and in another batch composition.
        max_rel_change: ``max_abs_change`` divided by ``output_scale``.
        batch_of_one_change: the largest absolute change when each example is predicted
            alone (a batch of one), relative to ``output_scale``.
        n_examples: examples checked.
        independent: ``max_rel_change <= tolerance``.
        worst_index: the example (index into ``x``) with the largest change.
        output_scale: standard deviation of the reference outputs (1.0 if they are constant).
        tolerance: the relative tolerance used for ``independent``.
        training: the ``training`` flag the model was called with.
        n_compositions: batch compositions compared with the reference.
    """

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
            f"{self.n_compositions} batch compositions of {self.n_examples} examples the "
            f"largest change is {self.max_abs_change:.3g} ({self.max_rel_change:.2%} of the "
            f"output scale {self.output_scale:.3g}; tolerance {self.tolerance:.0e}); "
            f"a batch of one changes outputs by {self.batch_of_one_change:.2%}; "
            f"worst example: index {self.worst_index}."
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

    The reference is ``model(x, training=training)`` on all of ``x`` as one batch. It is
    compared with ``n_trials`` random shufflings of ``x`` cut into batches of
    ``batch_size``, and with every example alone (a batch of one). The model's variables
    are restored afterwards: in Keras 3 a call with ``training=True`` updates BN moving
    statistics, and a check must not change the model it checks.

    Args:
        model: a Keras model (or any callable accepting ``training=``).
        x: inputs, first axis the examples (at least 2; a few dozen is plenty).
        training: the flag passed to every call; ``True`` shows the training-mode pitfall.
        n_trials: random batch compositions besides the whole batch and batches of one.
        seed: seed of the shuffles.
        batch_size: size of the shuffled batches; ``None`` uses ``max(2, len(x) // 4)``.
        tolerance: the largest relative change (to the output scale) still counted as
            independent; float32 round-off across batch sizes is ~1e-6.

    Returns:
        A :class:`BatchIndependenceReport`.

    Raises:
        ValueError: fewer than two examples, or a bad ``n_trials`` / ``batch_size``.
    """
    x = np.asarray(x)
    n = len(x)
    if n < 2:
        raise ValueError(
            f"Expected at least 2 examples in `x` to compare batch compositions, received {n}."
        )
    if isinstance(n_trials, bool) or not isinstance(n_trials, (int, np.integer)) or n_trials < 0:
        raise ValueError(f"n_trials must be a non-negative integer, received {n_trials!r}.")
    if batch_size is None:
        batch_size = max(2, n // 4)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"batch_size must be a positive integer or None, received {batch_size!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, received {batch_size!r}.")

    saved = _snapshot(model)
    try:
        reference = _predict(model, x, training)
        rng = np.random.default_rng(seed)
        changes = []  # per composition: (n,) largest absolute change per example
        for _ in range(n_trials):
            order = rng.permutation(n)
            pred = np.empty_like(reference)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                pred[idx] = _predict(model, x[idx], training)
            changes.append(np.abs(pred - reference).max(axis=1))
        single = np.concatenate([_predict(model, x[i : i + 1], training) for i in range(n)])
        one_change = np.abs(single - reference).max(axis=1)
        changes.append(one_change)
    finally:
        _restore(saved)

    per_example = np.max(changes, axis=0)
    scale = float(np.std(reference))
    scale = scale if scale > 0 and np.isfinite(scale) else 1.0
    max_abs = float(per_example.max())
    return BatchIndependenceReport(
        max_abs_change=max_abs,
        max_rel_change=max_abs / scale,
        batch_of_one_change=float(one_change.max()) / scale,
        n_examples=n,
        independent=bool(max_abs / scale <= tolerance),
        worst_index=int(per_example.argmax()),
        output_scale=scale,
        tolerance=float(tolerance),
        training=bool(training),
        n_compositions=n_trials + 1,
    )


def describe_bn_mode(model) -> str:
    """A table of the model's BN layers: trainable flag and the mode a call will use.

    In Keras 3 a BN layer with ``trainable=False`` runs in inference mode even when the
    model is called with ``training=True`` (the fine-tuning rule).

    Args:
        model: a Keras model.

    Returns:
        One line per BN layer (nested models included), or a line saying there is none.
    """
    import keras

    rows = []
    for layer in _walk_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            mode = "batch statistics" if layer.trainable else "moving statistics (frozen)"
            rows.append(
                f"{layer.name:<32} trainable={str(layer.trainable):<5} "
                f"under training=True uses {mode}"
            )
    return "\n".join(rows) if rows else f"`{model.name}` has no BatchNormalization layer."


def _walk_layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _walk_layers(layer)


def _predict(model, x: np.ndarray, training: bool) -> np.ndarray:
    """Outputs as a 2-D float64 array (examples, all output values flattened)."""
    import keras

    outputs = keras.tree.flatten(model(x, training=training))
    arrays = [np.asarray(keras.ops.convert_to_numpy(o), dtype=np.float64) for o in outputs]
    return np.concatenate([a.reshape(len(x), -1) for a in arrays], axis=1)


def _snapshot(model) -> list[tuple[object, np.ndarray]]:
    variables = list(getattr(model, "variables", []))
    return [(v, np.array(v.numpy())) for v in variables]


def _restore(saved) -> None:
    for variable, value in saved:
        variable.assign(value)
