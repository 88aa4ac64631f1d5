"""Rebuild the README's results section from the committed result files.

    python tools/results_table.py          # rewrite README.md between the result markers
    python tools/results_table.py --print  # print the section only

Every number in the README's results section comes from a JSON file under ``results/`` that a
notebook or a benchmark script wrote; this script only formats them. A missing file is reported
as "not yet measured" rather than invented.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from bnutils.results import make_table, read_result

ROOT = Path(__file__).resolve().parent.parent
RES = ROOT / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
NB_START, NB_END = "<!-- notebooks:start -->", "<!-- notebooks:end -->"


def _load(name: str):
    p = RES / name
    return read_result(p) if p.is_file() else None


def _machine(d) -> str:
    """Machine and versions of a result file, e.g. ``x86_64, 2 CPUs; Keras 3.15.1``."""
    m, v = d["machine"], d["versions"]
    cpus = f"{m['cpu_count']} CPUs" if m.get("cpu_count") else None
    flags = f"flags {' '.join(m['cpu_flags'])}" if m.get("cpu_flags") else None
    machine = ", ".join(x for x in (m.get("platform"), m.get("processor"), cpus, flags) if x)
    names = {"python": "Python", "numpy": "NumPy", "keras": "Keras", "tensorflow": "TensorFlow"}
    versions = ", ".join(f"{label} {v[k]}" for k, label in names.items() if v.get(k))
    return "; ".join(x for x in (machine or "unknown machine", versions) if x)


def section() -> str:
    out = []
    for fname, title, render in _SECTIONS:
        d = _load(fname)
        out.append(f"### {title}\n")
        if d is None:
            out.append(f"Not yet measured (`results/{fname}` is missing).\n")
            continue
        out.append(render(d))
        how = f"`{shlex.join(d['command'])}`" if d["command"] else "an unrecorded command"
        when = f" on {d['date'][:10]}" if d["date"] else ""
        out.append(
            f"\nSource: `results/{fname}`, written by {how}{when}; profile "
            f"`{d['profile']}`; {_machine(d)}.\n"
        )
    return "\n".join(out)


def _render_rows(d) -> str:
    """Generic renderer: a result file with a "rows" list of dicts and optional "notes"."""
    rows = d.get("rows", [])
    if not rows:
        return "(no rows)\n"
    table = make_table(rows).to_markdown()  # every row's columns, in first-seen order
    notes = d.get("notes", [])
    return table + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "") + "\n"


def _render_claims_audit(d) -> str:
    """The verdicts, test accuracy with both evaluations, one sentence per verdict, the rates."""
    out = [_render_rows(d)]
    if d.get("accuracy"):
        out.append("\n" + make_table(d["accuracy"]).to_markdown() + "\n")
    if d.get("sentences"):
        out.append("\n" + "\n".join(f"- {line}" for line in d["sentences"]) + "\n")
    rates = d.get("learning_rates", {})
    if rates:
        chosen = "; ".join(
            f"{name}: {r['best']:g} (grid {r['grid'][0]:g} to {r['grid'][-1]:g}, "
            f"{r['seeds']} seed{'s' * (r['seeds'] > 1)})"
            for name, r in rates.items()
        )
        out.append(f"- Best learning rates on validation accuracy: {chosen}.\n")
    if "training_seconds" in d:
        flags = "; ".join(d.get("run_cpu_flags") or ["?"])
        out.append(
            f"- {d.get('runs', '?')} runs, {d['training_seconds'] / 60:.1f} min of training "
            f"(CPU flags of the machine that trained them: {flags}).\n"
        )
    return "".join(out)


def _render_time_to_accuracy(d) -> str:
    """Each model at its fastest point and the ratio, then every grid point that ran."""
    out = _render_rows(d)
    columns = ("model", "schedule epochs", "rate", "seconds", "best test accuracy", "stopped")
    runs = [{k: r.get(k) for k in columns} for r in d.get("runs", [])]
    if runs:
        out += "\nEvery grid point, in the order it ran:\n\n" + make_table(runs).to_markdown()
        out += "\n"
    return out


def _render_best_accuracy(d) -> str:
    """The rows, plus how the epochs were planned."""
    out = _render_rows(d)
    for model, plan in d.get("settings", {}).get("plans", {}).items():
        out += f"- {model}: {plan['planned epochs']} planned epochs, from {plan['from']}.\n"
    return out


def _render_bn_profile(d) -> str:
    """Step time and ratio per variant, op time per category and what BN adds to it, the
    share in "other", then BN's floor: the element-wise ops alone, their passes and bandwidth."""
    out = [_render_rows(d)]
    per, extra = d.get("op_ms_per_step", {}), d.get("op_ms_vs_none", {})
    if per:
        rows = []
        for category in next(iter(per.values())):
            row = {"op ms per step": category}
            row.update({v: round(per[v][category], 1) for v in per})
            row.update({f"{v} - none": round(extra[v][category], 1) for v in extra})
            rows.append(row)
        out.append("\n" + make_table(rows).to_markdown() + "\n")
    if d.get("other_share"):
        shares = ", ".join(f"{v} {share:.1%}" for v, share in d["other_share"].items())
        out.append(f'\nShare of op time in "other": {shares}.\n')
    floor = d.get("floor")
    if floor:
        out.append(
            f"\nAlone, forward and backward at the BN layers' shapes ({floor['activations']:,} "
            f"activations, {floor['MB per pass']} MB per pass):\n\n"
            + make_table(floor["rows"]).to_markdown()
            + "\n\n"
        )
        out.append(
            f"- BN's floor: fused BN + ReLU makes {floor['extra passes']} more passes over the "
            f"activations than the no-BN twin, which pays for {floor['no-BN twin pays']}; at "
            f"the copy's {floor['bandwidth GB/s (copy)']} GB/s that is "
            f"{floor['floor of the extra, ms']} ms, {floor['floor / no-BN step']:.1%} of the "
            f"no-BN step. Measured: {floor['measured alone, ms']} ms alone, "
            f"{floor['fused step minus none step, ms']} ms inside the training step. A kernel "
            f"doing BN + ReLU in one pass each way would make "
            f"{floor['one-kernel BN + ReLU: extra passes']} extra passes "
            f"({floor['one-kernel floor / no-BN step']:.1%} of the step).\n"
        )
    remapper = d.get("remapper")
    if remapper:
        said = "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in remapper.items())
        out.append(f"- TensorFlow's remapper, in the traced steps: {said}.\n")
    return "".join(out)


def _render_inference(d) -> str:
    lines = [
        "| mode | batch | unfolded ms | folded ms | no BN ms | folded / no BN "
        "| unfolded / folded |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, batches in d.get("batches", {}).items():
        for batch, v in batches.items():
            c = v.get("cpu") or v["wall"]
            lat = c["latency"]
            lines.append(
                f"| {mode} | {batch} | {lat['unfolded']['median_ms']:.3f} | "
                f"{lat['folded']['median_ms']:.3f} | {lat['no_bn']['median_ms']:.3f} | "
                f"{c['ratio_folded_over_no_bn']:.2f} | {c['ratio_unfolded_over_folded']:.2f} |"
            )
    goals = d.get("goals", {})
    return "\n".join(lines) + (
        f"\n\nMedian CPU time per call of the benchmark process (wall time on a shared machine is "
        f"noisier; both are in the file). Goals: folded / no BN <= "
        f"{goals.get('folded_over_no_bn_max')}, unfolded / folded >= "
        f"{goals.get('unfolded_over_folded_batch1_min')} at batch 1. "
        f"Folding: {d['model']['layers']['unfolded']} -> {d['model']['layers']['folded']} layers, "
        f"largest relative difference {d['model']['fold_max_rel_diff']:.1e}.\n"
    )


_SECTIONS = [
    (
        "claims_audit.json",
        "With vs without BN: test accuracy and the claims audit (notebook 05)",
        _render_claims_audit,
    ),
    (
        "bench_time_to_accuracy.json",
        "Time to 91% test accuracy, each model at its best, with and without BN "
        "(benchmarks/bench_time_to_accuracy.py)",
        _render_time_to_accuracy,
    ),
    (
        "bench_best_accuracy.json",
        "Best accuracy within 20 minutes of 2-core training, with and without BN "
        "(benchmarks/bench_best_accuracy.py)",
        _render_best_accuracy,
    ),
    ("tuning_summary.json", "Hyperparameters (notebook 06)", _render_rows),
    (
        "test_time_adaptation.json",
        "Test-time adaptation: BN statistics re-estimated on shifted inputs (appendix A3)",
        _render_rows,
    ),
    (
        "bench_bn_layers.json",
        "Training-step cost of BN layers (benchmarks/bench_bn_layers.py)",
        _render_rows,
    ),
    (
        "bench_bn_profile.json",
        "Where BN's training time goes, per op (benchmarks/bench_bn_profile.py)",
        _render_bn_profile,
    ),
    (
        "bench_bn_profile_onednn_off.json",
        "The same profile with oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)",
        _render_bn_profile,
    ),
    (
        "bench_inference.json",
        "Inference latency: unfolded, folded, no BN (benchmarks/bench_inference.py)",
        _render_inference,
    ),
]


# The README's main figures: (file under figures/, caption). The notebooks write them in the
# full profile (`make run`); a missing file is listed as not yet produced.
FIGURES = [
    (
        "04_fig1_percentiles.png",
        "Ioffe & Szegedy's Figure 1(b, c) on Fashion-MNIST: the 15th, 50th "
        "and 85th percentiles of one sigmoid input over training, without and with BN "
        "(notebook 04)",
    ),
    (
        "05_test_accuracy.png",
        "Test accuracy per seed, MLP and CNN each at its best learning rate: no BN, BN with its "
        "moving averages, BN after precise BN; mean and 95% interval in black (notebook 05)",
    ),
    (
        "05_cnn_curves_seeds.png",
        "CNN learning curves at each model's best learning rate, mean and spread over seeds "
        "(notebook 05)",
    ),
    (
        "05_lr_range.png",
        "Validation accuracy over learning rates, each model with and without BN: the sigmoid "
        "MLP (SGD, 5 seeds) and the small CNN (SGD with momentum, 1 seed) (notebook 05)",
    ),
    (
        "06_learning_rate.png",
        "ReLU MLP, SGD with momentum: final validation accuracy over "
        "learning rates, with and without BN (notebook 06)",
    ),
    (
        "06_init_scale.png",
        "ReLU MLP: final validation accuracy over initial weight scales, with "
        "and without BN (notebook 06)",
    ),
]


def figures() -> str:
    out = [
        "### Main figures\n",
        "Written by the notebooks in the full profile (`make run`); `make results` only links "
        "them.\n",
    ]
    for name, caption in FIGURES:
        # a figure counts once the notebook that writes it is in the suite (not a draft)
        published = any((ROOT / "notebooks").glob(f"{name[:2]}_*.ipynb"))
        if published and (ROOT / "figures" / name).is_file():
            out.append(f"**{caption}.**\n\n![{caption}](figures/{name})\n")
        else:
            out.append(f"- `figures/{name}` not yet produced: {caption}.\n")
    return "\n".join(out)


def notebook_list() -> str:
    import nbformat

    lines = ["| notebook | step | full run |", "|---|---|---|"]
    for p in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(p, as_version=4)
        title = next(
            (
                ln[2:]
                for c in nb.cells
                if c.cell_type == "markdown"
                for ln in c.source.splitlines()
                if ln.startswith("# ")
            ),
            p.stem,
        )
        meta = nb.metadata.get("bnutils", {})
        run = f"{meta.get('profile', '?')}, {meta.get('seconds', '?')} s" if meta else "not run"
        lines.append(f"| [`{p.name}`](notebooks/{p.name}) | {title} | {run} |")
    return "\n".join(lines) + "\n"


def _replace(text: str, start: str, end: str, body: str) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"README.md lacks the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}{end}{tail}"


if __name__ == "__main__":
    body = section() + "\n" + figures()
    if "--print" in sys.argv:
        print(body)
        sys.exit(0)
    readme = ROOT / "README.md"
    text = readme.read_text()
    text = _replace(text, START, END, body)
    text = _replace(text, NB_START, NB_END, notebook_list())
    readme.write_text(text)
    print("README.md results section rebuilt")
