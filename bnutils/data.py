"""Datasets, found offline first (Fashion-MNIST, MNIST, CIFAR-10), and the ``tf.data`` pipeline.

Fashion-MNIST is looked for in ``data_dir``, ``$BNUTILS_DATA_DIR``, ``data/fashion-mnist/`` (or
``data/``), Debian's ``/usr/share/datasets/fashion-mnist/`` (``dataset-fashion-mnist``), the
Keras cache, then Keras's download (``data/README.md`` has the table for all three). Files are
checked (magic number, dimensions, counts, labels 0-9). Images come back float32 ``(N, H, W, C)``
in [0, 1] (``scale="unit"``), standardized with the training split's per-channel mean and std
(``"standard"``) or uint8 (``"raw"``); labels int32.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bnutils._util import check_positive_int
from bnutils.config import repo_root

__all__ = [
    "Dataset",
    "DatasetError",
    "load_dataset",
    "make_tf_dataset",
    "read_idx",
    "synthetic_images",
]

DATA_DIR_ENV = "BNUTILS_DATA_DIR"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("fashion_mnist", "mnist", "cifar10")
# name -> (folder under data/, folder under the Keras cache's datasets/, image shape, train size)
_SPECS = {
    "fashion_mnist": ("fashion-mnist", "fashion-mnist", (28, 28, 1), 60_000),
    "mnist": ("mnist", "", (28, 28, 1), 60_000),
    "cifar10": ("cifar10", "cifar-10-batches-py-target", (32, 32, 3), 50_000),
}
SCALES = ("unit", "standard", "raw")
_CLASSES = {
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "mnist": tuple(str(i) for i in range(10)),
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
}
# file stem -> (expected magic, expected count, trailing dimensions)
_FASHION_FILES = {
    "train-images-idx3-ubyte": (2051, 60_000, (28, 28)),
    "train-labels-idx1-ubyte": (2049, 60_000, ()),
    "t10k-images-idx3-ubyte": (2051, 10_000, (28, 28)),
    "t10k-labels-idx1-ubyte": (2049, 10_000, ()),
}
_FIX = {
    "fashion_mnist": (
        "Install Debian's package (`apt-get install dataset-fashion-mnist`; `make setup` does), "
        "copy train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
        f"and t10k-labels-idx1-ubyte.gz into data/fashion-mnist/ (or ${DATA_DIR_ENV}), or fetch "
        "them with `keras.datasets.fashion_mnist.load_data()` (needs internet)."
    ),
    "mnist": "Put mnist.npz in $KERAS_HOME/datasets/ or in `data_dir`, or run "
    "`keras.datasets.mnist.load_data()` once with internet.",
    "cifar10": "Put the extracted cifar-10-batches-py/ folder in `data_dir` or in $KERAS_HOME/"
    "datasets/cifar-10-batches-py-target/, or run `keras.datasets.cifar10.load_data()` online.",
}


class DatasetError(RuntimeError):
    """A dataset file is missing, unreadable, truncated or corrupted."""


@dataclasses.dataclass
class Dataset:
    """Train / validation / test splits of one dataset.

    Attributes:
        x_train, y_train, x_val, y_val, x_test, y_test: images ``(N, H, W, C)`` and labels.
        name, class_names, source, scale: the dataset, label names, where it was read, scaling.
        mean, std: per-channel statistics of the training split (before scaling to unit).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    source: str
    scale: str = "unit"
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, train: int | None = None, val: int | None = None, test: int | None = None):
        """The first ``train`` / ``val`` / ``test`` examples of each shuffled split (None: all)."""
        cut = {}
        for split, n in (("train", train), ("val", val), ("test", test)):
            size = len(getattr(self, f"x_{split}"))
            if n is not None and check_positive_int(split, n) > size:
                raise ValueError(f"Requested {n} {split} examples but the split has only {size}.")
            for part in ("x", "y"):
                cut[f"{part}_{split}"] = getattr(self, f"{part}_{split}")[:n]
        return dataclasses.replace(self, **cut)

    def summary(self) -> str:
        """Name, split shapes and scaling (where it was read is in ``source``)."""
        return (
            f"{self.name}: train {self.x_train.shape}, val {self.x_val.shape}, "
            f"test {self.x_test.shape}, scale={self.scale!r}"
        )


def _check_name(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}. Expected one of {list(DATASETS)}.")
    return key


def _search_locations(name: str, data_dir) -> list[tuple[str, Path]]:
    """The folders searched for ``name``, in order, as ``(label, path)`` pairs."""
    repo = repo_root() / "data"
    cache = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "datasets"
    locs = [
        ("data_dir argument", data_dir),
        (f"${DATA_DIR_ENV}", os.environ.get(DATA_DIR_ENV)),
        ("repository data/", repo / _SPECS[name][0]),
        ("repository data/", repo),
        ("Debian package dataset-fashion-mnist", DEBIAN_DIR if name == "fashion_mnist" else None),
        ("Keras cache", cache / _SPECS[name][1]),
    ]
    return [(label, Path(p)) for label, p in locs if p]


# ---------------------------------------------------------------- readers


def read_idx(
    path: str | os.PathLike,
    magic: int | None = None,
    count: int | None = None,
    dims: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Read and check one IDX file (``.gz`` or plain) of unsigned bytes.

    Args:
        path: the file.
        magic, count, dims: the expected magic number (2049 labels, 2051 images), number of
            items and trailing dimensions, e.g. ``(28, 28)``; ``None`` skips a check.

    Returns:
        A uint8 array of shape ``(count, *dims)``.

    Raises:
        DatasetError: the file cannot be read, is truncated, or its header is wrong.
    """
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(
            f"{path}: cannot be read ({e!r}): missing, truncated or not gzip."
        ) from e
    if len(raw) < 4 or len(raw) < 4 + 4 * raw[3]:
        raise DatasetError(f"{path}: {len(raw)} bytes, truncated inside its IDX header.")
    file_magic, ndim = struct.unpack(">I", raw[:4])[0], raw[3]
    if raw[2] != 0x08:
        raise DatasetError(f"{path}: magic number {file_magic} is not an unsigned-byte IDX file.")
    if magic is not None and file_magic != magic:
        raise DatasetError(f"{path}: magic number {file_magic}, expected {magic}.")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if count is not None and shape[0] != count:
        raise DatasetError(f"{path}: holds {shape[0]} items, expected {count}.")
    if dims is not None and tuple(shape[1:]) != tuple(dims):
        raise DatasetError(f"{path}: item dimensions {tuple(shape[1:])}, expected {tuple(dims)}.")
    if len(raw) - header != int(np.prod(shape)):
        got = f"{len(raw) - header} data bytes for shape {shape}"
        raise DatasetError(f"{path}: {got}; the file is truncated or corrupted.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read_fashion_folder(folder: Path):
    found = {}
    for stem in _FASHION_FILES:
        found[stem] = next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)
    if not any(found.values()):
        return None
    missing = [f"{s}.gz" for s, p in found.items() if p is None]
    if missing:
        raise DatasetError(f"{folder} holds some Fashion-MNIST files but not {', '.join(missing)}.")
    x_train, y_train, x_test, y_test = (
        read_idx(found[stem], magic=magic, count=count, dims=dims)
        for stem, (magic, count, dims) in _FASHION_FILES.items()
    )
    return x_train[..., None], y_train, x_test[..., None], y_test


def _read_mnist_folder(folder: Path):
    path = folder / "mnist.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            x_train, y_train, x_test, y_test = [
                f[k] for k in ("x_train", "y_train", "x_test", "y_test")
            ]
    except Exception as e:  # zipfile.BadZipFile, KeyError, ValueError, OSError
        raise DatasetError(f"{path}: cannot be read as mnist.npz ({e!r}).") from e
    return x_train[..., None], y_train, x_test[..., None], y_test


def _read_cifar_folder(folder: Path):
    base = folder / "cifar-10-batches-py"
    base = base if base.is_dir() else folder
    if not (base / "test_batch").is_file():
        return None
    parts = []
    for p in [base / f"data_batch_{i}" for i in range(1, 6)] + [base / "test_batch"]:
        try:
            with open(p, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            parts.append((x, np.asarray(d[b"labels"], dtype=np.uint8)))
        except Exception as e:
            raise DatasetError(f"{p}: cannot be read as a CIFAR-10 batch ({e!r}).") from e
    x_train, y_train = (np.concatenate([p[i] for p in parts[:5]]) for i in (0, 1))
    return x_train, y_train, *parts[5]


def _check_arrays(where, name, x_train, y_train, x_test, y_test):
    dims, n_train = _SPECS[name][2:]
    for label, x, y, n in (("train", x_train, y_train, n_train), ("test", x_test, y_test, 10_000)):
        if x.shape[1:] != dims or len(x) != n or len(y) != n:
            want = f"({n}, {', '.join(map(str, dims))}) and ({n},)"
            raise DatasetError(f"{where}: {label} images {x.shape}, labels {y.shape}; want {want}.")
        if y.min() < 0 or y.max() > 9:
            raise DatasetError(f"{where}: {label} labels span {y.min()}-{y.max()}, expected 0-9.")


_READERS = {
    "fashion_mnist": _read_fashion_folder,
    "mnist": _read_mnist_folder,
    "cifar10": _read_cifar_folder,
}


def _keras_download(name: str):
    import keras

    (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    if x_train.ndim == 3:
        x_train, x_test = x_train[..., None], x_test[..., None]
    return x_train, np.ravel(y_train), x_test, np.ravel(y_test)


def _locate(name: str, data_dir, download: bool):
    searched = []
    for label, folder in _search_locations(name, data_dir):
        searched.append(f"{folder} ({label})")
        explicit = label in ("data_dir argument", f"${DATA_DIR_ENV}")
        if not folder.is_dir() or not os.access(folder, os.R_OK | os.X_OK):
            if explicit:
                what = "is not a readable folder" if folder.exists() else "does not exist"
                raise DatasetError(
                    f"The {label} {folder} {what}; expected {name} files. {_FIX[name]}"
                )
            continue
        try:
            arrays = _READERS[name](folder)
            if arrays is not None:
                _check_arrays(folder, name, *arrays)
        except DatasetError as e:
            raise DatasetError(
                f"{e}\nFix: delete or replace the bad file. {_FIX[name]}\n"
                "Searched so far: " + "; ".join(searched)
            ) from e
        if arrays is not None:
            return arrays, str(folder)
        if explicit:
            raise DatasetError(f"The {label} {folder} holds no {name} files. {_FIX[name]}")
    if download:
        try:
            return _keras_download(name), "keras download"
        except Exception as e:
            searched.append(f"keras download ({type(e).__name__}: {e})")
    where = "\n  - ".join(searched)
    raise DatasetError(
        f"Could not find the {name} dataset. Searched, in order:\n  - {where}\nFix: {_FIX[name]}"
    )


def load_dataset(
    name: str = "fashion_mnist",
    data_dir: str | os.PathLike | None = None,
    validation_size: int = 5_000,
    seed: int = 0,
    scale: str = "unit",
    download: bool = True,
) -> Dataset:
    """Load a dataset with a fixed, seeded validation split carved from the training set.

    Args:
        name: ``"fashion_mnist"`` (default), ``"mnist"`` or ``"cifar10"``.
        data_dir: a folder to look in first (the order is in the module docstring).
        validation_size, seed: training examples held out for validation (0: none), and the
            seed of the permutation that shuffles the training set before the split.
        scale: ``"unit"``, ``"standard"`` or ``"raw"`` (see the module docstring).
        download: fall back to Keras's download when no local copy is found.

    Returns:
        A :class:`Dataset`.

    Raises:
        ValueError: unknown name or scale, or a bad ``validation_size``.
        DatasetError: files missing, unreadable, truncated or corrupted (the message names
            the file, the problem, the places searched and the fix).
    """
    name = _check_name(name)
    if scale not in SCALES:
        raise ValueError(f"Unknown scale {scale!r}. Expected one of {list(SCALES)}.")
    (x_train, y_train, x_test, y_test), source = _locate(name, data_dir, download)
    n = len(x_train)
    if check_positive_int("validation_size", validation_size, minimum=0) >= n:
        raise ValueError(f"`validation_size` must be below {n}, received {validation_size}.")
    order = np.random.default_rng(seed).permutation(n)
    x_train, y_train = x_train[order], y_train[order].astype(np.int32)
    cut = n - validation_size
    pixels = x_train[:cut].reshape(-1, x_train.shape[-1])
    mean, std = pixels.mean(axis=0) / 255.0, pixels.std(axis=0) / 255.0

    def prep(x):
        if scale == "raw":
            return np.ascontiguousarray(x)
        x = x.astype(np.float32) / 255.0
        return (x - mean.astype(np.float32)) / std.astype(np.float32) if scale == "standard" else x

    x_val, y_val = prep(x_train[cut:]), y_train[cut:]
    x_train, y_train = prep(x_train[:cut]), y_train[:cut]
    splits = (x_train, y_train, x_val, y_val, prep(x_test), y_test.astype(np.int32))
    return Dataset(name, *splits, _CLASSES[name], source, scale, mean, std)


# ---------------------------------------------------------------- tf.data and synthetic data


def make_tf_dataset(
    x: np.ndarray,
    y: np.ndarray | None = None,
    batch_size: int = 128,
    shuffle: bool = True,
    seed: int = 0,
    drop_remainder: bool = False,
):
    """Arrays as a cached, shuffled (a new order each epoch, the same orders for the same
    ``seed``), batched and prefetched ``tf.data.Dataset``. Used in notebooks 01, 07 and A2.

    Args:
        x, y: inputs and labels (or ``None``), first axis the examples.
        batch_size: examples per batch (positive).
        shuffle, seed: shuffle every epoch, with this seed.
        drop_remainder: drop a last, smaller batch (BN dislikes a batch of 1).

    Raises:
        ValueError: a bad batch size or mismatched ``x`` / ``y`` lengths.
    """
    import tensorflow as tf

    batch_size = check_positive_int("batch_size", batch_size)
    if y is not None and len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}; expected equal lengths.")
    ds = tf.data.Dataset.from_tensor_slices(x if y is None else (x, y)).cache()
    if shuffle:
        ds = ds.shuffle(min(len(x), 60_000), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def synthetic_images(
    n: int, shape: Sequence[int] = (28, 28, 1), num_classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` deterministic float32 images of ``shape`` in [0, 1], brighter for higher labels,
    and their int32 labels in ``[0, num_classes)``: fast plumbing data for tests and demos."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=n).astype("int32")
    level = (y.astype("float32") + 0.5) / num_classes
    noise = rng.random((n, *shape), dtype=np.float32)
    x = 0.5 * noise + 0.5 * level.reshape((n,) + (1,) * len(shape))
    return x.astype("float32"), y
