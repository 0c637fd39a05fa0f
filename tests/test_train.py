"""train.py: the run folder, learning on the tiny phantom, resume (also after SIGKILL), reproducibility."""
import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import ROOT, SMALL, TINY_RUN_EPOCHS, _shared
from filelock import FileLock

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
    assert [p.name for p in (tiny_run / "checkpoint").iterdir()] == [f"epoch-{TINY_RUN_EPOCHS:04d}.keras"]
    model = keras.models.load_model(tiny_run / "model.keras")
    assert model.output_shape == (None, 64, 32, 6) and model.get_layer("mask").activation.__name__ == "softmax"
    assert (tiny_run / "logs" / "train").is_dir()  # TensorBoard
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["class_names"] == ["background", "body", "bone", "bladder", "rectum", "prostate"]
    assert cfg["input_size"] == [64, 32] and cfg["target_ids"] is None and cfg["seed"] == 42
    assert cfg["data"]["train"]["fingerprint"] and cfg["versions"]["tensorflow"]
    assert cfg["geometry"]["orientation"] == "RAS" and cfg["geometry"]["orientation_disagree"] == 0
    assert cfg["geometry"]["spacing_mm_median"] == [1.0, 1.0]
    rows = _history(tiny_run)
    assert [r["epoch"] for r in rows] == [str(e) for e in range(1, TINY_RUN_EPOCHS + 1)]
    assert {"loss", "val_loss", "val_dice", "val_dice_prostate", "accuracy", "val_accuracy"} <= set(rows[0])


# What the session's run must reach on the validation split at its best epoch, per label. It reached body 0.92-0.93,
# bone 0.62-0.63, bladder 0.45-0.79 (the code of the day moves bladder most). Rectum and prostate, a few pixels
# each at 64x32, stay at 0 after 12 epochs: for them this checks only that a score is there (a number, not NaN);
# test_modules.test_every_label_counts_in_the_loss checks that the loss trains them.
LEARNED = {"body": 0.85, "bone": 0.45, "bladder": 0.3, "rectum": 0.0, "prostate": 0.0}


def test_the_model_learns_the_phantom_labels(tiny_run):
    """The session's run (12 epochs at 64x32) finds body, bone and bladder on the validation split. A label
    mapping that pairs images with the wrong masks, or a loss that does not train, stays far below this."""
    best = max(_history(tiny_run), key=lambda r: float(r["val_dice"]))
    dice = {k: float(best[f"val_dice_{k}"]) for k in LEARNED}
    assert all(dice[k] >= minimum for k, minimum in LEARNED.items()), dice


def test_binary_target(tiny_data, tmp_path):
    out = tmp_path / "bin"
    assert train.main(["-d", str(tiny_data), "-o", str(out), "-e", "1", *SMALL, "--target", "bladder"]) == 0
    model = keras.models.load_model(out / "model.keras")
    assert model.output_shape == (None, 64, 32, 1)
    assert model.get_layer("mask").activation.__name__ == "sigmoid"
    assert "val_dice_bladder" in _history(out)[0]
    # The default cosine schedule spans the run's epochs: a resume asking for more is refused, naming them.
    with pytest.raises(SystemExit, match="epochs"):
        train.main(["-d", str(tiny_data), "-o", str(out), "-e", "2", *SMALL, "--target", "bladder", "--resume"])


def test_gpu_settings_mixed_float16_and_xla_run_on_the_cpu(tiny_data, tmp_path, capsys):
    """What auto picks on a GPU (mixed float16, XLA, the fused batch norm, a float32 output) is the same code
    as here; this runs it on the CPU, where XLA is slow but works, so the GPU path is not untested code."""
    out = tmp_path / "gpu-settings"
    args = ["-d", str(tiny_data), "-o", str(out), *SMALL, "--precision", "mixed_float16", "--schedule", "plateau"]
    assert train.main(args + ["-e", "1", "--jit", "on"]) == 0
    assert "xla True" in capsys.readouterr().out
    with warnings.catch_warnings(record=True) as caught:  # the loss-scale optimizer's state comes back whole
        warnings.simplefilter("always")  # (-e 1: loads the checkpoint and stops; test_sigkill trains on after one)
        assert train.main(args + ["-e", "1", "--resume", "--jit", "off"]) == 0
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]
    # The checkpoint was compiled with XLA; the resume's --jit off holds (compiling again costs a minute here).
    assert "xla False" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["precision"] == "mixed_float16"
    model = keras.models.load_model(out / "model.keras", compile=False)
    assert model.get_layer("enc1_bn").compute_dtype == "float16"
    assert model.get_layer("mask").compute_dtype == "float32"
    rows = _history(out)
    assert [r["epoch"] for r in rows] == ["1"]
    assert all(np.isfinite(float(r[k])) for r in rows for k in ("loss", "val_loss"))


@pytest.fixture(scope="session")
def one_epoch(tiny_data, tmp_path_factory):
    """A finished 1-epoch float32 run, trained once by whichever pytest-xdist worker comes first; each resume
    test works on its own copy."""
    out = _shared(tmp_path_factory, "one-epoch")
    with FileLock(f"{out}.lock"):
        if not (out / "model.keras").exists():
            assert train.main(_args(tiny_data, out) + ["-e", "1"]) == 0
    return out


def _copy(run, tmp_path):
    return Path(shutil.copytree(run, tmp_path / "run"))


def _args(tiny_data, out):
    """A constant rate (plateau), so that a resume may extend the run; cosine and poly fix the epoch count.
    --ema 0.5: the weights' average spans half the run (3 of its 6 steps), so it differs from the trained weights."""
    return ["-d", str(tiny_data), "-o", str(out), *SMALL, "--precision", "float32", "--schedule", "plateau",
            "--ema", "0.5"]


def test_resume_continues_at_the_next_epoch_unless_stopped_early_and_refuses_changed_settings(
        tiny_data, one_epoch, tmp_path, capsys):
    out = _copy(one_epoch, tmp_path)
    args = _args(tiny_data, out)
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(args + ["-e", "2"])
    # As if it had run with --early-stopping 1 and epoch 1 had not improved: EarlyStopping's saved state.
    state = json.loads((out / "state.json").read_text())
    state["callbacks"]["early_stopping"] = {"wait": 1, "best": state["best"], "stopped_epoch": 0}
    (out / "state.json").write_text(json.dumps(state))
    assert train.main(args + ["-e", "3", "--resume", "--early-stopping", "1"]) == 0
    assert "stopped early after epoch 1" in capsys.readouterr().out
    assert len(_history(out)) == 1
    assert train.main(args + ["-e", "2", "--resume", "--early-stopping", "2"]) == 0  # more patience: trains on
    assert "resuming" in capsys.readouterr().out
    assert [r["epoch"] for r in _history(out)] == ["1", "2"]
    assert [p.name for p in (out / "checkpoint").iterdir()] == ["epoch-0002.keras"]
    with pytest.raises(SystemExit, match="base_filters"):
        train.main(args + ["-e", "3", "--resume", "-f", "8"])
    # The checkpoint keeps its loss, learning rate and precision: a resume may not claim to have changed them.
    for flag, key in ((["--loss", "dice"], "loss"), (["--lr", "5e-3"], "effective_lr"),
                      (["--precision", "mixed_bfloat16"], "precision"),
                      (["--class-names", "bg,a,b,c,d,e"], "class_names"), (["--norm", "zscore"], "preprocessing"),
                      (["--ema", "0"], "ema"), (["--norm-layer", "instance"], "norm_layer")):
        with pytest.raises(SystemExit, match=key):
            train.main(args + ["-e", "3", "--resume", *flag])


def test_resume_compares_the_effective_learning_rate(tiny_data, one_epoch, tmp_path):
    """A run made on 2 replicas (batch 4 each, lr 1e-3 each: global batch 8, rate 2e-3) resumed on 1 replica with
    --batch-size 8 keeps the global batch, but the optimizer would run at the default of a run this short, 3e-3:
    refused."""
    out = _copy(one_epoch, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(replicas=2, batch_size=4, global_batch_size=8, effective_lr=2e-3)  # as a 2-replica run writes it
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match=r"effective_lr=0\.002 but this run has 0\.003"):
        train.main(_args(tiny_data, out) + ["-e", "2", "--resume", "--batch-size", "8"])


def test_the_default_rate_is_higher_for_short_runs(one_epoch):
    assert train.default_lr(300) == pytest.approx(3e-3) and train.default_lr(301) == pytest.approx(1.5e-3)
    assert train.default_lr(1250) == pytest.approx(1.5e-3)  # the demo: 10 epochs of 125 steps
    assert train.peak_lr(train.parse_args(["-e", "3"]), 100) == pytest.approx(3e-3)  # 300 steps
    assert train.peak_lr(train.parse_args(["-e", "3"]), 101) == pytest.approx(1.5e-3)
    assert train.peak_lr(train.parse_args(["-e", "3", "--lr", "5e-4"]), 100) == pytest.approx(5e-4)  # --lr wins
    cfg = json.loads((one_epoch / "config.json").read_text())  # one epoch on the tiny data: a few steps
    assert cfg["lr"] == pytest.approx(3e-3) and cfg["effective_lr"] == pytest.approx(3e-3)


def _averaged(run):
    """The last checkpoint's weights with its optimizer's moving averages put in (the --ema weights)."""
    state = json.loads((run / "state.json").read_text())
    model = keras.models.load_model(run / state["checkpoint"])
    model.optimizer.finalize_variable_values(model.trainable_variables)
    return model.get_weights()


def test_best_model_holds_the_averaged_weights_and_the_checkpoint_the_trained_ones(one_epoch):
    """--ema validates the averaged weights, so model.keras holds them; the checkpoint keeps the trained weights
    and the averages apart (a resume goes on from exactly where training was)."""
    best, averaged, trained = (keras.models.load_model(one_epoch / "model.keras").get_weights(),
                               _averaged(one_epoch), _final_weights(one_epoch))
    assert len(best) == len(averaged) == len(trained) > 0
    for a, b in zip(best, averaged):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(best, trained))


def test_resume_writes_the_best_model_a_kill_cut_off(tiny_data, one_epoch, tmp_path):
    # state.json commits an epoch before the best model is written; a kill between the two loses model.keras.
    out = _copy(one_epoch, tmp_path)
    (out / "model.keras").unlink()
    assert train.main(_args(tiny_data, out) + ["-e", "1", "--resume"]) == 0  # nothing to train; the model comes back
    state = json.loads((out / "state.json").read_text())
    written, averaged = keras.models.load_model(out / "model.keras").get_weights(), _averaged(out)
    assert len(written) == len(averaged) > 0
    for a, b in zip(written, averaged):
        np.testing.assert_array_equal(a, b)
    assert state["best_epoch"] == 1


def test_bad_size_is_refused_before_loading(tmp_path, capsys):
    for size in ("250x128", "256", "big"):
        with pytest.raises(SystemExit) as e:
            train.main(["-d", str(tmp_path / "nowhere"), "-o", str(tmp_path / "r"), "--size", size])
        assert e.value.code == 2
        assert f"--size {size!r}: expected ROWSxCOLS with both divisible by 16" in capsys.readouterr().err


def _train_cmd(data, out, epochs):
    return [sys.executable, str(ROOT / "train.py"), "-d", str(data), "-o", str(out), "-e", str(epochs), *SMALL,
            "--deterministic"]


def _final_weights(run):
    state = json.loads((run / "state.json").read_text())
    return keras.models.load_model(run / state["checkpoint"]).get_weights()


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_data, tmp_path):
    """Also proves that --deterministic runs agree to the bit: the resumed run must equal the uninterrupted one."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    procs = [subprocess.Popen(_train_cmd(tiny_data, out, 2), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for out in (full, killed)]  # side by side: half the wait
    try:
        deadline = time.time() + 240
        while not (killed / "state.json").exists() and time.time() < deadline and procs[1].poll() is None:
            time.sleep(0.02)
        assert procs[1].poll() is None, "training ended before it could be killed"
        os.kill(procs[1].pid, signal.SIGKILL)  # during epoch 2
        procs[1].wait(30)
        assert procs[0].wait(240) == 0, procs[0].stderr.read()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    state = json.loads((killed / "state.json").read_text())
    assert state["epoch"] == 0, "the kill was meant to land in epoch 2"

    subprocess.run(_train_cmd(tiny_data, killed, 2) + ["--resume"], check=True, env=env, timeout=300,
                   capture_output=True)
    drop = ("seconds",)
    strip = [{k: v for k, v in r.items() if k not in drop} for r in _history(killed)]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in _history(full)]
    resumed, uninterrupted = _final_weights(killed), _final_weights(full)
    assert len(resumed) == len(uninterrupted) > 0
    for a, b in zip(resumed, uninterrupted):
        np.testing.assert_array_equal(a, b)


def test_bad_data_gives_a_message_not_a_traceback(tmp_path, capsys):
    assert train.main(["-d", str(tmp_path / "nowhere"), "-o", str(tmp_path / "r"), "-q"]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err


def test_labels_no_training_mask_holds_are_named(tiny_data, tmp_path, capsys):
    """A label set that does not match the masks (e.g. prostate-only masks with the six HipMRI names) is said,
    not trained in silence: a warning for named labels no training mask holds, an error when none is held."""
    names = ["background", "body", "bone", "bladder", "rectum", "prostate", "urethra"]
    data = argparse.Namespace(label_counts=np.array([[90, 10, 0, 0, 0, 0, 0], [80, 15, 5, 0, 0, 0, 0]]))
    args = argparse.Namespace(class_names=names, target_ids=None)
    train.check_labels(data, args, "DATA")
    err = capsys.readouterr().err
    assert "no training mask holds label 3 (bladder), 4 (rectum), 5 (prostate), 6 (urethra) of the 7" in err
    train.check_labels(data, argparse.Namespace(class_names=names, target_ids=(1, 2)), "DATA")
    assert capsys.readouterr().err == ""  # every target is there; the labels not asked for do not matter
    data.label_counts[:, 1:] = 0
    with pytest.raises(train.DataError, match="no training mask holds any label but 0"):
        train.check_labels(data, args, "DATA")
    # Through train.main, on real files: a target the masks never hold stops the run before the model is built.
    out = tmp_path / "r"
    code = train.main(["-d", str(tiny_data), "-o", str(out), *SMALL, "--class-names", ",".join(names),
                       "--target", "urethra"])
    assert code == 2 and not out.exists()
    assert "no training mask holds the target (6 (urethra))" in capsys.readouterr().err


def _rates(args, steps, steps_per_epoch=5, lr=1e-3):
    """The optimizer's learning rate at each of these steps (its step counter set to each in turn)."""
    optimizer = train.make_optimizer(args, lr, steps_per_epoch)
    rates = []
    for step in steps:
        optimizer.iterations.assign(step)
        rates.append(float(keras.ops.convert_to_numpy(optimizer.learning_rate)))
    return rates


def _schedule(schedule, warmup=2.0, epochs=10, ema=0.0, optimizer="adam"):
    return argparse.Namespace(schedule=schedule, epochs=epochs, warmup=warmup, ema=ema, optimizer=optimizer)


# 10 epochs of 5 steps: 50 steps; --warmup 2: the first 10 climb to the peak, 1e-3, and the last 40 decay.
STEPS = [0, 5, 9, 10, 20, 30, 49]
HAND = {  # cosine (Keras' CosineDecay): step/10 of the peak while warming, then (1 + cos(pi (step - 10) / 40)) / 2
    "cosine": [0.0, 5e-4, 9e-4, 1e-3, 1e-3 * (1 + np.cos(np.pi / 4)) / 2, 5e-4,
               1e-3 * (1 + np.cos(np.pi * 39 / 40)) / 2],
    # poly (WarmupPoly): (step + 1)/10 of the peak while warming, then (1 - (step - 10) / 40) ** 0.9
    "poly": [1e-4, 6e-4, 1e-3, 1e-3, 1e-3 * 0.75 ** 0.9, 1e-3 * 0.5 ** 0.9, 1e-3 * (1 / 40) ** 0.9]}


@pytest.mark.parametrize("schedule", ["cosine", "poly"])
def test_learning_rate_schedules_at_hand_computed_steps(schedule):
    np.testing.assert_allclose(_rates(_schedule(schedule), STEPS), HAND[schedule], rtol=1e-5, atol=1e-10)
    # --warmup 0: the decay starts at the peak from the first step and spans all 50.
    no_warmup = {"cosine": [1e-3, 1e-3 * (1 + np.cos(np.pi * 10 / 50)) / 2, 5e-4],
                 "poly": [1e-3, 1e-3 * 0.8 ** 0.9, 1e-3 * 0.5 ** 0.9]}[schedule]
    np.testing.assert_allclose(_rates(_schedule(schedule, warmup=0), [0, 10, 25]), no_warmup, rtol=1e-5)
    # The same schedule whatever the optimizer.
    for optimizer in ("adamw", "sgd"):
        np.testing.assert_allclose(_rates(_schedule(schedule, optimizer=optimizer), STEPS), HAND[schedule],
                                   rtol=1e-5, atol=1e-10)


def test_plateau_rate_is_constant_and_ema_spans_its_share_of_the_run():
    assert _rates(_schedule("plateau"), STEPS) == pytest.approx([1e-3] * len(STEPS), rel=1e-6)
    adam = train.make_optimizer(_schedule("plateau", ema=0.1), 1e-3, 5)
    # --ema 0.1 of 50 steps: an average over about 5 steps, momentum 1 - 1/5.
    assert isinstance(adam, keras.optimizers.Adam) and adam.use_ema and adam.ema_momentum == pytest.approx(0.8)
    assert not train.make_optimizer(_schedule("plateau", ema=0.0), 1e-3, 5).use_ema
    sgd = train.make_optimizer(_schedule("cosine", optimizer="sgd"), 1e-3, 5)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == pytest.approx(0.99) and sgd.nesterov
    adamw = train.make_optimizer(_schedule("cosine", optimizer="adamw"), 1e-3, 5)
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == pytest.approx(1e-4)


@pytest.mark.parametrize("flags,flag", [
    (["--epochs", "0"], "--epochs"), (["--batch-size", "0"], "--batch-size"), (["--ema", "-0.1"], "--ema"),
    (["--ema", "1"], "--ema"), (["--warmup", "11", "--epochs", "10"], "--warmup"),
    (["--max-bad-fraction", "2"], "--max-bad-fraction"), (["--max-bad-fraction", "-0.1"], "--max-bad-fraction"),
    (["--lr", "0"], "--lr"), (["--base-filters", "0"], "--base-filters"), (["--patience", "-1"], "--patience")])
def test_flags_out_of_range_are_refused_naming_the_flag(flags, flag, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(flags)
    assert e.value.code == 2  # argparse's error exit, with the usage line
    err = capsys.readouterr().err
    # The message is about that flag (not another check that happens to mention it, as --warmup's names --epochs).
    assert re.search(rf"error: (argument (-\w/)?)?{re.escape(flag)}\b", err), err


def test_help_lists_every_flag_with_its_text(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    # The augmentation text holds percent signs, which argparse would take for a format (a crash on --help).
    assert "--augment" in out and "shifts up to 10% of the size" in out and "--resume" in out


def test_time_left_is_the_median_epoch_pace_times_the_epochs_to_run():
    history = [{"seconds": 60.0}, {"seconds": 120.0}, {"seconds": 90.0}]
    assert train.time_left(history, 10) == ", about 10 min of training left"  # 7 x 90 s
    assert train.time_left(history[:1], 1) == "" and train.time_left(history, 3) == ""
    assert train.time_left([{"seconds": 20.0}], 2) == ", under a minute of training left"
    assert train.time_left(history, 10, 150.0) == ", about 10 min of training left (then about 2 min to predict " \
        "the test split)"
    assert train.time_left(history, 10, 20.0).endswith("(then under 2 min to predict the test split)")


def test_the_test_split_costs_its_share_of_validation_passes(tmp_path):
    state = train.RunState(tmp_path, {}, None, ["a"], test_share=2.0)  # twice as many test as validation slices
    assert state.scoring_seconds() == 0.0  # no validation pass timed yet: no estimate
    for _ in range(3):
        state.on_test_begin()
        state.on_test_end()
    assert len(state.val_seconds) == 3 and state.scoring_seconds() == 2.0 * float(np.median(state.val_seconds))
