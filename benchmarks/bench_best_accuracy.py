"""How far does a small CNN get on Fashion-MNIST within 20 minutes of 2-core training, with BN
and without?

    .venv/bin/python benchmarks/bench_best_accuracy.py                # both models (2 x 20 min)
    .venv/bin/python benchmarks/bench_best_accuracy.py --models bn    # one model
    .venv/bin/python benchmarks/bench_best_accuracy.py --quick        # subsets, about a minute

The recipe is in ``_recipe.py``: the small residual CNN (32-64-128 channels, global average
pooling) with ``bnutils.FusedBatchNormalization`` (``bn``) or without normalization
(``plain``), SGD with Nesterov momentum and a one-cycle learning rate, label smoothing 0.1,
pad-and-crop and flip augmentation, batch 128, on the 55,000 training images (5,000 held out
for validation). Peak rates: 0.4 with BN, 0.1 without (the better of 0.05 and 0.1 in the
4-epoch trials of issue 27; ``bench_time_to_accuracy.py`` has the grids).

The one-cycle schedule must know its length before training starts, so the epochs are planned
from a probe (``probe_epoch_seconds``: seconds per training step from two fits of different
lengths, plus a validation pass) that gives an epoch's seconds, and the plan
is the number of epochs that fit in 95% of the budget. The plan is saved in the result file and
reused when the benchmark runs again, so that a run cut short resumes from its run record
(``bnutils.train``'s cache); ``--epochs`` sets it by hand, ``--replan`` probes again.

Reported per model and seed: the planned epochs, the training seconds (validation included),
the test accuracy on the 10,000 test images, with flip test-time augmentation, and whether it
meets the goal (at least 94.0% in at most 20 minutes). Results go to
``results/bench_best_accuracy.json`` (quick: ``results/quick/...``), with the CPU flags.
"""

from __future__ import annotations

import json
import math
import sys
import time

import _harness
import _recipe

GOAL_ACCURACY = 0.94
BUDGET_S = 1200
SETTINGS = {
    "full": {"train": None, "val": 5_000, "test": None, "budget_s": BUDGET_S, "probe_steps": 60},
    "quick": {"train": 2_000, "val": 1_000, "test": 2_000, "budget_s": 40, "probe_steps": 6},
}
MODELS = {"bn": {"bn": True, "peak": 0.4}, "plain": {"bn": False, "peak": 0.1}}
PLAN_SHARE = 0.95  # of the budget: epochs vary by a few percent


def probe_epoch_seconds(model_name: str, ds, probe_steps: int, seed: int) -> float:
    """Seconds of one training epoch plus one validation pass, estimated on a model built like
    the run's: the seconds per step are the difference between a fit of ``probe_steps`` and
    one of ``probe_steps // 3`` steps, divided by the steps between them, so that the cost of
    a ``fit`` call (a few seconds) is not spread over the steps; each fit and the validation
    pass are timed twice after an untimed pass that traces them, and the faster counts."""
    import tensorflow as tf

    from bnutils.data import make_tf_dataset

    spec = MODELS[model_name]
    model = _recipe.build(spec["bn"], spec["peak"], steps=1000)
    batch = _recipe.BATCH_SIZE
    n = min(len(ds.x_train), probe_steps * batch)
    augment = _recipe.augmenter(seed)
    data = make_tf_dataset(ds.x_train[:n], ds.y_train[:n], batch, shuffle=True, seed=seed)
    data = data.map(lambda x, y: (augment(x, training=True), y)).cache()
    steps = math.ceil(n / batch)
    short = max(1, steps // 3)
    x_val = tf.constant(ds.x_val)

    def best_of_two(call):
        call()  # traces
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return min(times)

    long_fit = best_of_two(lambda: model.fit(data, epochs=1, verbose=0))
    short_fit = best_of_two(lambda: model.fit(data.take(short), epochs=1, verbose=0))
    validation = best_of_two(lambda: model.predict(x_val, batch_size=256, verbose=0))
    per_step = (long_fit - short_fit) / max(1, steps - short)
    if per_step <= 0:  # a disturbed probe: fall back on the plain average
        per_step = long_fit / steps
    return per_step * math.ceil(len(ds.x_train) / batch) + validation


def saved_plan(path, model_name: str, profile: str, budget_s: float) -> int | None:
    """The planned epochs of ``model_name`` in an earlier result file, or ``None``."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if report.get("profile") != profile or report.get("settings", {}).get("budget_s") != budget_s:
        return None
    for row in report.get("rows", []):
        if row.get("model") == model_name and row.get("planned epochs"):
            return int(row["planned epochs"])
    return None


def run_one(model_name: str, ds, cfg: dict, epochs: int, seed: int, profile: str, force: bool):
    """Train (or read the record of) one model for ``epochs`` planned epochs; its row."""
    import bnutils

    spec = MODELS[model_name]
    steps = epochs * math.ceil(len(ds.x_train) / _recipe.BATCH_SIZE)
    result = bnutils.train(
        lambda: _recipe.build(spec["bn"], spec["peak"], steps),
        ds,
        epochs=epochs,
        batch_size=_recipe.BATCH_SIZE,
        seed=seed,
        augment=_recipe.augmenter(seed),
        run_name=f"bench-best-{model_name}-{profile}",
        measure=_recipe.test_accuracy,
        config={"peak": spec["peak"], "budget_s": cfg["budget_s"]},
        force=force,
    )
    measured = result.measured or {}
    seconds = float(result.total_time)
    test, tta = measured.get("test_accuracy"), measured.get("test_accuracy_flip_tta")
    best = max(a for a in (test, tta) if a is not None) if measured else None
    met = best is not None and best >= GOAL_ACCURACY and seconds <= cfg["budget_s"]
    return {
        "model": model_name,
        "seed": seed,
        "peak lr": spec["peak"],
        "planned epochs": epochs,
        "epochs run": len(result.val_accuracy),
        "training seconds": round(seconds, 1),
        "val accuracy": round(float(result.val_accuracy[-1]), 4) if result.val_accuracy else None,
        "test accuracy": None if test is None else round(test, 4),
        "test accuracy, flip TTA": None if tta is None else round(tta, 4),
        "goal (>= 94.0% in <= 20 min)": "met" if met else "not met",
        "trained (UTC)": result.created[:16],  # a run read from its record keeps its own seconds
    }


def run(
    quick: bool = False,
    models=tuple(MODELS),
    seeds=(0,),
    epochs: int | None = None,
    replan: bool = False,
    force: bool = False,
    previous=None,
) -> dict:
    """Run the benchmark and return its report (see the module docstring)."""
    import bnutils

    profile = _harness.profile(quick).name
    cfg = dict(SETTINGS[profile])
    ds = bnutils.load_dataset(validation_size=cfg["val"]).subset(cfg["train"], None, cfg["test"])
    _harness.log(f"{profile}: {ds.summary()}; budget {cfg['budget_s']} s per run")
    rows, plans = [], {}
    for name in models:
        planned, how, estimate = epochs, "given (--epochs)", None
        if planned is None and not replan and previous is not None:
            planned, how = saved_plan(previous, name, profile, cfg["budget_s"]), "a saved plan"
        if planned is None:
            estimate = probe_epoch_seconds(name, ds, cfg["probe_steps"], seeds[0])
            planned = max(1, int(PLAN_SHARE * cfg["budget_s"] // estimate))
            how = f"a probe of {estimate:.0f} s per epoch (training and validation)"
        plans[name] = {"planned epochs": planned, "probed epoch seconds": estimate, "from": how}
        _harness.log(
            f"{name}: {planned} epochs"
            + (f" (probe: {estimate:.1f} s per epoch)" if estimate else " (saved or given plan)")
        )
        for seed in seeds:
            rows.append(run_one(name, ds, cfg, planned, seed, profile, force))
            _harness.log(str(rows[-1]))
    return {
        "settings": {
            **cfg,
            "models": {m: MODELS[m] for m in models},
            "seeds": list(seeds),
            "plans": plans,
            "recipe": {
                "widths": list(_recipe.WIDTHS),
                "batch_size": _recipe.BATCH_SIZE,
                "momentum (Nesterov)": _recipe.MOMENTUM,
                "label_smoothing": _recipe.LABEL_SMOOTHING,
                "shift_pixels": _recipe.SHIFT_PIXELS,
                "flip": True,
            },
        },
        "rows": rows,
        "notes": [
            f"Training seconds count fit (validation after each epoch included), not the probe "
            f"that planned the epochs nor the test evaluation. The goal counts the better of the "
            f"plain and the flip-TTA test accuracy and a run of at most {cfg['budget_s']} s. "
            f"A run read from its record keeps the seconds of the machine that trained it "
            f"(`trained`, from the record; the source line names the machine of this file).",
        ],
    }


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _harness.parser(__doc__)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="planned epochs (no probe)")
    parser.add_argument("--replan", action="store_true", help="probe again, ignore saved plans")
    parser.add_argument("--force", action="store_true", help="retrain even if recorded")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be a positive integer, received {args.epochs}.")
    from bnutils import config

    previous = args.output or config.results_dir() / "bench_best_accuracy.json"
    report = run(
        quick=args.quick,
        models=tuple(args.models),
        seeds=tuple(args.seeds),
        epochs=args.epochs,
        replan=args.replan,
        force=args.force,
        previous=previous,
    )
    from bnutils.results import make_table

    _harness.log(str(make_table(report["rows"])))
    _harness.save("bench_best_accuracy", report, argv, args.quick, args.output)
    return report


if __name__ == "__main__":
    main()
