"""Report tables, and the one JSON schema of every file under ``results/``.

:func:`write_result` writes ``{"name", "date", "profile", "machine", "versions", "command",
**data}``; :func:`read_result` (and ``tools/results_table.py``) reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from bnutils import config
from bnutils._util import atomic_write_json, env_info, json_safe

__all__ = ["SCHEMA", "Report", "Table", "make_table", "read_result", "write_result"]

SCHEMA = ("name", "date", "profile", "machine", "versions", "command")


def _fmt(value, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if math.isfinite(value) and value != 0 and abs(value) < 10.0 ** (1 - digits):
            return f"{value:.{digits}g}"  # 3e-4 must not print as 0.000
        return f"{value:.{digits}f}"
    return str(value)


class Report:
    """The base of the package's reports (insertion, folding, precise BN, the doctor, batch
    independence, the export check): dataclasses whose ``str()`` is a readable table and whose
    :meth:`to_dict` is the same facts as JSON values (for :func:`write_result`)."""

    def to_dict(self) -> dict:
        """The report's fields, nested dataclasses included, as JSON values."""
        return json_safe(dataclasses.asdict(self))


@dataclasses.dataclass
class Table:
    """Rows of results that display as a Markdown table in a notebook (``digits``: decimals)."""

    rows: list[dict]
    columns: list[str]
    digits: int = 3

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for row in self.rows:
            cells = (_fmt(row.get(c), self.digits) for c in self.columns)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __str__(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:  # the plain-text output of a notebook cell: the table, no fields
        return self.to_markdown()

    def to_dict(self) -> dict:
        """``{"columns": [...], "rows": [...]}``, the layout ``tools/results_table.py`` reads."""
        return {"columns": list(self.columns), "rows": [dict(r) for r in self.rows]}


def make_table(
    rows: Iterable[Mapping], columns: Sequence[str] | None = None, digits: int = 3
) -> Table:
    """A :class:`Table` from dict rows (columns: the given order, else first-seen order)."""
    rows = [dict(r) for r in rows]
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    return Table(rows=rows, columns=list(columns), digits=digits)


def _relative(arg: str) -> str:
    """An absolute path inside the repository as a repository-relative one (else unchanged)."""
    if os.path.isabs(arg):
        with contextlib.suppress(ValueError):
            return str(Path(arg).resolve().relative_to(config.repo_root()))
    return arg


def _command(command) -> list[str] | None:
    if command is None:
        if not sys.argv or "ipykernel" in sys.argv[0]:  # a notebook: argv names the kernel
            return None
        command = ["python", *sys.argv] if sys.argv[0].endswith(".py") else sys.argv
    parts = shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
    return [_relative(c) for c in parts]


def write_result(
    name: str,
    data: Mapping,
    command: Sequence[str] | None = None,
    directory: str | os.PathLike | None = None,
    *,
    profile: str | None = None,
) -> Path:
    """Write ``data`` to ``<directory>/<name>.json`` atomically, in the one result schema.

    The file holds ``name``, ``date`` (UTC, ISO 8601), ``profile``, ``machine`` and
    ``versions`` (from :func:`bnutils._util.env_info`) and ``command``, then ``data``'s keys.

    Args:
        name: file stem, e.g. ``"claims_audit"`` (no folder: use ``directory``).
        data: the measurements (JSON values; numpy values and NaN are converted, NaN to null).
        command: what reproduces the file, e.g. ``["python", "benchmarks/bench_inference.py"]``
            (default: ``sys.argv``; in a notebook pass it, e.g.
            ``["python", "tools/notebooks.py", "run", "notebooks/05_evaluate.ipynb"]``).
        directory: default :func:`bnutils.config.results_dir` (``results/quick/`` when quick).
        profile: default the active profile's name; a script with its own size switch
            (``--quick``) passes it.

    Returns:
        The path written.

    Raises:
        ValueError: a bad ``name``, or ``data`` sets a key of the schema.
    """
    if not isinstance(name, str) or not name or Path(name).name != name or name.endswith(".json"):
        raise ValueError(f"Expected a file stem such as 'claims_audit' as name, received {name!r}.")
    clash = [k for k in SCHEMA if k in data]
    if clash:
        raise ValueError(f"data sets {clash}, which write_result fills in; rename those keys.")
    env = env_info()  # date, machine, versions
    head = {"name": name, "date": env.pop("date"), "profile": profile or config.get_profile().name}
    record = {**head, **env, "command": _command(command), **data}
    folder = config.results_dir() if directory is None else Path(directory)
    return atomic_write_json(folder / f"{name}.json", record)


def read_result(path: str | os.PathLike) -> dict:
    """The dict of a result file written by :func:`write_result`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file lacks keys of the schema (written before it: rerun its command).
    """
    path = Path(path)
    record = json.loads(path.read_text())
    missing = [k for k in SCHEMA if k not in record]
    if missing:
        raise ValueError(
            f"{path} lacks the result-schema keys {missing}; expected a file written by "
            "bnutils.results.write_result. Rerun the command that writes it."
        )
    return record
