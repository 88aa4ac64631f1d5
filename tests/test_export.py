"""SavedModel export (atomic, with metadata), reload in a fresh process, ONNX and LiteRT."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from bnutils.export import (
    METADATA_FILE,
    check_fresh_process,
    export_savedmodel,
    load_for_inference,
    read_metadata,
)

L = keras.layers


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    m = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.Conv2D(4, 3, use_bias=False, name="conv"),
            L.BatchNormalization(name="bn"),
            L.ReLU(),
            L.MaxPooling2D(),
            L.Flatten(),
            L.Dense(5),
        ],
        name="tiny_bn_cnn",
    )
    bn = m.layers[1]
    rng = np.random.default_rng(0)
    bn.moving_mean.assign(rng.normal(0, 0.3, 4))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, 4))
    bn.gamma.assign(rng.uniform(0.5, 1.5, 4))
    return m


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).uniform(size=(6, 8, 8, 1)).astype("float32")


def _expected(model, x):
    return np.asarray(model(x, training=False))


def test_export_writes_savedmodel_and_metadata(model, x, tmp_path):
    names = list("abcde")
    path = export_savedmodel(model, tmp_path / "sm", class_names=names, preprocessing="x / 255")
    assert (path / "saved_model.pb").exists()
    meta = json.loads((path / METADATA_FILE).read_text())
    assert meta == read_metadata(path)
    assert meta["inputs"][0]["shape"] == [None, 8, 8, 1]
    assert meta["inputs"][0]["dtype"] == "float32"
    assert meta["outputs"][0]["shape"] == [None, 5]
    assert meta["class_names"] == names
    assert meta["preprocessing"] == "x / 255"
    assert meta["folded"] is True
    assert meta["fold_report"]["folded"] == [["conv", "bn"]]
    assert meta["versions"]["tensorflow"] == __import__("tensorflow").__version__
    assert meta["versions"]["keras"] == keras.__version__
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sm"]  # no temporary leftovers


@pytest.mark.parametrize("fold", [True, False])
def test_reload_matches_the_in_memory_model(model, x, tmp_path, fold):
    path = export_savedmodel(model, tmp_path / "sm", fold=fold)
    predict, meta = load_for_inference(path)
    assert meta["folded"] is fold
    assert meta["endpoint"] == "serve"
    np.testing.assert_allclose(predict(x), _expected(model, x), rtol=0, atol=1e-5)


def test_existing_path_is_refused_and_left_alone(model, tmp_path):
    target = tmp_path / "sm"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_savedmodel(model, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_overwrite_replaces_the_old_export(model, x, tmp_path):
    target = tmp_path / "sm"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    export_savedmodel(model, target, overwrite=True)
    assert not (target / "stale.txt").exists()
    assert (target / "saved_model.pb").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sm"]


def _fail_midway(monkeypatch):
    import tensorflow as tf

    original = tf.saved_model.save

    def save_then_fail(*args, **kwargs):
        original(*args, **kwargs)  # the SavedModel is written, the metadata is not
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(tf.saved_model, "save", save_then_fail)


def test_interrupted_export_leaves_nothing(model, tmp_path, monkeypatch):
    _fail_midway(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        export_savedmodel(model, tmp_path / "out" / "sm")
    assert list((tmp_path / "out").iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_export(model, x, tmp_path, monkeypatch):
    target = export_savedmodel(model, tmp_path / "sm", fold=False)
    _fail_midway(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        export_savedmodel(model, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sm"]
    predict, meta = load_for_inference(target)
    assert meta["folded"] is False
    np.testing.assert_allclose(predict(x), _expected(model, x), atol=1e-5)


def test_bad_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="3 class names"):
        export_savedmodel(model, tmp_path / "sm", class_names=["a", "b", "c"])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="No SavedModel"):
        load_for_inference(tmp_path / "missing")


@pytest.mark.slow
def test_fresh_process_reload(model, x, tmp_path):
    path = export_savedmodel(model, tmp_path / "sm")
    expected = _expected(model, x)
    result = check_fresh_process(path, x, expected, atol=1e-5)
    assert result.passed, str(result)
    assert not result.bnutils_imported
    assert result.max_abs_diff <= 1e-5
    wrong = check_fresh_process(path, x, expected + 1e-3, atol=1e-5)
    assert not wrong.passed
    assert wrong.max_abs_diff == pytest.approx(1e-3, rel=1e-2)


def _agreement_tolerance(model, x):
    return 1e-4 * max(1.0, float(np.abs(_expected(model, x)).max()))


def test_onnx_agrees_with_keras(model, x, tmp_path):
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    from bnutils.export import export_onnx, load_onnx

    path = export_onnx(model, tmp_path / "m.onnx")
    predict = load_onnx(path)
    np.testing.assert_allclose(predict(x), _expected(model, x), atol=_agreement_tolerance(model, x))
    np.testing.assert_allclose(predict(x[:1]), _expected(model, x[:1]), atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_litert_agrees_with_keras(model, x, tmp_path):
    pytest.importorskip("ai_edge_litert")
    from bnutils.export import export_litert, load_litert

    path = export_litert(model, tmp_path / "m.tflite")
    predict = load_litert(path)
    tol = _agreement_tolerance(model, x)
    np.testing.assert_allclose(predict(x), _expected(model, x), atol=tol)
    np.testing.assert_allclose(predict(x[:1]), _expected(model, x[:1]), atol=tol)  # resized
    assert [p.name for p in tmp_path.iterdir()] == ["m.tflite"]
