"""Run a Keras model outside Keras: ONNX Runtime (via tf2onnx) and LiteRT (ex-TFLite).

Both converters start from the model's inference graph, so BN layers arrive as their
fixed moving-statistics affine map (and are usually fused into the convolution).
Each ``export_*`` function writes its file atomically (a temporary file renamed into
place); each ``load_*`` function returns a ``predict(x) -> np.ndarray`` callable.

Tested pins (with tensorflow-cpu 2.21.0, keras 3.15.1, numpy 2.1.3, protobuf 7):
``tf2onnx==1.17.0``, ``onnx==1.23.2``, ``onnxruntime==1.32.0``, ``ai-edge-litert==2.3.0``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
    "RUNTIMES",
    "export_litert",
    "export_onnx",
    "load_litert",
    "load_onnx",
    "runtime_agreement",
]

RUNTIMES = ("savedmodel", "onnx", "litert")
_INSTALL = {
    "onnx": "pip install tf2onnx==1.17.0 onnx==1.23.2 onnxruntime==1.32.0",
    "litert": "pip install ai-edge-litert==2.3.0",
}


def export_onnx(model, path: str | os.PathLike, opset: int = 17) -> Path:
    """Convert ``model`` (in inference mode) to an ONNX file with a free batch dimension.

    Args:
        model: a built Keras model with known inputs.
        path: the ``.onnx`` file to write (replaced if it exists).
        opset: the ONNX opset version.

    Returns:
        The path of the ONNX file.

    Raises:
        ImportError: ``tf2onnx`` or ``onnx`` is not installed.
    """
    _require("tf2onnx", "onnx")
    _require("onnx", "onnx")
    _ensure_called(model)
    target = Path(path)
    with _atomic_file(target) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Keras's numpy-2 patch of tf2onnx
        model.export(str(tmp), format="onnx", opset_version=int(opset), verbose=False)
    return target


def load_onnx(
    path: str | os.PathLike, threads: int | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """An ONNX Runtime (CPU) session for the file, as ``predict(x) -> np.ndarray``.

    Args:
        path: an ``.onnx`` file with one input.
        threads: intra-op threads (``None``: ONNX Runtime's default).

    Raises:
        ImportError: ``onnxruntime`` is not installed.
    """
    ort = _require("onnxruntime", "onnx")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    dtype = np.float32 if spec.type == "tensor(float)" else None

    def predict(x):
        return session.run(None, {spec.name: np.asarray(x, dtype=dtype)})[0]

    predict.session = session
    return predict


def export_litert(model, path: str | os.PathLike) -> Path:
    """Convert ``model`` to a LiteRT (``.tflite``) flatbuffer via a temporary SavedModel.

    The SavedModel (``bnutils.export.export_savedmodel`` with ``fold=False``: the
    converter folds BN itself) is converted with
    ``tf.lite.TFLiteConverter.from_saved_model``, without quantization.

    Args:
        model: a built Keras model with known inputs.
        path: the ``.tflite`` file to write (replaced if it exists).

    Returns:
        The path of the LiteRT file.
    """
    import tensorflow as tf

    from bnutils.export import export_savedmodel

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".litert-", dir=target.parent) as work:
        saved = export_savedmodel(model, Path(work) / "saved_model", fold=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=["serve"])
        flatbuffer = converter.convert()
    with _atomic_file(target) as tmp:
        tmp.write_bytes(flatbuffer)
    return target


def load_litert(
    path: str | os.PathLike, threads: int | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """A LiteRT interpreter for the file, as ``predict(x) -> np.ndarray`` (any batch size).

    Args:
        path: a ``.tflite`` file with one input.
        threads: interpreter threads (``None``: LiteRT's default).

    Raises:
        ImportError: ``ai-edge-litert`` is not installed.
    """
    _require("ai_edge_litert", "litert")
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
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


def runtime_agreement(
    model, x, directory: str | os.PathLike, runtimes=RUNTIMES
) -> dict[str, float]:
    """Export ``model`` to each runtime and return the largest |difference| from Keras.

    Args:
        model: a built Keras model with one input and one output.
        x: inputs to compare on.
        directory: where the exported files go (``model_savedmodel/``, ``model.onnx``,
            ``model.tflite``).
        runtimes: any of ``"savedmodel"``, ``"onnx"``, ``"litert"``.

    Returns:
        ``{runtime: max |runtime(x) - model(x, training=False)|}``.

    Raises:
        ValueError: an unknown runtime name.
    """
    from bnutils.export import export_savedmodel, load_for_inference

    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        raise ValueError(f"Unknown runtime(s) {unknown}; expected names from {RUNTIMES}.")
    directory = Path(directory)
    x = np.asarray(x, dtype=np.float32)
    reference = np.asarray(model(x, training=False))
    result = {}
    for name in runtimes:
        if name == "savedmodel":
            saved = export_savedmodel(model, directory / "model_savedmodel", overwrite=True)
            predict, _ = load_for_inference(saved)
        elif name == "onnx":
            predict = load_onnx(export_onnx(model, directory / "model.onnx"))
        else:
            predict = load_litert(export_litert(model, directory / "model.tflite"))
        result[name] = float(np.max(np.abs(np.asarray(predict(x)) - reference)))
    return result


def _require(module: str, runtime: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"The {runtime} runtime needs the package providing `{module}`, which is not "
            f"installed. Install the tested versions with `{_INSTALL[runtime]}`."
        ) from err


def _ensure_called(model) -> None:
    """Keras's ONNX export refuses a model never called on data: call it on zeros once."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            f"Model `{model.name}` has no known inputs; build it on `keras.Input` first."
        )
    zeros = [np.zeros((1, *t.shape[1:]), dtype=t.dtype) for t in inputs]
    model(zeros[0] if len(zeros) == 1 else zeros, training=False)


class _atomic_file:
    """Context manager: yields a temporary path beside ``target``, renamed onto it on success."""

    def __init__(self, target: Path):
        self.target = target

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=f".{self.target.name}.partial-",
            suffix=self.target.suffix,
            dir=self.target.parent,
        )
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            os.replace(self.tmp, self.target)
        else:
            self.tmp.unlink(missing_ok=True)
        return False
