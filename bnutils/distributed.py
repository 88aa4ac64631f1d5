"""Synchronized BN with ``tf.distribute`` on one machine: strategies and measured comparisons.

Plain ``BatchNormalization`` normalizes each replica with its own share of the global batch;
``synchronized=True`` all-reduces the sums, so every replica uses the global batch's statistics,
as one device would. Used in notebook A1 and ``scripts/multiworker_bn.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bnutils._graph import find_batchnorm_layers
from bnutils._util import check_positive_int

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
    """Split the first CPU into ``n`` logical devices and return their names.

    Call it before anything touches TensorFlow's devices; again with the same ``n``: a no-op.

    Raises:
        ValueError: ``n`` is not a positive integer.
        RuntimeError: TensorFlow already set up another number of logical CPUs.
    """
    n = check_positive_int("n", n)
    import tensorflow as tf

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
    """A ``tf.distribute.MirroredStrategy`` over ``n`` GPUs when visible, else ``n`` logical
    CPUs from :func:`setup_logical_cpus` (reduced through one device: NCCL is GPU-only).

    Raises:
        ValueError: fewer than ``n`` devices.
    """
    import tensorflow as tf

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
    """What the BN layers saw and hold after training steps, per BN layer name.

    ``batch_*``: ``(steps, replicas, channels)`` statistics each replica normalized with;
    ``moving_*``: ``(replicas, channels)``, every replica's own copy; ``saved_moving_*``: as
    checkpoints see them; ``initial_moving_*``: before step 1; ``losses``: ``(steps,)``.
    """

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
    weights: tuple[np.ndarray, ...]
    trainable: tuple[bool, ...]
    losses: np.ndarray

    def ema_replay_error(self) -> float:
        """Largest gap between each replica's moving statistics and the EMA replay of its own
        batch statistics (about zero: each copy followed its own replica's batches)."""
        held = self._joined(self.moving_mean, self.moving_var)
        mom = {k: np.full_like(v, self.momentum[k], "float64") for k, v in self.moving_mean.items()}
        mom = self._joined(mom, mom)
        start = self._joined(self.initial_moving_mean, self.initial_moving_var)
        replay = np.broadcast_to(start, held.shape)
        for step in self._joined(self.batch_mean, self.batch_var):
            replay = mom * replay + (1.0 - mom) * step
        return float(np.max(np.abs(replay - held)))

    def _joined(self, mean: dict, var: dict) -> np.ndarray:  # every statistic on the last axis
        return np.concatenate([np.concatenate([mean[k], var[k]], -1) for k in self.layer_names], -1)

    def saved_replicas(self, atol: float = 0.0) -> list[int]:
        """The replicas whose copies of every moving statistic equal the saved value."""
        held = self._joined(self.moving_mean, self.moving_var)
        saved = self._joined(self.saved_moving_mean, self.saved_moving_var)
        return [r for r in range(self.num_replicas) if np.allclose(held[r], saved, 0.0, atol)]

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
    initial_weights: list[np.ndarray] | None = None,
) -> BNStepStats:
    """Train ``steps`` SGD steps under ``strategy`` and record every replica's BN statistics.

    Step ``s`` uses examples ``[s G, (s + 1) G)`` (``G = replicas * per_replica_batch``), replica
    ``r`` the ``r``-th slice; the loss is the global batch's mean, so one device with batch ``G``
    computes the same step. Batch statistics come from each BN input via ``keras.ops.moments``.

    Args:
        strategy: a ``tf.distribute`` strategy; ``None``: the default (one device).
        model_fn: builds a Functional or Sequential model, in the strategy's scope.
        x, y: inputs (at least ``steps * G``) and int labels for the model's logits.
        per_replica_batch: examples per replica per step.
        steps: training steps; ``lr``: SGD learning rate.
        initial_weights: weights to start from; ``None`` keeps the model's initialization.

    Raises:
        ValueError: too little data, no BN layers, or a subclassed model.
    """
    import keras
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    n = strategy.num_replicas_in_sync
    b = check_positive_int("per_replica_batch", per_replica_batch)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}; expected equal lengths.")
    if len(x) < n * b * steps:
        raise ValueError(
            f"{steps} step(s) of a global batch of {n * b} need {n * b * steps} examples, "
            f"received {len(x)}. Pass more data, fewer steps or a smaller batch."
        )
    with strategy.scope():
        model = model_fn()
        if initial_weights is not None:
            model.set_weights(initial_weights)
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

    def saved(attr):
        return {bn.name: np.asarray(getattr(bn, attr).numpy()) for bn in bns}

    def batch_stats(j):  # (steps, replicas, channels) per layer; j = 0: means, 1: variances
        return {
            bn.name: np.stack([_local_stack(strategy, r[i][j]) for r in recs])
            for i, bn in enumerate(bns)
        }

    initial_mean, initial_var = saved("moving_mean"), saved("moving_variance")
    losses, recs = [], []
    for s in range(steps):
        lo, hi = s * n * b, (s + 1) * n * b
        loss, stats = step(distribute(x[lo:hi]), distribute(y[lo:hi]))
        losses.append(float(loss))
        recs.append(stats)
    return BNStepStats(
        num_replicas=n,
        per_replica_batch=b,
        layer_names=tuple(bn.name for bn in bns),
        batch_mean=batch_stats(0),
        batch_var=batch_stats(1),
        moving_mean={bn.name: _local_stack(strategy, bn.moving_mean.value) for bn in bns},
        moving_var={bn.name: _local_stack(strategy, bn.moving_variance.value) for bn in bns},
        saved_moving_mean=saved("moving_mean"),
        saved_moving_var=saved("moving_variance"),
        initial_moving_mean=initial_mean,
        initial_moving_var=initial_var,
        momentum={bn.name: float(bn.momentum) for bn in bns},
        weights=tuple(np.asarray(w.numpy()) for w in model.weights),
        trainable=tuple(bool(w.trainable) for w in model.weights),
        losses=np.asarray(losses, dtype="float64"),
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
        """Largest |difference| from the single run: ``batch_mean``, ``batch_var``,
        ``moving_mean``, ``moving_var`` (every replica), trainable ``weights``, ``loss``."""
        out = {}
        for key in ("batch_mean", "batch_var", "moving_mean", "moving_var"):
            ours, ref = getattr(run, key), getattr(self.single, key)  # ref broadcasts: 1 replica
            out[key] = max(float(np.max(np.abs(ours[k] - ref[k]))) for k in run.layer_names)
        out["weights"] = max(
            float(np.max(np.abs(ours - ref)))
            for ours, ref, t in zip(run.weights, self.single.weights, run.trainable, strict=True)
            if t
        )
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
    x: np.ndarray,
    y: np.ndarray,
    per_replica_batch: int = 8,
    steps: int = 1,
    strategy=None,
    model_fn: Callable[..., Any] | None = None,
    lr: float = 0.1,
) -> SyncComparison:
    """Run the same steps on one device (batch ``replicas * B``) and on replicas, synced and not.

    Args:
        x, y: images and int labels.
        per_replica_batch: ``B``.
        steps: training steps of each run; ``lr``: SGD learning rate.
        strategy: a multi-replica strategy; ``None``: :func:`mirrored_strategy` over 2 devices.
        model_fn: ``model_fn(synchronized=...)``; default ``bnutils.models.small_bn_model``.

    Raises:
        ValueError: a strategy with fewer than 2 replicas.
    """
    import tensorflow as tf

    from bnutils.models import small_bn_model

    strategy = strategy or mirrored_strategy(2)
    if model_fn is None:
        shape, classes = tuple(x.shape[1:]), int(y.max()) + 1

        def model_fn(synchronized: bool = False):
            return small_bn_model(synchronized, input_shape=shape, num_classes=classes)

    n = strategy.num_replicas_in_sync
    if n < 2:
        raise ValueError(f"Expected a strategy with at least 2 replicas, received {n}.")
    start = model_fn(synchronized=False).get_weights()
    common = dict(x=x, y=y, steps=steps, lr=lr, initial_weights=start)

    def run(strat, synchronized, batch):
        return bn_step_statistics(
            strat, lambda: model_fn(synchronized=synchronized), per_replica_batch=batch, **common
        )

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
    per_replica_batch: int = 4,
    epochs: int = 1,
    seeds: Sequence[int] = (0,),
    strategy=None,
    model_fn: Callable[..., Any] | None = None,
    lr: float = 1e-3,
) -> SmallBatchResult:
    """Fit with Adam and a small per-replica batch, synchronized vs per-replica BN, per seed.

    The saved weights are evaluated on ``data``'s test split on one device. One compiled model
    per flavour is reset for every seed, so the training step is traced once.

    Args:
        data: a :class:`bnutils.data.Dataset`.
        per_replica_batch: examples per replica per step; ``epochs``: per run.
        seeds: one run per seed and flavour; ``lr``: Adam learning rate.
        strategy: default :func:`mirrored_strategy` over 2 devices.
        model_fn: ``model_fn(synchronized=..., seed=...)``; default ``small_bn_model``.
    """
    import keras

    from bnutils.data import make_tf_dataset
    from bnutils.evaluation import evaluate
    from bnutils.models import small_bn_model
    from bnutils.repro import set_seed

    strategy = strategy or mirrored_strategy(2)
    n = strategy.num_replicas_in_sync
    if model_fn is None:

        def model_fn(synchronized: bool = False, seed: int = 0):
            shape, classes = data.input_shape, data.num_classes
            return small_bn_model(synchronized, shape, classes, width=16, momentum=0.99, seed=seed)

    flavours = {"synced": True, "unsynced": False}
    models = {}
    for key, flag in flavours.items():
        with strategy.scope():
            models[key] = model_fn(synchronized=flag, seed=seeds[0])
            models[key].compile(
                optimizer=keras.optimizers.Adam(lr),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                steps_per_execution=25,  # small batches: fewer Python round trips
            )
    accuracy, spread = {k: [] for k in flavours}, {k: [] for k in flavours}
    for seed in seeds:
        start = model_fn(synchronized=False, seed=seed).get_weights()
        for key, model in models.items():
            set_seed(seed)
            model.set_weights(start)
            for variable in model.optimizer.variables:  # step counter and slots back to zero
                variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
            model.optimizer.learning_rate = lr
            train = make_tf_dataset(
                data.x_train, data.y_train, n * per_replica_batch, seed=seed, drop_remainder=True
            )
            model.fit(train, epochs=epochs, shuffle=False, verbose=0)
            copies = [
                _local_stack(strategy, v.value)
                for _, bn in find_batchnorm_layers(model)
                for v in (bn.moving_mean, bn.moving_variance)
            ]
            spread[key].append(max(float(np.max(np.ptp(c, axis=0))) for c in copies))
            evaluator = model_fn(synchronized=False, seed=seed)  # on the default strategy
            evaluator.set_weights(model.get_weights())
            accuracy[key].append(float(evaluate(evaluator, data)["accuracy"]))
    return SmallBatchResult(
        per_replica_batch=int(per_replica_batch),
        num_replicas=n,
        accuracy=accuracy,
        replica_spread=spread,
    )
