"""bnutils.training and bnutils.cache: determinism, the run cache and its key, divergence,
saved models."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import keras
import numpy as np
import pytest

from bnutils import cache
from bnutils.callbacks import MovingStatsTracker
from bnutils.data import load_dataset
from bnutils.repro import set_seed
from bnutils.training import TrainResult, load_result, resolve_verbose, train


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_key_changes_with_what_changes_the_run(data, tmp_path):
    base = train(build_mlp, data, epochs=1, batch_size=64, results_dir=tmp_path)
    other_lr = train(build_mlp, data, epochs=1, batch_size=64, lr=0.01, results_dir=tmp_path)
    other_cfg = train(
        build_mlp, data, epochs=1, batch_size=64, config={"note": "x"}, results_dir=tmp_path
    )
    smaller = train(
        build_mlp, data.subset(256, 256, 256), epochs=1, batch_size=64, results_dir=tmp_path
    )
    keys = {base.key, other_lr.key, other_cfg.key, smaller.key}
    assert len(keys) == 4 and not any(r.from_cache for r in (other_lr, other_cfg, smaller))
    assert len(list(tmp_path.glob("*.json"))) == 4
    assert base.config["user"] == {} and other_cfg.config["user"] == {"note": "x"}


def run_key(builder, data, seed=0, lr=0.01, **settings):
    """The key train() computes: seeded, built, then described with the settings."""
    set_seed(seed)
    model = builder()
    optimizer = keras.optimizers.SGD(lr)
    return cache.run_key(model, data, "k", optimizer=optimizer, seed=seed, **settings)


def test_run_key_is_what_the_run_is(data):
    base = run_key(build_mlp, data)
    assert base == run_key(build_mlp, data), "the same run must give the same key"
    assert base.startswith("k-") and len(base) == len("k-") + 12
    assert run_key(build_mlp, data, lr=0.1) != base
    assert run_key(build_mlp, data, epochs=3) != run_key(build_mlp, data, epochs=2)
    assert run_key(build_mlp, data.subset(256, 256, 256)) != base, "other data"
    labels = data.y_train.copy()
    labels[0] = (labels[0] + 1) % 10
    other_labels = dataclasses.replace(data, y_train=labels)
    assert run_key(build_mlp, other_labels) != base, "the digest covers every training label"
    assert run_key(functools.partial(build_mlp, bn=True), data) != base, "other architecture"
    assert run_key(functools.partial(build_mlp, activation="tanh"), data) != base
    assert run_key(build_mlp, data, seed=1) != base, "other initial weights (and seed)"

    def shifted():
        model = build_mlp()
        model.get_layer("d1").kernel.assign(model.get_layer("d1").kernel + 1.0)
        return model

    assert run_key(shifted, data) != base, "same architecture and seed, other initial weights"


def test_model_description_ignores_generated_names_not_weights():
    def unnamed():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])

    keras.utils.set_random_seed(1)
    first = unnamed()
    keras.utils.set_random_seed(1)
    second = unnamed()  # same weights, but layers named dense_<n+2>, ...
    assert first.layers[0].name != second.layers[0].name
    assert cache.describe(first) == cache.describe(second)
    second.layers[0].kernel.assign(second.layers[0].kernel + 1.0)
    assert cache.describe(first) != cache.describe(second)


@pytest.mark.slow
def test_builder_code_and_closures_do_not_count_only_the_model(data, tmp_path):
    """Two builders written differently that build the same model share one cached run."""

    def closure(flag, note):
        return lambda: build_mlp(bn=flag)  # `note` is captured but changes nothing

    first = train(closure(True, "a"), data, epochs=1, batch_size=128, results_dir=tmp_path)
    for builder in (
        closure(True, "b"),
        lambda: build_mlp(True),
        functools.partial(build_mlp, bn=True),
    ):
        again = train(builder, data, epochs=1, batch_size=128, results_dir=tmp_path)
        assert again.from_cache and again.key == first.key
    other = train(closure(False, "a"), data, epochs=1, batch_size=128, results_dir=tmp_path)
    assert not other.from_cache and other.key != first.key


def test_divergence_is_recorded_not_raised(data, capsys):
    def deep_relu():
        return keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                keras.layers.Flatten(),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(10),
            ]
        )

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
    r = train(
        lambda: build_mlp(bn=True),
        data,
        epochs=1,
        batch_size=128,
        optimizer="momentum",
        lr=0.05,
        run_name="BN MLP",
        seed=7,
    )
    again = TrainResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r
    cfg = r.config
    assert r.key.startswith("bn-mlp-") and r.run_name == "bn-mlp"
    assert cfg["model_name"] == "mlp_bn" and cfg["params"] == r.model.count_params()
    assert cfg["optimizer"] == "SGD" and cfg["optimizer_config"]["momentum"] == pytest.approx(0.9)
    assert cfg["lr"] == pytest.approx(0.05)
    assert cfg["dataset"] == {
        "name": "fashion_mnist",
        "scale": "unit",
        "train_size": 512,
        "val_size": 256,
    }
    assert cfg["profile"] == "quick" and r.seed == 7 and r.format_version == 2
    assert r.steps == r.steps_per_epoch == 4 and len(r.epoch_times) == 1
    assert r.total_time >= sum(r.epoch_times) > 0
    assert set(r.versions) == {"python", "numpy", "bnutils", "keras", "tensorflow"}
    assert r.machine["cpu_count"] >= 1 and r.created.endswith("+00:00")


@pytest.mark.slow
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
    again = train(build_mlp, data, epochs=1, batch_size=128, save_model=True, results_dir=tmp_path)
    assert again.from_cache and again.model is not None
    x = data.x_val[:16]
    np.testing.assert_allclose(
        again.model.predict(x, verbose=0), r.model.predict(x, verbose=0), rtol=0, atol=1e-6
    )


def val_numbers(model, data):
    """A `measure`: numbers of the trained model that its record keeps."""
    logits = model.predict(data.x_val, verbose=0)
    return {"val_accuracy": float(np.mean(logits.argmax(1) == data.y_val)), "n": np.int64(256)}


def val_list(model, data):
    return [val_numbers(model, data)["val_accuracy"]]


def test_measured_numbers_are_saved_and_read_back_without_the_model(data, tmp_path):
    kw = dict(epochs=1, batch_size=128, results_dir=tmp_path)
    r = train(build_mlp, data, measure=val_numbers, **kw)
    assert r.measured["val_accuracy"] == pytest.approx(r.val_accuracy[-1], abs=1e-6)
    assert r.measured["n"] == 256 and type(r.measured["n"]) is int, "JSON values"
    saved = json.loads((tmp_path / f"{r.key}.json").read_text())
    assert saved["measured"] == r.measured
    assert "model_path" not in saved, "no machine path in a record"
    again = train(build_mlp, data, measure=val_numbers, **kw)
    assert again.from_cache and again.model is None and again.measured == r.measured
    plain = train(build_mlp, data, **kw)
    assert plain.key != r.key and not plain.from_cache, "the measure is part of the key"
    with pytest.raises(TypeError, match="must return a dict"):
        train(build_mlp, data, measure=val_list, force=True, **kw)


def test_refresh_since_retrains_older_records_and_reads_newer_ones(data, tmp_path, monkeypatch):
    log = tmp_path / "job.log"
    monkeypatch.setenv("BNUTILS_LOG", str(log))
    kw = dict(epochs=1, batch_size=128, results_dir=tmp_path)
    first = train(build_mlp, data, **kw)
    monkeypatch.setenv("BNUTILS_REFRESH_SINCE", "2999-01-01T00:00:00")
    assert not train(build_mlp, data, **kw).from_cache, "a record older than the time retrains"
    monkeypatch.setenv("BNUTILS_REFRESH_SINCE", first.created)
    assert train(build_mlp, data, **kw).from_cache, "a record made since is read back"
    lines = log.read_text().splitlines()
    assert [ln.split(" ", 1)[1].split(":")[1].split()[0] for ln in lines] == [
        "trained",
        "trained",
        "from",
    ]
    assert all(first.key in ln for ln in lines)
    monkeypatch.setenv("BNUTILS_REFRESH_SINCE", "yesterday")
    with pytest.raises(ValueError, match="not an ISO 8601 time"):
        train(build_mlp, data, **kw)


def test_callbacks_that_only_watch_are_not_in_the_key(data, tmp_path):
    """A TensorBoard folder is one machine's path: a record must match on any clone."""
    kw = dict(epochs=1, batch_size=128, results_dir=tmp_path / "runs")
    first = train(build_mlp, data, **kw)
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb" / "elsewhere"))
    watched = train(build_mlp, data, callbacks=[board], **kw)
    assert watched.from_cache and watched.key == first.key
    stop = keras.callbacks.EarlyStopping("val_loss", patience=3)
    assert train(build_mlp, data, callbacks=[stop], **kw).key != first.key


def test_compiled_model_keeps_its_compile_settings(data):
    model = build_mlp()
    model.compile(
        optimizer=keras.optimizers.RMSprop(0.002),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    r = train(model, data, epochs=1, batch_size=128)
    assert r.config["optimizer"] == "RMSprop" and r.config["lr"] == pytest.approx(0.002)
    assert r.model is model and len(r.val_accuracy) == 1


def _blank_images(x, y):
    import tensorflow as tf

    return tf.zeros_like(x), y


@pytest.mark.slow
def test_augment_is_applied_to_training_batches_only(data, tmp_path):
    plain = train(build_mlp, data, epochs=1, batch_size=128, results_dir=tmp_path)
    blank = train(
        build_mlp,
        data,
        epochs=1,
        batch_size=128,
        results_dir=tmp_path,
        augment=_blank_images,
    )
    assert blank.key != plain.key
    assert blank.history["loss"] != plain.history["loss"]
    # trained on blank images, the first layer's kernel never gets a gradient
    assert not blank.from_cache
    kernel = blank.model.get_layer("d1").kernel.numpy()
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


def test_unseeded_initializer_seed_does_not_count_its_weights_do():
    """Keras draws a random seed for RandomNormal(seed=None) at construction (per process);
    the key sees the config (seed=None) and the weights it drew, not the drawn seed."""

    def model_with(init):
        layer = keras.layers.Dense(2, kernel_initializer=init, name="d")
        return keras.Sequential([keras.Input((3,)), layer])

    a = keras.initializers.RandomNormal(stddev=0.1)
    b = keras.initializers.RandomNormal(stddev=0.1)
    assert a.seed != b.seed  # the per-object draw that must not leak into the key
    first, second = model_with(a), model_with(b)
    second.set_weights(first.get_weights())
    assert cache.describe(first) == cache.describe(second)
    seeded = model_with(keras.initializers.RandomNormal(stddev=0.1, seed=3))
    seeded.set_weights(first.get_weights())
    assert cache.describe(seeded) != cache.describe(first), "an explicit seed is config"
    wider = model_with(keras.initializers.RandomNormal(stddev=0.2))
    wider.set_weights(first.get_weights())
    assert cache.describe(wider) != cache.describe(first)


def test_unseeded_initializer_inside_a_builder_gives_the_same_key_every_time(data):
    """train() seeds before building, so the initializer's drawn seed repeats too."""

    def builder():
        init = keras.initializers.RandomNormal(stddev=0.1)
        return keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                keras.layers.Flatten(),
                keras.layers.Dense(10, kernel_initializer=init),
            ]
        )

    assert run_key(builder, data) == run_key(builder, data)


@pytest.mark.slow
def test_unreadable_runs_are_trained_again_and_newer_formats_refused(data, tmp_path):
    first = train(build_mlp, data, epochs=1, batch_size=128, results_dir=tmp_path)
    saved = json.loads(open(first.path).read())
    assert saved["format_version"] == cache.FORMAT_VERSION == 2
    assert cache.lookup(tmp_path, first.key, load_result).history == first.history
    assert cache.lookup(tmp_path, "no-such-run", load_result) is None
    open(first.path, "w").write("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        again = train(build_mlp, data, epochs=1, batch_size=128, results_dir=tmp_path)
    assert not again.from_cache and again.key == first.key
    newer = {**saved, "format_version": 3}
    with pytest.raises(ValueError, match="format 3"):
        TrainResult.from_dict(newer)
    with pytest.raises(ValueError, match="Not a saved TrainResult"):
        TrainResult.from_dict({"history": {}})


def test_key_sees_callback_settings_and_partials_and_refuses_lambdas():
    early = [keras.callbacks.EarlyStopping(patience=p) for p in (1, 1, 5)]
    assert cache.describe(early[0]) == cache.describe(early[1])
    assert cache.describe(early[0]) != cache.describe(early[2]), "patience changes training"
    counter = BatchCounter()
    before = cache.describe(counter)
    counter.batches = 99  # state a run changes is not a setting
    assert cache.describe(counter) == before
    assert cache.describe(functools.partial(np.clip, a_min=0)) != cache.describe(
        functools.partial(np.clip, a_min=1)
    )
    with pytest.raises(ValueError, match="lambda"):
        cache.describe(lambda x: x)


class HiddenPatience(keras.callbacks.Callback):
    def __init__(self, patience=2):
        super().__init__()
        self._patience = patience  # not under its argument's name: the key cannot read it


class NoConfig:
    def get_config(self):
        raise NotImplementedError


def test_key_refuses_objects_whose_settings_it_cannot_read():
    """A setting the key cannot see could hit a stale run: refused, with the fix."""
    with pytest.raises(ValueError, match=r"HiddenPatience.*\['patience'\].*self.patience"):
        cache.describe(HiddenPatience(5))
    with pytest.raises(ValueError, match=r"get_config\(\) is not implemented"):
        cache.describe(NoConfig())
