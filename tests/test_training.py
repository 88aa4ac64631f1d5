"""bnutils.training: determinism, the result cache, divergence, targets, saved models."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest

from bnutils.callbacks import MovingStatsTracker
from bnutils.data import load_dataset
from bnutils.training import TrainResult, _fingerprint, load_result, resolve_verbose, train


@pytest.fixture(scope="module")
def data():
    """512 training and 256 validation images of the real Fashion-MNIST."""
    return load_dataset("fashion_mnist").subset(512, 256, 256)


def build_mlp(bn: bool = False, activation: str = "relu") -> keras.Model:
    layers = [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(32, name="d1")]
    if bn:
        layers.append(keras.layers.BatchNormalization(name="bn1"))
    layers += [keras.layers.Activation(activation), keras.layers.Dense(10, name="out")]
    return keras.Sequential(layers, name="mlp_bn" if bn else "mlp")


class BatchCounter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


def test_same_seed_same_numbers(data, tmp_path):
    a = train(build_mlp, data, epochs=2, batch_size=64, seed=3, results_dir=tmp_path / "a")
    b = train(build_mlp, data, epochs=2, batch_size=64, seed=3, results_dir=tmp_path / "b")
    c = train(build_mlp, data, epochs=2, batch_size=64, seed=4, results_dir=tmp_path / "c")
    assert not a.from_cache and not b.from_cache
    assert set(a.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for k in a.history:
        np.testing.assert_allclose(a.history[k], b.history[k], rtol=0, atol=1e-6)
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=0, atol=1e-6)
    assert a.history["loss"] != c.history["loss"], "another seed should give other numbers"


def test_second_call_comes_from_cache_and_trains_nothing(data):
    counter = BatchCounter()
    first = train(build_mlp, data, epochs=2, batch_size=64, callbacks=[counter])
    trained = counter.batches
    assert trained == 2 * math.ceil(512 / 64) == first.steps
    assert not first.from_cache and first.model is not None

    again = train(build_mlp, data, epochs=2, batch_size=64, callbacks=[counter])
    assert again.from_cache and again.model is None
    assert counter.batches == trained, "the cached call must not train"
    assert again.history == first.history and again.key == first.key
    assert again.path == first.path

    forced = train(build_mlp, data, epochs=2, batch_size=64, callbacks=[counter], force=True)
    assert not forced.from_cache and counter.batches == 2 * trained


def test_key_changes_with_what_changes_the_run(data, tmp_path):
    base = train(build_mlp, data, epochs=1, batch_size=64, results_dir=tmp_path)
    other_lr = train(build_mlp, data, epochs=1, batch_size=64, lr=0.01, results_dir=tmp_path)
    other_cfg = train(build_mlp, data, epochs=1, batch_size=64, config={"note": "x"},
                      results_dir=tmp_path)
    smaller = train(build_mlp, data.subset(256, 256, 256), epochs=1, batch_size=64,
                    results_dir=tmp_path)
    keys = {base.key, other_lr.key, other_cfg.key, smaller.key}
    assert len(keys) == 4 and not any(r.from_cache for r in (other_lr, other_cfg, smaller))
    assert len(list(tmp_path.glob("*.json"))) == 4
    assert base.config["user"] == {} and other_cfg.config["user"] == {"note": "x"}


def test_builder_fingerprint_sees_arguments_closures_and_globals():
    def closure(flag):
        return lambda: build_mlp(bn=flag)

    assert _fingerprint(lambda: build_mlp(bn=True)) != _fingerprint(lambda: build_mlp(bn=False))
    assert _fingerprint(closure(True)) != _fingerprint(closure(False))
    assert _fingerprint(closure(True)) == _fingerprint(closure(True))
    import functools

    assert _fingerprint(functools.partial(build_mlp, bn=True)) != _fingerprint(
        functools.partial(build_mlp, bn=False))
    g = {"build_mlp": build_mlp, "BN": True}
    f_true = eval("lambda: build_mlp(bn=BN)", g)
    fp_true = _fingerprint(f_true)
    g["BN"] = False
    assert _fingerprint(f_true) != fp_true, "a global flag read by the builder counts"


def test_model_instance_fingerprint_ignores_generated_names_not_weights():
    def unnamed():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])

    keras.utils.set_random_seed(1)
    first = unnamed()
    keras.utils.set_random_seed(1)
    second = unnamed()  # same weights, but layers named dense_<n+2>, ...
    assert first.layers[0].name != second.layers[0].name
    assert _fingerprint(first) == _fingerprint(second)
    second.layers[0].kernel.assign(second.layers[0].kernel + 1.0)
    assert _fingerprint(first) != _fingerprint(second)


def test_divergence_is_recorded_not_raised(data, capsys):
    def deep_relu():
        return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                 keras.layers.Dense(32, activation="relu"),
                                 keras.layers.Dense(32, activation="relu"),
                                 keras.layers.Dense(10)])

    result = train(deep_relu, data, epochs=3, batch_size=64, optimizer="sgd", lr=1e6)
    assert result.diverged
    assert "diverged" in capsys.readouterr().out
    assert result.epochs_run < 3 or not math.isfinite(result.train_loss[-1])
    assert not math.isfinite(result.train_loss[-1])
    saved = json.loads(open(result.path).read())  # strict JSON: NaN written as null
    assert saved["diverged"] is True and saved["train_loss"][-1] is None
    loaded = load_result(result.path)
    assert loaded.diverged and math.isnan(loaded.train_loss[-1])
    assert "learning rate" in loaded.divergence_message


def test_result_round_trip_and_configuration(data):
    r = train(lambda: build_mlp(bn=True), data, epochs=1, batch_size=128, optimizer="momentum",
              lr=0.05, run_name="BN MLP", seed=7)
    again = TrainResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r
    cfg = r.config
    assert r.key.startswith("bn-mlp-") and r.run_name == "bn-mlp"
    assert cfg["model_name"] == "mlp_bn" and cfg["params"] == r.model.count_params()
    assert cfg["optimizer"] == "SGD" and cfg["optimizer_config"]["momentum"] == pytest.approx(0.9)
    assert cfg["lr"] == pytest.approx(0.05)
    assert cfg["dataset"] == {"name": "fashion_mnist", "scale": "unit", "train_size": 512,
                              "val_size": 256}
    assert cfg["profile"] == "quick" and r.seed == 7
    assert r.steps == r.steps_per_epoch == 4 and len(r.epoch_times) == 1
    assert r.total_time >= sum(r.epoch_times) > 0
    assert set(r.versions) == {"python", "numpy", "keras", "tensorflow"}


def test_target_accuracy_from_history_and_recomputed_on_cache(data):
    r = train(build_mlp, data, epochs=2, batch_size=64, target_accuracy=0.05)
    assert r.target_epoch == 1
    assert r.target_seconds == pytest.approx(r.epoch_times[0])
    never = train(build_mlp, data, epochs=2, batch_size=64, target_accuracy=1.0)
    assert never.from_cache and never.target_epoch is None and never.target_seconds is None
    mid = max(r.val_accuracy)
    cached = train(build_mlp, data, epochs=2, batch_size=64, target_accuracy=mid)
    expected = 1 + int(np.argmax(np.asarray(r.val_accuracy) >= mid))
    assert cached.from_cache and cached.target_epoch == expected


def test_tracker_records_survive_the_cache(data):
    t1 = MovingStatsTracker(every=4)
    first = train(lambda: build_mlp(bn=True), data, epochs=1, batch_size=64, callbacks=[t1])
    t2 = MovingStatsTracker(every=4)
    again = train(lambda: build_mlp(bn=True), data, epochs=1, batch_size=64, callbacks=[t2])
    assert again.from_cache and t2.steps == t1.steps == [0, 4, 8]
    assert t2.stats == t1.stats
    t3 = MovingStatsTracker(every=2)  # another tracker setting is another run
    third = train(lambda: build_mlp(bn=True), data, epochs=1, batch_size=64, callbacks=[t3])
    assert not third.from_cache and first.history == third.history


def test_save_model_and_reload_from_cache(data, tmp_path):
    r = train(build_mlp, data, epochs=1, batch_size=128, save_model=True, results_dir=tmp_path)
    assert r.model_path and r.model_path.endswith(f"{r.key}.keras")
    again = train(build_mlp, data, epochs=1, batch_size=128, save_model=True,
                  results_dir=tmp_path)
    assert again.from_cache and again.model is not None
    x = data.x_val[:16]
    np.testing.assert_allclose(again.model.predict(x, verbose=0), r.model.predict(x, verbose=0),
                               rtol=0, atol=1e-6)


def test_compiled_model_keeps_its_compile_settings(data):
    model = build_mlp()
    model.compile(optimizer=keras.optimizers.RMSprop(0.002),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    r = train(model, data, epochs=1, batch_size=128)
    assert r.config["optimizer"] == "RMSprop" and r.config["lr"] == pytest.approx(0.002)
    assert r.model is model and len(r.val_accuracy) == 1


def test_strategy_builds_inside_scope(data):
    import tensorflow as tf

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    r = train(build_mlp, data, epochs=1, batch_size=128, strategy=strategy)
    assert r.config["strategy"] == "OneDeviceStrategy" and r.config["replicas"] == 1
    assert r.model.distribute_strategy is strategy
    assert r.steps == 4


def test_augment_is_applied_to_training_batches_only(data, tmp_path):
    import tensorflow as tf

    plain = train(build_mlp, data, epochs=1, batch_size=128, results_dir=tmp_path)
    blank = train(build_mlp, data, epochs=1, batch_size=128, results_dir=tmp_path,
                  augment=lambda x, y: (tf.zeros_like(x), y))
    assert blank.key != plain.key
    assert blank.history["loss"] != plain.history["loss"]
    # trained on blank images, the first layer's kernel never gets a gradient
    grads_free = train(build_mlp, data, epochs=1, batch_size=128, results_dir=tmp_path,
                       augment=lambda x, y: (tf.zeros_like(x), y), force=True)
    kernel = grads_free.model.get_layer("d1").kernel.numpy()
    keras.utils.set_random_seed(0)
    fresh = build_mlp().get_layer("d1").kernel.numpy()
    np.testing.assert_array_equal(kernel, fresh)


def test_bad_arguments_say_what_was_expected(data):
    with pytest.raises(TypeError, match="Dataset"):
        train(build_mlp, (data.x_train, data.y_train), epochs=1)
    with pytest.raises(TypeError, match="expected a keras.Model"):
        train(lambda: "not a model", data, epochs=1)
    with pytest.raises(ValueError, match="Unknown optimizer"):
        train(build_mlp, data, epochs=1, optimizer="adagrad-ish")
    with pytest.raises(ValueError, match="epochs"):
        train(build_mlp, data, epochs=0)


def test_verbose_is_quiet_under_tests(monkeypatch):
    assert resolve_verbose() == 0  # PYTEST_CURRENT_TEST is set by pytest
    assert resolve_verbose(2) == 2
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    monkeypatch.setenv("BNUTILS_QUIET", "0")
    assert resolve_verbose() in (1, 2)
    monkeypatch.setenv("BNUTILS_QUIET", "1")
    assert resolve_verbose() == 0


def test_mirrored_strategy_counts_steps(data):
    """Under MirroredStrategy the optimizer's step counter is a distributed variable."""
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    r = train(build_mlp, data, epochs=1, batch_size=128, strategy=strategy)
    assert r.steps == r.steps_per_epoch > 0
    assert r.model.distribute_strategy is strategy


def test_unseeded_initializer_in_a_builder_gives_the_same_key_every_time():
    """Keras draws a random seed for RandomNormal(seed=None) at construction; two such
    initializers (as in two processes) must fingerprint alike, and a seeded one differently."""
    from bnutils.training import _fingerprint

    def closure(init):
        return lambda: keras.layers.Dense(2, kernel_initializer=init)

    a = keras.initializers.RandomNormal(stddev=0.1)
    b = keras.initializers.RandomNormal(stddev=0.1)
    assert a.seed != b.seed  # the per-object draw that used to leak into the key
    assert _fingerprint(closure(a)) == _fingerprint(closure(b))
    assert _fingerprint(closure(a)) != _fingerprint(closure(keras.initializers.RandomNormal(
        stddev=0.1, seed=3)))
    assert _fingerprint(closure(a)) != _fingerprint(closure(keras.initializers.RandomNormal(
        stddev=0.2)))
