"""tools/results_table.py and bnutils.results: the result schema, tables, README lines."""

from __future__ import annotations

import importlib.util

from bnutils.config import repo_root


def _tool():
    spec = importlib.util.spec_from_file_location(
        "results_table", repo_root() / "tools" / "results_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_to_accuracy_lists_every_grid_point_after_the_best_ones():
    run = {"model": "resnet", "schedule epochs": 2, "rate": 0.1, "seconds": 250.0}
    d = {"rows": [{"model": "resnet", "seconds": 250.0}], "runs": [run, {**run, "rate": 0.05}]}
    text = _tool()._render_time_to_accuracy(d)
    assert "Every grid point" in text and "| resnet | 2 | 0.050 |" in text


def test_best_accuracy_says_how_each_model_planned_its_epochs():
    plans = {
        "bn": {"planned epochs": 8, "from": "a probe of 128 s per epoch"},
        "plain": {"planned epochs": 9, "from": "given (--epochs)"},
    }
    text = _tool()._render_best_accuracy({"settings": {"plans": plans}, "rows": [{"m": 1}]})
    assert "- bn: 8 planned epochs, from a probe of 128 s per epoch." in text
    assert "- plain: 9 planned epochs, from given (--epochs)." in text


def test_source_line_reads_the_one_result_schema():
    tool = _tool()
    d = {
        "machine": {"platform": None, "processor": "x86_64", "cpu_count": 2, "cpu_flags": None},
        "versions": {
            "python": "3.11.7",
            "numpy": None,
            "bnutils": None,
            "keras": "3.15.1",
            "tensorflow": "2.21.0",
        },
    }
    assert tool._machine(d) == "x86_64, 2 CPUs; Python 3.11.7, Keras 3.15.1, TensorFlow 2.21.0"


def test_committed_result_files_follow_the_schema():
    from bnutils.results import SCHEMA, read_result

    res = repo_root() / "results"
    names = [f for f, _, _ in _tool()._SECTIONS] + ["A1_multiworker/summary.json"]
    files = [res / n for n in names if (res / n).is_file()]  # the README's sources and A1's
    assert files
    for p in files:
        d = read_result(p)
        assert list(d)[: len(SCHEMA)] == list(SCHEMA), p
        assert d["name"] == p.stem and d["profile"] in ("quick", "full"), p
        assert set(d["machine"]) == {"platform", "processor", "cpu_count", "cpu_flags"}, p
        assert set(d["versions"]) == {"python", "numpy", "bnutils", "keras", "tensorflow"}, p
        assert d["command"] is None or all(isinstance(c, str) for c in d["command"]), p


# ---------------------------------------------------------------- bnutils.results


def test_write_result_then_read_result(tmp_path, monkeypatch):
    import json
    import math

    import numpy as np
    import pytest

    from bnutils import config
    from bnutils.results import SCHEMA, read_result, write_result

    data = {"rows": [{"acc": np.float32(0.5), "loss": math.nan}], "seeds": np.arange(3)}
    path = write_result(
        "demo", data, command=["python", str(repo_root() / "x.py")], directory=tmp_path
    )
    assert path == tmp_path / "demo.json" and not list(tmp_path.glob(".*partial*"))
    d = read_result(path)
    assert list(d) == [*SCHEMA, "rows", "seeds"]
    assert d["name"] == "demo" and d["profile"] == config.get_profile().name
    assert d["command"] == ["python", "x.py"], "paths inside the repository are made relative"
    assert d["rows"] == [{"acc": 0.5, "loss": None}] and d["seeds"] == [0, 1, 2]
    assert set(d["machine"]) == {"platform", "processor", "cpu_count", "cpu_flags"}
    assert d["versions"]["numpy"] == np.__version__
    assert write_result("q", {}, directory=tmp_path, profile="quick").name == "q.json"
    assert read_result(tmp_path / "q.json")["profile"] == "quick"
    monkeypatch.setattr(config, "results_dir", lambda: tmp_path / "default")
    assert write_result("d", {"x": 1}).parent == tmp_path / "default"
    with pytest.raises(ValueError, match="fills in"):
        write_result("bad", {"date": "today"}, directory=tmp_path)
    with pytest.raises(ValueError, match="file stem"):
        write_result("sub/bad", {}, directory=tmp_path)
    (tmp_path / "old.json").write_text(json.dumps({"rows": [], "created_utc": "2026"}))
    with pytest.raises(ValueError, match="lacks the result-schema keys"):
        read_result(tmp_path / "old.json")


def test_tables():
    from bnutils.results import make_table

    t = make_table([{"model": "bn", "acc": 0.91234, "ok": True}, {"model": "plain", "acc": None}])
    md = t.to_markdown()
    assert md.splitlines()[0] == "| model | acc | ok |"
    assert "| bn | 0.912 | yes |" in md and "| plain | n/a | n/a |" in md
    assert t._repr_markdown_() == md and t.to_dict()["rows"][0]["model"] == "bn"
    assert "| 0.0003 |" in str(make_table([{"lr": 3e-4}])), "3e-4 must not print as 0.000"
    assert make_table([{"a": 1, "b": 2}], columns=["b", "a"]).columns == ["b", "a"]
    assert repr(t) == str(t) and "Table(rows=" not in repr(t), "a cell's text output is the table"


def test_claims_audit_renders_verdicts_both_evaluations_sentences_and_rates():
    audit = {
        "rows": [
            {"claim": "c", "experiment": "e", "measured": "+0.1 [+0.0, +0.2]", "verdict": "v"}
        ],
        "accuracy": [{"model": "MLP", "evaluation": "BN, precise BN", "test accuracy": 0.86}],
        "sentences": ["Convergence, MLP: with BN the target took -1.00 epochs."],
        "learning_rates": {"mlp BN": {"best": 0.1, "grid": [0.0316, 31.6], "seeds": 5}},
        "training_seconds": 1200.0,
        "runs": 190,
        "run_cpu_flags": ["avx2, fma"],
    }
    text = _tool()._render_claims_audit(audit)
    assert "| c | e | +0.1 [+0.0, +0.2] | v |" in text
    assert "| MLP | BN, precise BN | 0.860 |" in text
    assert "- Convergence, MLP: with BN the target took -1.00 epochs." in text
    assert "mlp BN: 0.1 (grid 0.0316 to 31.6, 5 seeds)" in text
    assert (
        "190 runs, 20.0 min of training (CPU flags of the machine that trained them: avx2, fma)"
        in text
    )
