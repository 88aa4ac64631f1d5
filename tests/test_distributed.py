"""Synchronized BN with tf.distribute: logical CPUs, one-device equality, loopback workers.

Logical devices must be configured before TensorFlow initializes, and this pytest process may
have initialized it already, so the multi-replica checks run in fresh processes
(``scripts/multiworker_bn.py mirrored`` and the loopback launcher). Every process a test
starts is ended by the test, and checked to be gone, even when the test fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bnutils import distributed as dist
from bnutils._graph import find_batchnorm_layers
from bnutils.data import synthetic_images
from bnutils.models import small_bn_mlp, small_bn_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "multiworker_bn.py"


# ---------------------------------------------------------------------------------------------
# process helpers
# ---------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process reused the id
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _kill_group(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.5)


@pytest.fixture
def run_launcher(tmp_path):
    """Run the multi-worker launcher in its own process group; end everything it started."""
    started: list[subprocess.Popen] = []
    out = tmp_path / "mw"

    def run(*extra: str, timeout: float = 180.0):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("TF_CONFIG", None)
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--out", str(out), *extra],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        started.append(proc)
        t0 = time.monotonic()
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output, time.monotonic() - t0, out

    try:
        yield run
    finally:
        pids = []
        if (out / "pids.json").exists():
            pids = list(json.loads((out / "pids.json").read_text()).values())
        for proc in started:
            if proc.poll() is None:
                _kill_group(proc.pid)
                proc.wait(timeout=10)
        for pid in pids:  # the workers run in their own process groups
            if _alive(pid):
                _kill_group(pid)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in pids if _alive(p)], "worker processes outlived the test"


def _worker_pids(out: Path) -> list[int]:
    pids = json.loads((out / "pids.json").read_text())
    assert set(pids) == {"worker0", "worker1", "single"}
    return list(pids.values())


def _load_script():
    spec = importlib.util.spec_from_file_location("multiworker_bn", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# in-process: argument checks and one-device plumbing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, True, 1.5])
def test_setup_logical_cpus_rejects_bad_counts(n):
    with pytest.raises(ValueError, match="integer >= 1"):
        dist.setup_logical_cpus(n)


def test_setup_logical_cpus_after_initialization_says_restart():
    import tensorflow as tf

    tf.constant(0.0)  # TensorFlow's devices are now fixed in this process
    current = len(tf.config.list_logical_devices("CPU"))
    with pytest.raises(RuntimeError, match="Restart the kernel"):
        dist.setup_logical_cpus(current + 1)
    assert len(dist.setup_logical_cpus(current)) == current  # same count: a no-op


def test_mirrored_strategy_explains_missing_devices():
    import tensorflow as tf

    too_many = len(tf.config.list_logical_devices("CPU")) + 1
    if len(tf.config.list_logical_devices("GPU")) < too_many:  # CPUs are the fallback
        with pytest.raises(ValueError, match="setup_logical_cpus"):
            dist.mirrored_strategy(too_many)


def _bns(model):
    return [bn for _, bn in find_batchnorm_layers(model)]


@pytest.mark.parametrize("builder", [small_bn_model, small_bn_mlp])
def test_small_models_pass_synchronized_and_are_seeded(builder):
    synced = builder(True, input_shape=(8, 8, 1), seed=3)
    plain = builder(False, input_shape=(8, 8, 1), seed=3)
    other = builder(False, input_shape=(8, 8, 1), seed=4)
    assert [bn.synchronized for bn in _bns(synced)] == [True, True]
    assert [bn.synchronized for bn in _bns(plain)] == [False, False]
    for a, b in zip(synced.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    kernels = [w for w in other.get_weights() if w.ndim > 1]
    assert any(
        not np.array_equal(a, b)
        for a, b in zip([w for w in plain.get_weights() if w.ndim > 1], kernels, strict=True)
    )


def test_bn_step_statistics_on_one_device_matches_numpy():
    import keras

    x, y = synthetic_images(32, shape=(8, 8, 1), seed=1)
    start = small_bn_model(False, input_shape=(8, 8, 1), momentum=0.8)
    bn1 = _bns(start)[0]
    conv_out = keras.Model(start.inputs, bn1.input).predict(x[:16], verbose=0)
    stats = dist.bn_step_statistics(
        None,
        lambda: small_bn_model(False, input_shape=(8, 8, 1), momentum=0.8),
        x,
        y,
        per_replica_batch=16,
        steps=2,
    )  # seeded initializers: the same weights as `start`
    assert stats.num_replicas == 1 and stats.layer_names == ("bn1", "bn2")
    assert stats.batch_mean["bn1"].shape == (2, 1, 8)  # (steps, replicas, channels)
    np.testing.assert_allclose(
        stats.batch_mean["bn1"][0, 0], conv_out.mean(axis=(0, 1, 2)), atol=1e-5
    )
    np.testing.assert_allclose(
        stats.batch_var["bn1"][0, 0], conv_out.var(axis=(0, 1, 2)), atol=1e-5
    )
    assert stats.ema_replay_error() < 1e-5
    assert stats.saved_replicas() == [0]
    assert np.all(np.isfinite(stats.losses)) and stats.losses.shape == (2,)


def test_bn_step_statistics_checks_its_inputs():
    import keras

    x, y = synthetic_images(8, shape=(8, 8, 1))
    with pytest.raises(ValueError, match="need 32 examples, received 8"):
        dist.bn_step_statistics(None, lambda: small_bn_model(input_shape=(8, 8, 1)), x, y, 16, 2)

    def no_bn():
        inputs = keras.Input((8, 8, 1))
        return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))

    with pytest.raises(ValueError, match="BatchNormalization"):
        dist.bn_step_statistics(None, no_bn, x, y, 4, 1)


@pytest.mark.slow
def test_small_batch_experiment_resets_between_seeds():
    import tensorflow as tf

    from bnutils.data import Dataset

    x, y = synthetic_images(96, shape=(6, 6, 1), num_classes=3, seed=2)
    data = Dataset(
        name="synthetic", x_train=x[:64], y_train=y[:64], x_val=x[:0], y_val=y[:0],
        x_test=x[64:], y_test=y[64:], class_names=("a", "b", "c"), source="generated",
    )  # fmt: skip

    def model_fn(synchronized=False, seed=0):
        return small_bn_model(synchronized, (6, 6, 1), 3, width=16, momentum=0.99, seed=seed)

    result = dist.small_batch_experiment(
        data, model_fn, 8, epochs=1, seeds=[0, 1, 0], strategy=tf.distribute.get_strategy()
    )
    assert result.num_replicas == 1 and set(result.accuracy) == {"synced", "unsynced"}
    for accs in result.accuracy.values():
        assert all(0.0 <= a <= 1.0 for a in accs)
        assert accs[0] == accs[2]  # the same seed after another run: the reset is complete
    # one replica: synchronized BN is plain BN, and there is only one copy of each statistic
    assert result.accuracy["synced"] == result.accuracy["unsynced"]
    assert result.replica_spread == {"synced": [0.0] * 3, "unsynced": [0.0] * 3}


def test_compare_dumps_flags_disagreement_and_missing_files(tmp_path):
    mw = _load_script()
    with pytest.raises(FileNotFoundError, match="worker0.npz"):
        mw.compare_dumps(tmp_path)
    rng = np.random.default_rng(0)
    arrays = {
        "weight_000": rng.normal(size=(3, 3)),
        "moving_mean/bn1": rng.normal(size=(1, 4)),
        "moving_var/bn1": rng.random((1, 4)),
        "batch_mean/bn1": rng.normal(size=(2, 1, 4)),
        "batch_var/bn1": rng.random((2, 1, 4)),
        "losses": rng.random(2),
    }
    for name in ("worker0", "worker1", "single"):
        np.savez(tmp_path / f"{name}.npz", **arrays)
    assert mw.compare_dumps(tmp_path)["ok"]
    np.savez(
        tmp_path / "worker1.npz", **{**arrays, "moving_mean/bn1": arrays["moving_mean/bn1"] + 1e-3}
    )
    summary = mw.compare_dumps(tmp_path)
    assert not summary["ok"]
    assert summary["workers_max_diff"]["moving_stats"] == pytest.approx(1e-3, rel=1e-6)


def test_free_ports_are_distinct_and_bindable():
    import socket

    ports = _load_script().free_ports(3)
    assert len(set(ports)) == 3
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


# ---------------------------------------------------------------------------------------------
# fresh processes: two logical CPUs, two loopback workers
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_synchronized_bn_on_two_replicas_equals_one_device_on_the_global_batch():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "mirrored", "--steps", "2", "--per-replica-batch", "8"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert (summary["replicas"], summary["global_batch"]) == (2, 16)
    synced, unsynced = summary["synced_error"], summary["unsynced_error"]
    for key in ("batch_mean", "batch_var", "moving_mean", "moving_var"):
        assert synced[key] < 1e-5, (key, synced)
    assert synced["weights"] < 1e-5 and synced["loss"] < 1e-5
    assert summary["synced_replica_spread"] < 1e-6
    # per-replica BN normalizes each replica with its own 8 examples
    assert unsynced["batch_mean"] > 1e-3 and unsynced["batch_var"] > 1e-3
    # ... and every replica keeps its own moving averages; the saved ones are replica 0's
    assert summary["unsynced_replica_spread"] > 1e-4
    assert summary["unsynced_ema_replay_error"] < 1e-5
    assert summary["unsynced_saved_replicas"] == [0]
    assert proc.returncode == 0 and summary["ok"]


@pytest.mark.slow
def test_two_loopback_workers_agree_with_each_other_and_one_device(run_launcher):
    rc, output, wall, out = run_launcher("--steps", "3", "--timeout", "170")
    pids = _worker_pids(out)
    assert rc == 0, output[-3000:]
    assert wall < 180
    summary = json.loads((out / "summary.json").read_text())
    assert max(summary["workers_max_diff"].values()) <= 1e-6
    assert max(summary["single_max_diff"].values()) <= 1e-4
    assert summary["ok"] and "OK" in output
    assert summary["name"] == "summary"  # the result schema of bnutils.results.write_result
    assert summary["command"][:2] == ["python", "scripts/multiworker_bn.py"]
    assert not [p for p in pids if _alive(p)]


@pytest.mark.slow
def test_loopback_workers_with_plain_bn_disagree(run_launcher):
    rc, output, _, out = run_launcher("--steps", "2", "--no-sync", "--timeout", "170")
    assert rc == 1, output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers_max_diff"]["moving_stats"] > 1e-4  # each worker: its own stats
    assert summary["workers_max_diff"]["trainable_weights"] <= 1e-6  # gradients are all-reduced
    assert summary["single_max_diff"]["trainable_weights"] > 1e-4
    assert "MISMATCH" in output


@pytest.mark.slow
def test_launcher_timeout_ends_every_process(run_launcher):
    rc, output, wall, out = run_launcher("--timeout", "1")
    assert rc == 2, output[-3000:]
    assert "timed out" in output
    pids = _worker_pids(out)
    assert not [p for p in pids if _alive(p)]
    assert wall < 60
