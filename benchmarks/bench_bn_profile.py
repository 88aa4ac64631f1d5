"""Where does BN's training time go? A per-op breakdown of a training step, BN vs no-BN twin.

    .venv/bin/python benchmarks/bench_bn_profile.py           # full run (a few minutes)
    .venv/bin/python benchmarks/bench_bn_profile.py --quick   # under a minute

The CNN of ``bench_bn_layers.py`` (conv 32-32-pool-64-64-pool-128, a separate ``ReLU`` layer
after every conv or BN in all variants), trained with SGD momentum, batch 128, in three
variants: ``none`` (convs with bias, no BN), ``keras`` (``keras.layers.BatchNormalization``)
and ``fused`` (``bnutils.FusedBatchNormalization``). First the wall time of
``steps`` training steps (the model's ``train_step`` in a ``tf.function``, over batches in
memory) per variant, interleaved in rotating order over the
repeats, before any profiling; then, per repeat and variant, a trace of ``steps`` more steps by
TensorFlow's profiler, whose op events on the compute threads are summed per category (below)
and divided by the steps.

The two compute threads run ops concurrently, so a variant's op time exceeds its wall time; the
difference of op time between a BN variant and ``none`` is what BN adds, category by category.
Categories: ``conv fwd``/``conv bwd`` (``Conv2D`` and its two backprop ops), ``BN kernel fwd``
/``BN kernel bwd`` (``FusedBatchNormV3`` and its gradient), ``BN other fwd``/``BN other bwd``
(every other op in a BN layer's scope: Keras's moments and normalization, the fused layer's
moving-average update and Bessel correction), ``bias add`` (``BiasAdd``, ``BiasAddGrad``),
``ReLU`` (``Relu``, ``ReluGrad``), ``pooling``, ``optimizer`` and ``other``. The report records
the CPU flags and ``TF_ENABLE_ONEDNN_OPTS``, the share of op time in ``other``, and one
event name per op type seen with its category (``trace_ops``: the real names that
``tests/test_benchmark_scripts.py`` checks the categories on).

Then BN's memory floor (``_floor.py``): at the shapes of the fused variant's BN inputs, bias
add + ReLU, ReLU, the fused kernel, fused BN + ReLU, Keras BN + ReLU and a copy, each forward
and backward alone, with the passes each makes over the activations and the bandwidth it
reaches; and the floor of BN's extra time (its extra passes at that bandwidth) beside the
measured extra step time. ``remapper`` says whether TensorFlow fused BN + ReLU into one kernel
(``FusedBatchNormEx`` forward, ``FusedBatchNormGradEx`` backward) in the traced steps.

The report goes to ``results/bench_bn_profile.json``; with ``TF_ENABLE_ONEDNN_OPTS=0`` (plain
TensorFlow kernels) run it with ``--output results/bench_bn_profile_onednn_off.json``.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import statistics
import sys
import tempfile

import _floor
import _harness
import bench_bn_layers

VARIANTS = ("none", "keras", "fused")
SETTINGS = {
    "full": {"batch_size": 128, "steps": 15, "repeats": 3, "floor_calls": 10},
    "quick": {"batch_size": 128, "steps": 3, "repeats": 1, "floor_calls": 2},
}
CATEGORIES = (
    "conv fwd",
    "conv bwd",
    "BN kernel fwd",
    "BN kernel bwd",
    "BN other fwd",
    "BN other bwd",
    "bias add",
    "ReLU",
    "pooling",
    "optimizer",
    "other",
)
_OP = re.compile(r"^(?P<scope>[^:]*/[^:]*):(?P<type>[A-Za-z0-9_]+)$")


def categorize(name: str) -> str | None:
    """The category of a profiler event ``"scope/of/op:OpType"``; ``None`` if not an op."""
    m = _OP.match(name)
    if m is None:
        return None
    # With oneDNN's graph rewrite (seen on AVX-512 machines) kernels are named _MklNative<Op>,
    # a convolution's bias gradient folds into _MklNativeConv2DBackpropFilterWithBias and the
    # forward BN kernel is _MklNativeFusedBatchNormEx.
    scope, op = m["scope"], re.sub(r"^_Mkl(Native)?", "", m["type"])
    backward = "/gradient_tape/" in f"/{scope}/"
    if op in ("FusedBatchNormV3", "FusedBatchNormEx", "FusedBatchNormGradV3"):
        return "BN kernel bwd" if op.endswith("GradV3") else "BN kernel fwd"
    if re.search(r"_bn(_\d+)?/", f"{scope}/"):
        return "BN other bwd" if backward else "BN other fwd"
    if re.search(r"/(sgd|adam)(_\d+)?/", f"/{scope.lower()}/"):
        return "optimizer"
    if op in ("Conv2D", "_FusedConv2D", "FusedConv2D"):
        return "conv fwd"
    if op.startswith("Conv2DBackprop"):
        return "conv bwd"
    if op in ("BiasAdd", "BiasAddGrad"):
        return "bias add"
    if op in ("Relu", "ReluGrad"):
        return "ReLU"
    if op.startswith(("MaxPool", "AvgPool")):
        return "pooling"
    return "other"


def op_times(logdir: str, seen: dict | None = None) -> dict[str, float]:
    """Milliseconds of op time per category in the trace under ``logdir`` (compute threads).

    ``seen``, if given, collects one event name per op type and category: ``{name: category}``.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise RuntimeError(f"The profiler wrote no trace under {logdir}.")
    totals = collections.Counter()
    for path in files:
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
        for plane in space.planes:
            for line in plane.lines:
                if not line.name.startswith("tf_Compute"):
                    continue
                for event in line.events:
                    name = plane.event_metadata[event.metadata_id].name
                    category = categorize(name)
                    if category is None:
                        continue
                    totals[category] += event.duration_ps / 1e9
                    if seen is not None:
                        seen.setdefault((name.rsplit(":", 1)[-1], category), name)
    return {c: totals.get(c, 0.0) for c in CATEGORIES}


def run(quick: bool = False, repeats: int | None = None) -> dict:
    """Run the benchmark and return its report (see the module docstring)."""
    import keras
    import tensorflow as tf

    cfg = dict(SETTINGS[_harness.profile(quick).name])
    if repeats is not None:
        cfg["repeats"] = repeats
    batch, steps = cfg["batch_size"], cfg["steps"]
    x, y = bench_bn_layers._images(batch * steps)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True).cache()
    models = {}
    for variant in VARIANTS:
        keras.utils.set_random_seed(0)
        model = bench_bn_layers.build_cnn(variant)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
        model.fit(data.take(2), epochs=1, verbose=0)  # trace and warm up
        models[variant] = model

    # Wall times first, before the profiler ever starts, so that none of its work is timed.
    # Timed: a tf.function of the model's own train_step over batches already in memory, the
    # step that fit runs. Whole fit calls are not timed: on the machines of 2026-12-02 many
    # 15-step fit calls took 2.553 s, 5.107 s or 10.23 s to the millisecond, whatever the
    # variant, while this loop, timed beside them, did not (fit 170.0 ms/step, loop 125.3).
    batches = [(tf.constant(a), tf.constant(b)) for a, b in data]

    def steps_of(model):
        step = tf.function(model.train_step)
        step(batches[0])  # trace

        def loop():
            for b in batches:
                logs = step(b)
            return {k: float(v) for k, v in logs.items()}  # waits for the last step

        return loop

    loops = {v: steps_of(models[v]) for v in VARIANTS}
    wall = {
        v: [t / steps * 1e3 for t in times]
        for v, times in _harness.interleaved(loops, repeats=cfg["repeats"])["wall"].items()
    }
    _harness.log("step ms " + ", ".join(f"{v} {statistics.median(wall[v]):.1f}" for v in VARIANTS))
    ops, seen = {v: [] for v in VARIANTS}, {}
    for r in range(cfg["repeats"]):
        for variant in _harness.rotated(list(VARIANTS), r):
            with tempfile.TemporaryDirectory() as logdir:
                tf.profiler.experimental.start(logdir)
                try:
                    models[variant].fit(data, epochs=1, verbose=0)
                finally:
                    tf.profiler.experimental.stop()
                ops[variant].append({c: t / steps for c, t in op_times(logdir, seen).items()})
        _harness.log(f"profiled repeat {r + 1}/{cfg['repeats']}")

    breakdown = {
        v: {c: statistics.median(rep[c] for rep in ops[v]) for c in CATEGORIES} for v in VARIANTS
    }
    rows = []
    for v in VARIANTS:
        total = sum(breakdown[v].values())
        rows.append(
            {
                "variant": v,
                "step ms (median)": statistics.median(wall[v]),
                "step vs none": _harness.paired_ratio(wall, v, "none"),
                "op ms per step": total,
                "op ms vs none": total - sum(breakdown["none"].values()),
            }
        )
    extra = {
        v: {c: breakdown[v][c] - breakdown["none"][c] for c in CATEGORIES}
        for v in VARIANTS
        if v != "none"
    }
    types = {op_type for op_type, _ in seen}
    fused_forward = any("FusedBatchNormEx" in t for t in types)
    shapes = _floor.bn_input_shapes(models["fused"], batch)
    bias_fused = breakdown["none"]["bias add"] < 0.1 * breakdown["none"]["ReLU"]
    floor = _floor.measure(shapes, cfg["repeats"], cfg["floor_calls"], fused_forward, bias_fused)
    _harness.log("floor measured")
    step_extra = statistics.median(wall["fused"]) - statistics.median(wall["none"])
    floor["fused step minus none step, ms"] = round(step_extra, 2)
    none_step = statistics.median(wall["none"])
    floor["floor / no-BN step"] = round(floor["floor of the extra, ms"] / none_step, 3)
    floor["one-kernel floor / no-BN step"] = round(
        floor["one-kernel BN + ReLU: floor, ms"] / none_step, 3
    )
    other = {v: breakdown[v]["other"] / sum(breakdown[v].values()) for v in VARIANTS}
    return {
        "settings": {**cfg, "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS")},
        "rows": rows,
        "op_ms_per_step": breakdown,
        "op_ms_vs_none": extra,
        "step_ms": wall,
        "other_share": {v: round(other[v], 3) for v in VARIANTS},
        "floor": floor,
        "remapper": {
            "BN + ReLU forward fused (FusedBatchNormEx)": any(
                "FusedBatchNormEx" in t for t in types
            ),
            "BN + ReLU backward fused (FusedBatchNormGradEx)": any(
                "FusedBatchNormGradEx" in t for t in types
            ),
        },
        "trace_ops": [
            {"type": op_type, "category": category, "example": name}
            for (op_type, category), name in sorted(seen.items())
        ],
        "notes": [
            "Op times are sums over the two compute threads, which overlap; compare them "
            "between variants, not with the wall time. Step ratios are medians of per-repeat "
            "ratios of interleaved, unprofiled train_step loops.",
        ],
    }


def _print_report(report: dict) -> None:
    from bnutils._util import cpu_flags

    _harness.log(
        f"\nCPU flags: {' '.join(cpu_flags()) or 'none read'}; TF_ENABLE_ONEDNN_OPTS="
        f"{report['settings']['TF_ENABLE_ONEDNN_OPTS']}"
    )
    for row in report["rows"]:
        _harness.log(
            f"{row['variant']:<6} step {row['step ms (median)']:7.1f} ms "
            f"({row['step vs none']:.3f}x none); op time {row['op ms per step']:7.1f} ms/step; "
            "repeats " + " ".join(f"{t:.1f}" for t in report["step_ms"][row["variant"]])
        )
    _harness.log(f"\n{'op ms per step':<14}" + "".join(f"{v:>9}" for v in VARIANTS) + "  (extra)")
    for c in CATEGORIES:
        values = [report["op_ms_per_step"][v][c] for v in VARIANTS]
        extra = " ".join(f"{report['op_ms_vs_none'][v][c]:+7.1f}" for v in report["op_ms_vs_none"])
        _harness.log(f"{c:<14}" + "".join(f"{t:9.1f}" for t in values) + f"  {extra}")
    _harness.log("'other' share of op time: " + str(report["other_share"]))
    floor = report["floor"]
    _harness.log(f"\nalone, at the BN layers' shapes ({floor['MB per pass']} MB per pass):")
    for row in floor["rows"]:
        _harness.log(
            f"{row['candidate']:<16} {row['ms fwd+bwd']:7.2f} ms  {row['passes']:2d} passes  "
            f"{row['GB/s']:6.1f} GB/s"
        )
    for key, value in floor.items():
        if key not in ("rows", "shapes"):
            _harness.log(f"{key}: {value}")
    _harness.log(f"remapper: {report['remapper']}")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _harness.parser(__doc__)
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats")
    args = parser.parse_args(argv)
    report = run(quick=args.quick, repeats=args.repeats)
    _print_report(report)
    _harness.save("bench_bn_profile", report, argv, args.quick, args.output)
    return report


if __name__ == "__main__":
    main()
