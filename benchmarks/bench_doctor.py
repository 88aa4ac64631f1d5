"""Time the BN doctor on MobileNetV2 (52 BN layers, random weights, no download).

    python benchmarks/bench_doctor.py [--size 96] [--n 64] [--with-labels]

Prints the time of :func:`bnutils.doctor.diagnose_batchnorm` and its report. The target is
under 30 s on a laptop CPU at 96x96. A MobileNetV2 with ``weights=None`` was never trained,
so the doctor rightly reports ``moving-stats-never-updated``. The time goes to
``results/bench_doctor.json`` (quick profile: ``results/quick/...``).
"""

from __future__ import annotations

import sys
import time

import _harness


def main(argv: list[str] | None = None) -> float:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _harness.parser(__doc__)
    parser.add_argument("--size", type=int, default=96, help="image side (96, 128, ..., 224)")
    parser.add_argument("--n", type=int, default=64, help="examples in x")
    parser.add_argument("--with-labels", action="store_true", help="also pass random labels")
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    from bnutils.doctor import diagnose_batchnorm

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(args.size, args.size, 3), classes=10
    )
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, size=(args.n, args.size, args.size, 3)).astype("float32")
    y = rng.integers(0, 10, size=args.n) if args.with_labels else None

    start = time.perf_counter()
    report = diagnose_batchnorm(model, x, y)
    seconds = time.perf_counter() - start
    _harness.log(str(report))
    _harness.log(
        f"\ndiagnose_batchnorm on MobileNetV2 {args.size}x{args.size}, {args.n} examples, "
        f"{len(report.layers)} BN layers: {seconds:.1f} s"
    )
    data = {"size": args.size, "n": args.n, "with_labels": args.with_labels}
    data.update(bn_layers=len(report.layers), seconds=seconds)
    _harness.save("bench_doctor", data, argv, args.quick, args.output)
    return seconds


if __name__ == "__main__":
    main()
