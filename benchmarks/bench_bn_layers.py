"""What does a BN layer cost? Training step and inference latency, no BN vs three BN layers.

    .venv/bin/python benchmarks/bench_bn_layers.py           # full run (about 10 minutes)
    .venv/bin/python benchmarks/bench_bn_layers.py --quick   # small CNN only, under a minute

Models: a 5-conv CNN with pooling on Fashion-MNIST (28x28x1) and
``keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3))`` on Fashion-MNIST
images resized to 64x64 and repeated to 3 channels. Variants of each model:

- ``none``: no BN (CNN: convs with bias; ResNet50: every BN replaced by ``Identity``);
- ``keras``: ``keras.layers.BatchNormalization`` (moments + ``tf.nn.batch_normalization``);
- ``fused``: ``bnutils.layers.FusedBatchNormalization`` (one ``FusedBatchNormV3`` kernel);
- ``ghost``: ``bnutils.layers.GhostBatchNormalization`` (virtual batches of a quarter batch).

Training: the time of one epoch of ``model.fit`` (jit_compile off, as Keras picks on CPU),
reported per step. The epoch runs in chunks of a few steps (one ``fit`` call each) with the
variants interleaved chunk by chunk in rotating order, so that a slow spell of the shared
machine hits all of them; the training ratios vs ``none`` are medians of per-chunk ratios.
Inference: the latency of one call of ``tf.function(model(x))`` on a batch of 1 and of 256
(the mean of a few back-to-back calls), interleaved per repeat; its ratios are medians of
per-repeat ratios. Sizes follow the suite's profile (``BNUTILS_PROFILE``; ``--quick`` is the
quick one). Results go to ``results/bench_bn_layers.json`` (quick: ``results/quick/...``).
"""

from __future__ import annotations

import statistics
import sys
import time

import _harness
import numpy as np

VARIANTS = ("none", "keras", "fused", "ghost")

# Sizes of a run: full (the default) and --quick.
SETTINGS = {
    "full": {
        "cnn": {
            "train_images": 12_800,
            "batch_size": 128,
            "chunk_steps": 20,
            "repeats": 3,
            "calls": {1: 50, 256: 5},
        },
        "resnet50": {
            "train_images": 320,
            "batch_size": 32,
            "chunk_steps": 5,
            "repeats": 3,
            "calls": {1: 10, 256: 1},
        },
    },
    "quick": {
        "cnn": {
            "train_images": 1_280,
            "batch_size": 128,
            "chunk_steps": 5,
            "repeats": 2,
            "calls": {1: 20, 256: 2},
        },
    },
}


def build_cnn(
    variant: str, input_shape=(28, 28, 1), num_classes: int = 10, virtual_batch_size: int = 32
):
    """The benchmark CNN: conv 32-32-pool-64-64-pool-128, global pooling, dense logits."""
    from bnutils.models import build_cnn

    bn = _bn_factory(variant, virtual_batch_size)
    return build_cnn(
        input_shape,
        num_classes,
        filters=((32, 32), (64, 64), (128,)),
        dense_units=(),
        global_pool=True,
        kernel_initializer="glorot_uniform",
        output_activation=None,
        split_activation=True,
        norm=None if bn is None else "batch",
        bn_layer=bn,
        name=f"cnn_{variant}",
    )


def build_resnet50(
    variant: str, input_shape=(64, 64, 3), num_classes: int = 10, virtual_batch_size: int = 8
):
    """``keras.applications.ResNet50(weights=None)`` with its BN layers swapped per variant."""
    import keras

    from bnutils.layers import FusedBatchNormalization, GhostBatchNormalization
    from bnutils.models import build_resnet50

    _bn_factory(variant, virtual_batch_size)  # checks the name
    keras.utils.set_random_seed(0)
    return build_resnet50(
        input_shape,
        num_classes,
        norm=None if variant == "none" else "batch",
        bn_layer={"fused": FusedBatchNormalization, "ghost": GhostBatchNormalization}.get(variant),
        bn_kwargs={"virtual_batch_size": virtual_batch_size} if variant == "ghost" else None,
    )


def _bn_factory(variant: str, virtual_batch_size: int):
    import functools

    import keras

    from bnutils.layers import FusedBatchNormalization, GhostBatchNormalization

    factories = {
        "none": None,
        "keras": keras.layers.BatchNormalization,
        "fused": FusedBatchNormalization,
        "ghost": functools.partial(GhostBatchNormalization, virtual_batch_size),
    }
    if variant not in factories:
        raise ValueError(f"Unknown variant {variant!r}; expected one of {list(factories)}.")
    return factories[variant]


def _images(n: int, size: int | None = None):
    """``n`` Fashion-MNIST training images (resized to ``size`` x ``size`` x 3 if given)."""
    from bnutils.data import load_dataset

    ds = load_dataset("fashion_mnist")
    x, y = ds.x_train[:n], ds.y_train[:n]
    if size is not None:
        import tensorflow as tf

        x = tf.image.grayscale_to_rgb(tf.image.resize(x, (size, size))).numpy()
    return x, y


def _stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "runs": values}


def bench_model(
    name: str,
    build,
    x,
    y,
    batch_size: int,
    repeats: int,
    calls: dict[int, int],
    chunk_steps: int | None = None,
    variants=VARIANTS,
) -> dict:
    """Time training epochs and inference calls of every variant of one model, interleaved.

    Each repeat is one epoch over ``x`` per variant, run in chunks of ``chunk_steps`` steps
    (one ``fit`` call each) with the variants interleaved chunk by chunk, so that the chunks
    compared with each other ran within seconds of each other. Then the inference calls.

    Args:
        name: the model's name in the report.
        build: ``build(variant) -> keras.Model``.
        x, y: training images and labels (one epoch is one pass over them).
        batch_size: training batch size.
        repeats: interleaved repeats.
        calls: inference batch size -> calls timed per repeat.
        chunk_steps: steps per timed ``fit`` call (default: the whole epoch).
        variants: the variants to compare (``"none"`` first).

    Returns:
        A dict with the per-variant statistics and ratios vs ``"none"``.
    """
    import keras
    import tensorflow as tf

    steps = len(x) // batch_size
    chunk_steps = min(chunk_steps or steps, steps)
    xb = x[: steps * batch_size].reshape(steps, batch_size, *x.shape[1:])
    yb = y[: steps * batch_size].reshape(steps, batch_size)
    chunks = [
        tf.data.Dataset.from_tensor_slices((xb[i : i + chunk_steps], yb[i : i + chunk_steps]))
        for i in range(0, steps, chunk_steps)
    ]
    models, predict = {}, {}
    t_build = time.perf_counter()
    for variant in variants:
        keras.utils.set_random_seed(0)
        model = build(variant)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
        model.fit(chunks[0].take(2), epochs=1, shuffle=False, verbose=0)  # trace and warm up
        predict[variant] = tf.function(lambda t, m=model: m(t, training=False))
        models[variant] = model
    inputs = {b: tf.constant(np.resize(x, (b, *x.shape[1:]))) for b in calls}
    for variant in variants:
        for t in inputs.values():
            predict[variant](t).numpy()
    _harness.log(
        f"[{name}] built and warmed up {len(variants)} variants in "
        f"{time.perf_counter() - t_build:.0f} s"
    )

    def fit(variant, chunk):
        return lambda: models[variant].fit(chunk, epochs=1, shuffle=False, verbose=0)

    def infer(variant, b, n):
        return lambda: [predict[variant](inputs[b]).numpy() for _ in range(n)]

    train = {v: [] for v in variants}
    chunk_times = {v: [] for v in variants}
    latency = {b: {v: [] for v in variants} for b in calls}
    for r in range(repeats):
        epoch = dict.fromkeys(variants, 0.0)
        for c, chunk in enumerate(chunks):
            fns = {v: fit(v, chunk) for v in variants}
            times = _harness.interleaved(fns, offset=r * len(chunks) + c)["wall"]
            for v in variants:
                epoch[v] += times[v][0]
                chunk_times[v] += times[v]
        for v in variants:
            train[v].append(epoch[v] / steps * 1e3)
        for b, n in calls.items():
            fns = {v: infer(v, b, n) for v in variants}
            times = _harness.interleaved(fns, offset=r)["wall"]
            for v in variants:
                latency[b][v].append(times[v][0] / n * 1e3)
        _harness.log(
            f"[{name}] repeat {r + 1}/{repeats}: step ms "
            + ", ".join(f"{v} {train[v][-1]:.1f}" for v in variants)
        )

    def ratios(times, of=_harness.paired_ratio):
        return {v: of(times, v, "none") for v in variants}

    return {
        "steps_per_epoch": steps,
        "batch_size": batch_size,
        "chunk_steps": chunk_steps,
        "train_step_ms": {v: _stats(train[v]) for v in variants},
        "train_ratio_vs_none": ratios(chunk_times),
        "train_ratio_of_min": ratios(train, _harness.min_ratio),
        "latency_ms": {f"batch_{b}": {v: _stats(latency[b][v]) for v in variants} for b in calls},
        "latency_ratio_vs_none": {f"batch_{b}": ratios(latency[b]) for b in calls},
        "latency_ratio_of_min": {
            f"batch_{b}": ratios(latency[b], _harness.min_ratio) for b in calls
        },
    }


def _rows(models: dict) -> list[dict]:
    rows = []
    for name, res in models.items():
        for v in res["train_step_ms"]:
            row = {
                "model": name,
                "bn": v,
                "train step ms (median)": res["train_step_ms"][v]["median"],
                "train vs no BN": res["train_ratio_vs_none"][v],
                "train vs no BN (of min)": res["train_ratio_of_min"][v],
            }
            for key, lat in res["latency_ms"].items():
                row[f"{key} ms (median)"] = lat[v]["median"]
                row[f"{key} vs no BN"] = res["latency_ratio_vs_none"][key][v]
            rows.append(row)
    return rows


def run(
    quick: bool = False, models: tuple[str, ...] | None = None, repeats: int | None = None
) -> dict:
    """Run the benchmark and return its report (see the module docstring).

    Args:
        quick: the quick profile (else ``BNUTILS_PROFILE`` decides).
        models: ``"cnn"`` and/or ``"resnet50"`` (default: those of the profile's settings).
        repeats: override the number of interleaved repeats.

    Raises:
        ValueError: an unknown model name.
    """
    settings = SETTINGS[_harness.profile(quick).name]
    models = tuple(settings) if models is None else tuple(models)
    unknown = sorted(set(models) - set(_BUILDERS))
    if unknown:
        raise ValueError(f"Unknown models {unknown}; expected names from {sorted(_BUILDERS)}.")
    used, report = {}, {}
    for name in models:
        cfg = dict(settings.get(name) or SETTINGS["full"][name])
        if repeats is not None:
            cfg["repeats"] = repeats
        used[name] = cfg
        build, image_size = _BUILDERS[name]
        x, y = _images(cfg["train_images"], size=image_size)
        vbs = cfg["batch_size"] // 4
        report[name] = bench_model(
            name,
            lambda v, b=build, vbs=vbs: b(v, virtual_batch_size=vbs),
            x,
            y,
            cfg["batch_size"],
            cfg["repeats"],
            cfg["calls"],
            chunk_steps=cfg["chunk_steps"],
        )
    return {
        "settings": used,
        "rows": _rows(report),
        "notes": [
            "Times are medians of interleaved repeats on a shared machine. Training ratios vs "
            "no BN are medians of per-chunk ratios (a few steps per chunk, variants "
            "interleaved), latency ratios medians of per-repeat ratios, all from the same run; "
            "'of min' is the ratio of the minima.",
            "Ghost BN uses virtual batches of a quarter of the batch; its inference is Keras's BN.",
        ],
        "models": report,
    }


_BUILDERS = {"cnn": (build_cnn, None), "resnet50": (build_resnet50, 64)}


def _print_report(report: dict) -> None:
    """Print per model: step time (min, median) and latencies (median), each with its ratio
    vs no BN (median of per-repeat ratios; in brackets the ratio of the minima)."""
    for name, res in report["models"].items():
        _harness.log(
            f"\n{name}: batch {res['batch_size']}, {res['steps_per_epoch']} steps per epoch"
        )
        _harness.log(
            f"{'bn':<6} {'step ms min':>11} {'median':>8} {'vs none [of min]':>17}"
            + "".join(f" {k + ' ms':>14} {'vs none [of min]':>17}" for k in res["latency_ms"])
        )
        for v, st in res["train_step_ms"].items():
            line = (
                f"{v:<6} {st['min']:>11.2f} {st['median']:>8.2f} "
                f"{res['train_ratio_vs_none'][v]:>7.3f}x [{res['train_ratio_of_min'][v]:.3f}x]"
            )
            for key, lat in res["latency_ms"].items():
                line += (
                    f" {lat[v]['median']:>14.2f} {res['latency_ratio_vs_none'][key][v]:>7.3f}x"
                    f" [{res['latency_ratio_of_min'][key][v]:.3f}x]"
                )
            _harness.log(line)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _harness.parser(__doc__)
    parser.add_argument(
        "--models",
        nargs="+",
        choices=sorted(_BUILDERS),
        default=None,
        help="models to time (default: cnn and resnet50; cnn in the quick profile)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats")
    args = parser.parse_args(argv)

    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # one tf.function per variant is traced on purpose
    report = run(quick=args.quick, models=args.models, repeats=args.repeats)
    _print_report(report)
    _harness.save("bench_bn_layers", report, argv, args.quick, args.output)
    return report


if __name__ == "__main__":
    main()
