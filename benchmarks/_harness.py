"""What every ``benchmarks/*.py`` script shares: the profile, interleaved timing, ratios, results.

* The run profile is the suite's one switch, ``BNUTILS_PROFILE`` (``--quick`` selects the quick
  profile too), read through :func:`bnutils.config.get_profile`; each script keys its sizes by
  the profile's name.
* Variants are timed interleaved in rotating order (:func:`interleaved`), so a slow spell of
  the shared machine hits all of them, and compared by the median of per-repeat ratios
  (:func:`paired_ratio`) and the ratio of the minima (:func:`min_ratio`).
* The report goes through :func:`bnutils.results.write_result` (name, date, profile, machine,
  versions, command, then the data) to ``results/<script>.json``, ``results/quick/`` when quick.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process only


class _Parser(argparse.ArgumentParser):
    """Sets ``BNUTILS_PROFILE=quick`` when ``--quick`` is given, so that the package's run
    records and results of a quick run go to ``results/quick/`` as well, never among the full
    runs' records."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if getattr(parsed, "quick", False):
            os.environ["BNUTILS_PROFILE"] = "quick"
        return parsed


def parser(doc: str, output: bool = True) -> argparse.ArgumentParser:
    """An argument parser described by ``doc``'s first line, with ``--quick`` (which sets
    ``BNUTILS_PROFILE=quick`` for the whole process) and ``--output``."""
    p = _Parser(description=doc.strip().splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="quick profile (the same as BNUTILS_PROFILE=quick)"
    )
    if output:
        p.add_argument(
            "--output",
            type=Path,
            default=None,
            help="JSON file (default: results/<script>.json, results/quick/ when quick)",
        )
    return p


def profile(quick: bool = False):
    """The active :class:`bnutils.config.Profile` (the quick one when ``quick``)."""
    from bnutils.config import get_profile

    return get_profile("quick" if quick else None)


def log(message: str) -> None:
    print(message, flush=True)


def rotated(items: Sequence, k: int) -> list:
    """``items`` rotated left by ``k``: repeat ``k`` of an interleaved run starts elsewhere."""
    k %= len(items)
    return [*items[k:], *items[:k]]


def interleaved(
    fns: Mapping[str, Callable[[], object]], repeats: int = 1, offset: int = 0
) -> dict[str, dict[str, list[float]]]:
    """Run every ``fns[name]()`` once per repeat, the names in rotating order, and time it.

    Returns:
        ``{"wall": {name: [seconds, one per repeat]}, "cpu": {...}}``.
    """
    times = {clock: {name: [] for name in fns} for clock in CLOCKS}
    for r in range(repeats):
        for name in rotated(list(fns), offset + r):
            start = {clock: read() for clock, read in CLOCKS.items()}
            fns[name]()
            for clock, read in CLOCKS.items():
                times[clock][name].append(read() - start[clock])
    return times


def paired_ratio(times: Mapping[str, Sequence[float]], num: str, den: str) -> float:
    """The median over repeats of ``times[num][i] / times[den][i]`` (pairs run seconds apart)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def min_ratio(times: Mapping[str, Sequence[float]], num: str, den: str) -> float:
    """``min(times[num]) / min(times[den])``: the least disturbed repeats."""
    return min(times[num]) / min(times[den])


def save(
    name: str, report: dict, argv: Sequence[str], quick: bool = False, output: Path | None = None
) -> Path:
    """Write ``report`` with :func:`bnutils.results.write_result` and log where.

    Args:
        name: the script's name (``bench_inference``); the command is ``python
            benchmarks/<name>.py <argv>``.
        report: the measurements.
        argv: the arguments ``main()`` received.
        quick: ``--quick`` was given.
        output: a ``.json`` file instead of ``results/<name>.json`` (its stem names the result).
    """
    from bnutils import config
    from bnutils.results import write_result

    prof = profile(quick)
    if output is None:
        folder, stem = config.results_dir(), name
        if prof.is_quick and config.get_profile().name != "quick":  # never over a full run
            folder = folder / "quick"
    else:
        folder, stem = Path(output).parent, Path(output).stem
    data = {**report, "load_average_1_5_15_min_at_end": [round(v, 2) for v in os.getloadavg()]}
    command = ["python", f"benchmarks/{name}.py", *argv]
    path = write_result(stem, data, command=command, directory=folder, profile=prof.name)
    log(f"saved {path}")
    return path
