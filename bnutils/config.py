"""Run profiles: one environment variable makes every notebook small (CI) or full (readers).

``BNUTILS_PROFILE=quick`` selects small subsets, one or two epochs and few seeds;
``BNUTILS_PROFILE=full`` (the default) runs the real experiment. Notebooks read every
size from :func:`get_profile` and never hard-code them.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path

__all__ = [
    "PROFILE_ENV",
    "PROFILES",
    "REFRESH_ENV",
    "Profile",
    "figures_dir",
    "get_profile",
    "refresh_since",
    "repo_root",
    "results_dir",
]

PROFILE_ENV = "BNUTILS_PROFILE"
REFRESH_ENV = "BNUTILS_REFRESH_SINCE"  # retrain runs recorded before this time (ISO 8601)


@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes of one run profile.

    Attributes:
        name: ``"quick"`` or ``"full"``.
        train_size, val_size, test_size: examples per split (``None``: all of them).
        epochs, short_epochs, long_epochs: epochs of a normal run, of a run that only shows a
            model learns, and of the suite's best-accuracy run.
        seeds, sweep_points, tuner_trials: seeds per configuration in comparisons, points per
            axis of a hyperparameter sweep, KerasTuner trials.
        batch_size: default batch size.
    """

    name: str
    train_size: int | None
    val_size: int
    test_size: int | None
    epochs: int
    long_epochs: int
    seeds: int
    sweep_points: int
    tuner_trials: int
    short_epochs: int = 2
    batch_size: int = 128

    @property
    def is_quick(self) -> bool:
        return self.name == "quick"

    def seed_list(self, start: int = 0) -> list[int]:
        """The seeds a comparison runs: ``start, start + 1, ...``."""
        return list(range(start, start + self.seeds))


PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick",
        train_size=2_000,
        val_size=1_000,
        test_size=2_000,
        epochs=2,
        long_epochs=2,
        seeds=3,
        sweep_points=3,
        tuner_trials=2,
        short_epochs=2,
    ),
    "full": Profile(
        name="full",
        train_size=None,
        val_size=5_000,
        test_size=None,
        epochs=10,
        long_epochs=30,
        seeds=5,
        sweep_points=7,
        tuner_trials=10,
        short_epochs=3,
    ),
}


def get_profile(name: str | None = None) -> Profile:
    """The active profile. Used in every notebook's Setup cell.

    Args:
        name: a profile name; ``None`` reads ``$BNUTILS_PROFILE`` (default ``"full"``).

    Raises:
        ValueError: the name is not a known profile.
    """
    source = "argument `name`"
    if name is None:
        name = os.environ.get(PROFILE_ENV, "full")
        source = f"environment variable {PROFILE_ENV}"
    key = str(name).strip().lower()
    if key not in PROFILES:
        raise ValueError(
            f"Unknown profile {name!r} (from {source}). Expected one of "
            f"{sorted(PROFILES)}: set {PROFILE_ENV}=quick for CI-size runs or "
            f"{PROFILE_ENV}=full for the real experiment."
        )
    return PROFILES[key]


def refresh_since() -> datetime.datetime | None:
    """The time set by ``$BNUTILS_REFRESH_SINCE`` (ISO 8601, UTC if no zone is given): run records
    written before it are ignored and their runs trained again; ``None`` when it is not set.

    ``make run FRESH=1`` sets it to the time its retrain-everything job started, and keeps that
    time until the job finishes, so that a stopped job resumes: the runs it already retrained
    were recorded after that time and are read back.

    Raises:
        ValueError: the variable is set but is not an ISO 8601 time.
    """
    text = os.environ.get(REFRESH_ENV, "").strip()
    if not text:
        return None
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError as e:
        raise ValueError(
            f"{REFRESH_ENV}={text!r} is not an ISO 8601 time; expected for example "
            f"{REFRESH_ENV}=2026-12-03T19:00:00+00:00, or unset it to read every run record."
        ) from e
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


def _is_quick() -> bool:
    return os.environ.get(PROFILE_ENV, "").strip().lower() == "quick"


def repo_root() -> Path:
    """The repository root (the folder holding ``bnutils/``)."""
    return Path(__file__).resolve().parent.parent


def results_dir(*parts: str, create: bool = True) -> Path:
    """A folder under ``results/`` (or ``$BNUTILS_RESULTS``), created on demand.

    In the quick profile the default base is ``results/quick/`` (not committed), so CI-size
    runs never overwrite the full-profile result files behind the README.
    """
    default = repo_root() / ("results/quick" if _is_quick() else "results")
    path = Path(os.environ.get("BNUTILS_RESULTS", default)).joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def figures_dir() -> Path:
    """Where notebooks save figures: ``figures/``, or ``figures/quick/`` in the quick profile.

    The committed figures come from full-profile runs; CI-size runs write beside them.
    """
    path = repo_root() / ("figures/quick" if _is_quick() else "figures")
    path.mkdir(parents=True, exist_ok=True)
    return path
