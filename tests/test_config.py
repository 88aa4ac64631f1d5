"""Profiles, seeding and the tf.data pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from bnutils import config
from bnutils.data import make_tf_dataset
from bnutils.repro import set_seed


def test_profile_from_env(monkeypatch):
    monkeypatch.setenv(config.PROFILE_ENV, "quick")
    assert config.get_profile().is_quick
    monkeypatch.setenv(config.PROFILE_ENV, "FULL")
    p = config.get_profile()
    assert p.name == "full" and p.train_size is None and p.seeds >= 5
    monkeypatch.delenv(config.PROFILE_ENV)
    assert config.get_profile().name == "full"


def test_quick_is_smaller_than_full():
    q, f = config.PROFILES["quick"], config.PROFILES["full"]
    assert q.epochs < f.epochs and q.sweep_points < f.sweep_points and q.seeds >= 3
    assert q.seed_list() == [0, 1, 2]


def test_bad_profile_name_says_what_is_accepted(monkeypatch):
    monkeypatch.setenv(config.PROFILE_ENV, "medium")
    with pytest.raises(ValueError, match=r"'medium'.*BNUTILS_PROFILE.*\['full', 'quick'\]"):
        config.get_profile()


def test_bad_seed():
    with pytest.raises(ValueError, match="non-negative integer seed"):
        set_seed(-1)
    with pytest.raises(ValueError):
        set_seed(1.5)


def _tiny_run(seed):
    import keras

    set_seed(seed)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(2),
        ]
    )
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    hist = model.fit(make_tf_dataset(x, y, batch_size=32, seed=seed), epochs=2, verbose=0)
    return hist.history["loss"], model.get_weights()


def test_same_seed_same_numbers_different_seed_different():
    loss_a, w_a = _tiny_run(1)
    loss_b, w_b = _tiny_run(1)
    loss_c, _ = _tiny_run(2)
    assert loss_a == loss_b
    for a, b in zip(w_a, w_b, strict=True):
        np.testing.assert_array_equal(a, b)
    assert loss_a != loss_c


def test_pipeline_shuffles_with_seed_and_batches():
    x = np.arange(100, dtype="float32")
    first = [b.numpy() for b in make_tf_dataset(x, batch_size=32, seed=5)]
    again = [b.numpy() for b in make_tf_dataset(x, batch_size=32, seed=5)]
    assert [len(b) for b in first] == [32, 32, 32, 4]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    assert not np.array_equal(np.concatenate(first), x)
    assert sorted(np.concatenate(first).tolist()) == x.tolist()
    with pytest.raises(ValueError, match="`batch_size` must be an integer >= 1, received 0"):
        make_tf_dataset(x, batch_size=0)
    with pytest.raises(ValueError, match="x has 100 examples but y has 3"):
        make_tf_dataset(x, np.zeros(3))


def test_quick_results_never_land_on_committed_files(monkeypatch):
    monkeypatch.delenv("BNUTILS_RESULTS", raising=False)
    monkeypatch.setenv(config.PROFILE_ENV, "quick")
    assert config.results_dir("runs", create=False) == config.repo_root() / "results/quick/runs"
    monkeypatch.setenv(config.PROFILE_ENV, "full")
    assert config.results_dir(create=False) == config.repo_root() / "results"


def test_results_dir_override_and_quick_figures(monkeypatch, tmp_path):
    monkeypatch.setenv("BNUTILS_RESULTS", str(tmp_path / "elsewhere"))
    path = config.results_dir("runs", "a")
    assert path == tmp_path / "elsewhere" / "runs" / "a" and path.is_dir()
    monkeypatch.setenv(config.PROFILE_ENV, "quick")
    assert config.figures_dir() == config.repo_root() / "figures" / "quick"  # git-ignored
    assert config.get_profile("QUICK") is config.PROFILES["quick"]
    with pytest.raises(ValueError, match=r"'tiny' \(from argument `name`\)"):
        config.get_profile("tiny")
