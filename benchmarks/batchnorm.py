"""Keras 3's BatchNormalization vs modules.FusedBatchNormalization: one training step of one layer.

    python benchmarks/batchnorm.py            # 8 x 256 x 128 x 16, as the U-Net's first block, both precisions

Prints milliseconds per forward + backward pass (inside a tf.function, after a warm-up), with a ReLU
of the same tensor as the floor of what any elementwise layer costs.
"""
import functools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import modules  # noqa: E402

SHAPE = (8, 256, 128, 16)
REPEATS = 30


def step_ms(layer_fn, x) -> float:
    """Milliseconds per forward + backward of layer_fn on x."""
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(layer_fn(x), tf.float32))
        return tape.gradient(loss, x)

    step(x)
    start = time.perf_counter()
    for _ in range(REPEATS):
        step(x)
    return (time.perf_counter() - start) / REPEATS * 1e3


def main() -> None:
    print(f"one layer, input {SHAPE}, forward + backward, ms per step ({REPEATS} steps)")
    print("| precision | Keras BatchNormalization | FusedBatchNormalization | ReLU only |")
    print("|---|---|---|---|")
    for policy in ("float32", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(policy)
        x = tf.cast(tf.random.stateless_uniform(SHAPE, seed=(1, 2)), keras.mixed_precision.global_policy().compute_dtype)
        ref, fused = keras.layers.BatchNormalization(momentum=0.9), modules.FusedBatchNormalization(momentum=0.9)
        times = [step_ms(functools.partial(ref, training=True), x),
                 step_ms(functools.partial(fused, training=True), x), step_ms(tf.nn.relu, x)]
        print(f"| {policy} | " + " | ".join(f"{t:.1f}" for t in times) + " |")
    keras.mixed_precision.set_global_policy("float32")


if __name__ == "__main__":
    main()
