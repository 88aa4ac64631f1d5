"""Execute the notebook suite, keep the navigation lines, and check the output policy.

    python tools/notebooks.py run [NAME ...]   # execute in place (profile: $BNUTILS_PROFILE)
    python tools/notebooks.py nav              # rewrite the previous/next navigation lines
    python tools/notebooks.py check            # verify the committed-output policy

Output policy: the committed notebooks carry the outputs of a run in the *full* profile
(metadata ``bnutils.profile == "full"``), every code cell has been executed in order, and
no cell stores an error. ``make run`` produces exactly that; CI re-executes the notebooks
in the quick profile with nbval and never writes them back.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
NAV_MARK = "<!-- nav -->"


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


def run(names: list[str]) -> None:
    from nbclient import NotebookClient

    profile = os.environ.setdefault("BNUTILS_PROFILE", "full")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("BNUTILS_QUIET", "1")  # no progress bars in the committed outputs
    selected = notebooks()
    if names:
        paths = [Path(n).resolve() for n in names if n.endswith(".ipynb") and Path(n).is_file()]
        selected = paths or [p for p in selected if any(n in p.name for n in names)]
    for p in selected:
        start = time.perf_counter()
        print(f"[{profile}] executing {p.name} ...", flush=True)
        nb = nbformat.read(p, as_version=4)
        client = NotebookClient(
            nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(p.parent)}}
        )
        client.execute()
        seconds = time.perf_counter() - start
        _drop_log_noise(nb)
        from bnutils._util import env_info

        env = env_info()  # the one source of machine facts (bnutils.results uses it too)
        m = env["machine"]
        flags = "/".join(m["cpu_flags"]) or "no SIMD flags read"
        gpu = "with GPU" if _has_gpu() else "no GPU"
        nb.metadata["bnutils"] = {
            "profile": profile,
            "executed": env["date"][:10],
            "seconds": round(seconds, 1),
            "machine": f"{m['processor']}, {m['cpu_count']} CPU cores ({flags}), {gpu}",
        }
        nbformat.write(nb, p)
        print(f"  done in {seconds:.0f} s", flush=True)


_NOISE = (
    "absl::InitializeLog()",
    "oneDNN custom operations",
    "cpu_feature_guard",
    "This TensorFlow binary is optimized",
    "To enable the following instructions",
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
    problems = []
    for p in notebooks():
        nb = nbformat.read(p, as_version=4)
        meta = nb.metadata.get("bnutils", {})
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
    return problems


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "check"
    if cmd == "run":
        run(sys.argv[2:])
    elif cmd == "nav":
        nav()
    elif cmd == "check":
        found = check()
        print("\n".join(found) or "notebook output policy: OK")
        sys.exit(1 if found else 0)
    else:
        sys.exit(__doc__)
