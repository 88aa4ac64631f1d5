"""Synchronized BN across processes: ``MultiWorkerMirroredStrategy`` on two loopback workers.

The launcher (the default command) starts two worker processes on 127.0.0.1 (free ports picked
at run time), each with its own ``TF_CONFIG``, plus one single-process reference run. Every
worker trains the same small CNN with ``BatchNormalization(synchronized=True)`` for a few SGD
steps on deterministic data, its replica taking its slice of each global batch, and dumps its
final weights, moving statistics, batch statistics and losses to ``worker<i>.npz``. The
reference trains the same model on one device with the whole global batch (``single.npz``).
The launcher then checks that

* the workers agree with each other (``--worker-tol``, default 1e-6), and
* the workers agree with the single-process run on the global batch (``--single-tol``),

prints a summary, writes it to ``summary.json`` (in the result schema of
``bnutils.results.write_result``) and exits 0 when both hold, 1 on a mismatch,
2 when a process failed or ran past ``--timeout``. Every process it started is ended (its
whole process group) before it returns, also on errors, timeouts and Ctrl-C; their ids are
in ``pids.json``.

The ``mirrored`` command runs the one-process version instead: ``MirroredStrategy`` over
``--workers`` logical CPUs, synchronized and per-replica BN against one device on the global
batch (:func:`bnutils.distributed.compare_sync_bn`); it prints the summary as JSON and exits 0
when synchronized BN matches one device within ``--tol`` and per-replica BN does not.

Usage::

    python scripts/multiworker_bn.py --out results/multiworker --steps 5
    python scripts/multiworker_bn.py --data fashion_mnist      # real images instead
    python scripts/multiworker_bn.py --no-sync   # negative control: plain BN, expect exit 1
    python scripts/multiworker_bn.py mirrored --steps 3 --per-replica-batch 8   # one process

Running on real hosts: start one worker per machine with the same ``cluster`` and its own
``task.index``, then compare the dumps (copy them into one folder)::

    # on host-a (index 0) and host-b (index 1); ports must be open between them
    export TF_CONFIG='{"cluster": {"worker": ["host-a:23456", "host-b:23456"]},
                       "task": {"type": "worker", "index": 0}}'   # index 1 on host-b
    python scripts/multiworker_bn.py worker --out /shared/run1 --index 0   # --index 1 on host-b
    # anywhere, without TF_CONFIG:
    python scripts/multiworker_bn.py single --out /shared/run1
    python scripts/multiworker_bn.py compare --out /shared/run1 --workers 2

Each worker runs one replica per local device it uses (here one CPU); with GPUs the same
code mirrors over the local GPUs and all-reduces with NCCL across hosts
(``--implementation nccl``). Collectives use RING on CPUs. Op determinism is on in every
process (``bnutils.set_seed``), so repeated runs give identical dumps.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bnutils._util import atomic_path, atomic_write_json, json_safe
from bnutils.results import write_result

__all__ = [
    "compare_dumps",
    "free_ports",
    "launch",
    "main",
    "run_mirrored",
    "run_single",
    "run_worker",
]

_SHAPE = (12, 12, 1)  # synthetic image shape: small enough for a fast CPU demo


# ---------------------------------------------------------------------------------------------
# One process: a worker or the single-device reference
# ---------------------------------------------------------------------------------------------


def _data(args):
    from bnutils.data import synthetic_images

    need = args.workers * args.per_replica_batch * args.steps
    if args.data == "synthetic":
        return synthetic_images(need, shape=_SHAPE, seed=args.seed)
    from bnutils.data import load_dataset

    ds = load_dataset("fashion_mnist")
    return ds.x_train[:need], ds.y_train[:need]


def _model_fn(args, x, y):
    from bnutils.models import small_bn_model

    def build():
        return small_bn_model(
            synchronized=not args.no_sync,
            input_shape=x.shape[1:],
            num_classes=int(y.max()) + 1,
            seed=args.seed,
        )

    return build


def _dump(stats, path: Path) -> None:
    arrays = {f"weight_{i:03d}": w for i, w in enumerate(stats.weights)}  # the trainable ones
    for name in stats.layer_names:
        arrays[f"moving_mean/{name}"] = stats.moving_mean[name]
        arrays[f"moving_var/{name}"] = stats.moving_var[name]
        arrays[f"batch_mean/{name}"] = stats.batch_mean[name]
        arrays[f"batch_var/{name}"] = stats.batch_var[name]
    arrays["losses"] = stats.losses
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def run_worker(args) -> int:
    """One worker of the cluster in ``$TF_CONFIG``: train and dump ``worker<index>.npz``."""
    if "TF_CONFIG" not in os.environ:
        raise SystemExit(
            "The worker command expects $TF_CONFIG (cluster and task), found none. Set it as "
            "shown in this script's docstring, or run the launcher (no command) instead."
        )
    import tensorflow as tf

    # the strategy must exist before any other TensorFlow op runs in this process
    impl = tf.distribute.experimental.CommunicationImplementation[args.implementation.upper()]
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(implementation=impl)
    )
    from bnutils.distributed import bn_step_statistics
    from bnutils.repro import set_seed

    set_seed(args.seed)
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    index = int(task["index"]) if args.index is None else args.index
    if strategy.num_replicas_in_sync != args.workers:
        raise SystemExit(
            f"Expected {args.workers} replicas in sync (--workers), the cluster has "
            f"{strategy.num_replicas_in_sync}."
        )
    x, y = _data(args)
    stats = bn_step_statistics(
        strategy, _model_fn(args, x, y), x, y, args.per_replica_batch, args.steps, lr=args.lr
    )
    _dump(stats, Path(args.out) / f"worker{index}.npz")
    return 0


def run_single(args) -> int:
    """The reference: one device, the whole global batch; dumps ``single.npz``."""
    os.environ.pop("TF_CONFIG", None)
    from bnutils.distributed import bn_step_statistics
    from bnutils.repro import set_seed

    set_seed(args.seed)
    x, y = _data(args)
    stats = bn_step_statistics(
        None, _model_fn(args, x, y), x, y, args.workers * args.per_replica_batch, args.steps,
        lr=args.lr,
    )  # fmt: skip
    _dump(stats, Path(args.out) / "single.npz")
    return 0


def run_mirrored(args) -> int:
    """One process, ``--workers`` logical CPUs: synced and per-replica BN vs one device.

    Prints :meth:`bnutils.distributed.SyncComparison.summary` as JSON; 0 when synchronized BN
    matches one device within ``--tol`` (batch and moving statistics) and per-replica BN's
    batch means differ by more than ``10 * tol``, else 1.
    """
    from bnutils.distributed import compare_sync_bn, mirrored_strategy, setup_logical_cpus

    setup_logical_cpus(args.workers)  # before anything touches TensorFlow's devices
    from bnutils.repro import set_seed

    set_seed(args.seed)
    x, y = _data(args)
    strategy = mirrored_strategy(args.workers)
    summary = compare_sync_bn(x, y, args.per_replica_batch, args.steps, strategy=strategy).summary()
    stats = ("batch_mean", "batch_var", "moving_mean", "moving_var")
    synced_ok = max(summary["synced_error"][k] for k in stats) <= args.tol
    summary["ok"] = bool(synced_ok and summary["unsynced_error"]["batch_mean"] > 10 * args.tol)
    print(json.dumps(json_safe(summary), indent=2))
    return 0 if summary["ok"] else 1


# ---------------------------------------------------------------------------------------------
# Comparing the dumps
# ---------------------------------------------------------------------------------------------


def _max_diff(a, b, keys) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in keys)


def compare_dumps(
    out: str | os.PathLike, workers: int = 2, worker_tol: float = 1e-6, single_tol: float = 1e-4
) -> dict:
    """Compare ``worker<i>.npz`` with each other and with ``single.npz`` in ``out``.

    Returns:
        A JSON-ready summary: largest differences (``workers_max_diff``, ``single_max_diff``
        split by kind), the tolerances and ``ok``.

    Raises:
        FileNotFoundError: a dump is missing.
    """
    out = Path(out)
    paths = [out / f"worker{i}.npz" for i in range(workers)] + [out / "single.npz"]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"Expected dumps {missing}; run the workers and `single` first.")
    dumps = [dict(np.load(p)) for p in paths]
    *ws, single = dumps
    keys = sorted(single)
    kinds = {
        "trainable_weights": [k for k in keys if k.startswith("weight_")],
        "moving_stats": [k for k in keys if k.startswith("moving_")],
        "losses": ["losses"],
    }
    # every worker holds one replica; its batch statistics are the synchronized (global) ones
    kinds["batch_stats"] = [k for k in keys if k.startswith("batch_")]
    workers_diff = {
        kind: max(_max_diff(ws[0], w, ks) for w in ws[1:]) for kind, ks in kinds.items()
    }
    single_diff = {kind: max(_max_diff(single, w, ks) for w in ws) for kind, ks in kinds.items()}
    ok = max(workers_diff.values()) <= worker_tol and max(single_diff.values()) <= single_tol
    return {
        "workers": workers,
        "workers_max_diff": workers_diff,
        "single_max_diff": single_diff,
        "worker_tol": worker_tol,
        "single_tol": single_tol,
        "final_loss": float(single["losses"][-1]),
        "ok": bool(ok),
    }


# ---------------------------------------------------------------------------------------------
# The launcher
# ---------------------------------------------------------------------------------------------


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports free on ``host`` right now (the OS picks them)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _child_args(args, command: str) -> list[str]:
    return [
        sys.executable, os.path.abspath(__file__), command,
        "--out", str(args.out), "--workers", str(args.workers),
        "--per-replica-batch", str(args.per_replica_batch), "--steps", str(args.steps),
        "--lr", str(args.lr), "--seed", str(args.seed), "--data", args.data,
        "--implementation", args.implementation,
    ] + (["--no-sync"] if args.no_sync else [])  # fmt: skip


def _end(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End ``proc`` and its process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL did not take
        pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def launch(args) -> int:
    """Start the workers and the reference, wait, compare; end every process started."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.npz"), out / "summary.json"]:
        old.unlink(missing_ok=True)
    host = "127.0.0.1"
    cluster = {"worker": [f"{host}:{p}" for p in free_ports(args.workers, host)]}
    base_env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    base_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    start = time.monotonic()
    try:
        jobs = [(f"worker{i}", "worker", i) for i in range(args.workers)] + [
            ("single", "single", None)
        ]
        for name, command, index in jobs:
            env = dict(base_env)
            if index is not None:
                task = {"type": "worker", "index": index}
                env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": task})
            logs[name] = out / f"{name}.log"
            with open(logs[name], "w") as log:
                procs[name] = subprocess.Popen(
                    _child_args(args, command),
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, ended as a whole
                )
        atomic_write_json(out / "pids.json", {k: p.pid for k, p in procs.items()})
        print(f"cluster {cluster['worker']}; pids {[p.pid for p in procs.values()]}", flush=True)

        deadline = start + args.timeout
        while any(p.poll() is None for p in procs.values()):
            failed = [k for k, p in procs.items() if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                why = f"{failed} failed" if failed else f"timed out after {args.timeout:.0f} s"
                print(f"FAILED: {why}.", file=sys.stderr)
                for k in failed or procs:
                    print(f"--- {k} log tail ---\n{_tail(logs[k])}", file=sys.stderr)
                return 2
            time.sleep(0.2)
        failed = [k for k, p in procs.items() if p.returncode != 0]
        if failed:
            print(f"FAILED: {failed} exited non-zero.", file=sys.stderr)
            for k in failed:
                print(f"--- {k} log tail ---\n{_tail(logs[k])}", file=sys.stderr)
            return 2
        summary = compare_dumps(out, args.workers, args.worker_tol, args.single_tol)
        summary["cluster"] = cluster["worker"]
        summary["wall_s"] = round(time.monotonic() - start, 1)
        write_result("summary", summary, command=getattr(args, "command_line", None), directory=out)
        print(json.dumps(summary, indent=2))
        print("OK: workers agree and match one device" if summary["ok"] else "MISMATCH")
        return 0 if summary["ok"] else 1
    finally:
        for proc in procs.values():
            _end(proc)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Synchronized BN with MultiWorkerMirroredStrategy on loopback workers."
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="launch",
        choices=("launch", "worker", "single", "compare", "mirrored"),
        help="launch (default): run everything locally and compare; mirrored: one process",
    )
    parser.add_argument("--out", default="results/multiworker", help="folder for dumps and logs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--per-replica-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=("synthetic", "fashion_mnist"), default="synthetic")
    parser.add_argument("--implementation", choices=("ring", "auto", "nccl"), default="ring")
    parser.add_argument(
        "--no-sync",
        action="store_true",
        help="negative control: plain per-replica BN (expect a mismatch, exit status 1)",
    )
    parser.add_argument("--index", type=int, default=None, help="worker: overrides task.index")
    parser.add_argument("--timeout", type=float, default=170.0, help="launcher: seconds")
    parser.add_argument("--worker-tol", type=float, default=1e-6)
    parser.add_argument("--single-tol", type=float, default=1e-4)
    parser.add_argument("--tol", type=float, default=1e-5, help="mirrored: tolerance")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    args.command_line = ["python", "scripts/multiworker_bn.py", *argv]
    if args.command == "worker":
        return run_worker(args)
    if args.command == "single":
        return run_single(args)
    if args.command == "mirrored":
        return run_mirrored(args)
    if args.command == "compare":
        summary = compare_dumps(args.out, args.workers, args.worker_tol, args.single_tol)
        print(json.dumps(summary, indent=2))
        return 0 if summary["ok"] else 1
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
