"""The command line for a saved Keras model: ``python -m bnutils`` (or ``bnutils``).

    bnutils info MODEL.keras
    bnutils doctor MODEL.keras [--data fashion_mnist | FILE.npz]
    bnutils fold IN.keras OUT.keras [--data ...]
    bnutils recalibrate IN.keras OUT.keras --data ...
    bnutils export IN.keras OUT [--format savedmodel | onnx | tflite]

``--data`` names a dataset of :func:`bnutils.data.load_dataset` (its validation images for the
doctor and the fold check, its training images for recalibration) or an ``.npz`` file with an
array ``x`` (inputs, as the model takes them) and optionally ``y`` (integer labels). Bad input (a
missing file, a file that is not a Keras model, an existing output, data of the wrong shape)
exits with status 2 and one line on stderr, and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np

from bnutils.data import DATASETS

__all__ = ["main"]

FORMATS = ("savedmodel", "onnx", "tflite")


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


def _load_model(path: str):
    import keras

    import bnutils.layers  # noqa: F401  (registers the package's layers for deserialization)
    import bnutils.scratch  # noqa: F401

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"no such file: {path} (expected a model saved with model.save)")
    if p.suffix != ".keras" or not zipfile.is_zipfile(p):
        raise UsageError(
            f"{path} is not a Keras model file: expected a `.keras` file written by "
            "`model.save('model.keras')`"
        )
    try:
        return keras.saving.load_model(p, compile=False)
    except Exception as e:  # any reason Keras gives: the file or a custom class
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load {path} as a Keras model: {reason}") from e


def _free_output(path: str) -> Path:
    p = Path(path)
    if p.exists():
        raise UsageError(f"{path} exists: remove it or choose another output path")
    if not p.parent.is_dir():
        raise UsageError(f"the folder of {path} does not exist")
    return p


def _load_data(spec: str | None, model, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(x, y)`` for ``model`` from a dataset name or an ``.npz`` file; ``y`` may be None."""
    if spec in DATASETS:
        from bnutils.data import load_dataset

        ds = load_dataset(spec)
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
    elif spec and Path(spec).suffix == ".npz":
        if not Path(spec).is_file():
            raise UsageError(f"no such file: {spec}")
        with np.load(spec) as arrays:
            if "x" not in arrays:
                raise UsageError(f"{spec} has arrays {sorted(arrays)}: expected one named `x`")
            x = arrays["x"]
            y = arrays["y"] if "y" in arrays else None
    else:
        raise UsageError(
            f"--data {spec!r}: expected one of {', '.join(DATASETS)} or an .npz file with "
            "an array `x` (and optionally `y`)"
        )
    expected = tuple(model.inputs[0].shape[1:]) if getattr(model, "inputs", None) else None
    if expected is not None and tuple(x.shape[1:]) != expected:
        raise UsageError(
            f"--data {spec}: inputs of shape {tuple(x.shape[1:])} per example, but the model "
            f"takes {expected}"
        )
    if y is not None and len(y) != len(x):
        raise UsageError(f"--data {spec}: {len(x)} inputs but {len(y)} labels")
    return x.astype("float32"), y


def _save(model, target: Path) -> None:
    from bnutils._util import atomic_path

    with atomic_path(target) as tmp:
        model.save(tmp)


def _info(args) -> None:
    from bnutils._graph import find_batchnorm_layers, is_graph_model
    from bnutils.results import make_table

    model = _load_model(args.model)
    kind = type(model).__name__ if is_graph_model(model) else f"subclassed ({type(model).__name__})"
    print(f"{model.name}: {kind}, {model.count_params():,} parameters, {len(model.layers)} layers")
    rows = [
        {
            "layer": path,
            "class": type(bn).__name__,
            "axis": getattr(bn, "axis", None),
            "momentum": getattr(bn, "momentum", None),
            "epsilon": getattr(bn, "epsilon", None),
            "trainable": bn.trainable,
            "mode in fit": "batch statistics" if bn.trainable else "moving statistics (frozen)",
        }
        for path, bn in find_batchnorm_layers(model)
    ]
    print(make_table(rows) if rows else "no BatchNormalization layer")


def _doctor(args) -> None:
    from bnutils.doctor import diagnose_batchnorm

    model = _load_model(args.model)
    if args.data is None:
        shape = tuple(model.inputs[0].shape[1:])
        x, y = np.random.default_rng(0).normal(size=(256, *shape)).astype("float32"), None
        print("no --data: random normal inputs (give real data for the measured checks)")
    else:
        x, y = _load_data(args.data, model, "val")
    print(diagnose_batchnorm(model, x[: args.samples], None if y is None else y[: args.samples]))


def _fold(args) -> int:
    from bnutils.folding import fold_batchnorm

    model = _load_model(args.model)
    target = _free_output(args.output)
    try:
        with warnings.catch_warnings():  # "folded nothing" is said below, as a usage error
            warnings.simplefilter("ignore", UserWarning)
            folded, report = fold_batchnorm(model, return_report=True)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from e
    print(report)
    if not report.folded:
        raise UsageError(f"nothing to fold in {args.model}: no BN layer follows a linear layer")
    if args.data is None:
        shape = tuple(model.inputs[0].shape[1:])
        x = np.random.default_rng(0).normal(size=(64, *shape)).astype("float32")
    else:
        x = _load_data(args.data, model, "val")[0][:256]
    before = np.asarray(model.predict(x, verbose=0))
    after = np.asarray(folded.predict(x, verbose=0))
    gap = float(np.abs(before - after).max() / (np.abs(before).max() or 1.0))
    if gap > 1e-4:
        print(f"predictions differ after folding: max gap {gap:.2e} of the output scale; not saved")
        return 1
    _save(folded, target)
    print(f"predictions agree (max gap {gap:.1e} of the output scale on {len(x)} inputs)")
    print(f"wrote {target}")
    return 0


def _recalibrate(args) -> None:
    from bnutils.precise import recalibrate_batchnorm

    model = _load_model(args.model)
    target = _free_output(args.output)
    x, _ = _load_data(args.data, model, "train")
    try:
        report = recalibrate_batchnorm(model, x, num_batches=args.batches, batch_size=args.batch)
    except ValueError as e:
        raise UsageError(str(e)) from e
    print(report)
    _save(model, target)
    print(f"wrote {target}")


def _export(args) -> None:
    from bnutils import export

    model = _load_model(args.model)
    target = _free_output(args.output)
    if args.format == "savedmodel":
        export.export_savedmodel(model, target)
    elif args.format == "onnx":
        export.export_onnx(model, target)
    else:
        export.export_litert(model, target)
    print(f"wrote {target} ({args.format})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnutils", description="Batch normalization tools for a saved Keras model."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data_help = f"{' | '.join(DATASETS)} or FILE.npz (arrays x and optionally y)"

    p = sub.add_parser("info", help="list the BN layers, their settings and modes")
    p.add_argument("model", help="a .keras file")
    p.set_defaults(run=_info)

    p = sub.add_parser("doctor", help="check the model's BN for the common bugs")
    p.add_argument("model", help="a .keras file")
    p.add_argument("--data", help=f"held-out inputs: {data_help}")
    p.add_argument("--samples", type=int, default=512, help="examples to measure (512)")
    p.set_defaults(run=_doctor)

    p = sub.add_parser("fold", help="fold BN into the layers before it; check and save")
    p.add_argument("model", help="a .keras file")
    p.add_argument("output", help="the folded .keras file to write (must not exist)")
    p.add_argument("--data", help=f"inputs for the check (default: random): {data_help}")
    p.set_defaults(run=_fold)

    p = sub.add_parser("recalibrate", help="precise BN: recompute the moving statistics")
    p.add_argument("model", help="a .keras file")
    p.add_argument("output", help="the recalibrated .keras file to write (must not exist)")
    p.add_argument("--data", required=True, help=f"training inputs: {data_help}")
    p.add_argument("--batch", type=int, default=128, help="the training batch size (128)")
    p.add_argument("--batches", type=int, default=200, help="batches to average (200)")
    p.set_defaults(run=_recalibrate)

    p = sub.add_parser("export", help="export for inference (BN folded)")
    p.add_argument("model", help="a .keras file")
    p.add_argument("output", help="the SavedModel folder, .onnx or .tflite file to write")
    p.add_argument("--format", choices=FORMATS, default="savedmodel", help="(savedmodel)")
    p.set_defaults(run=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; return its exit status (2: bad input, nothing written)."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except UsageError as e:
        print(f"bnutils {args.command}: error: {e}", file=sys.stderr)
        return 2
