"""tools/results_table.py: the lines it derives from the benchmark result files."""

from __future__ import annotations

import importlib.util

from bnutils.config import repo_root


def _tool():
    spec = importlib.util.spec_from_file_location(
        "results_table", repo_root() / "tools" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tta(epochs_none, epochs_bn, reached_bn=True):
    rows = [{"variant": "none", "best lr": 1e-3, "reached": True, "epochs": epochs_none},
            {"variant": "fused", "best lr": 1e-3, "reached": reached_bn, "epochs": epochs_bn}]
    return {"rows": rows, "runs": []}


def test_equal_epochs_to_target_are_reported_as_a_per_epoch_ratio():
    text = _tool()._render_time_to_accuracy(_tta(3, 3))
    assert "Every variant reached the target in 3 epochs" in text


def test_no_per_epoch_remark_when_epochs_differ_or_a_variant_missed_the_target():
    tool = _tool()
    assert "Every variant" not in tool._render_time_to_accuracy(_tta(3, 4))
    assert "Every variant" not in tool._render_time_to_accuracy(_tta(3, 3, reached_bn=False))


def _best(ran, planned):
    return {"settings": {"epochs": planned}, "rows": [{"model": "m", "epochs": ran}]}


def test_best_accuracy_reports_where_the_cosine_schedule_stood():
    tool = _tool()
    assert "after 6 of 20 planned epochs" in tool._render_best_accuracy(_best(6, 20))
    assert "was then 79% of its start" in tool._render_best_accuracy(_best(6, 20))
    assert "was then 50% of its start" in tool._render_best_accuracy(_best(10, 20))
    assert "planned epochs" not in tool._render_best_accuracy(_best(20, 20))
