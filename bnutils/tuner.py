"""A KerasTuner random search over learning rate, batch size and BN momentum. Notebook 06.

``keras-tuner`` is optional: it is imported only when :func:`keras_tuner_search` runs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bnutils import config
from bnutils._util import check_choice, check_positive_int, digest, json_safe
from bnutils.cache import describe
from bnutils.repro import set_seed
from bnutils.results import make_table
from bnutils.training import resolve_verbose, train

__all__ = ["TunerSearchResult", "keras_tuner_search"]


@dataclasses.dataclass
class TunerSearchResult:
    """What :func:`keras_tuner_search` found: the ``best`` hyperparameters (``lr``,
    ``batch_size``, ``bn_momentum``) and their validation accuracy ``best_score``; ``trials``
    (``trial_id``, hyperparameters, ``score``, ``status``; best first); the tuner's
    ``directory`` (a rerun resumes there); the ``seconds`` this call took; the ``tuner``."""

    best: dict
    best_score: float
    trials: list[dict]
    directory: str
    seconds: float
    tuner: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        keys = ("best", "best_score", "trials", "directory")
        return json_safe({k: getattr(self, k) for k in keys})

    def to_table(self):
        """The trials as a :class:`bnutils.results.Table` (Markdown in Jupyter)."""
        return make_table(self.trials, digits=4)


def _import_keras_tuner():
    missing = [p for p in ("keras_tuner", "tensorboard") if importlib.util.find_spec(p) is None]
    if missing:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"keras_tuner_search needs keras-tuner (and, with TensorFlow, tensorboard); missing: "
            f"{missing}. Install them: `pip install keras-tuner==1.4.8 tensorboard==2.21.0`."
        )
    import keras_tuner

    return keras_tuner


def keras_tuner_search(
    data: Any,
    profile: Any = None,
    *,
    builder: Callable[..., Any],
    lr_range: tuple[float, float] = (1e-4, 3e-2),
    batch_sizes: Sequence[int] = (32, 64, 128, 256),
    momentums: Sequence[float] = (0.9, 0.99, 0.999),
    optimizer: str = "adam",
    max_trials: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
) -> TunerSearchResult:
    """``keras_tuner.RandomSearch`` for the best validation accuracy over a log-uniform learning
    rate in ``lr_range``, the ``batch_sizes`` and BN ``momentums``, each trial run by ``train``.
    It lives in ``results/tuner/``, named after the profile and a digest of settings and data, so
    a rerun resumes it.

    Args:
        data: a :class:`bnutils.data.Dataset` (trains on ``x_train``, scores on ``x_val``).
        profile: gives ``tuner_trials`` and ``epochs`` (default: the active profile).
        builder: ``builder(bn_momentum=...)`` returning a ``keras.Model`` with BN.
        lr_range, batch_sizes, momentums: the search space.
        optimizer: ``"adam"``, ``"sgd"`` or ``"momentum"`` (SGD with momentum 0.9).
        max_trials, epochs: override the profile's ``tuner_trials`` and ``epochs``.
        seed: seeds the search, and each trial's weights and shuffling.

    Raises:
        ImportError: ``keras-tuner`` or ``tensorboard`` is not installed.
        ValueError: bad ranges, choices or counts.
    """
    check_choice("optimizer", optimizer, ("adam", "sgd", "momentum"))
    profile = profile if profile is not None else config.get_profile()
    max_trials = profile.tuner_trials if max_trials is None else max_trials
    max_trials = check_positive_int("max_trials", max_trials)
    epochs = check_positive_int("epochs", profile.epochs if epochs is None else epochs)
    low, high = (float(v) for v in lr_range)
    batch_sizes = [check_positive_int("batch_sizes[i]", b) for b in batch_sizes]
    momentums = [float(m) for m in momentums]
    if not (0 < low < high and batch_sizes and momentums and all(0 <= m < 1 for m in momentums)):
        raise ValueError(
            f"Expected 0 < low < high, batch sizes and momentums in [0, 1), received "
            f"lr_range={lr_range!r}, batch_sizes={batch_sizes!r}, momentums={momentums!r}."
        )
    kt = _import_keras_tuner()
    space = [low, high, batch_sizes, momentums, optimizer, max_trials, epochs, seed]
    set_seed(seed)  # the project is keyed by the built model too, as train()'s cache is
    space.append(describe(builder(bn_momentum=momentums[0])))
    key = digest(np.array(json.dumps(space)), data.x_train, data.y_train, data.x_val, data.y_val)
    project = f"bn_mlp_{getattr(profile, 'name', 'custom')}_{key[:8]}"

    class _BNHyperModel(kt.HyperModel):
        def build(self, hp):
            hp.Float("lr", low, high, sampling="log")
            hp.Choice("batch_size", batch_sizes)
            set_seed(seed)
            return builder(bn_momentum=hp.Choice("bn_momentum", momentums))

        def fit(self, hp, model, *args, **kwargs):  # train() compiles, fits and caches the run
            fit = {"batch_size": hp.get("batch_size"), "lr": hp.get("lr"), "optimizer": optimizer}
            result = train(model, data, epochs=epochs, seed=seed, run_name="tuner", **fit)
            return {"val_accuracy": result.best_val_accuracy}

    start, folder = time.perf_counter(), config.results_dir("tuner")
    objective = kt.Objective("val_accuracy", direction="max")
    tuner = kt.RandomSearch(
        _BNHyperModel(),
        objective,
        max_trials,
        seed=seed,
        directory=str(folder),
        project_name=project,
        max_consecutive_failed_trials=max_trials,
    )
    tuner.search(verbose=resolve_verbose(None))
    trials = []
    for trial in tuner.oracle.get_best_trials(num_trials=len(tuner.oracle.trials)):
        score = math.nan if trial.score is None else float(trial.score)
        row = {"trial_id": trial.trial_id, **trial.hyperparameters.values, "score": score}
        trials.append({**row, "status": str(trial.status)})
    if not trials:
        raise RuntimeError(f"The tuner in {folder / project} finished no trial; see its log.")
    best = {k: v for k, v in trials[0].items() if k not in ("trial_id", "score", "status")}
    seconds = time.perf_counter() - start
    return TunerSearchResult(
        best, trials[0]["score"], trials, str(folder / project), seconds, tuner
    )
