"""Time ``insert_batchnorm`` on a 100-layer functional model and on keras.applications models.

    python benchmarks/bench_insertion.py [--quick] [--repeats 5]

The 100-layer model is a residual MLP (Dense layers with fused activations, Add merges and
a few Dropout layers). The target is under 2 s for it on a laptop CPU. For scale, the script
also times ``keras.models.clone_model`` (a plain copy, no BN, weights not copied) on the same
models: most of the time of either goes into creating Keras layers and variables. Prints the
minimum and median of ``--repeats`` interleaved runs and writes them to
``results/benchmarks/insertion.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


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


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, no applications")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import keras

    from bnutils.config import results_dir
    from bnutils.insertion import insert_batchnorm

    repeats = 1 if args.quick else args.repeats
    models = {"residual_mlp_100": _residual_mlp(100)}
    if not args.quick:
        models["MobileNetV2_96"] = keras.applications.MobileNetV2(
            input_shape=(96, 96, 3), weights=None, classes=10)
        models["VGG16_32_notop"] = keras.applications.VGG16(
            input_shape=(32, 32, 3), include_top=False, weights=None)
        models["EfficientNetB0_64"] = keras.applications.EfficientNetB0(
            input_shape=(64, 64, 3), weights=None, classes=10)

    figures = {}
    for name, model in models.items():
        _, report = insert_batchnorm(model, return_report=True)  # warm-up, and the report
        times, clone_times = [], []
        for _ in range(repeats):  # interleaved, so that load changes hit both alike
            times += _time(lambda m=model: insert_batchnorm(m), 1)
            clone_times += _time(lambda m=model: keras.models.clone_model(m), 1)
        figures[name] = {
            "layers": len(model.layers),
            "bn_inserted": report.bn_count,
            "min_s": min(times),
            "median_s": statistics.median(times),
            "clone_model_min_s": min(clone_times),
            "ratio_to_clone_model": min(times) / min(clone_times),
        }
        print(f"{name:<20} {len(model.layers):>4} layers  {report.bn_count:>3} BN inserted  "
              f"min {min(times):.3f} s  median {statistics.median(times):.3f} s  "
              f"(clone_model min {min(clone_times):.3f} s, ratio "
              f"{min(times) / min(clone_times):.2f})")
    path = results_dir("benchmarks") / "insertion.json"
    path.write_text(json.dumps({"repeats": repeats, "figures": figures}, indent=2))
    print(f"written {path}")
    return figures


if __name__ == "__main__":
    main()
