"""Execute the notebook suite, keep the navigation lines, and check the output policy.

    python tools/notebooks.py run [--fresh] [NAME ...]  # execute in place ($BNUTILS_PROFILE)
    python tools/notebooks.py nav                       # rewrite the navigation lines
    python tools/notebooks.py check                     # verify the committed-output policy
    python tools/notebooks.py words                     # prose words per notebook (budget)

``run`` reads training runs from their committed records (``results/runs/``) and trains only
what has no record; ``--fresh`` retrains every run recorded before the fresh job started, and
a stopped fresh job started again resumes (the start time is kept in
``results/runs/.refresh-since`` until the job ends). Each finished run writes a line to the
job log ``results/logs/run.log``, which the runner echoes; the kernel's own stderr
(TensorFlow's C++ log lines) goes to ``results/logs/kernel-NAME.log``, not to the terminal.

Output policy: the committed notebooks carry the outputs of a run in the *full* profile
(metadata ``bnutils.profile == "full"``), every code cell has been executed in order, and
no cell stores an error. Provenance: the runner records the hash of the package source it
ran against and, for each code cell, the hashes of its source and of the outputs it wrote;
``check`` fails when a code cell or an output differs from what the runner recorded, and
lists the notebooks executed against an older package. ``make run`` produces exactly that;
CI re-executes the notebooks in the quick profile with nbval and never writes them back.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
NAV_MARK = "<!-- nav -->"
# Executed before the runner recorded provenance: their outputs cannot be checked against their
# cells. A notebook leaves this set when the runner executes it; the check fails on a notebook
# that is in the set and has provenance, or that has none and is not in the set.
LEGACY: set[str] = set()


def notebooks() -> list[Path]:
    return sorted(p for p in NB_DIR.glob("*.ipynb") if p.name[0].isdigit() or p.name[0] == "A")


def _title(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    for c in nb.cells:
        if c.cell_type == "markdown":
            for line in c.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return path.stem


def nav() -> None:
    paths = notebooks()
    titles = [_title(p) for p in paths]
    for i, p in enumerate(paths):
        parts = []
        if i > 0:
            parts.append(f"← Previous: [{titles[i - 1]}]({paths[i - 1].name})")
        parts.append("[Index](../README.md#notebooks)")
        if i + 1 < len(paths):
            parts.append(f"Next: [{titles[i + 1]}]({paths[i + 1].name}) →")
        line = f"{NAV_MARK}\n" + " | ".join(parts)
        nb = nbformat.read(p, as_version=4)
        old = [c for c in nb.cells if c.source.startswith(NAV_MARK)]
        if (
            len(old) == 2
            and nb.cells[0] is old[0]
            and nb.cells[-1] is old[1]
            and all(c.source == line for c in old)
        ):
            continue  # up to date: leave the file (and its cell ids) alone
        nb.cells = [c for c in nb.cells if not c.source.startswith(NAV_MARK)]
        head, tail = nbformat.v4.new_markdown_cell(line), nbformat.v4.new_markdown_cell(line)
        if old:  # keep the ids, so that a nav update is a one-line diff
            head.id, tail.id = old[0].id, old[-1].id
        nb.cells.insert(0, head)
        nb.cells.append(tail)
        nbformat.write(nb, p)


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def package_hash() -> str:
    """The hash of the package source (every ``bnutils/**/*.py``, by path and content)."""
    parts = [
        f"{p.relative_to(ROOT).as_posix()}\n{p.read_text(encoding='utf-8')}"
        for p in sorted((ROOT / "bnutils").rglob("*.py"))
    ]
    return _short_hash("\0".join(parts))


def _cell_hashes(cell) -> dict:
    outputs = json.dumps(cell.get("outputs", []), sort_keys=True)
    return {"source": _short_hash(cell.source), "outputs": _short_hash(outputs)}


def provenance(nb) -> dict:
    """Per code cell (by id): the hashes of its source and of its outputs as stored."""
    return {c.id: _cell_hashes(c) for c in nb.cells if c.cell_type == "code"}


class _CellProgress:
    """``make run``'s place within a notebook: a line at each section's first code cell and
    after each cell that took ``slow`` seconds or more (cell n of N, the section, the time
    spent, and the committed run's time as the estimate). Hooks of ``NotebookClient``."""

    def __init__(self, nb, estimate: float | None, slow: float = 10.0, out=None):
        self.code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        self.sections, section = {}, ""
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "markdown":
                heading = next((ln for ln in cell.source.splitlines() if ln.startswith("#")), "")
                section = heading.lstrip("#").strip() or section
            self.sections[i] = section
        self.estimate, self.slow, self.out = estimate, slow, out or sys.stdout
        self.start = self.cell_start = time.perf_counter()
        self.last_section = None

    def _where(self, index: int) -> str:
        n = self.code.index(index) + 1 if index in self.code else 0
        spent = time.perf_counter() - self.start
        of = f" of ~{self.estimate:.0f} s" if self.estimate else ""
        return f"cell {n}/{len(self.code)}, {spent:.0f} s{of}"

    def on_cell_start(self, cell, cell_index, **kwargs):
        self.cell_start = time.perf_counter()
        section = self.sections.get(cell_index, "")
        if cell.cell_type == "code" and section != self.last_section:
            self.last_section = section
            print(f"    {section or '(top)'}: {self._where(cell_index)}", file=self.out, flush=True)

    def on_cell_complete(self, cell, cell_index, **kwargs):
        took = time.perf_counter() - self.cell_start
        if cell.cell_type == "code" and took >= self.slow:
            where = self._where(cell_index)
            print(f"    {where}: that cell took {took:.0f} s", file=self.out, flush=True)


class _LogEcho:
    """Echo the job log's new lines while a notebook runs, and count its runs."""

    def __init__(self, path: Path, expected: int | None):
        self.path, self.expected = path, expected
        self.offset = path.stat().st_size if path.exists() else 0
        self.counts = {"from records": 0, "trained": 0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self.start = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._read()

    def _loop(self):
        while not self.stop.wait(1.0):
            self._read()

    def _read(self):
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as log:
            log.seek(self.offset)
            text = log.read()
        complete = text[: text.rfind("\n") + 1]
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            body = line.split(" ", 1)[-1]
            if body.startswith("run ") and body.endswith(": from its record"):
                self.counts["from records"] += 1
            elif body.startswith("run ") and ": trained in " in body:
                self.counts["trained"] += 1
            else:
                print(f"    {body}", flush=True)
                continue
            n = sum(self.counts.values())
            of = f"/{self.expected}" if self.expected else ""
            elapsed = time.perf_counter() - self.start
            print(f"    run {n}{of} ({elapsed:.0f} s in): {body[4:]}", flush=True)


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _refresh_stamp(results: Path) -> str:
    """The start time of the fresh job: kept in ``runs/.refresh-since`` until it finishes."""
    stamp = results / "runs" / ".refresh-since"
    if stamp.is_file():
        since = stamp.read_text().strip()
        print(f"resuming the fresh run started at {since} (runs recorded since are kept)")
    else:
        since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(since + "\n")
        print(f"fresh run: every run recorded before {since} is trained again")
    return since


def run(names: list[str]) -> None:
    from nbclient import NotebookClient

    fresh = "--fresh" in names
    names = [n for n in names if n != "--fresh"]
    profile = os.environ.setdefault("BNUTILS_PROFILE", "full")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("BNUTILS_QUIET", "1")  # no progress bars in the committed outputs
    default = ROOT / ("results/quick" if profile == "quick" else "results")
    results = Path(os.environ.get("BNUTILS_RESULTS", default))  # as bnutils.config has it
    log_path = results / "logs" / "run.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    os.environ["BNUTILS_LOG"] = str(log_path)
    since = _refresh_stamp(results) if fresh else None
    if since:
        os.environ["BNUTILS_REFRESH_SINCE"] = since
    selected = notebooks()
    if names:
        paths = [Path(n).resolve() for n in names if n.endswith(".ipynb") and Path(n).is_file()]
        selected = paths or [p for p in selected if any(n in p.name for n in names)]
    if not selected:
        sys.exit(f"No notebook matches {names}; expected names such as 04 or 04_train.")
    estimates = [nbformat.read(p, as_version=4).metadata.get("bnutils", {}) for p in selected]
    totals = {"from records": 0, "trained": 0}
    began = time.perf_counter()
    for i, (p, before) in enumerate(zip(selected, estimates, strict=True), 1):
        if since and before.get("fresh_since") == since and not check_notebook(p):
            print(f"[{i}/{len(selected)}] {p.name}: already executed in this fresh run", flush=True)
            continue
        committed = before.get("seconds")
        guess = f" (last run {committed:.0f} s)" if committed else ""
        print(f"[{i}/{len(selected)}] {p.name} [{profile}]: executing{guess}", flush=True)
        nb = nbformat.read(p, as_version=4)
        package = package_hash()  # what this notebook's kernel imports
        progress = _CellProgress(nb, committed)
        client = NotebookClient(
            nb,
            timeout=3600,
            kernel_name="python3",
            resources={"metadata": {"path": str(p.parent)}},
            on_cell_start=progress.on_cell_start,
            on_cell_complete=progress.on_cell_complete,
        )
        expected = (before.get("runs") or {}).get("total")
        kernel_log = log_path.parent / f"kernel-{p.stem}.log"  # TensorFlow's C++ and oneDNN lines
        with _LogEcho(log_path, expected) as echo, open(kernel_log, "w") as stderr:
            client.execute(stderr=stderr)
        seconds = time.perf_counter() - echo.start
        _drop_log_noise(nb)
        nbformat.write(nb, p)
        nb = nbformat.read(p, as_version=4)  # hash the outputs as they are stored
        from bnutils._util import env_info

        env = env_info()  # the one source of machine facts (bnutils.results uses it too)
        m = env["machine"]
        flags = "/".join(m["cpu_flags"]) or "no SIMD flags read"
        gpu = "with GPU" if _has_gpu() else "no GPU"
        counts = echo.counts
        nb.metadata["bnutils"] = {
            "profile": profile,
            "executed": env["date"][:10],
            "seconds": round(seconds, 1),
            "machine": f"{m['processor']}, {m['cpu_count']} CPU cores ({flags}), {gpu}",
            "runs": {**counts, "total": sum(counts.values())},
            "package": package,
            "cells": provenance(nb),
        }
        if since:
            nb.metadata["bnutils"]["fresh_since"] = since
        nbformat.write(nb, p)
        for k in totals:
            totals[k] += counts[k]
        left = [e.get("seconds") for e in estimates[i:]]
        eta = f"; about {sum(left) / 60:.0f} min left" if left and all(left) else ""
        ran = f"{counts['from records']} runs from records, {counts['trained']} trained"
        print(f"[{i}/{len(selected)}] {p.name}: done in {seconds:.0f} s ({ran}){eta}", flush=True)
    if fresh and len(selected) == len(notebooks()):
        (results / "runs" / ".refresh-since").unlink(missing_ok=True)
    print(
        f"{len(selected)} notebook(s) in {time.perf_counter() - began:.0f} s: "
        f"{totals['from records']} runs from records, {totals['trained']} trained. Outputs in "
        f"notebooks/, figures in {'figures/quick' if profile == 'quick' else 'figures'}/, run "
        f"records in {_shown(results / 'runs')}/, the job log in {_shown(log_path)}.",
        flush=True,
    )


_NOISE = (
    "absl::InitializeLog()",
    "oneDNN custom operations",
    "cpu_feature_guard",
    "This TensorFlow binary is optimized",
    "To enable the following instructions",
    "Created TensorFlow Lite XNNPACK delegate",  # LiteRT's interpreter, on stderr at every load
)
# C++ (glog) lines such as `E0000 00:00:17955... node_def_util.cc:682] ...`, and absl's Python
# `INFO:tensorflow:` lines: neither obeys TF_CPP_MIN_LOG_LEVEL, neither teaches anything.
_LOG_LINE = re.compile(r"^([EIWF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ |(INFO|WARNING):tensorflow:)")


def _machine_paths() -> list[tuple[str, str]]:
    """This machine's folders as they would appear in an output, and what stands for them."""
    return [
        (str(Path(sys.prefix)) + os.sep, "<venv>/"),
        (str(ROOT) + os.sep, ""),
        (tempfile.gettempdir().rstrip(os.sep) + os.sep, "$TMPDIR/"),
    ]


def _drop_log_noise(nb) -> None:
    """Remove TensorFlow's log lines from stream outputs and write machine paths relatively."""
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        kept = []
        for o in c.outputs:
            if o.get("output_type") == "stream":
                lines = [
                    ln
                    for ln in o["text"].splitlines(keepends=True)
                    if not (_LOG_LINE.match(ln) or any(n in ln for n in _NOISE))
                ]
                if not lines:
                    continue
                text = "".join(lines)
                for path, stand_in in _machine_paths():
                    text = text.replace(path, stand_in)
                o["text"] = text
            kept.append(o)
        c.outputs = kept


def _has_gpu() -> bool:
    try:
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    except Exception:
        return False


def check() -> list[str]:
    """Every breach of the output policy, as lines that say how to fix it (empty: all good)."""
    return [line for p in notebooks() for line in check_notebook(p)]


def check_notebook(p: Path) -> list[str]:
    """The output policy's breaches in one notebook (see :func:`check`)."""
    problems = []
    nb = nbformat.read(p, as_version=4)
    meta = nb.metadata.get("bnutils", {})
    rerun = f"run `python tools/notebooks.py run {p.stem}`"
    if meta.get("profile") != "full":
        problems.append(
            f"{p.name}: outputs are not from a full-profile run "
            f"(metadata profile={meta.get('profile')!r}); run "
            f"`BNUTILS_PROFILE=full python tools/notebooks.py run {p.stem}`."
        )
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    if any(n is None for n in counts) or counts != sorted(counts):
        problems.append(f"{p.name}: code cells not all executed in order: {counts}.")
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code" and any(o.get("output_type") == "error" for o in c.outputs):
            problems.append(f"{p.name}: cell {i} stores an error output.")
    recorded = meta.get("cells")
    if recorded is None:
        if p.name not in LEGACY:
            problems.append(f"{p.name}: no provenance (not executed by the runner); {rerun}.")
        return problems
    if p.name in LEGACY:
        problems.append(f"{p.name}: executed by the runner; remove it from LEGACY.")
    now = provenance(nb)
    if set(now) != set(recorded):
        problems.append(f"{p.name}: code cells were added or removed since it ran; {rerun}.")
    for i, c in enumerate(nb.cells):
        if c.cell_type != "code" or c.id not in recorded:
            continue
        for part in ("source", "outputs"):
            if now[c.id][part] != recorded[c.id].get(part):
                what = "its code changed" if part == "source" else "its outputs were edited"
                problems.append(f"{p.name}: cell {i} ({c.id}): {what} since it ran; {rerun}.")
    return problems


PROSE_BUDGET = 8_280  # words of prose in the whole suite (issue 28)


def prose_words(path: Path) -> int:
    """Words in a notebook's markdown cells, navigation lines excluded: what a reader reads."""
    nb = nbformat.read(path, as_version=4)
    return sum(
        len(c.source.split())
        for c in nb.cells
        if c.cell_type == "markdown" and not c.source.startswith(NAV_MARK)
    )


def stale() -> list[str]:
    """The notebooks executed against a package source other than today's."""
    current = package_hash()
    out = []
    for p in notebooks():
        meta = nbformat.read(p, as_version=4).metadata.get("bnutils", {})
        if meta.get("cells") is not None and meta.get("package") != current:
            out.append(f"{p.name}: executed on {meta.get('executed')} against an older package")
    return out


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "check"
    if cmd == "run":
        run(sys.argv[2:])
    elif cmd == "nav":
        nav()
    elif cmd == "words":
        counts = {p.name: prose_words(p) for p in notebooks()}
        for name, n in counts.items():
            print(f"{n:6,d}  {name}")
        print(f"{sum(counts.values()):6,d}  in all (budget {PROSE_BUDGET:,d})")
    elif cmd == "check":
        found = check()
        print("\n".join(found) or "notebook output policy: OK")
        for line in stale():
            print(f"note: {line}")
        if unverified := sorted(LEGACY):
            print(f"note: {len(unverified)} notebook(s) executed before provenance was recorded")
        sys.exit(1 if found else 0)
    else:
        sys.exit(__doc__)
