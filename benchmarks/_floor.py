"""BN's memory floor: the element-wise work around the convolutions, timed alone.

Used by ``bench_bn_profile.py``. At the benchmark CNN's shapes (the five tensors its BN layers
normalize), each candidate runs forward and backward in one ``tf.function`` (a gradient tape
over the op, with a fixed upstream gradient), interleaved with the others:

* ``bias add + ReLU``: what the no-BN twin does after each convolution;
* ``ReLU``: the activation alone;
* ``fused BN``: ``tf.raw_ops.FusedBatchNormV3`` in training mode and its gradient;
* ``fused BN + ReLU``: what the fused twin does (the layer's kernel, then the activation);
* ``Keras BN + ReLU``: ``keras.layers.BatchNormalization`` in training mode, then ReLU;
* ``copy``: ``x * 1.5`` forward and backward, a memory-bound reference.

Each candidate has a pass count: how many times it must read or write a tensor of the
activations' size (``PASSES``; a reduction over a tensor reads it once). The rate it reaches
is passes x bytes / seconds; the copy's rate stands for the machine's bandwidth. The floor of
what BN adds over the no-BN twin is ``(passes of fused BN + ReLU - passes of what the twin
pays) x bytes / bandwidth``: what any kernel must spend that makes those passes. The twin pays
for bias add + ReLU, or for ReLU alone where oneDNN fuses the bias add into the convolution
(it then costs no op time in the traces). A kernel that did BN and ReLU in one pass each way
(none exists in TensorFlow for CPUs) would make ``FUSED_BN_RELU_IDEAL_PASSES``.
"""

from __future__ import annotations

import math
import statistics

import _harness

# Reads and writes of an activation-sized tensor, forward + backward.
PASSES = {
    # fwd: read x, write y (add), read y, write z (relu); bwd: read dz, z, write dy (ReluGrad),
    # read dy (BiasAddGrad; the input gradient is dy itself)
    "bias add + ReLU": 2 + 2 + 3 + 1,
    "ReLU": 2 + 3,
    # fwd: read x for the mean, read x for the variance, read x and write y; bwd: read dy and x
    # for the two reductions, read dy and x and write dx
    "fused BN": 4 + 5,
    "fused BN + ReLU": 4 + 5 + 2 + 3,
    # Keras's unfused BN: moments (mean: 1, squared difference: 2 + 1 reduction), then
    # x * a + b (2 + 2); its backward mirrors each op (about twice the forward)
    "Keras BN + ReLU": 8 + 16 + 2 + 3,
    "copy": 2 + 2,
}
# What one kernel at the bandwidth could do: the statistics in one read of x (the sum and the
# sum of squares together), normalize and ReLU in one read and one write; backward: the two
# reductions (with ReLU's mask from y) in one read of dy and y, then dx in one read of each and
# one write. The same count as bias add + ReLU.
FUSED_BN_RELU_IDEAL_PASSES = 1 + 2 + 2 + 3


def bn_input_shapes(model, batch_size: int) -> list[tuple[int, ...]]:
    """The input shapes of ``model``'s BN layers at ``batch_size``."""
    import keras

    return [
        (batch_size, *layer.input.shape[1:])
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def candidates(shapes):
    """``{name: zero-argument tf.function}`` running forward and backward at ``shapes``."""
    import keras
    import tensorflow as tf

    rng = tf.random.Generator.from_seed(0)
    xs = [tf.Variable(rng.normal(shape)) for shape in shapes]
    dys = [rng.normal(shape) for shape in shapes]
    params = [(tf.Variable(tf.ones([s[-1]])), tf.Variable(tf.zeros([s[-1]]))) for s in shapes]
    keras_bns = []
    for shape in shapes:
        layer = keras.layers.BatchNormalization()
        layer.build(shape)
        keras_bns.append(layer)

    def fused(x, gamma, beta):
        empty = tf.constant([], tf.float32)
        return tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=gamma,
            offset=beta,
            mean=empty,
            variance=empty,
            epsilon=1e-3,
            exponential_avg_factor=1.0,
            is_training=True,
        )[0]

    def bias_relu(i, x):
        return tf.nn.relu(tf.nn.bias_add(x, params[i][1]))

    def relu(i, x):
        return tf.nn.relu(x)

    def fused_bn(i, x):
        return fused(x, *params[i])

    def fused_bn_relu(i, x):
        return tf.nn.relu(fused(x, *params[i]))

    def keras_bn_relu(i, x):
        return tf.nn.relu(keras_bns[i](x, training=True))

    def copy(i, x):
        return x * 1.5  # not 1.0: TensorFlow's graph optimizer removes a multiply by one

    forwards = {
        "bias add + ReLU": bias_relu,
        "ReLU": relu,
        "fused BN": fused_bn,
        "fused BN + ReLU": fused_bn_relu,
        "Keras BN + ReLU": keras_bn_relu,
        "copy": copy,
    }

    def make(forward):
        @tf.function(jit_compile=False)
        def step():
            out = []
            for i, (x, dy) in enumerate(zip(xs, dys, strict=True)):
                watched = [x, *params[i]]
                with tf.GradientTape() as tape:
                    y = forward(i, x)
                out.append(tape.gradient(y, watched, output_gradients=dy))
            return out

        def run():
            grads = step()
            return float(tf.reduce_sum(grads[-1][0][0, 0, 0]))  # waits for the step

        return run

    return {name: make(fwd) for name, fwd in forwards.items()}


def measure(
    shapes, repeats: int, calls: int, fused_forward: bool = False, bias_fused: bool = False
) -> dict:
    """Seconds per forward + backward of each candidate (median over interleaved repeats of
    ``calls`` back-to-back calls), the bandwidth it reaches, and BN's floor.

    Args:
        fused_forward: TensorFlow's remapper runs BN + ReLU forward as one kernel
            (``FusedBatchNormEx``, seen in the traces), which saves ReLU's read and write.
        bias_fused: the no-BN twin's bias add is fused into its convolution (oneDNN; it costs
            no op time in the traces), so that twin pays for ReLU alone.
    """
    passes = dict(PASSES)
    if fused_forward:
        passes["fused BN + ReLU"] -= 2
    fns = candidates(shapes)
    for fn in fns.values():
        fn()  # trace

    def loop(fn):
        def calls_of():
            for _ in range(calls):
                fn()

        return calls_of

    wall = _harness.interleaved({k: loop(f) for k, f in fns.items()}, repeats=repeats)["wall"]
    elements = sum(math.prod(s) for s in shapes)
    nbytes = 4 * elements
    seconds = {name: statistics.median(wall[name]) / calls for name in fns}
    speed = {name: passes[name] * nbytes / seconds[name] for name in fns}  # bytes per second
    bandwidth = speed["copy"]  # streaming: the rate a kernel that only reads and writes reaches
    rows = [
        {
            "candidate": name,
            "ms fwd+bwd": round(seconds[name] * 1e3, 2),
            "passes": passes[name],
            "GB/s": round(speed[name] / 1e9, 1),
            "of the copy's rate": round(speed[name] / bandwidth, 2),
        }
        for name in fns
    ]
    base = "ReLU" if bias_fused else "bias add + ReLU"
    extra = passes["fused BN + ReLU"] - passes[base]
    ideal = FUSED_BN_RELU_IDEAL_PASSES - passes[base]
    return {
        "shapes": [list(s) for s in shapes],
        "activations": elements,
        "MB per pass": round(nbytes / 1e6, 1),
        "rows": rows,
        "bandwidth GB/s (copy)": round(bandwidth / 1e9, 1),
        "no-BN twin pays": base,
        "extra passes": extra,
        "floor of the extra, ms": round(extra * nbytes / bandwidth * 1e3, 2),
        "measured alone, ms": round((seconds["fused BN + ReLU"] - seconds[base]) * 1e3, 2),
        "one-kernel BN + ReLU: extra passes": ideal,
        "one-kernel BN + ReLU: floor, ms": round(max(ideal, 0) * nbytes / bandwidth * 1e3, 2),
    }
