"""tf.distribute set-up for train.py: which strategy, and which process writes the run folder."""
from __future__ import annotations

import atexit
import functools
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

# The Keras versions whose private names the two work-arounds below patch (requirements*.txt pin keras to them).
TESTED_KERAS = ">=3.15,<3.16"


def keras_private(owner, name: str, where: str, params: tuple = ()):
    """`owner.name`, a private Keras function that a work-around here replaces; RuntimeError if it is gone.

    Patching a name that Keras has renamed or removed would silently do nothing (and training would then fail
    in Keras' own code, far from here): check that it exists, is callable and takes `params`, or say what to do.
    """
    import keras

    attr = getattr(owner, name, None)
    problem = None
    if attr is None:
        problem = f"{where} has no attribute {name}"
    elif not callable(attr):
        problem = f"{where}.{name} is not a function but {type(attr).__name__} {attr!r}"
    else:
        try:
            have = list(inspect.signature(attr).parameters)
        except (TypeError, ValueError):  # no signature to read: trust the name
            have = list(params)
        if any(p not in have for p in params):
            problem = f"{where}.{name} no longer takes {list(params)} (its parameters: {have})"
    if problem:
        raise RuntimeError(
            f"Keras {keras.__version__}: {problem}. distribute.py patches this private Keras name to work around "
            f"keras-team/keras#20585 under tf.distribute, and was tested with keras{TESTED_KERAS}: install that "
            f"(pip install 'keras{TESTED_KERAS}', as requirements.txt pins it), or port the work-around in "
            f"distribute.py to this Keras version")
    return attr


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

    keras_private(trainer, "_collective_all_reduce_multi_worker", "keras.src.backend.tensorflow.trainer",
                  ("strategy",))
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
    build = keras_private(model, "_maybe_symbolic_build", "keras.Model", ("iterator", "data_batch"))
    batch = next(iter(dataset))
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: build(data_batch=batch)
