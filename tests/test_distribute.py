"""tf.distribute for real on the CPU: two mirrored replicas, and two worker processes on 127.0.0.1; and the guard on
the private Keras names that distribute.py patches."""
import csv
import json
import os
import socket
import subprocess
import sys

import keras
import pytest
from conftest import ROOT, SMALL

import distribute
import modules  # noqa: F401  (registers the custom objects for load_model)

TIMEOUT = 300
PROBE = str(ROOT / "tests" / "distribute_probe.py")


def _free_ports(n):
    """Ports the OS says are free now (bound to port 0, then released)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _run_together(cmds, envs, tmp_path):
    """Start the commands at once (the workers of one cluster), wait for all; their outputs."""
    procs = []
    try:
        for i, (cmd, env) in enumerate(zip(cmds, envs)):
            tmp = tmp_path / f"tmp{i}"
            tmp.mkdir(exist_ok=True)
            procs.append(subprocess.Popen(cmd, env={**os.environ, "TMPDIR": str(tmp), **env},
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    return outputs


def _worker_envs():
    """TF_CONFIG of two workers on 127.0.0.1."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    return [{"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})} for i in range(2)]


def _steps(text):
    """Per step of the probe: the sample ids that the replicas of one process saw, and per replica."""
    seen = json.loads(next(line for line in text.splitlines() if line.startswith("SEEN "))[5:])
    return [sum(step, []) for step in seen], seen


def _assert_disjoint_and_complete(steps):
    """13 samples in global batches of 4: each batch split between the replicas, none seen twice, all seen once,
    the short last batch included."""
    assert [len(s) for s in steps] == [4, 4, 4, 1]
    assert sorted(sum(steps, [])) == list(range(13)), steps


def _probe_then_train(strategy, replicas, data, out, *extra):
    """The probe (13 samples, global batch 4) and then train.py in the same process (see distribute_probe.py)."""
    return [sys.executable, PROBE, strategy, str(replicas), "4", "13", "-d", str(data), "-o", str(out), "-e", "1",
            *SMALL, "--precision", "float32", *extra]


def _train_cmd(data, out, epochs, *extra):
    return [sys.executable, str(ROOT / "train.py"), "-d", str(data), "-o", str(out), "-e", str(epochs), *SMALL,
            "--precision", "float32", *extra]


def _losses(run):
    with open(run / "history.csv") as f:
        return [(float(r["loss"]), float(r["val_loss"])) for r in csv.DictReader(f)]


def test_the_private_keras_names_that_distribute_patches_exist():
    """Fails loudly when a Keras upgrade renames what the keras-team/keras#20585 work-arounds patch."""
    from keras.src.backend.tensorflow import trainer

    version = f"Keras {keras.__version__}"
    assert callable(getattr(trainer, "_collective_all_reduce_multi_worker", None)), \
        f"{version}: keras.src.backend.tensorflow.trainer._collective_all_reduce_multi_worker is gone"
    assert callable(getattr(keras.Model, "_maybe_symbolic_build", None)), \
        f"{version}: keras.Model._maybe_symbolic_build is gone"
    # ... and they still take the arguments that the replacements take and pass.
    distribute.keras_private(trainer, "_collective_all_reduce_multi_worker", "trainer", ("strategy",))
    distribute.keras_private(keras.Model, "_maybe_symbolic_build", "keras.Model", ("iterator", "data_batch"))


def test_keras_is_pinned_to_the_tested_range():
    """requirements*.txt pin keras to the minor versions whose private names distribute.py was tested with."""
    for name in ("requirements.txt", "requirements-gpu.txt"):
        pins = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()
                if line.startswith("keras")]
        assert pins == [f"keras{distribute.TESTED_KERAS}"], (name, pins)


class _Model:
    """Stands in for a Keras model: records how the build it gets is called."""

    def __init__(self):
        self.calls = []

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        self.calls.append((iterator, data_batch))


def _untouched():
    """A dataset that fails if the guard lets anything read it."""
    raise AssertionError("the dataset was read before the guard ran")
    yield


def test_build_from_one_batch_hands_keras_the_plain_batch():
    model = _Model()
    distribute.build_from_one_batch(model, [("x", "y")])
    model._maybe_symbolic_build(iterator="distributed iterator")
    assert model.calls == [(None, ("x", "y"))]


@pytest.mark.parametrize("change", ["missing", "not callable", "other parameters"])
def test_the_guard_stops_a_patch_that_would_do_nothing(monkeypatch, change):
    """A renamed, replaced or re-signed private name is a clear RuntimeError naming it, the Keras version and the
    fix, raised before anything is patched or read."""
    from keras.src.backend.tensorflow import trainer

    model = _Model()
    if change == "missing":
        monkeypatch.delattr(_Model, "_maybe_symbolic_build")
        monkeypatch.delattr(trainer, "_collective_all_reduce_multi_worker")
        problems = ("keras.Model has no attribute _maybe_symbolic_build",
                    "keras.src.backend.tensorflow.trainer has no attribute _collective_all_reduce_multi_worker")
    elif change == "not callable":
        model._maybe_symbolic_build = 0
        monkeypatch.setattr(trainer, "_collective_all_reduce_multi_worker", 0)
        problems = ("keras.Model._maybe_symbolic_build is not a function but int 0",
                    "keras.src.backend.tensorflow.trainer._collective_all_reduce_multi_worker is not a function")
    else:
        model._maybe_symbolic_build = lambda data: None
        monkeypatch.setattr(trainer, "_collective_all_reduce_multi_worker", lambda: None)
        problems = ("keras.Model._maybe_symbolic_build no longer takes ['iterator', 'data_batch']",
                    "keras.src.backend.tensorflow.trainer._collective_all_reduce_multi_worker no longer takes "
                    "['strategy']")
    before = getattr(trainer, "_collective_all_reduce_multi_worker", "absent")
    for call, problem in zip((lambda: distribute.build_from_one_batch(model, _untouched()),
                              distribute._keep_keras_from_reducing_scalars_across_workers), problems):
        with pytest.raises(RuntimeError) as raised:
            call()
        message = str(raised.value)
        assert message.startswith(f"Keras {keras.__version__}: {problem}"), message
        assert f"pip install 'keras{distribute.TESTED_KERAS}'" in message and "keras-team/keras#20585" in message
    assert getattr(trainer, "_collective_all_reduce_multi_worker", "absent") is before  # nothing was patched


def test_mirrored_replicas_see_disjoint_data_and_match_one_device(tiny_data, tmp_path):
    """Two replicas in one process split every batch between them; and 48 training slices in global batches of
    10 (the last one 8) on two replicas of 5 give one device's losses."""
    one, two = _run_together(
        [_train_cmd(tiny_data, tmp_path / "one", 1, "--deterministic", "--strategy", "none", "--batch-size", "10",
                    "--lr", "2e-3"),
         _probe_then_train("mirrored", 2, tiny_data, tmp_path / "two", "--deterministic", "--strategy", "mirrored",
                           "--cpu-replicas", "2", "--batch-size", "5", "--lr", "1e-3")], [{}, {}], tmp_path)
    steps, per_replica = _steps(two)
    _assert_disjoint_and_complete(steps)
    for replicas in per_replica[:3]:  # full batches: two samples per replica, different ones
        assert [len(r) for r in replicas] == [2, 2] and not set(replicas[0]) & set(replicas[1])
    assert "2 replica(s), global batch 10" in two
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert cfg["replicas"] == 2 and cfg["global_batch_size"] == 10 and cfg["effective_lr"] == pytest.approx(2e-3)
    (a, va), = _losses(tmp_path / "one")
    (b, vb), = _losses(tmp_path / "two")
    assert a == pytest.approx(b, rel=2e-3) and va == pytest.approx(vb, rel=2e-3)


def test_two_workers_see_disjoint_data_and_train_one_model(tiny_data, tmp_path):
    """Two worker processes on 127.0.0.1 split every batch between them; then they train one model, the chief
    writes the run folder and the other's scratch folder goes. (Resume is the same code with or without
    workers; test_train covers it in one process.)"""
    run = tmp_path / "run"
    outputs = _run_together([_probe_then_train("multiworker", 0, tiny_data, run, "--strategy", "multiworker")] * 2,
                            _worker_envs(), tmp_path)
    _assert_disjoint_and_complete([a + b for a, b in zip(*[_steps(text)[0] for text in outputs])])
    assert all("2 replica(s), global batch 16" in text for text in outputs)
    model = keras.models.load_model(run / "model.keras")
    assert model.output_shape == (None, 64, 32, 6)
    assert len(_losses(run)) == 1
    assert not any((tmp_path / "tmp1").iterdir())  # the non-chief's scratch run folder was removed
    # Metric variables are all-reduced: both workers logged the same global numbers.
    epoch_lines = [[line for line in text.splitlines() if line.startswith("epoch 1/1")] for text in outputs]
    assert epoch_lines[0] and [line[:60] for line in epoch_lines[0]] == [line[:60] for line in epoch_lines[1]]
