"""Convert between a percent-format script and a notebook (authoring aid, no outputs kept).

    python tools/nbpy.py to-nb  notebooks/src.py notebooks/03_add_bn.ipynb
    python tools/nbpy.py to-py  notebooks/03_add_bn.ipynb /tmp/03.py

Cells start with ``# %%`` (code) or ``# %% [markdown]`` (markdown, each line prefixed ``# ``).
The notebooks are the source of truth in git; scripts are scratch copies for editing.
"""

from __future__ import annotations

import sys

import nbformat


def to_nb(src: str, dst: str) -> None:
    cells, kind, buf = [], None, []

    def flush():
        if kind is None:
            return
        text = "\n".join(buf).strip("\n")
        if kind == "markdown":
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in text.splitlines()]
            cells.append(nbformat.v4.new_markdown_cell("\n".join(lines)))
        else:
            cells.append(nbformat.v4.new_code_cell(text))

    for line in open(src, encoding="utf-8").read().splitlines():
        if line.startswith("# %%"):
            flush()
            kind, buf = ("markdown" if "[markdown]" in line else "code"), []
        else:
            buf.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, dst)


def to_py(src: str, dst: str) -> None:
    nb = nbformat.read(src, as_version=4)
    out = []
    for c in nb.cells:
        if c.cell_type == "markdown":
            out.append("# %% [markdown]")
            out.extend(("# " + ln) if ln else "#" for ln in c.source.splitlines())
        else:
            out.append("# %%")
            out.append(c.source)
        out.append("")
    open(dst, "w", encoding="utf-8").write("\n".join(out))


if __name__ == "__main__":
    cmd, a, b = sys.argv[1:4]
    {"to-nb": to_nb, "to-py": to_py}[cmd](a, b)
