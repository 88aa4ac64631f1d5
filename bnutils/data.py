"""Datasets, found offline first: Fashion-MNIST (default), MNIST and CIFAR-10.

Fashion-MNIST is looked for, in this order, in:

1. the ``data_dir`` argument;
2. the folder named by ``$BNUTILS_DATA_DIR``;
3. the repository's ``data/fashion-mnist/`` (or ``data/``);
4. Debian's ``/usr/share/datasets/fashion-mnist/`` (package ``dataset-fashion-mnist``);
5. the Keras cache, ``$KERAS_HOME/datasets/fashion-mnist/`` (default ``~/.keras``);
6. Keras's own download (``keras.datasets.fashion_mnist.load_data``), which needs internet.

The IDX ``.gz`` files are parsed here and checked: magic number, dimensions, counts
(60,000 training and 10,000 test examples) and labels 0-9. MNIST and CIFAR-10 go through
the same API from the Keras cache (``mnist.npz``, ``cifar-10-batches-py``) or its download.

Images come back as float32 ``(N, H, W, C)`` scaled to [0, 1] (``scale="unit"``), or
standardized with the training split's per-channel mean and std (``scale="standard"``),
or as the raw uint8 values (``scale="raw"``). Labels are int32 class indices.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np

from bnutils.config import repo_root

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "Dataset",
    "DatasetError",
    "load_dataset",
    "read_idx",
    "search_locations",
]

DATA_DIR_ENV = "BNUTILS_DATA_DIR"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
MNIST_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
DATASETS = ("fashion_mnist", "mnist", "cifar10")
SCALES = ("unit", "standard", "raw")

# file stem -> (expected magic, expected count, trailing dimensions)
_FASHION_FILES = {
    "train-images-idx3-ubyte": (2051, 60_000, (28, 28)),
    "train-labels-idx1-ubyte": (2049, 60_000, ()),
    "t10k-images-idx3-ubyte": (2051, 10_000, (28, 28)),
    "t10k-labels-idx1-ubyte": (2049, 10_000, ()),
}

_FIX = {
    "fashion_mnist": (
        "Install Debian's package (`apt-get install dataset-fashion-mnist`, which `make setup` "
        "does), or copy the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz into data/fashion-mnist/, or "
        f"point ${DATA_DIR_ENV} at a folder holding them. With internet, "
        "`keras.datasets.fashion_mnist.load_data()` downloads them into the Keras cache."
    ),
    "mnist": (
        "Put mnist.npz in $KERAS_HOME/datasets/ (or in a folder passed as `data_dir`), or run "
        "`keras.datasets.mnist.load_data()` once with internet."
    ),
    "cifar10": (
        "Put the extracted cifar-10-batches-py/ folder in a folder passed as `data_dir` or in "
        "$KERAS_HOME/datasets/cifar-10-batches-py-target/, or run "
        "`keras.datasets.cifar10.load_data()` once with internet."
    ),
}


class DatasetError(RuntimeError):
    """A dataset file is missing, unreadable, truncated or corrupted."""


@dataclasses.dataclass
class Dataset:
    """Train / validation / test splits of one dataset.

    Attributes:
        name: dataset name.
        x_train, y_train, x_val, y_val, x_test, y_test: images ``(N, H, W, C)`` and labels.
        class_names: label index -> name.
        source: where the files were read from.
        scale: how images were scaled (``"unit"``, ``"standard"`` or ``"raw"``).
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

    def subset(
        self, train: int | None = None, val: int | None = None, test: int | None = None
    ) -> Dataset:
        """The first ``train`` / ``val`` / ``test`` examples of each split (``None``: all).

        The splits are already shuffled with a fixed seed, so the first examples are a fair
        sample. Typical use: ``ds.subset(profile.train_size, profile.val_size,
        profile.test_size)``.
        """
        for label, n, arr in (
            ("train", train, self.x_train),
            ("val", val, self.x_val),
            ("test", test, self.x_test),
        ):
            if n is not None and (not isinstance(n, (int, np.integer)) or n <= 0):
                raise ValueError(f"Expected a positive integer or None for {label}, received {n!r}.")
            if n is not None and n > len(arr):
                raise ValueError(
                    f"Requested {n} {label} examples but the split has only {len(arr)}."
                )

        def cut(a, n):
            return a if n is None else a[:n]

        return dataclasses.replace(
            self,
            x_train=cut(self.x_train, train),
            y_train=cut(self.y_train, train),
            x_val=cut(self.x_val, val),
            y_val=cut(self.y_val, val),
            x_test=cut(self.x_test, test),
            y_test=cut(self.y_test, test),
        )

    def summary(self) -> str:
        return (
            f"{self.name} from {self.source}: train {self.x_train.shape}, "
            f"val {self.x_val.shape}, test {self.x_test.shape}, scale={self.scale!r}"
        )


def _keras_home() -> Path:
    return Path(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")))


def search_locations(name: str = "fashion_mnist", data_dir: str | os.PathLike | None = None):
    """The folders searched for ``name``, in order, as ``(label, path)`` pairs."""
    name = _check_name(name)
    locs: list[tuple[str, Path]] = []
    if data_dir is not None:
        locs.append(("data_dir argument", Path(data_dir)))
    if os.environ.get(DATA_DIR_ENV):
        locs.append((f"${DATA_DIR_ENV}", Path(os.environ[DATA_DIR_ENV])))
    sub = {"fashion_mnist": "fashion-mnist", "mnist": "mnist", "cifar10": "cifar10"}[name]
    locs.append(("repository data/", repo_root() / "data" / sub))
    locs.append(("repository data/", repo_root() / "data"))
    if name == "fashion_mnist":
        locs.append(("Debian package dataset-fashion-mnist", DEBIAN_DIR))
        locs.append(("Keras cache", _keras_home() / "datasets" / "fashion-mnist"))
    elif name == "mnist":
        locs.append(("Keras cache", _keras_home() / "datasets"))
    else:
        locs.append(("Keras cache", _keras_home() / "datasets" / "cifar-10-batches-py-target"))
    return locs


def _check_name(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    aliases = {"fashion": "fashion_mnist", "fmnist": "fashion_mnist", "cifar_10": "cifar10"}
    key = aliases.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}. Expected one of {list(DATASETS)}.")
    return key


# ---------------------------------------------------------------- IDX parsing


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: str | os.PathLike, magic: int | None = None, count: int | None = None,
             dims: tuple[int, ...] | None = None) -> np.ndarray:
    """Read and check one IDX file (``.gz`` or plain) of unsigned bytes.

    Args:
        path: the file.
        magic: expected magic number (2049 labels, 2051 images); ``None`` skips the check.
        count: expected number of items; ``None`` skips the check.
        dims: expected trailing dimensions, e.g. ``(28, 28)``; ``None`` skips the check.

    Returns:
        A uint8 array of shape ``(count, *dims)``.

    Raises:
        DatasetError: the file cannot be read, is truncated, or its header is wrong.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(f"{path}: cannot be read ({type(e).__name__}: {e}); it is "
                           "missing, unreadable, truncated or not a gzip file.") from e
    if len(raw) < 8:
        raise DatasetError(f"{path}: only {len(raw)} bytes, too short for an IDX header.")
    file_magic = struct.unpack(">I", raw[:4])[0]
    if raw[2] != 0x08:
        raise DatasetError(
            f"{path}: IDX magic number {file_magic} does not describe unsigned bytes "
            "(expected 2049 for labels or 2051 for images); the file is corrupted."
        )
    ndim = raw[3]
    if magic is not None and file_magic != magic:
        raise DatasetError(f"{path}: magic number {file_magic}, expected {magic}.")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated inside its header ({len(raw)} bytes).")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if count is not None and shape[0] != count:
        raise DatasetError(f"{path}: holds {shape[0]} items, expected {count}.")
    if dims is not None and tuple(shape[1:]) != tuple(dims):
        raise DatasetError(f"{path}: item dimensions {tuple(shape[1:])}, expected {tuple(dims)}.")
    expected = int(np.prod(shape))
    body = len(raw) - header
    if body != expected:
        raise DatasetError(
            f"{path}: {body} data bytes after the header, expected {expected} for shape "
            f"{shape}; the file is truncated or corrupted."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read_fashion_folder(folder: Path):
    found = {stem: _find_idx(folder, stem) for stem in _FASHION_FILES}
    if not any(found.values()):
        return None
    missing = [f"{s}.gz" for s, p in found.items() if p is None]
    if missing:
        raise DatasetError(
            f"{folder} holds some Fashion-MNIST files but not {', '.join(missing)}."
        )
    arrays = {}
    for stem, (magic, count, dims) in _FASHION_FILES.items():
        arrays[stem] = read_idx(found[stem], magic=magic, count=count, dims=dims)
    for stem in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        top = int(arrays[stem].max())
        if top > 9:
            raise DatasetError(f"{found[stem]}: label {top} out of range, expected 0-9.")
    return (
        arrays["train-images-idx3-ubyte"][..., None],
        arrays["train-labels-idx1-ubyte"],
        arrays["t10k-images-idx3-ubyte"][..., None],
        arrays["t10k-labels-idx1-ubyte"],
    )


def _read_mnist_folder(folder: Path):
    path = folder / "mnist.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    except Exception as e:  # zipfile.BadZipFile, KeyError, ValueError, OSError
        raise DatasetError(f"{path}: cannot be read as mnist.npz ({type(e).__name__}: {e}).") from e
    x_train, y_train, x_test, y_test = arrays
    _check_arrays(path, x_train, y_train, x_test, y_test, (28, 28), 60_000, 10_000)
    return x_train[..., None], y_train, x_test[..., None], y_test


def _read_cifar_folder(folder: Path):
    base = folder / "cifar-10-batches-py"
    if not base.is_dir():
        base = folder if (folder / "test_batch").is_file() else None
    if base is None:
        return None

    def batch(p: Path):
        try:
            with open(p, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(d[b"labels"], dtype=np.uint8)
        except Exception as e:
            raise DatasetError(f"{p}: cannot be read as a CIFAR-10 batch "
                               f"({type(e).__name__}: {e}).") from e
        return data.transpose(0, 2, 3, 1), labels

    parts = [batch(base / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = batch(base / "test_batch")
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    _check_arrays(base, x_train, y_train, x_test, y_test, (32, 32, 3), 50_000, 10_000)
    return x_train, y_train, x_test, y_test


def _check_arrays(where, x_train, y_train, x_test, y_test, dims, n_train, n_test):
    for label, x, y, n in (("train", x_train, y_train, n_train), ("test", x_test, y_test, n_test)):
        if x.shape[1:] != dims or len(x) != n or len(y) != n:
            raise DatasetError(
                f"{where}: {label} split has images {x.shape} and labels {y.shape}, "
                f"expected ({n}, {', '.join(map(str, dims))}) and ({n},)."
            )
        if y.min() < 0 or y.max() > 9:
            raise DatasetError(f"{where}: {label} labels span {y.min()}-{y.max()}, expected 0-9.")


_READERS = {
    "fashion_mnist": _read_fashion_folder,
    "mnist": _read_mnist_folder,
    "cifar10": _read_cifar_folder,
}


def _keras_download(name: str):
    import keras

    module = {"fashion_mnist": keras.datasets.fashion_mnist, "mnist": keras.datasets.mnist,
              "cifar10": keras.datasets.cifar10}[name]
    (x_train, y_train), (x_test, y_test) = module.load_data()
    if x_train.ndim == 3:
        x_train, x_test = x_train[..., None], x_test[..., None]
    return x_train, np.ravel(y_train), x_test, np.ravel(y_test)


def _locate(name: str, data_dir, download: bool):
    locs = search_locations(name, data_dir)
    searched = []
    for label, folder in locs:
        searched.append(f"{folder} ({label})")
        explicit = label in ("data_dir argument", f"${DATA_DIR_ENV}")
        if not folder.exists():
            if explicit:
                raise DatasetError(
                    f"The folder {folder} given by the {label} does not exist. Expected a "
                    f"folder holding the {name} files. {_FIX[name]}"
                )
            continue
        if not os.access(folder, os.R_OK | os.X_OK) or not folder.is_dir():
            if explicit:
                raise DatasetError(
                    f"The {label} {folder} is not a readable folder. Expected a readable "
                    f"folder holding the {name} files. {_FIX[name]}"
                )
            continue
        try:
            arrays = _READERS[name](folder)
        except DatasetError as e:
            raise DatasetError(
                f"{e}\nFix: delete or replace the bad file. {_FIX[name]}\n"
                "Searched so far: " + "; ".join(searched)
            ) from e
        if arrays is not None:
            return arrays, str(folder)
        if explicit:
            raise DatasetError(
                f"The {label} {folder} holds no {name} files. {_FIX[name]}"
            )
    if download:
        try:
            return _keras_download(name), "keras download"
        except Exception as e:
            searched.append(f"keras download ({type(e).__name__}: {e})")
    raise DatasetError(
        f"Could not find the {name} dataset. Searched, in order:\n  - "
        + "\n  - ".join(searched)
        + f"\nFix: {_FIX[name]}"
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
        data_dir: a folder to look in first (see the module docstring for the order).
        validation_size: training examples held out for validation (0 for none).
        seed: seed of the permutation that shuffles the training set before the split.
        scale: ``"unit"`` (float32 in [0, 1]), ``"standard"`` (float32, zero mean and unit
            variance per channel, with training-split statistics) or ``"raw"`` (uint8).
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
    if not isinstance(validation_size, (int, np.integer)) or not 0 <= validation_size < n:
        raise ValueError(
            f"validation_size must be an integer in [0, {n}), received {validation_size!r}."
        )
    order = np.random.default_rng(seed).permutation(n)
    x_train, y_train = x_train[order], y_train[order]
    cut = n - validation_size
    x_val, y_val = x_train[cut:], y_train[cut:]
    x_train, y_train = x_train[:cut], y_train[:cut]

    mean = x_train.reshape(-1, x_train.shape[-1]).mean(axis=0) / 255.0
    std = x_train.reshape(-1, x_train.shape[-1]).std(axis=0) / 255.0

    def prep(x):
        if scale == "raw":
            return np.ascontiguousarray(x)
        x = x.astype(np.float32) / 255.0
        if scale == "standard":
            x = (x - mean.astype(np.float32)) / std.astype(np.float32)
        return x

    classes = {"fashion_mnist": FASHION_CLASSES, "mnist": MNIST_CLASSES,
               "cifar10": CIFAR10_CLASSES}[name]
    return Dataset(
        name=name,
        x_train=prep(x_train),
        y_train=y_train.astype(np.int32),
        x_val=prep(x_val),
        y_val=y_val.astype(np.int32),
        x_test=prep(x_test),
        y_test=y_test.astype(np.int32),
        class_names=classes,
        source=source,
        scale=scale,
        mean=mean,
        std=std,
    )
