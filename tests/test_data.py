"""bnutils.data: offline Fashion-MNIST, validation of IDX files, clear errors."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from bnutils import data
from bnutils.data import DatasetError, load_dataset, read_idx, synthetic_images

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(
    not DEBIAN.is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (make setup does it)",
)


@pytest.fixture(autouse=True)
def _no_env_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))


def _write_idx(path: Path, arr: np.ndarray, magic: int | None = None, compress: bool = True):
    magic = magic if magic is not None else 0x0800 + arr.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@needs_debian
def test_fashion_mnist_from_debian_without_network(monkeypatch):
    def no_download(name):
        raise AssertionError("must not download")

    monkeypatch.setattr(data, "_keras_download", no_download)
    ds = load_dataset("fashion_mnist")
    assert len(ds.x_train) + len(ds.x_val) == 60_000
    assert len(ds.x_val) == 5_000
    assert ds.x_test.shape == (10_000, 28, 28, 1)
    assert ds.x_train.dtype == np.float32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert set(np.unique(ds.y_test)) == set(range(10))
    assert np.bincount(ds.y_test).tolist() == [1000] * 10  # the published test set is balanced
    assert ds.class_names[9] == "Ankle boot"


@pytest.mark.slow
@needs_debian
def test_validation_split_is_seeded_and_disjoint():
    a = load_dataset(validation_size=1000, seed=3)
    b = load_dataset(validation_size=1000, seed=3)
    c = load_dataset(validation_size=1000, seed=4)
    np.testing.assert_array_equal(a.y_val, b.y_val)
    assert not np.array_equal(a.y_val, c.y_val)
    # the split is a partition of the 60,000 training images: no image in both halves
    train_keys = {x.tobytes() for x in (a.x_train[:2000] * 255).astype(np.uint8)}
    assert not any(x.tobytes() in train_keys for x in (a.x_val * 255).astype(np.uint8))


@needs_debian
def test_standard_scale_has_zero_mean_unit_std():
    ds = load_dataset(scale="standard")
    assert abs(float(ds.x_train.mean())) < 1e-3
    assert abs(float(ds.x_train.std()) - 1.0) < 1e-3
    raw = load_dataset(scale="raw")
    assert raw.x_train.dtype == np.uint8


@needs_debian
def test_truncated_file_in_explicit_dir_names_it(tmp_path):
    for f in DEBIAN.iterdir():
        shutil.copy(f, tmp_path / f.name)
    victim = tmp_path / "train-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(DatasetError) as err:
        load_dataset(data_dir=tmp_path)
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg
    assert "truncated" in msg.lower()
    assert str(tmp_path) in msg  # where it looked


def test_corrupted_header_and_label_range(tmp_path):
    bad = tmp_path / "x.gz"
    _write_idx(bad, np.zeros((5, 28, 28)), magic=0x0D03)  # type byte 0x0D (float), not 0x08
    with pytest.raises(DatasetError, match="magic"):
        read_idx(bad)
    ok = tmp_path / "y.gz"
    _write_idx(ok, np.zeros((5, 28, 28)))
    with pytest.raises(DatasetError, match="holds 5 items, expected 60000"):
        read_idx(ok, magic=2051, count=60_000, dims=(28, 28))
    with pytest.raises(DatasetError, match=r"dimensions \(28, 28\), expected \(32, 32\)"):
        read_idx(ok, magic=2051, dims=(32, 32))


def test_missing_file_and_every_place_searched(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(data, "repo_root", lambda: tmp_path / "repo")
    monkeypatch.setattr(
        data, "_keras_download", lambda name: (_ for _ in ()).throw(OSError("offline"))
    )
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion_mnist")
    msg = str(err.value)
    for where in ("nowhere", "repo", "keras_home", "keras download", "apt-get install"):
        assert where in msg


def test_partial_folder_reports_missing_files(tmp_path):
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(60_000))
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset(data_dir=tmp_path)


def test_bad_inputs_say_what_is_accepted(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown dataset 'imagenet'.*fashion_mnist"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="Unknown scale"):
        load_dataset(scale="zscore")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(data_dir=tmp_path / "missing")
    if os.geteuid() != 0:  # root can read anything
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0)
        with pytest.raises(DatasetError, match="not a readable folder"):
            load_dataset(data_dir=locked)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="holds no fashion_mnist files"):
        load_dataset(data_dir=empty)


def test_unreadable_dir_is_reported(tmp_path, monkeypatch):
    target = tmp_path / "d"
    target.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        data.os, "access", lambda p, m: False if Path(p) == target else real_access(p, m)
    )
    with pytest.raises(DatasetError, match="not a readable folder"):
        load_dataset(data_dir=target)


def test_mnist_from_keras_cache(tmp_path, monkeypatch):
    cache = tmp_path / "keras_home" / "datasets"
    cache.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(
        cache / "mnist.npz",
        x_train=rng.integers(0, 256, (60_000, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 60_000, dtype=np.uint8),
        x_test=rng.integers(0, 256, (10_000, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, 10_000, dtype=np.uint8),
    )
    monkeypatch.setattr(data, "repo_root", lambda: tmp_path / "repo")
    ds = load_dataset("mnist", validation_size=10_000)
    assert ds.x_train.shape == (50_000, 28, 28, 1) and ds.x_test.shape == (10_000, 28, 28, 1)
    assert ds.source == str(cache)
    assert ds.class_names[3] == "3"


@pytest.mark.slow
def test_cifar10_from_keras_cache(tmp_path, monkeypatch):
    base = (
        tmp_path / "keras_home" / "datasets" / "cifar-10-batches-py-target" / "cifar-10-batches-py"
    )
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 10_000) for i in range(1, 6)] + [("test_batch", 10_000)]:
        with open(base / name, "wb") as f:
            pickle.dump(
                {
                    b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    b"labels": rng.integers(0, 10, n).tolist(),
                },
                f,
            )
    monkeypatch.setattr(data, "repo_root", lambda: tmp_path / "repo")
    ds = load_dataset("cifar10")
    assert ds.x_train.shape == (45_000, 32, 32, 3)
    assert ds.input_shape == (32, 32, 3) and ds.num_classes == 10
    # channel order: the first pixel's red value is the first byte of the record
    with open(base / "test_batch", "rb") as f:
        rec = pickle.load(f, encoding="bytes")[b"data"][0]
    raw = load_dataset("cifar10", scale="raw")
    assert raw.x_test[0, 0, 0, 0] == rec[0] and raw.x_test[0, 0, 0, 1] == rec[1024]


def test_subset_and_errors():
    ds = data.Dataset(
        "t", *(np.zeros((10, 2, 2, 1)), np.zeros(10)) * 3, class_names=("a",), source="x"
    )
    small = ds.subset(4, 2, None)
    assert len(small.x_train) == 4 and len(small.x_val) == 2 and len(small.x_test) == 10
    with pytest.raises(ValueError, match="only 10"):
        ds.subset(train=11)
    with pytest.raises(ValueError, match="`val` must be an integer >= 1, received 0"):
        ds.subset(val=0)


@needs_debian
def test_name_spelling_and_validation_size_bounds():
    ds = load_dataset("Fashion-MNIST", validation_size=0)
    assert ds.name == "fashion_mnist" and len(ds.x_train) == 60_000 and len(ds.x_val) == 0
    with pytest.raises(ValueError, match="`validation_size` must be below 60000"):
        load_dataset(validation_size=60_000)
    with pytest.raises(ValueError, match="validation_size"):
        load_dataset(validation_size=-1)


def test_synthetic_images_are_seeded_and_brighter_for_higher_labels():
    x, y = synthetic_images(400, shape=(4, 4, 1), num_classes=4, seed=1)
    again, y_again = synthetic_images(400, shape=(4, 4, 1), num_classes=4, seed=1)
    other, _ = synthetic_images(400, shape=(4, 4, 1), num_classes=4, seed=2)
    assert x.shape == (400, 4, 4, 1) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(x, again)
    np.testing.assert_array_equal(y, y_again)
    assert not np.array_equal(x, other)
    assert 0.0 <= x.min() and x.max() <= 1.0 and set(np.unique(y)) == {0, 1, 2, 3}
    means = [float(x[y == c].mean()) for c in range(4)]
    assert means == sorted(means) and means[-1] - means[0] > 0.3
