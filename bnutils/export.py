"""Export a Keras model as a TensorFlow SavedModel for serving, atomically, with metadata.

:func:`export_savedmodel` (optionally) folds BN into the preceding layers, writes the
SavedModel and a ``bnutils_metadata.json`` (input shape and dtype, expected preprocessing,
class names, versions, folded or not) into a temporary folder beside the target and renames
it into place only when everything succeeded: a failed export leaves nothing behind.
:func:`load_for_inference` reloads it without Keras code, and :func:`check_fresh_process`
proves that a brand-new Python process that imports only TensorFlow gets the same answers.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_PREPROCESSING",
    "METADATA_FILE",
    "FreshProcessResult",
    "check_fresh_process",
    "export_savedmodel",
    "load_for_inference",
    "read_metadata",
]

METADATA_FILE = "bnutils_metadata.json"
DEFAULT_PREPROCESSING = (
    "float32 images of shape (N, 28, 28, 1), pixels divided by 255 to lie in [0, 1] "
    "(as bnutils.load_dataset returns them); no other normalization"
)


def export_savedmodel(
    model,
    path: str | os.PathLike,
    fold: bool = True,
    overwrite: bool = False,
    endpoint: str = "serve",
    class_names: Sequence[str] | None = None,
    preprocessing: str = DEFAULT_PREPROCESSING,
    input_signature=None,
) -> Path:
    """Write ``model`` as a SavedModel with one inference endpoint, atomically.

    The endpoint calls ``model(x, training=False)``, so BN layers always use their moving
    statistics in the exported graph.

    Args:
        model: a Keras model.
        path: the SavedModel folder to create.
        fold: fold BN layers into the preceding layers first (see
            :func:`bnutils.folding.fold_batchnorm`); the report goes into the metadata.
        overwrite: replace an existing ``path`` (only once the new export is complete).
        endpoint: name of the serving function (``loaded.<endpoint>(x)``).
        class_names: names of the output classes, stored in the metadata.
        preprocessing: what a caller must do to raw inputs, stored in the metadata.
        input_signature: a ``tf.TensorSpec`` or list of them; ``None`` uses the model's
            inputs with a free batch dimension.

    Returns:
        The path of the SavedModel folder.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        ValueError: a bad endpoint name, or ``class_names`` that do not match the outputs.
    """
    import keras

    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"Refusing to overwrite the existing path {str(target)!r}. Pass `overwrite=True` "
            "to replace it (the old export is removed only after the new one is complete), "
            "or choose a new path."
        )
    if not endpoint.isidentifier():
        raise ValueError(
            f"endpoint must be a Python identifier such as 'serve', received {endpoint!r}."
        )
    signature = _input_signature(model, input_signature)
    report = None
    if fold:
        from bnutils.folding import fold_batchnorm

        try:
            model, report = fold_batchnorm(model, return_report=True)
        except ValueError as err:
            raise ValueError(f"{err} Or export it unfolded with `fold=False`.") from err
    outputs = _output_specs(model)
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        last = outputs[0]["shape"][-1] if len(outputs) == 1 and outputs[0]["shape"] else None
        if last is not None and last != len(class_names):
            raise ValueError(
                f"Received {len(class_names)} class names but the model outputs {last} "
                "values per example; expected one name per output."
            )

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            name=endpoint,
            fn=_serving_fn(model, len(signature)),
            input_signature=signature,
        )
        archive.write_out(str(tmp), verbose=False)
        metadata = {
            "format": "bnutils-savedmodel/1",
            "endpoint": endpoint,
            "model_name": model.name,
            "inputs": [
                {"name": s.name, "shape": list(s.shape.as_list()), "dtype": s.dtype.name}
                for s in signature
            ],
            "outputs": outputs,
            "preprocessing": preprocessing,
            "class_names": class_names,
            "folded": bool(fold),
            "fold_report": None
            if report is None
            else {
                "folded": [list(p) for p in report.folded],
                "kept": [list(k) for k in report.kept],
            },
            "versions": _versions(),
            "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``bnutils_metadata.json`` of an export (``{}`` for a SavedModel without one)."""
    file = Path(path) / METADATA_FILE
    return json.loads(file.read_text(encoding="utf-8")) if file.exists() else {}


def load_for_inference(path: str | os.PathLike) -> tuple[Callable[..., np.ndarray], dict]:
    """Reload an export for inference, needing only TensorFlow (no Keras code, no bnutils).

    Args:
        path: a folder written by :func:`export_savedmodel` (or any SavedModel with a
            ``serve`` endpoint).

    Returns:
        ``(predict, metadata)``: ``predict(x)`` takes NumPy arrays and returns a NumPy
        array (a list of arrays for several outputs); ``metadata`` is the stored dict.

    Raises:
        FileNotFoundError: ``path`` is not a SavedModel folder.
        ValueError: the SavedModel lacks the endpoint named in its metadata.
    """
    import tensorflow as tf

    path = Path(path)
    if not (path / "saved_model.pb").exists():
        raise FileNotFoundError(
            f"No SavedModel at {str(path)!r} (expected a folder holding saved_model.pb); "
            "write one with `bnutils.export_savedmodel(model, path)`."
        )
    metadata = read_metadata(path)
    endpoint = metadata.get("endpoint", "serve")
    loaded = tf.saved_model.load(str(path))
    fn = getattr(loaded, endpoint, None)
    if fn is None:
        raise ValueError(
            f"The SavedModel at {str(path)!r} has no endpoint {endpoint!r}; expected the "
            "endpoint named in its metadata."
        )
    dtypes = [spec["dtype"] for spec in metadata.get("inputs", [])]

    def predict(*xs):
        tensors = [
            tf.convert_to_tensor(np.asarray(x), dtype=dtypes[i] if i < len(dtypes) else None)
            for i, x in enumerate(xs)
        ]
        outputs = [t.numpy() for t in tf.nest.flatten(fn(*tensors))]
        return outputs[0] if len(outputs) == 1 else outputs

    predict.loaded = loaded  # keep the SavedModel's resources alive with the function
    return predict, metadata


@dataclasses.dataclass(frozen=True)
class FreshProcessResult:
    """The result of :func:`check_fresh_process`.

    Attributes:
        max_abs_diff: largest absolute difference between the child's and the expected outputs.
        passed: ``max_abs_diff <= atol`` and the child did not import ``bnutils``.
        atol: the tolerance.
        bnutils_imported: whether ``bnutils`` was in the child's ``sys.modules`` (must not).
        keras_imported: whether ``keras`` was in the child's ``sys.modules``; TensorFlow 2.21
            imports Keras 3 itself, so this is informative only.
        tensorflow_version: the child's TensorFlow version.
        seconds: wall time of the child process.
    """

    max_abs_diff: float
    passed: bool
    atol: float
    bnutils_imported: bool
    keras_imported: bool
    tensorflow_version: str
    seconds: float

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return (
            f"Fresh-process reload {verdict}: max |difference| {self.max_abs_diff:.2e} "
            f"(atol {self.atol:.0e}); child imported bnutils: {self.bnutils_imported}, "
            f"keras: {self.keras_imported} (TensorFlow {self.tensorflow_version}); "
            f"{self.seconds:.1f} s."
        )


_CHILD = r"""
import json, sys
import numpy as np
import tensorflow as tf
path, x_file, out_file, endpoint = sys.argv[1:5]
x = np.load(x_file)
loaded = tf.saved_model.load(path)  # keep a reference: it owns the variables
outputs = tf.nest.flatten(getattr(loaded, endpoint)(tf.constant(x)))
y = np.concatenate([np.asarray(o).reshape(len(x), -1) for o in outputs], axis=1)
np.save(out_file, y)
print(json.dumps({
    "bnutils": any(m == "bnutils" or m.startswith("bnutils.") for m in sys.modules),
    "keras": "keras" in sys.modules,
    "tensorflow": tf.__version__,
}))
"""


def check_fresh_process(
    path: str | os.PathLike,
    x,
    expected,
    atol: float = 1e-5,
    timeout: float = 300.0,
) -> FreshProcessResult:
    """Reload the export in a new Python process that imports only TensorFlow and NumPy.

    The child (``sys.executable -I -c ...``, working in a temporary folder) loads the
    SavedModel, calls its endpoint on ``x`` (passed as a ``.npy`` file) and sends the
    outputs back, which are compared with ``expected`` (the in-memory model's outputs).

    Args:
        path: a folder written by :func:`export_savedmodel`.
        x: inputs, first axis the examples.
        expected: the outputs the in-memory model gives for ``x``.
        atol: the largest absolute difference accepted.
        timeout: seconds before the child is stopped.

    Returns:
        A :class:`FreshProcessResult`.

    Raises:
        RuntimeError: the child process failed (its error output is included).
    """
    path = Path(path).resolve()
    endpoint = read_metadata(path).get("endpoint", "serve")
    x = np.asarray(x)
    expected = np.asarray(expected, dtype=np.float64).reshape(len(x), -1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="bnutils-fresh-") as work:
        x_file, out_file = Path(work, "x.npy"), Path(work, "y.npy")
        np.save(x_file, x)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-I", "-c", _CHILD, str(path), str(x_file), str(out_file), endpoint],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(
                f"The fresh Python process failed to reload {str(path)!r} (exit code "
                f"{proc.returncode}). Its error output ends with:\n{proc.stderr[-2000:]}"
            )
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        got = np.load(out_file).astype(np.float64)
    if got.shape != expected.shape:
        raise RuntimeError(
            f"The reloaded model returned outputs of shape {got.shape} but `expected` has "
            f"shape {expected.shape}; expected the in-memory model's outputs for `x`."
        )
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    return FreshProcessResult(
        max_abs_diff=diff,
        passed=bool(diff <= atol and not info["bnutils"]),
        atol=float(atol),
        bnutils_imported=bool(info["bnutils"]),
        keras_imported=bool(info["keras"]),
        tensorflow_version=str(info["tensorflow"]),
        seconds=seconds,
    )


def _input_signature(model, input_signature) -> list:
    import tensorflow as tf

    if input_signature is not None:
        specs = input_signature if isinstance(input_signature, (list, tuple)) else [input_signature]
        if not all(isinstance(s, tf.TensorSpec) for s in specs):
            raise ValueError(
                "input_signature must be a tf.TensorSpec or a list of them, received "
                f"{input_signature!r}."
            )
        return list(specs)
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            f"Model `{model.name}` has no known inputs; build it on `keras.Input` or pass "
            "`input_signature=tf.TensorSpec(shape, dtype)`."
        )
    return [
        tf.TensorSpec((None, *t.shape[1:]), dtype=t.dtype, name=_spec_name(t.name, i))
        for i, t in enumerate(inputs)
    ]


def _spec_name(name: str, index: int) -> str:
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in str(name))
    return cleaned if cleaned and not cleaned[0].isdigit() else f"input_{index}"


def _serving_fn(model, n_inputs: int):
    if n_inputs == 1:
        return lambda x: model(x, training=False)
    return lambda *xs: model(list(xs), training=False)


def _output_specs(model) -> list[dict]:
    import keras

    outputs = getattr(model, "outputs", None)
    if not outputs:
        return []
    return [
        {"shape": [None, *list(t.shape[1:])], "dtype": keras.backend.standardize_dtype(t.dtype)}
        for t in outputs
    ]


def _versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    import bnutils

    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "bnutils": bnutils.__version__,
        "python": platform.python_version(),
    }


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` folder to ``target``, replacing an old one last."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
