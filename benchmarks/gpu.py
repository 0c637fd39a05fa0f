"""Training and prediction throughput of the project's U-Net on any Keras backend (JAX, PyTorch or TensorFlow).

    KERAS_BACKEND=jax python benchmarks/gpu.py                            # base 16 and 64, batch 8 and 64, fp16
    python benchmarks/gpu.py --base-filters 16 --batches 8 --precision float32 --steps 5   # a CPU check

The network is modules.build_unet, compiled with the project's loss (modules.SegmentationLoss) and Dice metrics
under the chosen precision policy; the batches are demo-phantom slices rendered in memory (phantom.py) and
preprocessed as training does (preprocess.preprocess_pair). Nothing here imports TensorFlow: with
KERAS_BACKEND=jax or torch it runs where only that framework is installed. One line of JSON per (base, batch):
img/s of training steps (Model.train_on_batch, after --warmup steps that compile) and of prediction
(Model.predict_on_batch).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import modules  # noqa: E402
from dataset import CLASS_NAMES  # noqa: E402
from phantom import render_slice, volume_state  # noqa: E402
from preprocess import Preprocessing, preprocess_pair  # noqa: E402
from synthetic import plan_volumes  # noqa: E402


def phantom_batch(n: int, size, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """n demo-phantom training slices (images (n, rows, cols, 1) float32, labels (n, rows, cols, 1) uint8)."""
    prep = Preprocessing(size=tuple(size), norm="percentile")
    volumes = [v for v in plan_volumes("demo", seed) if v["split"] == "train"]
    images, labels = [], []
    for i in range(n):
        v = volumes[i % len(volumes)]
        image, mask = render_slice(*volume_state(seed, v), v, (7 * i) % v["slices"])
        x, y = preprocess_pair(image, mask.astype(np.uint8), prep)
        images.append(x)
        labels.append(y)
    return np.stack(images)[..., None], np.stack(labels)[..., None]


def time_calls(call, steps: int, warmup: int) -> float:
    """Seconds per call over `steps` calls, after `warmup` calls (compilation, autotuning) that are not timed."""
    for _ in range(warmup):
        call()
    start = time.perf_counter()
    for _ in range(steps):
        out = call()
    keras.ops.convert_to_numpy(keras.tree.flatten(out)[0])  # wait for asynchronous backends (JAX, torch on GPU)
    return (time.perf_counter() - start) / steps


def measure(base: int, batch: int, size, precision: str, steps: int, warmup: int) -> dict:
    """Training and prediction img/s of one model size at one batch size."""
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(42)
    images, labels = phantom_batch(batch, size)
    model = modules.build_unet((*size, 1), len(CLASS_NAMES), base)
    model.compile(keras.optimizers.Adam(1e-3), modules.SegmentationLoss(), jit_compile="auto",
                  metrics=modules.segmentation_metrics(list(CLASS_NAMES)))
    train = time_calls(lambda: model.train_on_batch(images, labels), steps, warmup)
    predict = time_calls(lambda: model.predict_on_batch(images), steps, warmup)
    return {"backend": keras.backend.backend(), "precision": precision, "base_filters": base, "batch": batch,
            "size": list(size), "params": model.count_params(), "train_img_s": round(batch / train, 2),
            "predict_img_s": round(batch / predict, 2), "steps": steps}


def devices() -> list:
    """What the backend computes on, in its own words."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        return [str(d) for d in jax.devices()]
    if backend == "torch":
        import torch
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"]
    if backend == "tensorflow":
        import tensorflow as tf
        return [d.name for d in tf.config.list_logical_devices()]
    return [platform.processor() or "cpu"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-f", "--base-filters", default="16,64", help="comma-separated U-Net widths (default: 16,64)")
    p.add_argument("-b", "--batches", default="8,64", help="comma-separated batch sizes (default: 8,64)")
    p.add_argument("--size", default="256x128", help="input ROWSxCOLS, both divisible by 16 (default: 256x128)")
    p.add_argument("--precision", default="mixed_float16", choices=["float32", "mixed_float16", "mixed_bfloat16"],
                   help="Keras dtype policy (default: mixed_float16, what train.py picks on a GPU)")
    p.add_argument("--steps", type=int, default=20, help="timed calls per measurement (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: 3)")
    p.add_argument("-o", "--out", type=Path, default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    try:
        a.base_filters = [int(x) for x in a.base_filters.split(",")]
        a.batches = [int(x) for x in a.batches.split(",")]
        a.size = tuple(int(x) for x in a.size.lower().split("x"))
    except ValueError:
        p.error("--base-filters and --batches take comma-separated integers, --size ROWSxCOLS")
    if len(a.size) != 2 or any(s <= 0 or s % 16 for s in a.size) or min(a.base_filters + a.batches) < 1 \
            or a.steps < 1 or a.warmup < 0:
        p.error("--size needs two multiples of 16; widths, batches and --steps at least 1; --warmup 0 or more")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    results = {"devices": devices(), "keras": keras.__version__, "rows": []}
    print(json.dumps({"backend": keras.backend.backend(), "devices": results["devices"]}), flush=True)
    for base in a.base_filters:
        for batch in a.batches:
            results["rows"].append(measure(base, batch, a.size, a.precision, a.steps, a.warmup))
            print(json.dumps(results["rows"][-1]), flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
