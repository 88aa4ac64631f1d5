"""Does folding BN pay at inference? Latency of a BN CNN unfolded, folded, and without BN.

    .venv/bin/python benchmarks/bench_inference.py           # full run (a few minutes)
    .venv/bin/python benchmarks/bench_inference.py --quick   # under a minute

Model: a small VGG-style CNN on 28x28x1 inputs (conv 32-32-pool-64-64-pool-128-128,
global average pooling, dense 128, dense 10), in three variants of the same architecture:

- ``unfolded``: every conv and the hidden dense layer followed by BatchNormalization
  (moving statistics randomized, as after training);
- ``folded``: ``bnutils.folding.fold_batchnorm`` of ``unfolded`` (same outputs, checked);
- ``no_bn``: the same layers with biases and no BN at all (the floor folding can reach).

Each variant is called on a batch of 1 and of 256 in two modes: ``graph``, through
``tf.function(model(x, training=False))`` (how a SavedModel serves), and ``eager``, plain
``model(x, training=False)`` calls (where every layer adds Python overhead). Variants are interleaved in rotating order within each repeat, after a warm-up, so a
slow spell of the shared machine hits all of them; ratios are medians of per-repeat ratios
(and, in brackets / ``min_ratio_*``, ratios of the fastest repeats, the least disturbed ones).
Both wall time and the process's CPU time are recorded: on a loaded machine the CPU time is
the steadier measure of the work a variant does.
Goals: ``folded / no_bn <= 1.05`` (folding removes all of BN's cost) and
``unfolded / folded >= 1.2`` at batch 1 (where per-op overhead dominates). Sizes follow the
suite's profile (``BNUTILS_PROFILE``; ``--quick`` is the quick one). Results go to
``results/bench_inference.json`` (quick: ``results/quick/...``).
"""

from __future__ import annotations

import statistics
import sys

import _harness
import numpy as np

VARIANTS = ("unfolded", "folded", "no_bn")
MODES = ("graph", "eager")
CLOCKS = tuple(_harness.CLOCKS)  # wall time, and CPU time of this process (less hit by load)
SETTINGS = {
    "full": {"repeats": 15, "calls": {1: 100, 256: 4}},
    "quick": {"repeats": 3, "calls": {1: 50, 256: 2}},
}


def build_vgg(batchnorm: bool, input_shape=(28, 28, 1), num_classes: int = 10, seed: int = 0):
    """The benchmark CNN, with BN after every conv and the hidden dense layer or without BN.

    Args:
        batchnorm: insert BN (and drop the biases it makes redundant).
        input_shape: image shape.
        num_classes: output units.
        seed: weight seed (the same for both variants).
    """
    import keras

    from bnutils.models import build_cnn

    keras.utils.set_random_seed(seed)
    return build_cnn(
        input_shape,
        num_classes,
        filters=((32, 32), (64, 64), (128, 128)),
        dense_units=(128,),
        global_pool=True,
        kernel_initializer="glorot_uniform",
        output_activation=None,
        split_activation=True,
        norm="batch" if batchnorm else None,
        name="vgg_bn" if batchnorm else "vgg_no_bn",
    )


def _randomize_bn(model, seed: int = 0) -> None:
    from bnutils import find_batchnorm_layers

    rng = np.random.default_rng(seed)
    for _, layer in find_batchnorm_layers(model):
        c = layer.moving_mean.shape[0]
        layer.moving_mean.assign(rng.normal(0.0, 0.2, c))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))
        layer.gamma.assign(rng.uniform(0.8, 1.2, c))
        layer.beta.assign(rng.normal(0.0, 0.1, c))


def _call_fn(model, mode: str):
    """``graph``: a traced ``tf.function`` (how a SavedModel serves); ``eager``: plain calls."""
    import tensorflow as tf

    if mode == "graph":
        return tf.function(lambda t: model(t, training=False))
    return lambda t: model(t, training=False)


def _calls(fn, x, calls: int):
    """``calls`` back-to-back calls of ``fn(x)`` (one timed unit of an interleaved repeat)."""

    def run_calls():
        for _ in range(calls):
            fn(x).numpy()

    return run_calls


def _stats(values: list[float]) -> dict:
    return {"min_ms": 1e3 * min(values), "median_ms": 1e3 * statistics.median(values)}


def run(quick: bool = False) -> dict:
    """Build the three variants, check folding is exact, time them interleaved."""
    import tensorflow as tf

    from bnutils.folding import fold_batchnorm

    settings = SETTINGS[_harness.profile(quick).name]
    unfolded = build_vgg(batchnorm=True)
    _randomize_bn(unfolded)
    folded, report = fold_batchnorm(unfolded, return_report=True)
    models = {"unfolded": unfolded, "folded": folded, "no_bn": build_vgg(batchnorm=False)}
    _harness.log(str(report).splitlines()[0])

    rng = np.random.default_rng(0)
    x_check = rng.uniform(size=(8, 28, 28, 1)).astype("float32")
    ref = np.asarray(unfolded(x_check, training=False))
    max_diff = float(np.abs(np.asarray(folded(x_check, training=False)) - ref).max())
    rel_diff = max_diff / float(ref.std())
    if rel_diff > 1e-4:
        raise RuntimeError(f"Folded outputs differ from unfolded by {rel_diff:.2e} of the scale.")

    results = {}
    for mode in MODES:
        results[mode] = {}
        for batch_size, calls in settings["calls"].items():
            calls = max(2, calls // 4) if mode == "eager" else calls
            x = tf.constant(rng.uniform(size=(batch_size, 28, 28, 1)).astype("float32"))
            call = {name: _call_fn(models[name], mode) for name in VARIANTS}
            for name in VARIANTS:
                _calls(call[name], x, max(2, calls // 4))()  # trace and warm up
            fns = {name: _calls(call[name], x, calls) for name in VARIANTS}
            times = _harness.interleaved(fns, settings["repeats"])
            row = results[mode][str(batch_size)] = {"calls_per_repeat": calls}
            for clock in CLOCKS:
                t = {name: [v / calls for v in times[clock][name]] for name in VARIANTS}
                row[clock] = {
                    "latency": {name: _stats(t[name]) for name in VARIANTS},
                    "ratio_folded_over_no_bn": _harness.paired_ratio(t, "folded", "no_bn"),
                    "ratio_unfolded_over_folded": _harness.paired_ratio(t, "unfolded", "folded"),
                    "min_ratio_folded_over_no_bn": _harness.min_ratio(t, "folded", "no_bn"),
                    "min_ratio_unfolded_over_folded": _harness.min_ratio(t, "unfolded", "folded"),
                }
            wall = row["wall"]["latency"]
            _harness.log(
                f"{mode:<5} batch {batch_size:>3}: "
                + ", ".join(f"{n} {wall[n]['median_ms']:.3f} ms" for n in VARIANTS)
            )
    return {
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "model": {
            "layers": {name: len(m.layers) for name, m in models.items()},
            "params": {name: int(m.count_params()) for name, m in models.items()},
            "bn_folded": len(report.folded),
            "fold_max_rel_diff": rel_diff,
        },
        "repeats": settings["repeats"],
        "batches": results,
        "goals": {"folded_over_no_bn_max": 1.05, "unfolded_over_folded_batch1_min": 1.2},
        "note": (
            "Latencies are min and median over interleaved repeats on a shared machine; "
            "ratios are medians of per-repeat ratios; min_ratio_* are ratios of the minima. "
            "'wall' is elapsed time, 'cpu' the CPU time of the benchmark process per call."
        ),
    }


def _print_report(report: dict) -> None:
    for mode, batches in report["batches"].items():
        for batch, row in batches.items():
            parts = []
            for clock in CLOCKS:
                r = row[clock]
                parts.append(
                    f"{clock}: folded/no_bn {r['ratio_folded_over_no_bn']:.3f} "
                    f"[min {r['min_ratio_folded_over_no_bn']:.3f}], unfolded/folded "
                    f"{r['ratio_unfolded_over_folded']:.3f} [min {r['min_ratio_unfolded_over_folded']:.3f}]"
                )
            print(f"{mode:<5} batch {batch:>3}: " + " | ".join(parts))
    print("goals: folded/no_bn <= 1.05; unfolded/folded >= 1.2 at batch 1")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _harness.parser(__doc__).parse_args(argv)
    report = run(quick=args.quick)
    _print_report(report)
    _harness.save("bench_inference", report, argv, args.quick, args.output)
    return report


if __name__ == "__main__":
    main()
