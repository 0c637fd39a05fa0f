"""tf.distribute for real on the CPU: two mirrored replicas, and two worker processes on 127.0.0.1."""
import csv
import json
import os
import socket
import subprocess
import sys

import keras
import pytest
from conftest import ROOT

import modules  # noqa: F401  (registers the custom objects for load_model)

TIMEOUT = 300


def _free_ports(n):
    """Ports the OS says are free now (bound to port 0, then released)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _train(data, out, *extra, env=None, epochs=2):
    cmd = [sys.executable, str(ROOT / "train.py"), "-d", str(data), "-o", str(out), "-e", str(epochs), "-f", "4", "-q",
           "--precision", "float32", "--deterministic", *extra]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, timeout=TIMEOUT, capture_output=True, text=True)


def _losses(run):
    with open(run / "history.csv") as f:
        return [(float(r["loss"]), float(r["val_loss"])) for r in csv.DictReader(f)]


def test_mirrored_two_replicas_match_one_device(tiny_data, tmp_path):
    one = _train(tiny_data, tmp_path / "one", "--strategy", "none", "--batch-size", "8", "--lr", "2e-3")
    assert one.returncode == 0, one.stderr[-2000:]
    mirrored = ("--strategy", "mirrored", "--cpu-replicas", "2", "--batch-size", "4", "--lr", "1e-3")
    # Same global batch 8 and effective lr 2e-3; one epoch, then resumed for the second.
    two = _train(tiny_data, tmp_path / "two", *mirrored, epochs=1)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 replica(s), global batch 8" in two.stdout
    two = _train(tiny_data, tmp_path / "two", *mirrored, "--resume")
    assert two.returncode == 0, two.stderr[-2000:]
    assert "resuming" in two.stdout
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert cfg["replicas"] == 2 and cfg["global_batch_size"] == 8 and cfg["effective_lr"] == pytest.approx(2e-3)
    # Each replica computed a different half of every batch: equal halves could not give the same loss.
    assert len(_losses(tmp_path / "two")) == 2
    for (a, va), (b, vb) in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two")):
        assert a == pytest.approx(b, rel=2e-3) and va == pytest.approx(vb, rel=2e-3)


def _run_workers(data, out, tmp_path, epochs, *extra):
    """Two train.py worker processes on 127.0.0.1 with TF_CONFIG; returns their outputs."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    try:
        for index in range(2):
            tmp = tmp_path / f"tmp{index}"
            tmp.mkdir(exist_ok=True)
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            cmd = [sys.executable, str(ROOT / "train.py"), "-d", str(data), "-o", str(out), "-e", str(epochs),
                   "-f", "4", "-q", "--precision", "float32", "--strategy", "multiworker", *extra]
            procs.append(subprocess.Popen(cmd, env={**os.environ, "TF_CONFIG": tf_config, "TMPDIR": str(tmp)},
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


def test_two_workers_on_localhost_with_resume(tiny_data, tmp_path):
    run = tmp_path / "run"
    first = _run_workers(tiny_data, run, tmp_path, 1)
    assert all("2 replica(s), global batch 16" in text for text in first)
    model = keras.models.load_model(run / "model.keras")
    assert model.output_shape == (None, 256, 128, 6)
    assert len(_losses(run)) == 1
    assert not any((tmp_path / "tmp1").iterdir())  # the non-chief's scratch run folder was removed
    second = _run_workers(tiny_data, run, tmp_path, 2, "--resume")
    assert all("resuming" in text for text in second)
    assert len(_losses(run)) == 2
    # Metric variables are all-reduced: both workers logged the same global numbers.
    epoch_lines = [[line for line in text.splitlines() if line.startswith("epoch 2/2")] for text in second]
    assert epoch_lines[0] and [line[:60] for line in epoch_lines[0]] == [line[:60] for line in epoch_lines[1]]
