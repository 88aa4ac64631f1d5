"""The command line (`python -m bnutils`), run as a user runs it: subprocesses on saved models, a
trained notebook CNN and Keras's MobileNetV2. Bad input exits 2 with one line, writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from bnutils.data import load_dataset
from bnutils.models import build_cnn
from bnutils.training import train

pytestmark = pytest.mark.slow


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-m", "bnutils", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A notebook CNN with BN trained one epoch on real Fashion-MNIST, MobileNetV2 (no weights),
    and an .npz of Fashion-MNIST validation images."""
    folder = tmp_path_factory.mktemp("cli")
    ds = load_dataset().subset(2000, 500, 500)
    runs = folder / "runs"
    result = train(lambda: build_cnn(norm="batch"), ds, epochs=1, batch_size=128, results_dir=runs)
    result.model.save(folder / "cnn.keras")
    keras.utils.set_random_seed(0)
    mobile = keras.applications.MobileNetV2(
        weights=None, input_shape=(64, 64, 3), alpha=0.35, classes=10
    )
    mobile.save(folder / "mobilenet.keras")
    np.savez(folder / "val.npz", x=ds.x_val[:256], y=ds.y_val[:256])
    (folder / "notes.txt").write_text("not a model\n")
    return folder


def test_info_lists_the_bn_layers_and_their_modes(saved):
    out = cli("info", "cnn.keras", cwd=saved)
    assert out.returncode == 0, out.stderr
    assert "BatchNormalization" in out.stdout and "batch statistics" in out.stdout
    mobile = cli("info", "mobilenet.keras", cwd=saved)
    assert mobile.returncode == 0, mobile.stderr
    assert mobile.stdout.count("BatchNormalization") >= 30


def test_doctor_reads_real_data_from_a_file(saved):
    out = cli("doctor", "cnn.keras", "--data", "val.npz", cwd=saved)
    assert out.returncode == 0, out.stderr
    assert "model 'cnn_bn', 5 BN layer(s), 256 examples" in out.stdout
    # one epoch (16 steps) with momentum 0.99 leaves moving statistics far from the data's
    assert "moving-stats" in out.stdout


def test_fold_checks_predictions_and_writes_a_model_that_agrees(saved):
    for name in ("cnn", "mobilenet"):
        data = ["--data", "val.npz"] if name == "cnn" else []
        out = cli("fold", f"{name}.keras", f"{name}_folded.keras", *data, cwd=saved)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "predictions agree" in out.stdout and "Folded" in out.stdout
        folded = keras.saving.load_model(saved / f"{name}_folded.keras", compile=False)
        original = keras.saving.load_model(saved / f"{name}.keras", compile=False)
        x = np.random.default_rng(1).normal(size=(4, *original.input_shape[1:])).astype("float32")
        np.testing.assert_allclose(
            folded.predict(x, verbose=0), original.predict(x, verbose=0), atol=1e-4
        )
        bns = [layer for layer in folded.layers if "BatchNormalization" in type(layer).__name__]
        assert len(bns) < sum(
            "BatchNormalization" in type(layer).__name__ for layer in original.layers
        )


def test_recalibrate_and_export_write_their_outputs(saved):
    out = cli("recalibrate", "cnn.keras", "cnn_precise.keras", "--data", "val.npz", cwd=saved)
    assert out.returncode == 0, out.stderr
    assert "recalibrated" in out.stdout and (saved / "cnn_precise.keras").is_file()
    out = cli("export", "cnn.keras", "cnn_savedmodel", cwd=saved)
    assert out.returncode == 0, out.stderr
    assert (saved / "cnn_savedmodel" / "saved_model.pb").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (("info", "missing.keras"), "no such file: missing.keras"),
        (("info", "notes.txt"), "notes.txt is not a Keras model file"),
        (("fold", "cnn.keras", "val.npz"), "val.npz exists"),
        (("recalibrate", "cnn.keras", "out.keras", "--data", "nope"), "--data 'nope': expected"),
        (("doctor", "mobilenet.keras", "--data", "val.npz"), "the model takes (64, 64, 3)"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(saved, args, message):
    before = sorted(p.name for p in saved.iterdir())
    out = cli(*args, cwd=saved)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("bnutils ")]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert sorted(p.name for p in saved.iterdir()) == before, "nothing written"


def test_every_subcommand_has_help(saved):
    for command in ("info", "doctor", "fold", "recalibrate", "export"):
        out = cli(command, "--help", cwd=saved)
        assert out.returncode == 0 and f"usage: bnutils {command}" in out.stdout
