"""Batch independence: BN in inference mode passes, training mode fails, nothing is changed."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from bnutils.inference import BatchIndependenceReport, check_batch_independence, describe_bn_mode

L = keras.layers


def _bn_cnn(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.Conv2D(4, 3, use_bias=False),
            L.BatchNormalization(),
            L.ReLU(),
            L.Flatten(),
            L.Dense(6, use_bias=False),
            L.BatchNormalization(),
            L.ReLU(),
            L.Dense(3),
        ]
    )
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.3, c))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))
    return model


def _x(n=12, seed=1):
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 1)).astype("float32")


def _values(model):
    return [np.array(v.numpy()) for v in model.variables]


def test_inference_mode_is_batch_independent():
    report = check_batch_independence(_bn_cnn(), _x())
    assert isinstance(report, BatchIndependenceReport)
    assert report.independent
    assert report.max_rel_change <= 1e-4
    assert report.batch_of_one_change <= 1e-4
    assert report.n_examples == 12
    assert report.n_compositions == 4
    assert "do not depend" in str(report)


def test_training_mode_depends_on_the_batch_and_weights_are_restored():
    model = _bn_cnn()
    before = _values(model)
    report = check_batch_independence(model, _x(), training=True, n_trials=2, batch_size=3)
    assert not report.independent
    assert report.max_rel_change > 0.01
    assert report.batch_of_one_change > 0.01
    assert 0 <= report.worst_index < 12
    assert "DEPEND" in str(report)
    for old, new in zip(before, _values(model), strict=True):
        np.testing.assert_array_equal(old, new)  # moving statistics were put back


def test_without_bn_training_mode_is_independent():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(3, 3), L.Flatten(), L.Dense(2)])
    assert check_batch_independence(model, _x(), training=True).independent


def test_dense_bn_batch_of_one_gives_the_same_answer_for_every_input():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), L.Dense(4), L.BatchNormalization()])
    x = np.random.default_rng(2).normal(size=(6, 5)).astype("float32")
    singles = np.stack([np.asarray(model(x[i : i + 1], training=True))[0] for i in range(6)])
    np.testing.assert_allclose(singles, np.zeros_like(singles), atol=1e-5)  # beta is 0
    report = check_batch_independence(model, x, training=True)
    assert report.batch_of_one_change > 0.5


def test_variables_are_restored_when_the_model_raises():
    class FailsOnOne(keras.Model):
        def __init__(self):
            super().__init__()
            self.bn = L.BatchNormalization()

        def call(self, x, training=False):
            if x.shape[0] == 1:
                raise RuntimeError("batch of one")
            return self.bn(x, training=training)

    model = FailsOnOne()
    x = np.random.default_rng(3).normal(2.0, 1.0, size=(6, 3)).astype("float32")
    model(x[:2])
    before = _values(model)
    with pytest.raises(RuntimeError, match="batch of one"):
        check_batch_independence(model, x, training=True)
    for old, new in zip(before, _values(model), strict=True):
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": np.zeros((1, 8, 8, 1), "float32")}, "at least 2 examples"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"n_trials": -1}, "n_trials"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    args = {"x": _x(4), **kwargs}
    with pytest.raises(ValueError, match=match):
        check_batch_independence(_bn_cnn(), **args)


def test_describe_bn_mode_reports_frozen_layers():
    model = _bn_cnn()
    model.layers[1].trainable = False
    text = describe_bn_mode(model)
    assert len(text.splitlines()) == 2
    assert "frozen" in text.splitlines()[0]
    assert "batch statistics" in text.splitlines()[1]
    plain = keras.Sequential([keras.Input((2,)), L.Dense(1)])
    assert "no BatchNormalization" in describe_bn_mode(plain)
