"""Does BN make a CNN reach 91% test accuracy sooner, in seconds, each model at its best?

    .venv/bin/python benchmarks/bench_time_to_accuracy.py           # full run (30-45 minutes)
    .venv/bin/python benchmarks/bench_time_to_accuracy.py --quick   # subsets, a few minutes

Ioffe and Szegedy's claim is fewer steps at higher learning rates. Each model trains on grids
that include high rates and short schedules, and is scored at its fastest setting:

* ``resnet_bn``: the residual CNN of ``_recipe.py`` with ``bnutils.FusedBatchNormalization``,
  SGD with Nesterov momentum, one-cycle schedules sized to 1, 2 and 3 epochs, peaks 0.4 and 0.8;
* ``resnet``: the same network without normalization, schedules of 2 and 3 epochs, peaks 0.05
  and 0.1 (one epoch does not reach 91% at these rates);
* ``cnn_adam``: the notebooks' VGG-style CNN without BN (``bnutils.build_cnn``) with Adam at a
  constant 1e-3 and 3e-3, up to 5 epochs (it reached 91% in 3 epochs in an earlier grid);
* ``cnn_bn_adam``: its twin with ``bnutils.FusedBatchNormalization`` before every activation,
  trained the same way.

The residual CNNs use the recipe's label smoothing and pad-and-crop and flip augmentation;
the two CNNs train as in that earlier grid (plain cross-entropy, no augmentation). The test
accuracy is measured four times an epoch (``TimeToTarget``, an ``AccuracyTracker`` on the test
set; its evaluations are off the clock); a run stops when it reaches the target, or when its
training seconds pass the best time already reached by its group (BN: ``resnet_bn`` and
``cnn_bn_adam``; no BN: ``resnet`` and ``cnn_adam``), since it can no longer be the group's best. Schedules run from
the shortest up, the models interleaved in rotating order at each length, and a model that
reached the target skips its longer schedules. Seconds count optimizer steps (tracing
included). Every run is a run record (``bnutils.train``), so a cut run resumes. The report's
ratio is the BN group's best seconds over the no-BN group's (the issue's goal: at most 1/3).
Results go to ``results/bench_time_to_accuracy.json`` (quick: ``results/quick/...``).
"""

from __future__ import annotations

import math
import sys

import _harness
import _recipe

from bnutils.callbacks import AccuracyTracker

GROUPS = {"resnet_bn": "BN", "resnet": "no BN", "cnn_adam": "no BN", "cnn_bn_adam": "BN"}
SETTINGS = {
    "full": {
        "train": None,
        "val": 5_000,
        "test": None,
        "target": 0.91,
        "checks_per_epoch": 4,
        "grids": {
            "resnet_bn": {"epochs": [1, 2, 3], "rates": [0.4, 0.8]},
            "resnet": {"epochs": [2, 3], "rates": [0.05, 0.1]},
            "cnn_adam": {"epochs": [5], "rates": [3e-3, 1e-3]},
            "cnn_bn_adam": {"epochs": [5], "rates": [3e-3, 1e-3]},
        },
    },
    "quick": {
        "train": 3_000,
        "val": 500,
        "test": 1_000,
        "target": 0.7,
        "checks_per_epoch": 2,
        "grids": {
            "resnet_bn": {"epochs": [1, 2], "rates": [0.4]},
            "resnet": {"epochs": [2], "rates": [0.05]},
            "cnn_adam": {"epochs": [2], "rates": [3e-3]},
            "cnn_bn_adam": {"epochs": [2], "rates": [3e-3]},
        },
    },
}


class TimeToTarget(AccuracyTracker):
    """Test accuracy every ``every`` steps (off the clock); stops training when it reaches
    ``target`` or when the training seconds pass ``give_up_after`` (``None``: never)."""

    _settings = (*AccuracyTracker._settings, "target", "give_up_after")

    def __init__(self, sets, target: float, give_up_after=None, every: int = 100):
        super().__init__(sets, batch_size=1000, every=every, name="time_to_target")
        self.target = float(target)
        self.give_up_after = None if give_up_after is None else float(give_up_after)

    def record(self, step: int) -> None:
        super().record(step)
        reached = self.accuracy["test"][-1] >= self.target
        late = self.give_up_after is not None and self.seconds[-1] > self.give_up_after
        if step > 0 and (reached or late):
            self.model.stop_training = True

    def reached(self) -> tuple[int, float] | None:
        """``(step, seconds)`` of the first record at or above the target, or ``None``."""
        for step, seconds, accuracy in zip(
            self.steps, self.seconds, self.accuracy["test"], strict=True
        ):
            if accuracy >= self.target:
                return step, seconds
        return None


def builder(model: str, rate: float, steps: int):
    """A zero-argument builder of one grid point (compiled)."""
    import keras

    import bnutils

    if model not in GROUPS:
        raise ValueError(f"Unknown model {model!r}; expected one of {list(GROUPS)}.")
    if model not in ("cnn_adam", "cnn_bn_adam"):
        return lambda: _recipe.build(model == "resnet_bn", rate, steps, name=model)
    bn = model == "cnn_bn_adam"

    def build():
        net = bnutils.build_cnn(
            norm="batch" if bn else None,
            bn_layer=bnutils.FusedBatchNormalization if bn else None,
            name=model,
        )
        net.compile(
            optimizer=keras.optimizers.Adam(rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        return net

    return build


def time_to_target(model, rate, epochs, ds, cfg, seed, give_up_after=None) -> dict:
    """Train (or read the record of) one grid point; its row (``seconds`` is ``None`` when the
    target was not reached)."""
    import bnutils

    per_epoch = math.ceil(len(ds.x_train) / _recipe.BATCH_SIZE)
    tracker = TimeToTarget(
        {"test": (ds.x_test, ds.y_test)},
        cfg["target"],
        give_up_after,
        every=max(1, per_epoch // cfg["checks_per_epoch"]),
    )
    result = bnutils.train(
        builder(model, rate, epochs * per_epoch),
        ds,
        epochs=epochs,
        batch_size=_recipe.BATCH_SIZE,
        seed=seed,
        augment=None if model.startswith("cnn") else _recipe.augmenter(seed),
        run_name=f"tta-{model}-{epochs}ep-{rate:g}",
        callbacks=[tracker],
    )
    reached = tracker.reached()
    accuracy = tracker.accuracy["test"]
    if reached is not None:
        stopped = "reached"
    elif result.diverged:
        stopped = "diverged"
    elif give_up_after is not None and tracker.seconds and tracker.seconds[-1] > give_up_after:
        stopped = "slower than the group's best"
    else:
        stopped = "schedule ended"
    return {
        "model": model,
        "group": GROUPS[model],
        "schedule epochs": epochs,
        "rate": rate,
        "seconds": None if reached is None else round(reached[1], 1),
        "epochs": None if reached is None else round(reached[0] / per_epoch, 2),
        "best test accuracy": round(max(accuracy), 4),
        "stopped": stopped,
        "seconds per epoch": round(tracker.seconds[-1] / max(tracker.steps[-1], 1) * per_epoch, 1),
        "from record": bool(result.from_cache),
    }


def summarize(runs: list[dict]) -> list[dict]:
    """One row per model at its fastest grid point (or its most accurate, when none reached),
    then one row per group with BN's seconds over no BN's."""
    rows = []
    for model in GROUPS:
        mine = [r for r in runs if r["model"] == model]
        reached = [r for r in mine if r["seconds"] is not None]
        if reached:
            rows.append(min(reached, key=lambda r: r["seconds"]))
        elif mine:
            rows.append(max(mine, key=lambda r: r["best test accuracy"]))
    best = {}
    for group in ("BN", "no BN"):
        times = [r["seconds"] for r in runs if r["group"] == group and r["seconds"] is not None]
        best[group] = min(times) if times else None
    ratio = best["BN"] / best["no BN"] if None not in best.values() else None
    return [
        {key: r[key] for key in ("model", "group", "schedule epochs", "rate", "seconds", "epochs")}
        | {
            "best test accuracy": r["best test accuracy"],
            "seconds per epoch": r["seconds per epoch"],
        }
        for r in rows
    ] + [
        {
            "model": "BN vs no BN",
            "group": "ratio",
            "seconds": None if ratio is None else round(ratio, 3),
        }
    ]


def run(quick: bool = False, seed: int = 0, target: float | None = None) -> dict:
    """Run the benchmark and return its report (see the module docstring)."""
    import bnutils

    profile = _harness.profile(quick).name
    cfg = dict(SETTINGS[profile])
    if target is not None:
        cfg["target"] = target
    if not 0 < cfg["target"] < 1:
        raise ValueError(f"target must be an accuracy in (0, 1), received {cfg['target']!r}.")
    ds = bnutils.load_dataset(validation_size=cfg["val"]).subset(cfg["train"], None, cfg["test"])
    _harness.log(f"{profile}: {ds.summary()}; target test accuracy {cfg['target']}")
    grids = cfg["grids"]
    lengths = sorted({e for grid in grids.values() for e in grid["epochs"]})
    runs, best, done = [], {"BN": None, "no BN": None}, set()
    for i, epochs in enumerate(lengths):
        for model in _harness.rotated(list(grids), i):
            if epochs not in grids[model]["epochs"] or model in done:
                continue
            for rate in grids[model]["rates"]:
                group = GROUPS[model]
                row = time_to_target(model, rate, epochs, ds, cfg, seed, best[group])
                runs.append(row)
                _harness.log(str(row))
                if row["seconds"] is not None:
                    done.add(model)
                    best[group] = min(best[group] or math.inf, row["seconds"])
    rows = summarize(runs)
    ratio = rows[-1]["seconds"]
    return {
        "settings": {**cfg, "seed": seed},
        "rows": rows,
        "notes": [
            f"Target: {cfg['target']:.0%} test accuracy, measured {cfg['checks_per_epoch']} "
            "times an epoch off the clock; seconds count optimizer steps, tracing included. "
            "Each model at its fastest grid point; the rates are chosen on the test accuracy "
            "the table reports (the question is how fast each model can get there, not a tuned "
            f"test score). One seed ({seed}). Rate: the one-cycle peak for the residual nets "
            "(SGD with Nesterov momentum), Adam's constant rate for the CNNs; schedule epochs: "
            "the one-cycle length, or the CNNs' most epochs.",
            "Goal of issue 27: BN at most 1/3 of the no-BN seconds. Measured: "
            + ("no ratio (a group did not reach the target)" if ratio is None else f"{ratio}x")
            + ".",
        ],
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _harness.parser(__doc__)
    parser.add_argument("--target", type=float, default=None, help="test accuracy to reach")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        report = run(args.quick, args.seed, args.target)
    except ValueError as err:
        parser.error(str(err))
    from bnutils.results import make_table

    _harness.log("\n" + str(make_table(report["rows"])))
    for note in report["notes"]:
        _harness.log(f"- {note}")
    _harness.save("bench_time_to_accuracy", report, argv, args.quick, args.output)
    return report


if __name__ == "__main__":
    main()
