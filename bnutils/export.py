"""Run a trained BN model outside Keras: SavedModel (BN folded, with metadata), ONNX Runtime
and LiteRT (ex-TFLite). Every export is atomic: a failed one leaves nothing. Used in notebook 07.

Tested pins (with tensorflow-cpu 2.21.0, keras 3.15.1, numpy 2.1.3, protobuf 7):
``tf2onnx==1.17.0``, ``onnx==1.23.2``, ``onnxruntime==1.32.0``, ``ai-edge-litert==2.3.0``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bnutils._util import atomic_path, atomic_write_json, env_info
from bnutils.results import Report

__all__ = [
    "DEFAULT_PREPROCESSING",
    "METADATA_FILE",
    "FreshProcessResult",
    "check_fresh_process",
    "export_litert",
    "export_onnx",
    "export_savedmodel",
    "load_for_inference",
    "load_litert",
    "load_onnx",
    "read_metadata",
]

METADATA_FILE = "bnutils_metadata.json"
DEFAULT_PREPROCESSING = (
    "float32 images of shape (N, 28, 28, 1), pixels divided by 255 to lie in [0, 1] "
    "(as bnutils.load_dataset returns them); no other normalization"
)
ENDPOINT = "serve"
_INSTALL = {
    "onnx": "pip install tf2onnx==1.17.0 onnx==1.23.2 onnxruntime==1.32.0",
    "litert": "pip install ai-edge-litert==2.3.0",
}


def export_savedmodel(
    model,
    path: str | os.PathLike,
    fold: bool = True,
    overwrite: bool = False,
    class_names: Sequence[str] | None = None,
    preprocessing: str = DEFAULT_PREPROCESSING,
) -> Path:
    """Write ``model`` as a SavedModel whose ``serve`` endpoint calls it with ``training=False``.

    Args:
        model: a Keras model built on ``keras.Input``.
        path: the SavedModel folder to create.
        fold: fold BN layers into the preceding layers first
            (:func:`bnutils.folding.fold_batchnorm`); the report goes into the metadata.
        overwrite: replace an existing ``path`` (only once the new export is complete).
        class_names: names of the output classes, stored in the metadata.
        preprocessing: what a caller must do to raw inputs, stored in the metadata.

    Returns:
        The SavedModel folder.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        ValueError: a model without ``keras.Input``, or ``class_names`` unlike the outputs.
    """
    import keras
    import tensorflow as tf

    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"Refusing to overwrite the existing path {str(target)!r}. Pass `overwrite=True` "
            "to replace it (the old export is removed only after the new one is complete), "
            "or choose a new path."
        )
    inputs = _model_inputs(model)
    signature = [
        tf.TensorSpec((None, *t.shape[1:]), dtype=t.dtype, name=re.sub(r"\W", "_", t.name))
        for t in inputs
    ]
    if fold:
        from bnutils.folding import fold_batchnorm

        try:
            with warnings.catch_warnings():  # a model without BN exports as it is
                warnings.simplefilter("ignore", UserWarning)
                model, report = fold_batchnorm(model, return_report=True)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} Or export it unfolded with `fold=False`.") from err
    outputs = [
        {"shape": [None, *t.shape[1:]], "dtype": keras.backend.standardize_dtype(t.dtype)}
        for t in model.outputs or []
    ]
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        last = outputs[0]["shape"][-1] if len(outputs) == 1 else None
        if last is not None and last != len(class_names):
            raise ValueError(
                f"Received {len(class_names)} class names but the model outputs {last} "
                "values per example; expected one name per output."
            )

    def serve(*xs):
        return model(xs[0] if len(xs) == 1 else list(xs), training=False)

    info = env_info()
    metadata = {
        "format": "bnutils-savedmodel/1",
        "endpoint": ENDPOINT,
        "model_name": model.name,
        "inputs": [
            {"name": s.name, "shape": s.shape.as_list(), "dtype": s.dtype.name} for s in signature
        ],
        "outputs": outputs,
        "preprocessing": preprocessing,
        "class_names": class_names,
        "folded": bool(fold),
        "fold_report": {"folded": report.folded, "kept": report.kept} if fold else None,
        "versions": info["versions"],
        "created_utc": info["date"],
    }
    with atomic_path(target, directory=True) as tmp:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(name=ENDPOINT, fn=serve, input_signature=signature)
        archive.write_out(str(tmp), verbose=False)
        atomic_write_json(tmp / METADATA_FILE, metadata)
    return target


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``bnutils_metadata.json`` of an export (``{}`` for a SavedModel without one)."""
    file = Path(path) / METADATA_FILE
    return json.loads(file.read_text(encoding="utf-8")) if file.exists() else {}


def load_for_inference(path: str | os.PathLike) -> tuple[Callable[..., np.ndarray], dict]:
    """Reload an export for inference, needing only TensorFlow (no Keras code, no bnutils).

    Returns:
        ``(predict, metadata)``: ``predict(x)`` takes NumPy arrays and returns a NumPy array
        (a list of arrays for several outputs); ``metadata`` is the stored dict.

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
    endpoint = metadata.get("endpoint", ENDPOINT)
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
class FreshProcessResult(Report):
    """What :func:`check_fresh_process` found: ``passed`` is ``max_abs_diff <= atol`` and no
    ``bnutils`` import in the child (``keras_imported`` is informative: TensorFlow imports it)."""

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
path, x_file, out_file = sys.argv[1:4]
x = np.load(x_file)
loaded = tf.saved_model.load(path)  # keep a reference: it owns the variables
outputs = tf.nest.flatten(loaded.serve(tf.constant(x)))
np.save(out_file, np.concatenate([np.asarray(o).reshape(len(x), -1) for o in outputs], axis=1))
print(json.dumps({
    "bnutils": any(m == "bnutils" or m.startswith("bnutils.") for m in sys.modules),
    "keras": "keras" in sys.modules,
    "tensorflow": tf.__version__,
}))
"""


def check_fresh_process(
    path: str | os.PathLike, x, expected, atol: float = 1e-5, timeout: float = 300.0
) -> FreshProcessResult:
    """Reload the export in a new Python process that imports only TensorFlow and NumPy.

    The child (``sys.executable -I``, in a temporary folder) calls ``serve`` on ``x``.

    Args:
        path: a folder written by :func:`export_savedmodel`.
        x: inputs, first axis the examples.
        expected: the outputs the in-memory model gives for ``x``.
        atol: the largest absolute difference accepted.
        timeout: seconds before the child is stopped.

    Raises:
        RuntimeError: the child process failed (its error output is included).
    """
    path = Path(path).resolve()
    x = np.asarray(x)
    expected = np.asarray(expected, dtype=np.float64).reshape(len(x), -1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="bnutils-fresh-") as work:
        x_file, out_file = Path(work, "x.npy"), Path(work, "y.npy")
        np.save(x_file, x)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-I", "-c", _CHILD, str(path), str(x_file), str(out_file)],
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


def export_onnx(model, path: str | os.PathLike) -> Path:
    """Convert ``model`` (in inference mode) to an ONNX file (opset 17, free batch dimension).

    Raises:
        ImportError: ``tf2onnx`` or ``onnx`` is not installed.
    """
    for module in ("tf2onnx", "onnx"):
        _require(module, "onnx")
    inputs = _model_inputs(model)
    zeros = [np.zeros((1, *t.shape[1:]), dtype=t.dtype) for t in inputs]
    model(zeros[0] if len(zeros) == 1 else zeros, training=False)  # Keras refuses uncalled models
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Keras's numpy-2 patch of tf2onnx
        model.export(str(tmp), format="onnx", opset_version=17, verbose=False)
    return Path(path)


def load_onnx(path: str | os.PathLike) -> Callable[[np.ndarray], np.ndarray]:
    """An ONNX Runtime (CPU) session for a one-input file, as ``predict(x) -> np.ndarray``.

    Raises:
        ImportError: ``onnxruntime`` is not installed.
    """
    ort = _require("onnxruntime", "onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    dtype = np.float32 if spec.type == "tensor(float)" else None

    def predict(x):
        return session.run(None, {spec.name: np.asarray(x, dtype=dtype)})[0]

    predict.session = session
    return predict


def export_litert(model, path: str | os.PathLike) -> Path:
    """Convert ``model`` to a LiteRT (``.tflite``) flatbuffer, without quantization.

    Goes through a temporary unfolded SavedModel (the converter folds BN itself) and
    ``tf.lite.TFLiteConverter.from_saved_model``.
    """
    import tensorflow as tf

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".litert-", dir=target.parent) as work:
        saved = export_savedmodel(model, Path(work) / "saved_model", fold=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=[ENDPOINT])
        flatbuffer = converter.convert()
    with atomic_path(target) as tmp:
        tmp.write_bytes(flatbuffer)
    return target


def load_litert(path: str | os.PathLike) -> Callable[[np.ndarray], np.ndarray]:
    """A LiteRT interpreter for a one-input file, as ``predict(x) -> np.ndarray`` (any batch).

    Raises:
        ImportError: ``ai-edge-litert`` is not installed.
    """
    _require("ai_edge_litert", "litert")
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    state = {"shape": None}

    def predict(x):
        inp = interpreter.get_input_details()[0]
        x = np.asarray(x, dtype=inp["dtype"])
        if state["shape"] != x.shape:
            interpreter.resize_tensor_input(inp["index"], x.shape, strict=False)
            interpreter.allocate_tensors()
            state["shape"] = x.shape
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        return np.array(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))

    predict.interpreter = interpreter
    return predict


def _model_inputs(model) -> list:
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            f"Model `{model.name}` has no known inputs; expected one built on `keras.Input`."
        )
    return list(inputs)


def _require(module: str, runtime: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"The {runtime} runtime needs the package providing `{module}`, which is not "
            f"installed. Install the tested versions with `{_INSTALL[runtime]}`."
        ) from err
