"""bnutils.evaluation: evaluate, confusion matrices, time to accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from bnutils.evaluation import confusion_matrix, evaluate, time_to_accuracy


def test_confusion_matrix_by_hand():
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], num_classes=3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    rows = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3, normalize="true")
    np.testing.assert_allclose(rows, [[0.5, 0.5, 0], [0, 1, 0], [1 / 3, 0, 2 / 3]])
    with pytest.raises(ValueError, match="expected 0-1"):
        confusion_matrix([0, 2], [0, 1], num_classes=2)
    with pytest.raises(ValueError, match="equal lengths"):
        confusion_matrix([0, 1], [0])
    with pytest.raises(ValueError, match="normalize"):
        confusion_matrix([0, 1], [0, 1], normalize="rows")


def test_evaluate_reads_logits_and_probabilities_alike():
    import keras

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)).astype("float32")
    y = rng.integers(0, 3, size=50)
    w, b = rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=3).astype("float32")
    logits = x @ w + b
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    want_loss = -log_p[np.arange(50), y].mean()
    want_acc = (logits.argmax(axis=1) == y).mean()
    for activation in (None, "softmax"):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation=activation)])
        model.set_weights([w, b])
        r = evaluate(model, (x, y), return_predictions=True)
        assert r["n"] == 50 and r["accuracy"] == pytest.approx(want_acc)
        assert r["loss"] == pytest.approx(want_loss, rel=1e-5)
        np.testing.assert_array_equal(r["y_pred"], logits.argmax(axis=1))


def _run(name, seed, val_acc, times, spe=10):
    return {
        "run_name": name,
        "seed": seed,
        "history": {"val_accuracy": val_acc},
        "epoch_times": times,
        "steps_per_epoch": spe,
    }


def test_time_to_accuracy():
    rows = time_to_accuracy(
        [
            _run("bn", 0, [0.5, 0.8, 0.9], [2.0, 1.0, 1.0]),
            _run("bn", 1, [0.5, 0.6, None], [2.0, 1.5, 1.0]),
        ],
        target=0.8,
    )
    assert rows[0] == {
        "run_name": "bn",
        "seed": 0,
        "reached": True,
        "epoch": 2,
        "seconds": 3.0,
        "steps": 20,
    }
    assert rows[1]["reached"] is False and rows[1]["epoch"] is None
    with pytest.raises(ValueError, match="no 'val_loss'"):
        time_to_accuracy([_run("bn", 0, [0.5], [1.0])], 0.5, metric="val_loss")
