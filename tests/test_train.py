"""train.py: the run folder, learning on the tiny phantom, resume (also after SIGKILL), reproducibility."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import keras
import numpy as np
import pytest
from conftest import ROOT

import modules  # noqa: F401  (registers the custom objects for load_model)
import train

RUN_FILES = ["model.keras", "state.json", "history.csv", "config.json", "training_validation_loss.png",
             "training_validation_accuracy.png", "training_validation_dice.png"]


def _history(run):
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def test_run_folder_has_every_file(tiny_run):
    for name in RUN_FILES:
        assert (tiny_run / name).stat().st_size > 0, name
    assert [p.name for p in (tiny_run / "checkpoint").iterdir()] == ["epoch-0002.keras"]
    model = keras.models.load_model(tiny_run / "model.keras")
    assert model.output_shape == (None, 256, 128, 6)
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["class_names"] == ["background", "body", "bone", "bladder", "rectum", "prostate"]
    assert cfg["input_size"] == [256, 128] and cfg["target_ids"] is None and cfg["seed"] == 42
    assert cfg["data"]["train"]["fingerprint"] and cfg["versions"]["tensorflow"]
    rows = _history(tiny_run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"loss", "val_loss", "val_dice", "val_dice_prostate", "accuracy", "val_accuracy"} <= set(rows[0])


def test_loss_decreases_and_binary_target(tiny_data, tmp_path):
    out = tmp_path / "bin"
    assert train.main(["-d", str(tiny_data), "-o", str(out), "-e", "3", "-f", "4", "--target", "bladder",
                       "--no-augment", "--lr", "3e-3", "-q"]) == 0
    rows = _history(out)
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    model = keras.models.load_model(out / "model.keras")
    assert model.output_shape == (None, 256, 128, 1)
    assert model.get_layer("mask").activation.__name__ == "sigmoid"
    assert "val_dice_bladder" in rows[0]


def test_gpu_settings_mixed_float16_and_xla_run_on_the_cpu(tiny_data, tmp_path):
    """What auto picks on a GPU (mixed float16, XLA, the fused batch norm, a float32 output) is the same code
    as here; this runs it on the CPU, where XLA is slow but works, so the GPU path is not untested code."""
    out = tmp_path / "gpu-settings"
    args = ["-d", str(tiny_data), "-o", str(out), "-f", "4", "--size", "64x32", "--precision", "mixed_float16",
            "--jit", "on", "-q"]
    assert train.main(args + ["-e", "1"]) == 0
    with warnings.catch_warnings(record=True) as caught:  # the loss-scale optimizer's state comes back whole
        warnings.simplefilter("always")
        assert train.main(args + ["-e", "2", "--resume"]) == 0
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["precision"] == "mixed_float16" and cfg["jit"] == "on"
    model = keras.models.load_model(out / "model.keras", compile=False)
    assert model.get_layer("enc1_bn").compute_dtype == "float16"
    assert model.get_layer("mask").compute_dtype == "float32"
    rows = _history(out)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(np.isfinite(float(r[k])) for r in rows for k in ("loss", "val_loss"))


def test_resume_continues_at_the_next_epoch(tiny_data, tmp_path, capsys):
    out = tmp_path / "r"
    args = ["-d", str(tiny_data), "-o", str(out), "-f", "4", "-q"]
    assert train.main(args + ["-e", "1"]) == 0
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(args + ["-e", "2"])
    assert train.main(args + ["-e", "2", "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert [r["epoch"] for r in _history(out)] == ["1", "2"]
    assert [p.name for p in (out / "checkpoint").iterdir()] == ["epoch-0002.keras"]
    with pytest.raises(SystemExit, match="base_filters"):
        train.main(args + ["-e", "3", "--resume", "-f", "8"])
    # The checkpoint keeps its loss, learning rate and precision: a resume may not claim to have changed them.
    for flag, key in ((["--loss", "dice"], "loss"), (["--lr", "1e-3"], "lr"), (["--precision", "float32"], "precision"),
                      (["--class-names", "bg,a,b,c,d,e"], "class_names")):
        with pytest.raises(SystemExit, match=key):
            train.main(args + ["-e", "3", "--resume", *flag])


def test_resume_writes_the_best_model_a_kill_cut_off(tiny_data, tmp_path):
    # state.json commits an epoch before the best model is written; a kill between the two loses model.keras.
    out = tmp_path / "r"
    args = ["-d", str(tiny_data), "-o", str(out), "-f", "4", "-e", "1", "-q"]
    assert train.main(args) == 0
    (out / "model.keras").unlink()
    assert train.main(args + ["--resume"]) == 0  # nothing left to train, but the best model comes back
    state = json.loads((out / "state.json").read_text())
    for a, b in zip(keras.models.load_model(out / "model.keras").get_weights(), _final_weights(out)):
        np.testing.assert_array_equal(a, b)
    assert state["best_epoch"] == 1


def test_resume_after_early_stopping_trains_no_more(tiny_data, tmp_path, capsys):
    out = tmp_path / "r"
    args = ["-d", str(tiny_data), "-o", str(out), "-f", "4", "-q"]
    assert train.main(args + ["-e", "1", "--early-stopping", "1"]) == 0
    state_path = out / "state.json"
    state = json.loads(state_path.read_text())
    state["callbacks"][1]["wait"] = 1  # as if epoch 1 had not improved: EarlyStopping(patience=1) stops here
    state_path.write_text(json.dumps(state))
    assert train.main(args + ["-e", "3", "--resume", "--early-stopping", "1"]) == 0
    assert "stopped early after epoch 1" in capsys.readouterr().out
    assert len(_history(out)) == 1
    assert train.main(args + ["-e", "2", "--resume", "--early-stopping", "2"]) == 0  # more patience: trains on
    assert len(_history(out)) == 2


def test_bad_size_is_refused_before_loading(tmp_path, capsys):
    for size in ("250x128", "256", "big"):
        with pytest.raises(SystemExit) as e:
            train.main(["-d", str(tmp_path / "nowhere"), "-o", str(tmp_path / "r"), "--size", size])
        assert e.value.code == 2
        assert f"--size {size!r}: expected ROWSxCOLS with both divisible by 16" in capsys.readouterr().err


def _train_cmd(data, out, epochs):
    return [sys.executable, str(ROOT / "train.py"), "-d", str(data), "-o", str(out), "-e", str(epochs), "-f", "4",
            "--deterministic", "-q"]


def _final_weights(run):
    state = json.loads((run / "state.json").read_text())
    return keras.models.load_model(run / state["checkpoint"]).get_weights()


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_data, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(tiny_data, full, 3), check=True, env=env, timeout=300, capture_output=True)

    proc = subprocess.Popen(_train_cmd(tiny_data, killed, 3), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (killed / "state.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # during epoch 2
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = json.loads((killed / "state.json").read_text())
    assert state["epoch"] == 0, "the kill was meant to land in epoch 2"

    subprocess.run(_train_cmd(tiny_data, killed, 3) + ["--resume"], check=True, env=env, timeout=300,
                   capture_output=True)
    drop = ("seconds",)
    strip = [{k: v for k, v in r.items() if k not in drop} for r in _history(killed)]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in _history(full)]
    for a, b in zip(_final_weights(killed), _final_weights(full)):
        np.testing.assert_array_equal(a, b)


def test_deterministic_runs_are_identical(tiny_data, tmp_path):
    for name in ("a", "b"):
        assert train.main(["-d", str(tiny_data), "-o", str(tmp_path / name), "-e", "1", "-f", "4",
                           "--deterministic", "-q"]) == 0
    a, b = _history(tmp_path / "a"), _history(tmp_path / "b")
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in a] == \
           [{k: v for k, v in r.items() if k != "seconds"} for r in b]


def test_bad_data_gives_a_message_not_a_traceback(tmp_path, capsys):
    assert train.main(["-d", str(tmp_path / "nowhere"), "-o", str(tmp_path / "r"), "-q"]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
