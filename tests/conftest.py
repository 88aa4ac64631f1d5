"""Shared test setup: quiet TensorFlow, quick profile, results in a temporary folder."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("BNUTILS_PROFILE", "quick")
os.environ.setdefault("BNUTILS_QUIET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_results(tmp_path, monkeypatch):
    """Every test writes results under its own temporary folder, never into the repo."""
    monkeypatch.setenv("BNUTILS_RESULTS", str(tmp_path / "results"))
    yield
