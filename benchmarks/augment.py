"""What the training augmentation costs per batch, and its parts: the CPU time it takes from training.

    python benchmarks/augment.py

On a 2-core CPU the tf.data pipeline runs beside the training step and takes its CPU time from it, so
the pipeline's overhead (bench.py) is about this cost against the step time. Times one batch of 8
256 x 128 pairs through `pipeline.augment_batch` (in a tf.function, as tf.data runs it), with parts
switched off, and TensorFlow's own warp (ImageProjectiveTransformV3, which the project used before
OpenCV's) for comparison. Each figure is the median of 5 rounds of 100 batches, in ms per batch.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pipeline  # noqa: E402


def main() -> int:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = tf.constant(rng.random((8, 256, 128, 1), np.float32))
    targets = tf.constant(rng.integers(0, 6, (8, 256, 128, 1)).astype(np.uint8))
    basic, wide = pipeline.augmentation("basic", True), pipeline.augmentation("wide", True)
    transform = tf.constant([[np.cos(0.1), -np.sin(0.1), 10.0, np.sin(0.1), np.cos(0.1), -5.0, 0.0, 0.0]] * 8,
                            tf.float32)

    def tf_warp(x, y, seed):
        def warp(a, interpolation):
            return tf.raw_ops.ImageProjectiveTransformV3(images=a, transforms=transform, output_shape=[256, 128],
                                                         interpolation=interpolation, fill_mode="NEAREST",
                                                         fill_value=0.0)
        return warp(x, "BILINEAR"), tf.cast(warp(tf.cast(y, tf.float32), "NEAREST"), tf.uint8)

    cases = {
        "--augment wide, all of it": lambda x, y, s: pipeline.augment_batch(x, y, s, wide),
        "--augment basic, all of it": lambda x, y, s: pipeline.augment_batch(x, y, s, basic),
        "  warp only (OpenCV warpAffine, image and mask)":
            lambda x, y, s: pipeline.augment_batch(x, y, s, dataclasses.replace(basic, gamma=0, noise=0)),
        "  warp + gamma": lambda x, y, s: pipeline.augment_batch(x, y, s, dataclasses.replace(basic, noise=0)),
        "TensorFlow's warp (ImageProjectiveTransformV3), image and mask": tf_warp,
        "call overhead (returns its inputs)": lambda x, y, s: (x + 0.0, y),
    }
    print("| augmentation of 8 pairs, 256 x 128 | ms per batch (median of 5 x 100) |\n|---|---|")
    for name, fn in cases.items():
        f = tf.function(fn)
        for i in range(5):  # trace and warm up
            f(images, targets, tf.constant([i, 42], tf.int64))
        rounds = []
        for _ in range(5):
            start = time.perf_counter()
            for i in range(100):
                f(images, targets, tf.constant([i, 42], tf.int64))[0].numpy()
            rounds.append((time.perf_counter() - start) * 10)  # ms per batch
        print(f"| {name} | {statistics.median(rounds):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
