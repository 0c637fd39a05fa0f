"""tf.distribute for real on the CPU: two mirrored replicas, and two worker processes on 127.0.0.1."""
import csv
import json
import os
import socket
import subprocess
import sys

import keras
import pytest
from conftest import ROOT, SMALL

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
