"""bnutils.tuner: a KerasTuner random search that finds the best trial and resumes."""

from __future__ import annotations

import json

import keras
import pytest

from bnutils.config import get_profile
from bnutils.data import load_dataset
from bnutils.tuner import keras_tuner_search


@pytest.fixture(scope="module")
def data():
    return load_dataset("fashion_mnist").subset(256, 128, 128)


def tiny_bn_mlp(bn_momentum):
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(16, use_bias=False),
            keras.layers.BatchNormalization(momentum=bn_momentum),
            keras.layers.Activation("relu"),
            keras.layers.Dense(10),
        ],
        name="tiny_bn",
    )


@pytest.mark.slow
def test_keras_tuner_search_finds_best_and_resumes(data, tmp_path):
    models = []

    def builder(bn_momentum):
        models.append(tiny_bn_mlp(bn_momentum))
        return models[-1]

    def trained() -> int:
        opts = [getattr(m, "optimizer", None) for m in models]  # built, maybe never compiled
        return sum(o is not None and int(o.iterations) > 0 for o in opts)

    kwargs = dict(
        builder=builder, max_trials=2, epochs=1, seed=1, batch_sizes=(32, 64), momentums=(0.9, 0.99)
    )
    result = keras_tuner_search(data, get_profile("quick"), **kwargs)
    assert len(result.trials) == 2 and trained() == 2
    scores = [t["score"] for t in result.trials]
    assert result.best_score == max(scores)
    assert 1e-4 <= result.best["lr"] <= 3e-2
    assert result.best["batch_size"] in (32, 64) and result.best["bn_momentum"] in (0.9, 0.99)
    assert json.loads(json.dumps(result.to_dict()))["best"] == result.best
    assert "bn_mlp_quick_" in result.directory
    assert result.directory.startswith(str(tmp_path)), "under results/tuner"
    assert "| trial_id |" in result.to_table().to_markdown()

    again = keras_tuner_search(data, get_profile("quick"), **kwargs)
    assert trained() == 2, "a finished search trains nothing when called again"
    assert again.best == result.best and again.directory == result.directory


def test_keras_tuner_search_checks_its_arguments(data):
    profile, builder = get_profile("quick"), tiny_bn_mlp
    with pytest.raises(ValueError, match="optimizer"):
        keras_tuner_search(data, profile, builder=builder, optimizer="lamb")
    with pytest.raises(ValueError, match="lr_range"):
        keras_tuner_search(data, profile, builder=builder, lr_range=(0.1, 0.01))
    with pytest.raises(ValueError, match="momentums"):
        keras_tuner_search(data, profile, builder=builder, momentums=(1.5,))
    with pytest.raises(ValueError, match="max_trials"):
        keras_tuner_search(data, profile, builder=builder, max_trials=0)
