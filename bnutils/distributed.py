"""Synchronized batch normalization with ``tf.distribute``, measured on one machine.

Under a ``tf.distribute`` strategy every replica sees only its share of the global batch.
A plain ``BatchNormalization`` layer normalizes with the statistics of that share (per-replica
batch ``B``); with ``synchronized=True`` the layer all-reduces the sums, sums of squares and
counts across replicas, so every replica normalizes with the statistics of the global batch
(``n * B``), exactly as one device running the whole batch would.

This module makes the difference measurable on a laptop: :func:`setup_logical_cpus` splits the
CPU into logical devices, :func:`mirrored_strategy` mirrors a model over them,
:func:`bn_step_statistics` records the batch statistics every replica used and the moving
statistics every replica holds, :func:`compare_sync_bn` sets synchronized and per-replica BN
side by side with one device on the global batch, and :func:`small_batch_experiment` trains
both with a small per-replica batch. ``python -m bnutils.distributed`` runs the comparison in
a fresh process and prints it as JSON (exit status 1 when synchronized BN does not match).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "BNStepStats",
    "SmallBatchResult",
    "SyncComparison",
    "batchnorm_layers",
    "bn_step_statistics",
    "compare_sync_bn",
    "main",
    "mirrored_strategy",
    "setup_logical_cpus",
    "small_batch_experiment",
    "small_bn_mlp",
    "small_bn_model",
    "synthetic_images",
]


# ---------------------------------------------------------------------------------------------
# Devices and strategies
# ---------------------------------------------------------------------------------------------


def setup_logical_cpus(n: int = 2) -> list[str]:
    """Split the first physical CPU into ``n`` logical devices.

    TensorFlow fixes its devices the first time anything touches them (creating a tensor,
    listing logical devices, building a model), so call this first: in the first cell of a
    notebook or the first lines of a script. Calling it again with the same ``n`` is a no-op.

    Args:
        n: number of logical CPU devices (positive).

    Returns:
        The logical CPU device names, e.g. ``["/device:CPU:0", "/device:CPU:1"]``.

    Raises:
        ValueError: ``n`` is not a positive integer.
        RuntimeError: TensorFlow already initialized its devices with another number of
            logical CPUs; restart the kernel (or process) and call this first.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"Expected a positive integer number of devices, received n={n!r}.")
    import tensorflow as tf

    n = int(n)
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError as err:
        existing = tf.config.list_logical_devices("CPU")
        if len(existing) != n:
            raise RuntimeError(
                f"Cannot split the CPU into {n} logical devices: TensorFlow has already "
                f"initialized its devices with {len(existing)} logical CPU(s) "
                f"{[d.name for d in existing]}. Expected setup_logical_cpus({n}) to run before "
                "anything touches TensorFlow devices. Restart the kernel (or the Python "
                f"process) and call bnutils.distributed.setup_logical_cpus({n}) first."
            ) from err
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def mirrored_strategy(n: int = 2, device_type: str = "auto"):
    """A ``tf.distribute.MirroredStrategy`` over ``n`` local devices.

    Args:
        n: number of replicas (devices).
        device_type: ``"GPU"``, ``"CPU"`` or ``"auto"`` (GPUs when at least ``n`` are
            visible, else logical CPUs made by :func:`setup_logical_cpus`).

    Returns:
        The strategy. On CPUs it reduces through one device (NCCL is GPU-only); on GPUs it
        uses TensorFlow's default (NCCL all-reduce).

    Raises:
        ValueError: an unknown ``device_type`` or fewer than ``n`` devices of that type.
    """
    import tensorflow as tf

    kind = device_type.upper()
    if kind not in ("AUTO", "CPU", "GPU"):
        raise ValueError(f"Expected device_type 'auto', 'CPU' or 'GPU', received {device_type!r}.")
    if kind == "AUTO":
        kind = "GPU" if len(tf.config.list_logical_devices("GPU")) >= n else "CPU"
    devices = [d.name for d in tf.config.list_logical_devices(kind)]
    if len(devices) < n:
        hint = (
            f"call bnutils.distributed.setup_logical_cpus({n}) before anything touches "
            "TensorFlow (restart the kernel first if it already ran)"
            if kind == "CPU"
            else "use fewer replicas or device_type='CPU'"
        )
        raise ValueError(
            f"Expected at least {n} logical {kind} devices for {n} replicas, found "
            f"{len(devices)}: {devices}. To fix it, {hint}."
        )
    cross = tf.distribute.ReductionToOneDevice(devices[0]) if kind == "CPU" else None
    return tf.distribute.MirroredStrategy(devices=devices[:n], cross_device_ops=cross)


# ---------------------------------------------------------------------------------------------
# A tiny model and data
# ---------------------------------------------------------------------------------------------


def small_bn_model(
    synchronized: bool = False,
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    width: int = 8,
    momentum: float = 0.9,
    seed: int = 0,
):
    """A two-block CNN with two ``BatchNormalization`` layers, seeded initializers.

    ``Conv(width) -> BN -> ReLU -> MaxPool -> Conv(2 width) -> BN -> ReLU -> GAP -> Dense``.
    The same ``seed`` gives the same initial weights under any strategy.

    Args:
        synchronized: passed to both BN layers.
        input_shape: image shape ``(H, W, C)``.
        num_classes: logits produced.
        width: filters of the first convolution.
        momentum: BN moving-average momentum.
        seed: initializer seed.
    """
    import keras

    def init(offset: int):
        return keras.initializers.GlorotUniform(seed=seed + offset)

    def bn(name: str):
        return keras.layers.BatchNormalization(
            momentum=momentum, synchronized=synchronized, name=name
        )

    inputs = keras.Input(shape=tuple(input_shape))
    h = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, kernel_initializer=init(1))(
        inputs
    )
    h = keras.layers.ReLU()(bn("bn1")(h))
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(
        2 * width, 3, padding="same", use_bias=False, kernel_initializer=init(2)
    )(h)
    h = keras.layers.ReLU()(bn("bn2")(h))
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(num_classes, kernel_initializer=init(3))(h)
    name = "small_cnn_syncbn" if synchronized else "small_cnn_bn"
    return keras.Model(inputs, outputs, name=name)


def small_bn_mlp(
    synchronized: bool = False,
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    width: int = 64,
    momentum: float = 0.99,
    seed: int = 0,
):
    """``Flatten -> (Dense(width) -> BN -> ReLU) x 2 -> Dense``, seeded initializers.

    After a dense layer BN estimates each feature's statistics from the batch alone (one
    value per example), so a small per-replica batch makes them noisy: the case where
    synchronizing matters most.

    Args:
        synchronized: passed to both BN layers.
        input_shape: input shape (flattened first).
        num_classes: logits produced.
        width: units of the hidden layers.
        momentum: BN moving-average momentum.
        seed: initializer seed.
    """
    import keras

    inputs = keras.Input(shape=tuple(input_shape))
    h = keras.layers.Flatten()(inputs)
    for i in (1, 2):
        h = keras.layers.Dense(
            width, use_bias=False, kernel_initializer=keras.initializers.GlorotUniform(seed + i)
        )(h)
        h = keras.layers.BatchNormalization(
            momentum=momentum, synchronized=synchronized, name=f"bn{i}"
        )(h)
        h = keras.layers.ReLU()(h)
    outputs = keras.layers.Dense(
        num_classes, kernel_initializer=keras.initializers.GlorotUniform(seed + 3)
    )(h)
    return keras.Model(inputs, outputs, name="small_mlp_syncbn" if synchronized else "small_mlp_bn")


def synthetic_images(
    n: int, shape: Sequence[int] = (28, 28, 1), num_classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic float32 images in [0, 1] whose brightness depends on the label.

    Plumbing data for tests and the multi-worker demo (fast, no files): ``n`` images of
    ``shape`` and int32 labels in ``[0, num_classes)``.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=n).astype("int32")
    level = (y.astype("float32") + 0.5) / num_classes
    noise = rng.random((n, *shape), dtype=np.float32)
    x = 0.5 * noise + 0.5 * level.reshape((n,) + (1,) * len(shape))
    return x.astype("float32"), y


def batchnorm_layers(model) -> list:
    """Every ``keras.layers.BatchNormalization`` in ``model``, nested models included."""
    import keras

    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        elif hasattr(layer, "layers"):
            found.extend(batchnorm_layers(layer))
    return found


# ---------------------------------------------------------------------------------------------
# One or k training steps, every replica's BN statistics recorded
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BNStepStats:
    """What the BN layers saw and hold after ``steps`` training steps under one strategy.

    Attributes:
        num_replicas: replicas in sync (1 for one device).
        per_replica_batch: examples per replica per step.
        synchronized: the BN layers' ``synchronized`` flags (all equal).
        layer_names: BN layer names, in model order.
        batch_mean: layer -> ``(steps, replicas, channels)`` batch means the layer
            normalized with, replica by replica.
        batch_var: layer -> ``(steps, replicas, channels)`` batch variances.
        moving_mean: layer -> ``(replicas, channels)``, every replica's own copy of the
            moving mean after the last step.
        moving_var: layer -> ``(replicas, channels)`` copies of the moving variance.
        saved_moving_mean: layer -> ``(channels,)``, the moving mean as ``get_weights`` and
            checkpoints see it (read outside the replicas).
        saved_moving_var: layer -> ``(channels,)``, the same for the moving variance.
        initial_moving_mean: layer -> ``(channels,)`` before the first step.
        initial_moving_var: layer -> ``(channels,)`` before the first step.
        momentum: layer -> the layer's moving-average momentum.
        weights: ``model.weights`` values in order, as saved (the primary replica's copy).
        trainable: for each entry of ``weights``, whether it is trainable.
        losses: ``(steps,)`` global training loss of each step.
    """

    num_replicas: int
    per_replica_batch: int
    synchronized: bool
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

    @property
    def global_batch(self) -> int:
        return self.num_replicas * self.per_replica_batch

    def ema_replay_error(self) -> float:
        """How far every replica's moving statistics are from the EMA of its own batch stats.

        Replays ``m <- momentum * m + (1 - momentum) * batch_stat`` over the recorded steps,
        replica by replica, from the initial moving statistics. About zero means each
        replica's copy followed the batch statistics that replica normalized with.
        """
        worst = 0.0
        for name in self.layer_names:
            mom = self.momentum[name]
            for batch, start, held in (
                (self.batch_mean, self.initial_moving_mean, self.moving_mean),
                (self.batch_var, self.initial_moving_var, self.moving_var),
            ):
                replay = np.broadcast_to(start[name], held[name].shape).astype("float64")
                for step_stats in batch[name]:
                    replay = mom * replay + (1.0 - mom) * step_stats
                worst = max(worst, float(np.max(np.abs(replay - held[name]))))
        return worst

    def saved_replicas(self, atol: float = 0.0) -> list[int]:
        """The replicas whose copies of every moving statistic equal the saved value."""
        return [
            r
            for r in range(self.num_replicas)
            if all(
                np.allclose(held[name][r], saved[name], rtol=0.0, atol=atol)
                for name in self.layer_names
                for held, saved in (
                    (self.moving_mean, self.saved_moving_mean),
                    (self.moving_var, self.saved_moving_var),
                )
            )
        ]

    def replica_spread(self) -> float:
        """Largest difference between two replicas' copies of any moving statistic."""
        spreads = [
            float(np.max(np.ptp(stats[name], axis=0)))
            for stats in (self.moving_mean, self.moving_var)
            for name in self.layer_names
        ]
        return max(spreads)


def _check_batches(x: np.ndarray, y: np.ndarray, global_batch: int, steps: int) -> None:
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}; expected equal lengths.")
    if len(x) < global_batch * steps:
        raise ValueError(
            f"{steps} step(s) of a global batch of {global_batch} need {global_batch * steps} "
            f"examples, received {len(x)}. Pass more data, fewer steps or a smaller batch."
        )


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

    Step ``s`` uses examples ``[s G, (s + 1) G)`` with ``G = replicas * per_replica_batch``;
    replica ``r`` gets the ``r``-th slice of ``per_replica_batch`` examples of it. The loss is
    the mean cross-entropy over the global batch (each replica's mean divided by the number
    of replicas; gradients are summed across replicas), so one device with
    ``per_replica_batch = G`` computes the same step.

    The batch statistics are recomputed inside the step from each BN layer's input with the
    layer's own op (``keras.ops.moments`` with its ``synchronized`` flag), i.e. exactly the
    moments the layer normalized with. The moving statistics are read from each replica's
    own copy of the variable.

    Args:
        strategy: a ``tf.distribute`` strategy, or ``None`` for the default (one device).
        model_fn: builds a functional (or Sequential) Keras model; called in the strategy's
            scope.
        x: inputs, at least ``steps * G`` examples.
        y: int class labels for the model's logits.
        per_replica_batch: examples per replica per step.
        steps: training steps.
        lr: SGD learning rate.
        initial_weights: weights to start from (``model.get_weights()`` order); ``None``
            keeps the model's initialization.

    Returns:
        A :class:`BNStepStats`.

    Raises:
        ValueError: too little data, a model without BN layers or a model whose BN inputs
            cannot be reached as graph tensors (a subclassed model).
    """
    import keras
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    n = strategy.num_replicas_in_sync
    b = int(per_replica_batch)
    _check_batches(x, y, n * b, steps)

    with strategy.scope():
        model = model_fn()
        if initial_weights is not None:
            model.set_weights(initial_weights)
        bns = batchnorm_layers(model)
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

    axes = [
        [i for i in range(len(bn.input.shape)) if i != bn.axis % len(bn.input.shape)] for bn in bns
    ]

    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            outputs = probe(xb, training=True)
            logits, bn_inputs = outputs[0], outputs[1:]
            loss = keras.ops.mean(
                keras.losses.sparse_categorical_crossentropy(yb, logits, from_logits=True)
            )
            scaled = loss / n
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        stats = [
            keras.ops.moments(inp, axes=ax, synchronized=bn.synchronized)
            for inp, ax, bn in zip(bn_inputs, axes, bns, strict=True)
        ]
        return scaled, stats

    @tf.function
    def step(xb, yb):
        scaled, stats = strategy.run(replica_step, args=(xb, yb))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, scaled, axis=None), stats

    def slice_fn(arr):
        def fn(ctx):
            r = ctx.replica_id_in_sync_group
            return tf.constant(arr[r * b : (r + 1) * b])

        return fn

    initial_mean = {bn.name: np.asarray(bn.moving_mean.numpy()) for bn in bns}
    initial_var = {bn.name: np.asarray(bn.moving_variance.numpy()) for bn in bns}
    means = {bn.name: [] for bn in bns}
    variances = {bn.name: [] for bn in bns}
    losses = []
    for s in range(steps):
        lo, hi = s * n * b, (s + 1) * n * b
        xb = strategy.experimental_distribute_values_from_function(slice_fn(x[lo:hi]))
        yb = strategy.experimental_distribute_values_from_function(slice_fn(y[lo:hi]))
        loss, stats = step(xb, yb)
        losses.append(float(loss))
        for bn, (mean, var) in zip(bns, stats, strict=True):
            means[bn.name].append(_local_stack(strategy, mean))
            variances[bn.name].append(_local_stack(strategy, var))

    return BNStepStats(
        num_replicas=n,
        per_replica_batch=b,
        synchronized=bool(bns[0].synchronized),
        layer_names=tuple(bn.name for bn in bns),
        batch_mean={k: np.stack(v) for k, v in means.items()},
        batch_var={k: np.stack(v) for k, v in variances.items()},
        moving_mean={bn.name: _local_stack(strategy, bn.moving_mean.value) for bn in bns},
        moving_var={bn.name: _local_stack(strategy, bn.moving_variance.value) for bn in bns},
        saved_moving_mean={bn.name: np.asarray(bn.moving_mean.numpy()) for bn in bns},
        saved_moving_var={bn.name: np.asarray(bn.moving_variance.numpy()) for bn in bns},
        initial_moving_mean=initial_mean,
        initial_moving_var=initial_var,
        momentum={bn.name: float(bn.momentum) for bn in bns},
        weights=tuple(np.asarray(w.numpy()) for w in model.weights),
        trainable=tuple(bool(w.trainable) for w in model.weights),
        losses=np.asarray(losses, dtype="float64"),
    )


def _local_stack(strategy, value) -> np.ndarray:
    """Stack the per-replica components of a value or mirrored variable along axis 0."""
    return np.stack([np.asarray(v) for v in strategy.experimental_local_results(value)])


# ---------------------------------------------------------------------------------------------
# Synchronized vs per-replica BN vs one device on the global batch
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyncComparison:
    """Three runs of the same steps from the same weights.

    Attributes:
        single: one device, batch ``G = replicas * per_replica_batch``.
        synced: ``replicas`` replicas of ``per_replica_batch``, ``synchronized=True``.
        unsynced: the same replicas with plain (per-replica) BN.
    """

    single: BNStepStats
    synced: BNStepStats
    unsynced: BNStepStats

    def errors(self, run: BNStepStats) -> dict[str, float]:
        """Largest absolute difference from the single-device run.

        Keys: ``batch_mean`` / ``batch_var`` (every replica's batch statistics against the
        global batch's), ``moving_mean`` / ``moving_var`` (every replica's copy),
        ``weights`` (saved trainable weights), ``loss``.
        """
        out = {}
        for key in ("batch_mean", "batch_var", "moving_mean", "moving_var"):
            ours, ref = getattr(run, key), getattr(self.single, key)
            # the single run has one replica: broadcast it against every replica
            out[key] = max(float(np.max(np.abs(ours[k] - ref[k]))) for k in run.layer_names)
        out["weights"] = max(
            float(np.max(np.abs(ours - ref)))
            for ours, ref, t in zip(run.weights, self.single.weights, run.trainable, strict=True)
            if t
        )
        out["loss"] = float(np.max(np.abs(run.losses - self.single.losses)))
        return out

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict: sizes, errors of both runs, and the unsynced replica spread."""
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
    """Run the same steps on one device (batch ``G``) and on replicas, synced and not.

    Args:
        x: images; the model built by ``model_fn`` must accept them.
        y: int labels.
        per_replica_batch: ``B``; the single device runs ``G = replicas * B``.
        steps: training steps of each run.
        strategy: a multi-replica strategy; ``None``: :func:`mirrored_strategy` over 2
            devices.
        model_fn: ``model_fn(synchronized=...)`` builds the model; default
            :func:`small_bn_model` for ``x``'s image shape.
        lr: SGD learning rate.

    Returns:
        A :class:`SyncComparison`.
    """
    import tensorflow as tf

    strategy = strategy or mirrored_strategy(2)
    if model_fn is None:
        shape = tuple(x.shape[1:])

        def model_fn(synchronized: bool = False):
            return small_bn_model(synchronized, input_shape=shape, num_classes=int(y.max()) + 1)

    n = strategy.num_replicas_in_sync
    if n < 2:
        raise ValueError(f"Expected a strategy with at least 2 replicas, received {n}.")
    start = model_fn(synchronized=False).get_weights()
    common = dict(x=x, y=y, steps=steps, lr=lr, initial_weights=start)
    single = bn_step_statistics(
        tf.distribute.get_strategy(),
        lambda: model_fn(synchronized=False),
        per_replica_batch=n * per_replica_batch,
        **common,
    )
    synced = bn_step_statistics(
        strategy, lambda: model_fn(synchronized=True), per_replica_batch=per_replica_batch, **common
    )
    unsynced = bn_step_statistics(
        strategy,
        lambda: model_fn(synchronized=False),
        per_replica_batch=per_replica_batch,
        **common,
    )
    return SyncComparison(single=single, synced=synced, unsynced=unsynced)


# ---------------------------------------------------------------------------------------------
# Accuracy with a small per-replica batch
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SmallBatchResult:
    """Test accuracy of synchronized vs per-replica BN, one entry per seed.

    Attributes:
        per_replica_batch: examples per replica per step.
        num_replicas: replicas.
        epochs: training epochs.
        accuracy: ``"synced"`` / ``"unsynced"`` -> test accuracies (one per seed) of the
            saved (primary-replica) weights.
        replica_spread: same keys -> largest difference between replicas' copies of a moving
            statistic after training (one per seed).
    """

    per_replica_batch: int
    num_replicas: int
    epochs: int
    accuracy: dict[str, list[float]]
    replica_spread: dict[str, list[float]]

    def mean_accuracy(self) -> dict[str, float]:
        return {k: float(np.mean(v)) for k, v in self.accuracy.items()}


def small_batch_experiment(
    data,
    per_replica_batch: int = 4,
    epochs: int = 1,
    seeds: Sequence[int] = (0,),
    strategy=None,
    model_fn: Callable[..., Any] | None = None,
    lr: float = 1e-3,
    steps_per_execution: int = 25,
) -> SmallBatchResult:
    """Train with a small per-replica batch, synchronized BN vs per-replica BN.

    Each run fits with Adam under ``strategy`` on global batches of
    ``replicas * per_replica_batch`` from the seed's initial weights, then evaluates the saved
    weights (the primary replica's copy, what ``get_weights`` and checkpoints hold) on the
    test split on one device. One compiled model per flavour is reset (weights and optimizer
    state) for every seed, so the training step is traced only once.

    Args:
        data: a :class:`bnutils.data.Dataset` (``x_train``, ``y_train``, ``x_test``,
            ``y_test``, ``input_shape``, ``num_classes``).
        per_replica_batch: examples per replica per step.
        epochs: epochs per run.
        seeds: one run per seed and BN flavour.
        strategy: default :func:`mirrored_strategy` over 2 devices.
        model_fn: ``model_fn(synchronized=..., seed=...)``; default :func:`small_bn_model`.
        lr: Adam learning rate.
        steps_per_execution: training steps per ``tf.function`` call (fewer Python round
            trips; the small batches make the per-step overhead dominate otherwise).

    Returns:
        A :class:`SmallBatchResult`.
    """
    import keras

    from bnutils.pipeline import make_tf_dataset
    from bnutils.repro import set_seed

    strategy = strategy or mirrored_strategy(2)
    n = strategy.num_replicas_in_sync
    if model_fn is None:

        def model_fn(synchronized: bool = False, seed: int = 0):
            return small_bn_model(
                synchronized, data.input_shape, data.num_classes, width=16, momentum=0.99, seed=seed
            )

    # one compiled model per flavour, reset for every seed: the training step is traced once
    flavours = {"synced": True, "unsynced": False}
    models = {}
    for key, flag in flavours.items():
        with strategy.scope():
            models[key] = model_fn(synchronized=flag, seed=seeds[0])
            models[key].compile(
                optimizer=keras.optimizers.Adam(lr),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                steps_per_execution=steps_per_execution,
            )
    accuracy: dict[str, list[float]] = {key: [] for key in flavours}
    spread: dict[str, list[float]] = {key: [] for key in flavours}
    for seed in seeds:
        start = model_fn(synchronized=False, seed=seed).get_weights()
        for key, model in models.items():
            set_seed(seed)
            model.set_weights(start)
            _reset_optimizer(model.optimizer, lr)
            train = make_tf_dataset(
                data.x_train, data.y_train, n * per_replica_batch, seed=seed, drop_remainder=True
            )
            model.fit(train, epochs=epochs, shuffle=False, verbose=0)
            copies = [
                _local_stack(strategy, v.value)
                for bn in batchnorm_layers(model)
                for v in (bn.moving_mean, bn.moving_variance)
            ]
            spread[key].append(max(float(np.max(np.ptp(c, axis=0))) for c in copies))
            evaluator = model_fn(synchronized=False, seed=seed)  # built on the default strategy
            evaluator.set_weights(model.get_weights())
            accuracy[key].append(_accuracy(evaluator, data.x_test, data.y_test))
    return SmallBatchResult(
        per_replica_batch=int(per_replica_batch),
        num_replicas=n,
        epochs=int(epochs),
        accuracy=accuracy,
        replica_spread=spread,
    )


def _reset_optimizer(optimizer, lr: float) -> None:
    """Zero the optimizer's step counter and slots, keep its learning rate."""
    for variable in optimizer.variables:
        variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
    optimizer.learning_rate = lr


def _accuracy(model, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> float:
    """Inference-mode accuracy, computed eagerly (no ``predict`` function to trace)."""
    hits = 0
    for lo in range(0, len(x), batch_size):
        logits = np.asarray(model(x[lo : lo + batch_size], training=False))
        hits += int(np.sum(np.argmax(logits, axis=-1) == y[lo : lo + batch_size]))
    return hits / len(x)


# ---------------------------------------------------------------------------------------------
# Command line: the comparison in a fresh process
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bnutils.distributed``: compare synced / unsynced BN with one device.

    Prints the :meth:`SyncComparison.summary` as JSON and returns 0 when synchronized BN
    matches one device on the global batch within ``--tol`` and per-replica BN does not
    (its batch statistics differ by more than ``10 * tol``), else 1.
    """
    parser = argparse.ArgumentParser(prog="python -m bnutils.distributed", description=main.__doc__)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--per-replica-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--data", choices=("synthetic", "fashion_mnist"), default="synthetic")
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    setup_logical_cpus(args.replicas)
    from bnutils.repro import set_seed

    set_seed(args.seed)
    need = args.replicas * args.per_replica_batch * args.steps
    if args.data == "synthetic":
        x, y = synthetic_images(need, shape=(12, 12, 1), seed=args.seed)
    else:
        from bnutils.data import load_dataset

        ds = load_dataset("fashion_mnist")
        x, y = ds.x_train[:need], ds.y_train[:need]
    result = compare_sync_bn(
        x, y, args.per_replica_batch, args.steps, strategy=mirrored_strategy(args.replicas)
    )
    summary = result.summary()
    synced_ok = max(summary["synced_error"][k] for k in ("batch_mean", "batch_var")) <= args.tol
    synced_ok = (
        synced_ok
        and max(summary["synced_error"][k] for k in ("moving_mean", "moving_var")) <= args.tol
    )
    unsynced_differs = summary["unsynced_error"]["batch_mean"] > 10 * args.tol
    summary["ok"] = bool(synced_ok and unsynced_differs)
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
