"""tf.distribute set-up for train.py: which strategy, and which process writes the run folder."""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf


def split_cpu(replicas: int) -> None:
    """Expose the CPU as `replicas` logical devices, so a mirrored strategy can be run without GPUs."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)


@functools.cache  # one per process: TensorFlow's devices and a worker's cluster are set up once
def make_strategy(name: str = "auto", cpu_replicas: int = 0):
    """Return (strategy, is_chief). auto: MirroredStrategy over all GPUs when there are several."""
    gpus = tf.config.list_physical_devices("GPU")
    if cpu_replicas > 1:
        split_cpu(cpu_replicas)
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 or cpu_replicas > 1 else "none"
    if name == "none":
        return tf.distribute.get_strategy(), True
    if name == "mirrored":
        devices = None if gpus else [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices), True
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise SystemExit("error: --strategy multiworker needs the cluster in the TF_CONFIG environment "
                             "variable (see the README's 'Several machines' section)")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        _keep_keras_from_reducing_scalars_across_workers()
        return strategy, is_chief_task(json.loads(os.environ["TF_CONFIG"]))
    raise ValueError(f"unknown strategy {name!r}")


def _keep_keras_from_reducing_scalars_across_workers() -> None:
    """Work around keras-team/keras#20585 (Keras 3 fit under MultiWorkerMirroredStrategy).

    After each step Keras reduces every logged value across workers with axis=0, which fails for
    the scalar losses and metrics. They need no reduction: metric variables are created with SUM
    aggregation and are all-reduced on every update, so each worker already holds the global value.
    """
    from keras.src.backend.tensorflow import trainer

    trainer._collective_all_reduce_multi_worker = lambda strategy: False


def is_chief_task(tf_config: dict) -> bool:
    """The chief writes the run: the 'chief' task, or worker 0 when the cluster names no chief."""
    task = tf_config.get("task", {})
    if "chief" in tf_config.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def chief_dir(out: Path, is_chief: bool) -> Path:
    """The run folder for the chief; a temporary folder, removed at exit, for the other workers."""
    if is_chief:
        return out
    tmp = Path(tempfile.mkdtemp(prefix="hipmri-worker-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return tmp


def build_from_one_batch(model, dataset) -> None:
    """Let Keras build metrics and optimizer from one plain batch instead of a distributed one.

    Under tf.distribute, Keras 3's fit takes a batch from the training iterator and reduces it across
    replicas to build the model: that reduce fails under MultiWorkerMirroredStrategy
    (keras-team/keras#20585), and the batch it takes is lost to training. Only shapes matter here.
    """
    batch = next(iter(dataset))
    build = model._maybe_symbolic_build
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: build(data_batch=batch)
