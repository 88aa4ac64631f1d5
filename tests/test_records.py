"""The committed run records reproduce: retraining a short one gives its curves back.

A record is read back whenever its key matches, so a stale record (say, trained by code that has
changed since in a way the key cannot see) would hide behind its key. This retrains one short,
committed full-profile run of notebook 06 (its learning-rate sweep: the BN MLP at lr 0.1, seed 0)
on this machine and compares the curves with the record.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from bnutils.data import load_dataset
from bnutils.models import build_mlp
from bnutils.sweeps import TrainTrial, init_config
from bnutils.training import train

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "results" / "runs"

# Notebook 06's sweep trial, as its Setup and learning-rate cells build it (full profile).
MLP = {
    "activation": "relu",
    "kernel_initializer": init_config(1.0),
    "norm": "batch",
    "bn_kwargs": {"momentum": 0.9},
}


@pytest.mark.slow
def test_a_committed_record_is_what_retraining_gives():
    data = load_dataset().subset(None, 5000, None).subset(10_000)
    trial = TrainTrial(
        data, build_mlp, epochs=5, batch_size=128, optimizer="momentum", lr=0.1, builder_kwargs=MLP
    )
    build, fit = trial.split({"norm": "batch", "lr": 0.1})
    fresh = train(functools.partial(build_mlp, **build), data, seed=0, run_name="build_mlp", **fit)
    path = RUNS / f"{fresh.key}.json"
    assert path.is_file(), (
        f"No committed record {path.name}: notebook 06's sweep changed, or its records were not "
        "committed; execute it (python tools/notebooks.py run 06) and commit results/runs/."
    )
    record = json.loads(path.read_text())
    assert record["config"]["profile"] == "full" and not fresh.from_cache
    # Float round-off differs between CPUs (AVX2, AVX-512) and thread counts: close, not equal.
    np.testing.assert_allclose(fresh.val_accuracy, record["val_accuracy"], atol=0.01)
    np.testing.assert_allclose(fresh.train_loss, record["train_loss"], rtol=0.05)
    np.testing.assert_allclose(fresh.val_loss, record["val_loss"], rtol=0.05)
