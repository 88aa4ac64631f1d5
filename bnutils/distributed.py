"""Synchronized vs per-replica BN under ``tf.distribute`` on one machine: strategies and measured
comparisons. Used in notebook A1 and ``scripts/multiworker_bn.py``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from bnutils._graph import find_batchnorm_layers
from bnutils._util import check_positive_int
from bnutils.data import make_tf_dataset
from bnutils.evaluation import evaluate
from bnutils.models import small_bn_model
from bnutils.repro import set_seed

__all__ = [
    "BNStepStats",
    "SmallBatchResult",
    "SyncComparison",
    "bn_step_statistics",
    "compare_sync_bn",
    "mirrored_strategy",
    "setup_logical_cpus",
    "small_batch_experiment",
]


def setup_logical_cpus(n: int = 2) -> list[str]:
    """Split the first CPU into ``n`` logical devices before TensorFlow starts; their names.

    Raises:
        ValueError: ``n`` is not a positive integer.
        RuntimeError: TensorFlow already set up another number of logical CPUs.
    """
    n = check_positive_int("n", n)
    cpu, config = tf.config.list_physical_devices("CPU")[0], tf.config.LogicalDeviceConfiguration
    try:
        tf.config.set_logical_device_configuration(cpu, [config() for _ in range(n)])
    except RuntimeError as err:
        existing = tf.config.list_logical_devices("CPU")
        if len(existing) != n:
            raise RuntimeError(
                f"Cannot split the CPU into {n} logical devices: TensorFlow already initialized "
                f"{len(existing)} logical CPU(s). Restart the kernel (or the Python process) and "
                f"call bnutils.distributed.setup_logical_cpus({n}) before anything else."
            ) from err
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def mirrored_strategy(n: int = 2):
    """A ``MirroredStrategy`` over ``n`` GPUs when visible, else over ``n`` logical CPUs reduced
    through one device (NCCL is GPU-only); a ``ValueError`` when there are fewer devices."""
    kind = "GPU" if len(tf.config.list_logical_devices("GPU")) >= n else "CPU"
    devices = [d.name for d in tf.config.list_logical_devices(kind)]
    if len(devices) < n:
        hint = f"call setup_logical_cpus({n}) first" if kind == "CPU" else "use fewer replicas"
        raise ValueError(
            f"Expected at least {n} logical {kind} devices for {n} replicas, found "
            f"{len(devices)}: {devices}. To fix it, {hint} (restart the kernel before)."
        )
    cross = tf.distribute.ReductionToOneDevice(devices[0]) if kind == "CPU" else None
    return tf.distribute.MirroredStrategy(devices=devices[:n], cross_device_ops=cross)


@dataclasses.dataclass(frozen=True)
class BNStepStats:
    """BN statistics per layer name: ``batch_*`` ``(steps, replicas, channels)``, what each
    replica normalized with; ``moving_*`` ``(replicas, channels)``, each replica's copy;
    ``saved_moving_*``: as checkpoints see them; ``initial_moving_*``: before step 1."""

    num_replicas: int
    per_replica_batch: int
    layer_names: tuple[str, ...]
    batch_mean: dict[str, np.ndarray]
    batch_var: dict[str, np.ndarray]
    moving_mean: dict[str, np.ndarray]
    moving_var: dict[str, np.ndarray]
    saved_moving_mean: dict[str, np.ndarray]
    saved_moving_var: dict[str, np.ndarray]
    initial_moving_mean: dict[str, np.ndarray]
    initial_moving_var: dict[str, np.ndarray]
    momentum: dict[str, float]
    weights: tuple[np.ndarray, ...]  # the trainable ones
    losses: np.ndarray

    def _joined(self, mean: dict, var: dict) -> np.ndarray:  # every statistic on the last axis
        return np.concatenate([np.concatenate([mean[k], var[k]], -1) for k in self.layer_names], -1)

    def ema_replay_error(self) -> float:
        """Largest gap between each replica's moving statistics and the EMA of its own batches."""
        held = self._joined(self.moving_mean, self.moving_var)
        mom = {k: np.full_like(v, self.momentum[k], "float64") for k, v in self.moving_mean.items()}
        mom = self._joined(mom, mom)
        replay = self._joined(self.initial_moving_mean, self.initial_moving_var)
        for step in self._joined(self.batch_mean, self.batch_var):
            replay = mom * replay + (1.0 - mom) * step
        return float(np.max(np.abs(replay - held)))

    def saved_replicas(self) -> list[int]:
        """The replicas whose copies of every moving statistic equal the saved value."""
        held = self._joined(self.moving_mean, self.moving_var)
        saved = self._joined(self.saved_moving_mean, self.saved_moving_var)
        return [r for r in range(self.num_replicas) if np.array_equal(held[r], saved)]

    def replica_spread(self) -> float:
        """Largest difference between two replicas' copies of any moving statistic."""
        return float(np.max(np.ptp(self._joined(self.moving_mean, self.moving_var), axis=0)))


def bn_step_statistics(
    strategy,
    model_fn: Callable[[], Any],
    x: np.ndarray,
    y: np.ndarray,
    per_replica_batch: int,
    steps: int = 1,
    lr: float = 0.1,
) -> BNStepStats:
    """Train ``steps`` SGD steps under ``strategy``, recording every replica's BN statistics.

    Step ``s`` takes the ``s``-th global batch of ``G = replicas * per_replica_batch`` examples,
    replica ``r`` its ``r``-th slice; the loss is the global batch's mean.

    Args:
        strategy: a ``tf.distribute`` strategy; ``None``: the default (one device).
        model_fn: builds a Functional or Sequential model with logits (in the strategy's scope).
        x, y: at least ``steps * G`` inputs and their int labels.
        per_replica_batch, steps, lr: examples per replica per step, SGD steps, learning rate.

    Raises:
        ValueError: too little data, no BN layers, or a subclassed model.
    """
    strategy = strategy or tf.distribute.get_strategy()
    n = strategy.num_replicas_in_sync
    b = check_positive_int("per_replica_batch", per_replica_batch)
    if len(x) != len(y) or len(x) < n * b * steps:
        raise ValueError(
            f"{steps} step(s) of a global batch of {n * b} need {n * b * steps} examples, "
            f"received {len(x)} inputs and {len(y)} labels. Pass as many labels as inputs, more "
            "data, fewer steps or a smaller batch."
        )
    with strategy.scope():
        model = model_fn()
        bns = [bn for _, bn in find_batchnorm_layers(model)]
        if not bns:
            raise ValueError(
                f"Expected a model with BatchNormalization layers, received `{model.name}` "
                "without any."
            )
        try:
            probe = keras.Model(model.inputs, [model.outputs[0]] + [bn.input for bn in bns])
        except (AttributeError, ValueError) as err:
            raise ValueError(
                "Expected a Functional or Sequential model whose BN layers are each called "
                f"once, received `{type(model).__name__}` ({err}). Build the model with the "
                "functional API."
            ) from err
        optimizer = keras.optimizers.SGD(learning_rate=lr)
        optimizer.build(model.trainable_variables)
    xent = keras.losses.sparse_categorical_crossentropy  # per example (no replica scaling)

    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            logits, *bn_inputs = probe(xb, training=True)
            scaled = keras.ops.mean(xent(yb, logits, from_logits=True)) / n  # grads: summed
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return scaled, [
            keras.ops.moments(
                h, [i for i in range(h.ndim) if i != bn.axis % h.ndim], synchronized=bn.synchronized
            )
            for h, bn in zip(bn_inputs, bns, strict=True)
        ]

    @tf.function
    def step(xb, yb):
        scaled, stats = strategy.run(replica_step, args=(xb, yb))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, scaled, axis=None), stats

    def distribute(arr):  # replica r gets the r-th slice of b examples
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(arr[ctx.replica_id_in_sync_group * b :][:b])
        )

    def saved(attr):  # as checkpoints see them
        return {bn.name: np.asarray(getattr(bn, attr).numpy()) for bn in bns}

    attrs = {"mean": "moving_mean", "var": "moving_variance"}
    out = {f"initial_moving_{k}": saved(a) for k, a in attrs.items()}
    g = n * b  # replica r of step s: examples [s g + r b, s g + (r + 1) b)
    runs = [step(distribute(x[s * g :][:g]), distribute(y[s * g :][:g])) for s in range(steps)]
    for j, (k, a) in enumerate(attrs.items()):  # batch_*: (steps, replicas, channels)
        out[f"batch_{k}"] = {
            bn.name: np.stack([_local_stack(strategy, rec[i][j]) for _, rec in runs])
            for i, bn in enumerate(bns)
        }
        out[f"moving_{k}"] = {bn.name: _local_stack(strategy, getattr(bn, a).value) for bn in bns}
        out[f"saved_moving_{k}"] = saved(a)
    return BNStepStats(
        num_replicas=n,
        per_replica_batch=b,
        layer_names=tuple(bn.name for bn in bns),
        momentum={bn.name: float(bn.momentum) for bn in bns},
        weights=tuple(np.asarray(w.numpy()) for w in model.trainable_weights),
        losses=np.asarray([float(loss) for loss, _ in runs], dtype="float64"),
        **out,
    )


def _local_stack(strategy, value) -> np.ndarray:  # per-replica components along axis 0
    return np.stack([np.asarray(v) for v in strategy.experimental_local_results(value)])


@dataclasses.dataclass(frozen=True)
class SyncComparison:
    """The same steps from the same weights: ``single`` (one device, batch ``replicas * B``),
    ``synced`` (replicas of ``B``, synchronized BN) and ``unsynced`` (per-replica BN)."""

    single: BNStepStats
    synced: BNStepStats
    unsynced: BNStepStats

    def errors(self, run: BNStepStats) -> dict[str, float]:
        """Largest |difference| from ``single``: each BN statistic (every replica), weights, loss."""
        out = {}
        for key in ("batch_mean", "batch_var", "moving_mean", "moving_var"):
            ours, ref = getattr(run, key), getattr(self.single, key)  # ref broadcasts: 1 replica
            out[key] = max(float(np.max(np.abs(ours[k] - ref[k]))) for k in run.layer_names)
        pairs = zip(run.weights, self.single.weights, strict=True)
        out["weights"] = max(float(np.max(np.abs(ours - ref))) for ours, ref in pairs)
        out["loss"] = float(np.max(np.abs(run.losses - self.single.losses)))
        return out

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict: sizes, errors of both runs, replica spreads and EMA replays."""
        return {
            "replicas": self.synced.num_replicas,
            "per_replica_batch": self.synced.per_replica_batch,
            "global_batch": self.single.per_replica_batch,
            "steps": int(len(self.single.losses)),
            "synced_error": self.errors(self.synced),
            "unsynced_error": self.errors(self.unsynced),
            "synced_replica_spread": self.synced.replica_spread(),
            "unsynced_replica_spread": self.unsynced.replica_spread(),
            "synced_ema_replay_error": self.synced.ema_replay_error(),
            "unsynced_ema_replay_error": self.unsynced.ema_replay_error(),
            "unsynced_saved_replicas": self.unsynced.saved_replicas(),
        }


def compare_sync_bn(
    x: np.ndarray, y: np.ndarray, per_replica_batch: int = 8, steps: int = 1, strategy=None
) -> SyncComparison:
    """The same SGD steps (lr 0.1) of a ``small_bn_model`` for ``x, y`` on one device, batch
    ``replicas * per_replica_batch``, and on the replicas of ``strategy``, synced and not.

    Args:
        x, y: images and int labels.
        per_replica_batch, steps: examples per replica per step, and steps of each run.
        strategy: at least 2 replicas (else ``ValueError``); default :func:`mirrored_strategy`.
    """
    strategy = strategy or mirrored_strategy(2)
    n = strategy.num_replicas_in_sync
    if n < 2:
        raise ValueError(f"Expected a strategy with at least 2 replicas, received {n}.")
    shape, classes = tuple(x.shape[1:]), int(y.max()) + 1

    def run(strat, synchronized, batch):  # seeded initializers: the same weights every time
        model_fn = lambda: small_bn_model(synchronized, shape, classes)  # noqa: E731
        return bn_step_statistics(strat, model_fn, x, y, batch, steps)

    return SyncComparison(
        single=run(tf.distribute.get_strategy(), False, n * per_replica_batch),
        synced=run(strategy, True, per_replica_batch),
        unsynced=run(strategy, False, per_replica_batch),
    )


@dataclasses.dataclass(frozen=True)
class SmallBatchResult:
    """``accuracy`` (of the saved weights) and ``replica_spread`` (largest gap between replica
    copies of a moving statistic): ``"synced"`` / ``"unsynced"`` -> one value per seed."""

    per_replica_batch: int
    num_replicas: int
    accuracy: dict[str, list[float]]
    replica_spread: dict[str, list[float]]


def small_batch_experiment(
    data,
    model_fn: Callable[..., Any],
    per_replica_batch: int = 4,
    epochs: int = 1,
    seeds: Sequence[int] = (0,),
    strategy=None,
) -> SmallBatchResult:
    """Fit with Adam (lr 1e-3) and a small per-replica batch, synchronized vs per-replica BN;
    evaluate the saved weights on ``data``'s test split on one device.

    Args:
        data: a :class:`bnutils.data.Dataset`.
        model_fn: ``model_fn(synchronized=..., seed=...)`` builds a model with logits.
        per_replica_batch, epochs: examples per replica per step, and epochs of each run.
        seeds, strategy: one run per seed and flavour; default :func:`mirrored_strategy`.
    """
    strategy = strategy or mirrored_strategy(2)
    gb, lr = strategy.num_replicas_in_sync * per_replica_batch, 1e-3  # global batch, Adam
    models, moving = {}, {}  # one compiled model per flavour, reset for every seed: traced once
    for key, flag in {"synced": True, "unsynced": False}.items():
        with strategy.scope():
            model = models[key] = model_fn(synchronized=flag, seed=seeds[0])
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            model.compile(keras.optimizers.Adam(lr), loss, steps_per_execution=25)  # small batches
        bns = [bn for _, bn in find_batchnorm_layers(model)]
        moving[key] = [v for bn in bns for v in (bn.moving_mean, bn.moving_variance)]
    accuracy, spread = {k: [] for k in models}, {k: [] for k in models}
    for seed in seeds:
        start = model_fn(synchronized=False, seed=seed).get_weights()
        for key, model in models.items():
            set_seed(seed)
            model.set_weights(start)
            for variable in model.optimizer.variables:  # step counter and slots back to zero
                variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
            model.optimizer.learning_rate = lr
            train = make_tf_dataset(data.x_train, data.y_train, gb, seed=seed, drop_remainder=True)
            model.fit(train, epochs=epochs, shuffle=False, verbose=0)
            copies = [_local_stack(strategy, v.value) for v in moving[key]]
            spread[key].append(max(float(np.max(np.ptp(c, axis=0))) for c in copies))
            evaluator = model_fn(synchronized=False, seed=seed)  # on the default strategy
            evaluator.set_weights(model.get_weights())
            accuracy[key].append(float(evaluate(evaluator, data)["accuracy"]))
    return SmallBatchResult(int(per_replica_batch), strategy.num_replicas_in_sync, accuracy, spread)
