"""The committed notebooks follow the output policy of tools/notebooks.py."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import nbformat
import pytest

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
        nbformat.v4.new_output(
            "stream",
            name="stderr",
            text="INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n",
        ),
    ]
    nb.cells.append(cell)
    tool._drop_log_noise(nb)
    assert [o["text"] for o in cell.outputs] == ["wrote results/tuning_summary.json\n"]


@pytest.mark.slow
def test_runner_records_provenance_and_the_check_sees_every_edit(tmp_path, monkeypatch, capsys):
    """A notebook executed by the runner passes the check; a copy with one code cell edited, or
    with one output edited, or with a cell added, fails it."""
    tool = _tool()
    monkeypatch.setenv("BNUTILS_PROFILE", "full")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# A tiny notebook"),
        nbformat.v4.new_code_cell(
            "from bnutils._util import log_line\n\nlog_line('run tiny-0123: from its record')"
        ),
        nbformat.v4.new_code_cell("print(6 * 7)"),
        nbformat.v4.new_code_cell("import sys\n\nprint('kernel stderr', file=sys.__stderr__)"),
    ]
    path = tmp_path / "T1_tiny.ipynb"
    nbformat.write(nb, path)
    tool.run([str(path)])
    out = capsys.readouterr().out
    assert "T1_tiny.ipynb: done in" in out and "(1 runs from records, 0 trained)" in out
    results = os.environ["BNUTILS_RESULTS"]  # conftest: a temporary folder
    kernel_log = Path(results) / "logs" / "kernel-T1_tiny.log"  # the kernel's own stderr
    assert "kernel stderr" in kernel_log.read_text() and "kernel stderr" not in out
    ran = nbformat.read(path, as_version=4)
    meta = ran.metadata["bnutils"]
    assert meta["package"] == tool.package_hash() and meta["profile"] == "full"
    assert meta["runs"] == {"from records": 1, "trained": 0, "total": 1}
    assert ran.cells[2].outputs[0]["text"] == "42\n"
    assert tool.check_notebook(path) == []

    def edited(change):
        copy = nbformat.read(path, as_version=4)
        change(copy)
        target = tmp_path / "edited.ipynb"
        nbformat.write(copy, target)
        return " ".join(tool.check_notebook(target))

    assert "cell 2" in edited(lambda nb: setattr(nb.cells[2], "source", "print(6 * 8)"))
    assert "its code changed" in edited(lambda nb: setattr(nb.cells[2], "source", "print(48)"))

    def paste(nb):
        nb.cells[2].outputs[0]["text"] = "43\n"

    assert "its outputs were edited" in edited(paste)
    added = edited(lambda nb: nb.cells.append(nbformat.v4.new_code_cell("1")))
    assert "added or removed" in added


def test_the_policy_check_lists_no_legacy_notebook_that_is_gone():
    tool = _tool()
    names = {p.name for p in tool.notebooks()}
    assert tool.LEGACY <= names, f"LEGACY names notebooks that do not exist: {tool.LEGACY - names}"


def test_committed_run_records_are_full_profile_small_and_portable():
    """The records under results/runs/ (committed, read by `make run`) are full-profile runs,
    small, with no path of the machine that trained them."""
    import json

    records = sorted((ROOT / "results" / "runs").glob("*.json"))
    total = sum(p.stat().st_size for p in records)
    assert total < 8_000_000, f"{len(records)} run records take {total / 1e6:.1f} MB"
    for path in records:
        text = path.read_text()
        record = json.loads(text)
        assert record["key"] == path.stem, path.name
        assert record["config"]["profile"] == "full", f"{path.name} is a quick-profile run"
        # Most are a few KB; tracker records make some larger (the audit's BN CNN runs, with
        # moving statistics every 25 steps: about 0.1 MB).
        assert path.stat().st_size < 200_000, f"{path.name}: {path.stat().st_size} bytes"
        assert str(ROOT) not in text and "/tmp/" not in text, f"{path.name} holds a path"


def test_notebooks_04_and_05_define_their_shared_runs_alike():
    """Notebook 04's four runs are seed-0 points of notebook 05's grid and share their records:
    that holds only while both notebooks build the runs alike (the CNN, the trackers' sets, the
    training settings and the measurements, which count in a run's key by name)."""
    import ast

    def definitions(name):
        nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        found = {}
        for node in ast.parse(code).body:
            if isinstance(node, ast.FunctionDef):
                for fn in ast.walk(node):  # docstrings do not change a run
                    body = getattr(fn, "body", None)
                    if isinstance(fn, ast.FunctionDef) and isinstance(body[0], ast.Expr):
                        if isinstance(body[0].value, ast.Constant):
                            fn.body = body[1:] or [ast.Pass()]
                found[node.name] = ast.dump(node)
            elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                found[node.targets[0].id] = ast.dump(node)
        return found

    nb04, nb05 = definitions("04_train.ipynb"), definitions("05_evaluate.ipynb")
    shared = ["cnn", "predict", "test_metrics", "measure_mlp", "measure_cnn", "SETTINGS"]
    shared += ["TRACKED", "X_FIXED", "EPOCHS"]
    for name in shared:
        assert name in nb04 and name in nb05, f"{name} is not defined in both notebooks"
        assert nb04[name] == nb05[name], f"notebooks 04 and 05 define {name} differently"


def test_make_run_says_where_it_is_within_a_notebook():
    import io

    tool = _tool()
    v4 = nbformat.v4
    nb = v4.new_notebook(
        cells=[
            v4.new_markdown_cell("# Setup\nsome words"),
            v4.new_code_cell("a = 1"),
            v4.new_code_cell("b = 2"),
            v4.new_markdown_cell("## Training"),
            v4.new_code_cell("c = 3"),
        ]
    )
    out = io.StringIO()
    progress = tool._CellProgress(nb, estimate=120.0, slow=0.0, out=out)
    for i, cell in enumerate(nb.cells):
        progress.on_cell_start(cell=cell, cell_index=i)
        progress.on_cell_complete(cell=cell, cell_index=i)
    lines = out.getvalue().splitlines()
    assert lines[0].strip().startswith("Setup: cell 1/3, 0 s of ~120 s")
    assert sum("Setup:" in line for line in lines) == 1  # once per section
    assert any(line.strip().startswith("Training: cell 3/3") for line in lines)
    assert sum("that cell took" in line for line in lines) == 3  # every code cell (slow=0)


def test_the_prose_stays_within_its_budget():
    tool = _tool()
    counts = {p.name: tool.prose_words(p) for p in tool.notebooks()}
    assert sum(counts.values()) <= tool.PROSE_BUDGET, counts


def test_prose_words_skip_the_navigation_and_the_code(tmp_path):
    tool = _tool()
    v4 = nbformat.v4
    nb = v4.new_notebook(
        cells=[
            v4.new_markdown_cell(f"{tool.NAV_MARK}\n[Index](../README.md) | Next: [x](x.ipynb)"),
            v4.new_markdown_cell("# Title\n\nFour words of prose."),
            v4.new_code_cell("print('not prose at all')"),
        ]
    )
    path = tmp_path / "01_x.ipynb"
    nbformat.write(nb, path)
    assert tool.prose_words(path) == 6


_SECTION_LINK = re.compile(
    r"\]\(([\w.]+\.ipynb)\)[^\[]{0,40}?sections? ((?:\"[^\"]+\"[ ,andor]*)+)"
)


def _headings(path: Path) -> set[str]:
    nb = nbformat.read(path, as_version=4)
    found = set()
    for c in nb.cells:
        if c.cell_type != "markdown":
            continue
        for line in c.source.splitlines():
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
                found |= {heading, heading.split(":")[0]}  # "Pitfall 1" names "Pitfall 1: ..."
    return found


def test_links_to_a_section_of_another_notebook_name_a_heading_it_has():
    """Each lesson lives in one place and the others link to it by section name: a renamed
    heading must not leave a link pointing nowhere."""
    tool = _tool()
    headings = {p.name: _headings(p) for p in tool.notebooks()}
    broken, checked = [], 0
    for p in tool.notebooks():
        nb = nbformat.read(p, as_version=4)
        for c in nb.cells:
            if c.cell_type != "markdown":
                continue
            for m in _SECTION_LINK.finditer(" ".join(c.source.split())):
                target = m.group(1)
                for section in re.findall(r"\"([^\"]+)\"", m.group(2)):
                    checked += 1
                    if section not in headings.get(target, ()):
                        broken.append(f"{p.name} -> {target}: {section!r}")
    assert checked >= 10, f"only {checked} section links found: is the pattern still right?"
    assert not broken, broken


_NOISY_OUTPUT = {
    "a per-epoch log line": re.compile(r"^Epoch \d+/\d+$|\d+/\d+ - \d+s - ", re.M),
    "a per-trial progress line": re.compile(r"^\[\d+/\d+\] sweep ", re.M),
    "a raw dataclass repr": re.compile(r"\b(Table|SweepResult|TrainResult)\((rows|name|run_name)="),
    "a machine path": re.compile(r"(/usr/|/root/|/home/|/tmp/|site-packages|ipykernel_)"),
    "a TensorFlow log line": re.compile(
        r"^[EIWF]\d{4} \d\d:\d\d:\d\d|^(INFO|WARNING):tensorflow:", re.M
    ),
}


def test_committed_outputs_are_quiet():
    """What a reader sees under a cell is the result: no training logs, progress lines, raw
    reprs, paths of the machine that ran it or TensorFlow's log lines (logs go to files)."""
    tool = _tool()
    found = []
    for p in tool.notebooks():
        nb = nbformat.read(p, as_version=4)
        for i, c in enumerate(nb.cells):
            if c.cell_type != "code":
                continue
            for o in c.outputs:
                text = o.get("text", "") or str(o.get("data", {}).get("text/plain", ""))
                found += [
                    f"{p.name} cell {i}: {what}"
                    for what, pattern in _NOISY_OUTPUT.items()
                    if pattern.search(text)
                ]
    assert not found, found
