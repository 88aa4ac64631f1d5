"""bnutils.callbacks: trackers record the right tensors and leave the model alone."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from bnutils.callbacks import (
    ActivationPercentiles,
    MovingStatsTracker,
)

EPS = 1e-3  # keras.layers.BatchNormalization's default epsilon


@pytest.fixture(scope="module")
def xy():
    rng = np.random.default_rng(0)
    x = rng.normal(1.5, 2.0, size=(256, 8)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 3).astype("int32") + 2 * (x[:, 2] > 1.5)
    return x, y


def mlp(bn: bool, fused_sigmoid: bool = False, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = [
        keras.Input((8,)),
        keras.layers.Dense(6, name="d1", activation="sigmoid" if fused_sigmoid else None),
    ]
    if bn:
        layers.append(keras.layers.BatchNormalization(name="bn1"))
    if not fused_sigmoid:
        layers.append(keras.layers.Activation("sigmoid", name="act1"))
    layers.append(keras.layers.Dense(4, name="out"))
    model = keras.Sequential(layers)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def fit(model, xy, callbacks, epochs=1):
    x, y = xy
    model.fit(x, y, batch_size=32, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)


def pre_activation(model, x, training: bool) -> np.ndarray:
    """The sigmoid's input computed by hand from the weights."""
    kernel, bias = (w.numpy() for w in model.get_layer("d1").weights)
    h = x @ kernel + bias
    if "bn1" not in [lyr.name for lyr in model.layers]:
        return h
    bn = model.get_layer("bn1")
    if training:
        mean, var = h.mean(axis=0), h.var(axis=0)
    else:
        mean, var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    return bn.gamma.numpy() * (h - mean) / np.sqrt(var + EPS) + bn.beta.numpy()


@pytest.mark.parametrize(
    "bn, layer, tensor, training",
    [
        (True, "bn1", "output", True),
        (True, "bn1", "output", False),
        (True, "act1", "input", True),
        (False, "d1", "output", True),
    ],
)
def test_percentiles_track_the_sigmoid_input(xy, bn, layer, tensor, training):
    model = mlp(bn)
    x_fixed = xy[0][:100]
    tracker = ActivationPercentiles(
        layer, x_fixed, unit=3, every=1, tensor=tensor, training=training
    )
    fit(model, xy, [tracker])
    assert tracker.steps == list(range(9)) and tracker.as_array().shape == (9, 3)
    expected = np.percentile(pre_activation(model, x_fixed, training)[:, 3], [15, 50, 85])
    np.testing.assert_allclose(tracker.values[-1], expected, rtol=1e-4, atol=1e-5)
    assert np.all(np.diff(tracker.as_array(), axis=1) >= 0), "15th <= 50th <= 85th"


def test_percentile_probe_leaves_moving_statistics_alone(xy):
    model = mlp(bn=True)
    tracker = ActivationPercentiles("bn1", xy[0][:64], every=1000)
    fit(model, xy, [tracker])
    bn = model.get_layer("bn1")
    before = bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()
    tracker.record(999)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before[0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), before[1])
    assert not np.allclose(before[0], 0.0), "training did move the statistics"


def test_percentiles_refuse_a_fused_nonlinearity_and_unknown_layers(xy):
    with pytest.raises(ValueError, match="nonlinearity"):
        fit(mlp(bn=False, fused_sigmoid=True), xy, [ActivationPercentiles("d1", xy[0][:10])])
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        fit(mlp(bn=False), xy, [ActivationPercentiles("nope", xy[0][:10])])
    with pytest.raises(ValueError, match="out of range"):
        fit(mlp(bn=False), xy, [ActivationPercentiles("d1", xy[0][:10], unit=6)])


def test_moving_stats_tracker(xy):
    model = mlp(bn=True)
    tracker = MovingStatsTracker(every=2, channels=(0, 4, 99))
    fit(model, xy, [tracker])
    s = tracker.stats["bn1"]
    assert tracker.steps == [0, 2, 4, 6, 8] and len(s["mean"]) == 5
    assert s["mean"][0] == 0.0 and s["variance"][0] == 1.0  # Keras initial values
    bn = model.get_layer("bn1")
    assert s["mean"][-1] == pytest.approx(float(bn.moving_mean.numpy().mean()), abs=1e-6)
    np.testing.assert_allclose(
        s["variance_channels"][-1], bn.moving_variance.numpy()[[0, 4]], rtol=1e-6
    )
    restored = MovingStatsTracker(every=2, channels=(0, 4, 99))
    restored.load_dict(tracker.to_dict())
    assert restored.stats == tracker.stats and restored.steps == tracker.steps
    with pytest.raises(ValueError, match="no layer with moving_mean"):
        fit(mlp(bn=False), xy, [MovingStatsTracker()])
    with pytest.raises(ValueError, match="Cannot load"):
        restored.load_dict(ActivationPercentiles("d1", xy[0][:10]).to_dict())


def test_tracker_records_round_trip_through_json_and_settings_fingerprint(xy):
    import json

    model = mlp(bn=True)
    pct = ActivationPercentiles("bn1", xy[0][:50], every=4)
    moving = MovingStatsTracker(every=4)
    fit(model, xy, [pct, moving])
    for tracker, fresh in (
        (pct, ActivationPercentiles("bn1", xy[0][:50], every=4)),
        (moving, MovingStatsTracker(every=4)),
    ):
        saved = json.loads(json.dumps(tracker.to_dict()))
        fresh.load_dict(saved)
        assert fresh.to_dict() == tracker.to_dict() and fresh.steps == [0, 4, 8]
        assert fresh.fingerprint() == tracker.fingerprint()
    assert pct.to_dict()["percentiles"] == [15.0, 50.0, 85.0]
    other_batch = ActivationPercentiles("bn1", xy[0][50:100], every=4)
    assert other_batch.fingerprint() != pct.fingerprint(), "the fixed batch counts by digest"
    assert ActivationPercentiles("bn1", xy[0][:50], every=5).fingerprint() != pct.fingerprint()


def test_accuracy_tracker_measures_in_inference_mode(xy):
    from bnutils.callbacks import AccuracyTracker

    x, y = xy
    model = mlp(bn=True)
    tracker = AccuracyTracker({"train": (x[:200], y[:200]), "val": (x[200:], y[200:])}, every=4)
    fit(model, xy, [tracker], epochs=2)  # 8 steps an epoch: records at steps 0, 4, ..., 16
    assert tracker.steps == [0, 4, 8, 12, 16]
    for name, (xs, ys) in (("train", (x[:200], y[:200])), ("val", (x[200:], y[200:]))):
        assert len(tracker.accuracy[name]) == 5
        predicted = model.predict(xs, verbose=0).argmax(axis=-1)  # inference mode
        assert tracker.accuracy[name][-1] == pytest.approx((predicted == ys).mean())
    assert tracker.seconds[0] == 0 and np.all(np.diff(tracker.seconds) > 0)
    saved = tracker.to_dict()
    again = AccuracyTracker({"train": (x[:200], y[:200]), "val": (x[200:], y[200:])}, every=4)
    again.load_dict(saved)
    assert again.accuracy == tracker.accuracy and again.steps == tracker.steps
    assert again.seconds == tracker.seconds


@pytest.mark.parametrize(
    "sets, match",
    [
        ({}, "non-empty dict"),
        ({"val": np.zeros((4, 8))}, "must be a pair"),
        ({"val": (np.zeros((4, 8)), np.zeros(3, "int32"))}, "as many integer labels"),
        ({"val": (np.zeros((4, 8)), np.zeros(4, "float32"))}, "as many integer labels"),
    ],
)
def test_accuracy_tracker_refuses_bad_sets(sets, match):
    from bnutils.callbacks import AccuracyTracker

    with pytest.raises(ValueError, match=match):
        AccuracyTracker(sets)
