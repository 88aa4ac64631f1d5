"""The committed notebooks follow the output policy of tools/notebooks.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("nbtool", ROOT / "tools" / "notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_notebooks_carry_full_run_outputs():
    tool = _tool()
    assert tool.notebooks(), "no notebooks found"
    assert tool.check() == []


def test_navigation_lines_are_consistent():
    tool = _tool()
    paths = tool.notebooks()
    for i, p in enumerate(paths):
        nb = nbformat.read(p, as_version=4)
        first, last = nb.cells[0].source, nb.cells[-1].source
        assert first.startswith(tool.NAV_MARK) and first == last, (
            f"{p.name}: run tools/notebooks.py nav"
        )
        if i + 1 < len(paths):
            assert paths[i + 1].name in first
        if i > 0:
            assert paths[i - 1].name in first


def test_numbered_steps_are_in_order():
    names = [p.name for p in _tool().notebooks() if p.name[0].isdigit()]
    steps = [int(n[:2]) for n in names]
    assert steps == sorted(steps) and steps[0] == 1


def test_readme_audit_comes_from_the_committed_notebook_run():
    """The claims audit in results/ (and so in the README) is the table the committed notebook
    05 printed: same claims, same measurements, same verdicts."""
    import re

    from bnutils.results import read_result

    nb_path = ROOT / "notebooks" / "05_evaluate.ipynb"
    saved = read_result(ROOT / "results" / "claims_audit.json")
    assert saved["profile"] == "full"
    nb = nbformat.read(nb_path, as_version=4)
    printed = "".join(  # the cell `print(make_table(audit))`, whichever module it names
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        and re.fullmatch(r"print\((\w+\.)*make_table\(audit\)\)", c.source.strip())
        for o in c.outputs
    )
    assert printed, "notebook 05 has no printed audit table"
    table_rows = [ln for ln in printed.splitlines() if ln.startswith("| ")][1:]  # minus header
    assert len(saved["rows"]) == len(table_rows) == 5, (len(saved["rows"]), len(table_rows))
    for row in saved["rows"]:
        line = f"| {row['claim']} | {row['experiment']} | {row['measured']} | {row['verdict']} |"
        assert line in printed, f"not in the notebook's audit table: {line}"


def test_runner_drops_tensorflow_log_lines_and_machine_paths():
    tool = _tool()
    nb = nbformat.v4.new_notebook()
    log = "E0000 00:00:1795573885.101797    3009 node_def_util.cc:682] NodeDef mentions x\n"
    text = (
        f"{log}INFO:tensorflow:Assets written to: /x/assets\n"
        f"wrote {tool.ROOT}/results/tuning_summary.json\n"
    )
    cell = nbformat.v4.new_code_cell("print()")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text=text),
        nbformat.v4.new_output("stream", name="stderr", text=log),
    ]
    nb.cells.append(cell)
    tool._drop_log_noise(nb)
    assert [o["text"] for o in cell.outputs] == ["wrote results/tuning_summary.json\n"]
