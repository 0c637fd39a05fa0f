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


def _seen(text):
    return json.loads(next(line for line in text.splitlines() if line.startswith("SEEN "))[5:])


def test_replicas_and_workers_see_disjoint_parts_of_every_batch(tmp_path):
    """13 samples, global batch 4: the replicas (2 in one process, or 2 workers) split each batch between them,
    none sees a sample twice, and together they see every sample once, the short last batch included."""
    mirrored = _run_together([[sys.executable, PROBE, "mirrored", "2", "4", "13"]], [{}], tmp_path)
    workers = _run_together([[sys.executable, PROBE, "multiworker", "0", "4", "13"]] * 2, _worker_envs(), tmp_path)
    for steps in ([sum(s, []) for s in _seen(mirrored[0])],  # per step: the ids of both local replicas
                  [a + b for a, b in zip(*[[sum(s, []) for s in _seen(w)] for w in workers])]):
        assert [len(s) for s in steps] == [4, 4, 4, 1]
        ids = sum(steps, [])
        assert sorted(ids) == list(range(13)), steps
    for replicas in _seen(mirrored[0])[:3]:  # full batches: two per replica, different ones
        assert [len(r) for r in replicas] == [2, 2] and not set(replicas[0]) & set(replicas[1])


def _train_cmd(data, out, epochs, *extra):
    return [sys.executable, str(ROOT / "train.py"), "-d", str(data), "-o", str(out), "-e", str(epochs), *SMALL,
            "--precision", "float32", *extra]


def _losses(run):
    with open(run / "history.csv") as f:
        return [(float(r["loss"]), float(r["val_loss"])) for r in csv.DictReader(f)]


def test_mirrored_two_replicas_match_one_device(tiny_data, tmp_path):
    """48 training slices in global batches of 10 (the last one 8): two replicas of 5 give one device's losses."""
    one, two = _run_together(
        [_train_cmd(tiny_data, tmp_path / "one", 1, "--deterministic", "--strategy", "none", "--batch-size", "10",
                    "--lr", "2e-3"),
         _train_cmd(tiny_data, tmp_path / "two", 1, "--deterministic", "--strategy", "mirrored", "--cpu-replicas",
                    "2", "--batch-size", "5", "--lr", "1e-3")], [{}, {}], tmp_path)
    assert "2 replica(s), global batch 10" in two
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert cfg["replicas"] == 2 and cfg["global_batch_size"] == 10 and cfg["effective_lr"] == pytest.approx(2e-3)
    (a, va), = _losses(tmp_path / "one")
    (b, vb), = _losses(tmp_path / "two")
    assert a == pytest.approx(b, rel=2e-3) and va == pytest.approx(vb, rel=2e-3)


def test_two_workers_on_localhost(tiny_data, tmp_path):
    """Two worker processes train one model; the chief writes the run folder, the other's scratch folder goes.
    (Resume is the same code with or without workers; test_train covers it in one process.)"""
    run = tmp_path / "run"
    outputs = _run_together([_train_cmd(tiny_data, run, 1, "--strategy", "multiworker")] * 2, _worker_envs(),
                            tmp_path)
    assert all("2 replica(s), global batch 16" in text for text in outputs)
    model = keras.models.load_model(run / "model.keras")
    assert model.output_shape == (None, 64, 32, 6)
    assert len(_losses(run)) == 1
    assert not any((tmp_path / "tmp1").iterdir())  # the non-chief's scratch run folder was removed
    # Metric variables are all-reduced: both workers logged the same global numbers.
    epoch_lines = [[line for line in text.splitlines() if line.startswith("epoch 1/1")] for text in outputs]
    assert epoch_lines[0] and [line[:60] for line in epoch_lines[0]] == [line[:60] for line in epoch_lines[1]]
