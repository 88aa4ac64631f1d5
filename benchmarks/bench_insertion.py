"""Time ``insert_batchnorm`` on a 100-layer functional model and on keras.applications models.

    python benchmarks/bench_insertion.py [--quick] [--repeats 5]

The 100-layer model is a residual MLP (Dense layers with fused activations, Add merges and
a few Dropout layers). The target is under 2 s for it on a laptop CPU. For scale, the script
also times ``keras.models.clone_model`` (a plain copy, no BN, weights not copied) on the same
models: most of the time of either goes into creating Keras layers and variables. Prints the
minimum and median of ``--repeats`` interleaved runs. The quick profile (``BNUTILS_PROFILE`` or
``--quick``) runs one repeat on the residual MLP only. Results go to
``results/bench_insertion.json`` (quick: ``results/quick/...``).
"""

from __future__ import annotations

import statistics
import sys

import _harness


def _residual_mlp(n_layers: int = 100, width: int = 64):
    """A functional model with ``n_layers`` layers: Dense / Add / Dropout, one input."""
    import keras

    inputs = keras.Input((width,), name="inputs")
    x = inputs
    count, i = 1, 0
    while count < n_layers - 1:
        i += 1
        h = keras.layers.Dense(width, activation="relu", name=f"dense_{i}a")(x)
        h = keras.layers.Dense(width, activation="relu", name=f"dense_{i}b")(h)
        x = keras.layers.Add(name=f"add_{i}")([x, h])
        count += 3
        if i % 5 == 0 and count < n_layers - 1:
            x = keras.layers.Dropout(0.1, name=f"dropout_{i}")(x)
            count += 1
    outputs = keras.layers.Dense(10, name="predictions")(x)
    return keras.Model(inputs, outputs, name="residual_mlp")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _harness.parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (full)")
    args = parser.parse_args(argv)

    import keras

    from bnutils.insertion import insert_batchnorm

    quick = _harness.profile(args.quick).is_quick
    repeats = 1 if quick else args.repeats
    models = {"residual_mlp_100": _residual_mlp(100)}
    if not quick:
        apps = keras.applications
        models["MobileNetV2_96"] = apps.MobileNetV2(
            input_shape=(96, 96, 3), weights=None, classes=10
        )
        models["VGG16_32_notop"] = apps.VGG16(
            input_shape=(32, 32, 3), include_top=False, weights=None
        )
        models["EfficientNetB0_64"] = apps.EfficientNetB0(
            input_shape=(64, 64, 3), weights=None, classes=10
        )

    figures = {}
    for name, model in models.items():
        _, report = insert_batchnorm(model, return_report=True)  # warm-up, and the report
        fns = {
            "insert": lambda m=model: insert_batchnorm(m),
            "clone": lambda m=model: keras.models.clone_model(m),
        }
        times = _harness.interleaved(fns, repeats)["wall"]
        ins, clone = times["insert"], times["clone"]
        figures[name] = {
            "layers": len(model.layers),
            "bn_inserted": report.bn_count,
            "min_s": min(ins),
            "median_s": statistics.median(ins),
            "clone_model_min_s": min(clone),
            "ratio_to_clone_model": _harness.min_ratio(times, "insert", "clone"),
        }
        _harness.log(
            f"{name:<20} {len(model.layers):>4} layers  {report.bn_count:>3} BN inserted  "
            f"min {min(ins):.3f} s  median {statistics.median(ins):.3f} s  "
            f"(clone_model min {min(clone):.3f} s, ratio {min(ins) / min(clone):.2f})"
        )
    _harness.save(
        "bench_insertion", {"repeats": repeats, "figures": figures}, argv, args.quick, args.output
    )
    return figures


if __name__ == "__main__":
    main()
