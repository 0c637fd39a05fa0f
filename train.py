"""Train the U-Net on HipMRI-layout NIfTI slices (the demo phantom when no data is given).

    python train.py                                   # demo phantom, the README's result
    python train.py --data-dir /data/HipMRI_Study_open --epochs 40 --base-filters 32 --out runs/real
    python train.py --target prostate                 # binary prostate model
    python train.py --out runs/demo --resume          # continue an interrupted run

The run folder holds model.keras (best by validation mean foreground Dice), checkpoint/ (the last
epoch with optimizer state, for --resume), history.csv, config.json and the training plots.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import config  # noqa: E402
import dataset  # noqa: E402
import figures  # noqa: E402
import modules  # noqa: E402
import pipeline  # noqa: E402
import synthetic  # noqa: E402
from atomic_io import atomic_write_bytes, atomic_write_json  # noqa: E402
from distribute import build_from_one_batch, chief_dir, make_strategy  # noqa: E402
from preprocess import FITS, NORMS, DataError, Preprocessing, parse_target  # noqa: E402

# The peak rate when --lr is not given (issue 22, decided on validation, benchmarks/README.md): 1.5e-3 won at
# 340-390 steps on BraTS and on the demo (1250), but leaves shorter runs under-trained, where 3e-3 led on both
# real data sets (BraTS at 174, 255 and 291 steps, MNI at 175 and 204).
LR, SHORT_RUN_LR, SHORT_RUN_STEPS = 1.5e-3, 3e-3, 300
MONITOR = "val_dice"  # mean foreground Dice on the validation split
DEFAULT_DATA = Path("data")
DEMO_PHANTOM = DEFAULT_DATA / "phantom-demo"


def parse_args(argv=None):
    """Command-line flags; every default reproduces the README's demo result."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-d", "--data-dir", default=None,
                   help="HipMRI folder (or its parent); default: data/ if it holds the layout, "
                        "else the demo phantom in data/phantom-demo (generated on first use)")
    p.add_argument("-o", "--out", default="runs/demo", help="run folder")
    p.add_argument("-e", "--epochs", type=int, default=10, help="total epochs (a resumed run continues to this)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="batch size per replica")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate for one replica (default: {SHORT_RUN_LR:g} for runs of at most "
                        f"{SHORT_RUN_STEPS} optimiser steps, else {LR:g})")
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default="adam",
                   help="adam; adamw (weight decay 1e-4); sgd (Nesterov momentum 0.99, as nnU-Net)")
    p.add_argument("--schedule", choices=["plateau", "cosine", "poly"], default="cosine",
                   help="plateau: constant, halved after --patience epochs without a better val_dice; cosine or "
                        "poly (power 0.9): decay to 0 over the run, after --warmup epochs of linear warm-up")
    p.add_argument("--warmup", type=float, default=1, help="epochs of linear warm-up for cosine and poly")
    p.add_argument("--ema", type=float, default=0.1,
                   help="validate and keep a moving average of the weights over about this share of the run's "
                        "steps (0: off)")
    p.add_argument("-f", "--base-filters", type=int, default=16, help="filters of the first level (64 = classic U-Net)")
    p.add_argument("--norm-layer", choices=modules.NORM_LAYERS, default="batch",
                   help="normalisation after each block's convolutions: batch (the design's) or instance")
    p.add_argument("-t", "--target", default="all",
                   help="'all' for every label (softmax) or labels for a binary target, e.g. 'prostate'")
    p.add_argument("--class-names", default=",".join(dataset.CLASS_NAMES),
                   help="comma-separated names of the mask labels 0..N-1")
    p.add_argument("--num-classes", type=int, default=None, help="labels in the masks (default: len(class names))")
    p.add_argument("--size", default="256x128", help="network input ROWSxCOLS; both divisible by 16")
    p.add_argument("--norm", choices=list(NORMS), default="percentile", help="per-image intensity scaling")
    p.add_argument("--fit", choices=list(FITS), default="resize",
                   help="how a slice meets the network size: resize (squash) or crop (centre pad or crop; "
                        "prediction then covers larger slices with overlapping tiles)")
    p.add_argument("--loss", choices=modules.LOSSES, default="dice_ce", help="training loss (on logits)")
    p.add_argument("--dice-over", choices=["image", "batch"], default="image",
                   help="the Dice term per image, or pooled over the batch (nnU-Net's 2D setting)")
    p.add_argument("--augment", choices=list(pipeline.AUGMENTATIONS), default="basic",
                   help="paired augmentation of training batches: " + "; ".join(
                       f"{k}: {v}" for k, v in pipeline.AUGMENTATIONS.items()).replace("%", "%%"))
    p.add_argument("--seed", type=int, default=42, help="seed for Python, NumPy, TensorFlow and the data order")
    p.add_argument("--deterministic", action="store_true",
                   help="TensorFlow op determinism: identical runs on the CPU (slower)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--precision", choices=["auto", "float32", "mixed_bfloat16", "mixed_float16"], default="auto",
                   help="auto: mixed_float16 on GPU, mixed_bfloat16 on a CPU with bf16 support, else float32")
    p.add_argument("--jit", choices=["auto", "on", "off"], default="auto", help="XLA compilation (auto: GPU only)")
    p.add_argument("--patience", type=int, default=4, help="epochs without improvement before halving the lr")
    p.add_argument("--early-stopping", type=int, default=0, help="stop after N epochs without improvement (0: off)")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help="write TensorBoard logs to RUN/logs (tensorboard --logdir RUN/logs)")
    p.add_argument("--strategy", choices=["auto", "none", "mirrored", "multiworker"], default="auto",
                   help="tf.distribute strategy (auto: mirrored over all GPUs when there are several)")
    p.add_argument("--cpu-replicas", type=int, default=0,
                   help="split the CPU into N logical devices for --strategy mirrored (testing without GPUs)")
    p.add_argument("--cache-dir", default=None, help="decoded-data cache (default $HIPMRI_CACHE or ~/.cache/hipmri-unet)")
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable pairs, reporting each")
    p.add_argument("--max-bad-fraction", type=float, default=0.05, help="with --skip-bad, refuse above this share")
    p.add_argument("--strict", action="store_true", help="refuse data whose splits share a case (default: warn)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    checks = [(args.epochs >= 1, f"--epochs {args.epochs}: expected 1 or more"),
              (args.batch_size >= 1, f"--batch-size {args.batch_size}: expected 1 or more"),
              (args.lr is None or (args.lr > 0 and np.isfinite(args.lr)),
               f"--lr {args.lr}: expected a positive number"),
              (0 <= args.ema < 1, f"--ema {args.ema:g}: expected a share of the run in [0, 1) (0: no average)"),
              (args.warmup >= 0, f"--warmup {args.warmup:g}: expected 0 or more epochs"),
              (args.schedule == "plateau" or args.warmup <= args.epochs,
               f"--warmup {args.warmup:g}: longer than the run (--epochs {args.epochs}); the rate would never "
               "reach its peak"),
              (args.base_filters >= 1, f"--base-filters {args.base_filters}: expected 1 or more"),
              (args.patience >= 0, f"--patience {args.patience}: expected 0 or more"),
              (args.early_stopping >= 0, f"--early-stopping {args.early_stopping}: expected 0 or more"),
              (0 <= args.max_bad_fraction <= 1, f"--max-bad-fraction {args.max_bad_fraction:g}: expected a share "
               "between 0 and 1"),
              (args.cpu_replicas >= 0, f"--cpu-replicas {args.cpu_replicas}: expected 0 or more")]
    for ok, message in checks:
        if not ok:
            p.error(message)
    args.class_names = [c.strip() for c in args.class_names.split(",")]
    args.num_classes = args.num_classes or len(args.class_names)
    if args.num_classes < 2 or len(set(args.class_names)) != len(args.class_names):
        p.error(f"--class-names {args.class_names}: expected two or more distinct names, background first")
    if args.num_classes != len(args.class_names):
        p.error(f"--num-classes {args.num_classes} but {len(args.class_names)} --class-names")
    size = args.size
    try:
        args.size = tuple(int(s) for s in size.lower().split("x"))
    except ValueError:
        args.size = ()
    if len(args.size) != 2 or any(s <= 0 or s % 16 for s in args.size):  # 4 poolings halve each side 4 times
        p.error(f"--size {size!r}: expected ROWSxCOLS with both divisible by 16, e.g. 256x128")
    try:
        args.target_ids = parse_target(args.target, args.class_names)
    except ValueError as e:
        p.error(str(e))
    return args


def choose_precision(requested: str) -> str:
    """The mixed-precision policy for this machine."""
    if requested != "auto":
        return requested
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return "mixed_bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def default_lr(steps: int) -> float:
    """The peak rate of a run of this many optimiser steps when --lr is not given."""
    return SHORT_RUN_LR if steps <= SHORT_RUN_STEPS else LR


def peak_lr(args, steps_per_epoch: int) -> float:
    """--lr if given, else the default rate for --epochs of this many steps."""
    return default_lr(args.epochs * steps_per_epoch) if args.lr is None else args.lr


def make_optimizer(args, lr: float, steps_per_epoch: int):
    """The optimizer at the effective rate, with the learning-rate schedule of --schedule and --warmup."""
    if args.schedule != "plateau":
        total, warmup = args.epochs * steps_per_epoch, round(args.warmup * steps_per_epoch)
        if args.schedule == "cosine":
            lr = keras.optimizers.schedules.CosineDecay(0.0 if warmup else lr, max(1, total - warmup),
                                                        warmup_target=lr if warmup else None, warmup_steps=warmup)
        else:
            lr = WarmupPoly(lr, total, warmup)
    # --ema 0.1 averages over about the last tenth of the steps, whatever the data set's size.
    ema = dict(use_ema=True, ema_momentum=1.0 - 1.0 / max(1.0, args.ema * args.epochs * steps_per_epoch)) \
        if args.ema else {}
    if args.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.99, nesterov=True, **ema)
    if args.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=1e-4, **ema)
    return keras.optimizers.Adam(lr, **ema)


@keras.saving.register_keras_serializable(modules.PACKAGE)
class WarmupPoly(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, then nnU-Net's polynomial decay, peak * (1 - t)^0.9, to 0 at the last step."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0):
        self.peak, self.total_steps, self.warmup_steps = peak, total_steps, warmup_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warm = self.peak * (step + 1) / max(1, self.warmup_steps)
        t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        decay = self.peak * keras.ops.power(keras.ops.maximum(1.0 - t, 0.0), 0.9)
        return keras.ops.where(step < self.warmup_steps, warm, decay)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}


def default_data(progress: bool = True) -> Path:
    """data/ if it holds the HipMRI layout, else the demo phantom in data/phantom-demo (written on first use)."""
    try:
        return dataset.find_data_root(DEFAULT_DATA)
    except DataError:
        pass
    if not (DEMO_PHANTOM / synthetic.MARKER).exists():
        print(f"no --data-dir and no HipMRI data in {DEFAULT_DATA}/: writing the synthetic demo phantom to "
              f"{DEMO_PHANTOM}/ (once; about a minute)", flush=True)
    synthetic.generate(DEMO_PHANTOM, "demo", seed=42, progress=progress)
    return DEMO_PHANTOM


def check_labels(train_data, args, data_dir) -> None:
    """Refuse training masks without any label to learn; warn of named labels that none of them holds."""
    absent = dataset.absent_labels(train_data, args.class_names, args.target_ids)
    if len(absent) == len(args.target_ids or args.class_names[1:]):
        raise DataError(f"{data_dir}: no training mask holds {'the target' if args.target_ids else 'any label but 0'} "
                        f"({', '.join(absent)}); expected masks with the labels of --class-names {args.class_names}")
    if absent:
        print(f"warning: {data_dir}: no training mask holds label {', '.join(absent)} of the {len(args.class_names)} "
              "that --class-names names: the model cannot learn them and scores them nowhere. If the masks have "
              "other labels, say which with --class-names (background first)", file=sys.stderr)


def run_config(args, prep, precision, strategy, train, val) -> dict:
    """config.json's content: every flag, the preprocessing, the data and what the run ran on."""
    return config.build(
        vars(args), prep, target_ids=args.target_ids, replicas=strategy.num_replicas_in_sync, precision=precision,
        data={"train": {"pairs": len(train), "fingerprint": train.fingerprint},
              "validate": {"pairs": len(val), "fingerprint": val.fingerprint}},
        geometry=dataset.geometry_summary(train.geometry, train.orig_shapes),
        versions={"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
                  "numpy": np.__version__},
        devices=[d.name for d in tf.config.list_logical_devices()])


class RunState(keras.callbacks.Callback):
    """Per epoch: keep the best model, a resumable checkpoint and history.csv, all atomically; plots at the end.

    state.json is the commit point: it names the checkpoint of the last finished epoch and holds the
    history and the states of the other callbacks, so a kill at any moment resumes exactly. The best model
    is written after it (a resume finishes that write if a kill cut it off: see train()).
    """

    def __init__(self, out: Path, stateful_callbacks: dict, state: dict | None, summary_names: list,
                 test_share: float = 0.0):
        super().__init__()
        self.out, self.others, self.summary_names = out, stateful_callbacks, summary_names
        self.state = state or {"epoch": -1, "best": -np.inf, "best_epoch": -1, "history": [], "callbacks": {}}
        self.epoch_start, self.epoch_lr = 0.0, 0.0
        # Test slices per validation slice: scoring the test split afterwards costs about that many passes.
        self.test_share, self.val_start, self.val_seconds = test_share, 0.0, []

    def on_train_begin(self, logs=None):
        # Keras callbacks reset themselves here; put back what the interrupted run had reached.
        for name, cb in self.others.items():
            for k, v in self.state["callbacks"].get(name, {}).items():
                setattr(cb, k, v)

    def on_train_end(self, logs=None):
        # Once per run, not per epoch (a second or so each on 2 cores); TensorBoard shows a run as it goes.
        if self.state["history"]:
            figures.save_training_plots(self.state["history"], self.out)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()
        self.epoch_lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_test_begin(self, logs=None):  # fit's validation pass
        self.val_start = time.perf_counter()

    def on_test_end(self, logs=None):
        self.val_seconds.append(time.perf_counter() - self.val_start)

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()},
               "learning_rate": self.epoch_lr,  # the rate this epoch ran with
               "seconds": round(time.perf_counter() - self.epoch_start, 1)}
        st = self.state
        st["history"].append(row)
        improved = row[MONITOR] > st["best"]
        if improved:
            st["best"], st["best_epoch"] = row[MONITOR], epoch + 1
        old = self.out / "checkpoint" / f"epoch-{st['epoch'] + 1:04d}.keras"
        st["epoch"] = epoch
        st["checkpoint"] = f"checkpoint/epoch-{epoch + 1:04d}.keras"
        modules.save_model(self.model, self.out / st["checkpoint"])  # weights and optimizer state
        st["callbacks"] = {name: {k: _plain(getattr(cb, k)) for k in ("wait", "best", "cooldown_counter",
                                                                      "stopped_epoch") if hasattr(cb, k)}
                           for name, cb in self.others.items()}
        atomic_write_json(self.out / "state.json", st)  # commit point
        if improved:
            save_best(self.model, self.out / "model.keras")
        if old.exists():
            old.unlink()
        write_history_csv(self.out / "history.csv", st["history"])
        per_class = " ".join(f"{n} {row.get('val_dice_' + n, float('nan')):.3f}" for n in self.summary_names)
        print(f"epoch {epoch + 1}/{self.params['epochs']} loss {row['loss']:.4f} val_loss {row['val_loss']:.4f} "
              f"val_dice {row[MONITOR]:.4f} | {per_class} | lr {row['learning_rate']:.2e} {row['seconds']:.0f}s"
              f"{time_left(st['history'], self.params['epochs'], self.scoring_seconds())}", flush=True)

    def scoring_seconds(self) -> float:
        """About how long predict.py will take on the test split: validation passes at their median pace."""
        return float(np.median(self.val_seconds)) * self.test_share if self.val_seconds else 0.0


def time_left(history: list, epochs: int, scoring_seconds: float = 0.0) -> str:
    """', about N min left' for the epochs still to run, at the median pace of the epochs run so far, and the
    scoring of the test split that `make demo` runs next."""
    left = epochs - len(history)
    if left <= 0 or not history:
        return ""
    minutes = left * float(np.median([r["seconds"] for r in history])) / 60
    text = f", about {minutes:.0f} min of training left" if minutes >= 1 else ", under a minute of training left"
    if scoring_seconds:
        then = f"about {scoring_seconds / 60:.0f} min" if scoring_seconds >= 90 else "under 2 min"
        text += f" (then {then} to predict the test split)"
    return text


def save_best(model, path: Path) -> None:
    """model.keras: the model as validated, i.e. with the weights' moving average under --ema."""
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    if not optimizer.use_ema:
        modules.save_model(modules.with_probabilities(model), path)
        return
    weights = model.trainable_variables
    trained = [keras.ops.convert_to_numpy(w) for w in weights]
    optimizer.finalize_variable_values(weights)  # the averages into the model, as SwapEMAWeights validates
    modules.save_model(modules.with_probabilities(model), path)
    for w, t in zip(weights, trained):  # training goes on from the trained weights
        w.assign(t)


def early_stopped(state: dict, patience: int) -> bool:
    """Whether the saved run had reached --early-stopping's patience (EarlyStopping's restored `wait`)."""
    return bool(patience) and state["callbacks"].get("early_stopping", {}).get("wait", 0) >= patience


def _plain(v):
    """JSON-safe copy of a callback attribute."""
    return None if v is None else float(v) if isinstance(v, (float, np.floating)) else v


def write_history_csv(path: Path, history: list) -> None:
    """history.csv from the in-memory history (rewritten whole: no duplicate rows after a resume)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, buf.getvalue().encode())


def load_state(out: Path, cfg: dict):
    """The interrupted run's state and model, after checking it was the same experiment."""
    state_path = out / "state.json"
    if not state_path.exists():
        print(f"--resume: no checkpoint in {out}; starting a new run")
        return None, None
    conflict = config.resume_conflict(json.loads((out / config.NAME).read_text()), cfg)
    if conflict:
        key, was, now = conflict
        raise SystemExit(f"error: --resume: {out}/{config.NAME} has {key}={was!r} but this run has {now!r}; "
                         "resume with the same settings or use another --out")
    state = json.loads(state_path.read_text())
    model = keras.models.load_model(out / state["checkpoint"])
    if model.layers[-1].name != "logits" or not isinstance(state["callbacks"], dict):
        raise SystemExit(f"error: --resume: {out} was written by an earlier version of train.py (a model with "
                         "probabilities as its output); start a new run with another --out")
    print(f"resuming {out} after epoch {state['epoch'] + 1} (best {MONITOR} {state['best']:.4f} "
          f"at epoch {state['best_epoch']})")
    return state, model


def train(args) -> dict:
    """Fit the U-Net as the flags say; returns the final state."""
    keras.utils.set_random_seed(args.seed)  # Python, NumPy and TensorFlow
    if args.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy, is_chief = make_strategy(args.strategy, args.cpu_replicas)
    precision = choose_precision(args.precision)
    keras.mixed_precision.set_global_policy(precision)
    out = chief_dir(Path(args.out), is_chief)

    data_dir = dataset.find_data_root(args.data_dir) if args.data_dir else default_data(not args.quiet)
    for message in dataset.check_disjoint_cases(data_dir, args.strict):
        print(f"warning: {message}", file=sys.stderr)
    # The network's pixel spacing comes from the training slices' headers, before any slice is loaded through it.
    spacing = config.network_spacing(dataset.header_geometry(data_dir, "train", args.cache_dir), args.fit, args.size)
    prep = Preprocessing(args.size, args.norm, args.num_classes, args.fit, spacing)
    load = dict(prep=prep, cache_dir=args.cache_dir, progress=not args.quiet, skip_bad=args.skip_bad,
                max_bad_fraction=args.max_bad_fraction)
    train_data = dataset.load_split(data_dir, "train", **load)
    check_labels(train_data, args, data_dir)
    val_data = dataset.load_split(data_dir, "validate", **load)
    args.data_dir = str(data_dir.resolve())  # predict.py may run from another folder
    steps_per_epoch = -(-len(train_data) // (args.batch_size * strategy.num_replicas_in_sync))  # global batches
    args.lr = peak_lr(args, steps_per_epoch)
    cfg = run_config(args, prep, precision, strategy, train_data, val_data)

    names = cfg["channel_names"]
    channels = 1 if args.target_ids else args.num_classes
    jit = args.jit == "on" or (args.jit == "auto" and bool(tf.config.list_physical_devices("GPU")))
    with strategy.scope():  # every worker reads the chief's checkpoint; only the chief writes
        state, model = load_state(Path(args.out), cfg) if args.resume else (None, None)
        if state is None and any((Path(args.out) / f).exists() for f in ("model.keras", "state.json")):
            raise SystemExit(f"error: {args.out} already holds a run; use --resume to continue it or another --out")
        if model is None:
            model = modules.build_unet((*args.size, 1), channels, args.base_filters,
                                       sync_bn=strategy.num_replicas_in_sync > 1, norm=args.norm_layer)
            model.compile(make_optimizer(args, cfg["effective_lr"], steps_per_epoch),
                          modules.SegmentationLoss(args.loss, args.dice_over),
                          metrics=modules.segmentation_metrics(names), jit_compile=jit)
            # The optimizer's variables made now, not in fit's first step: Keras then traces the step once, not
            # twice (~5 s less before the first batch here, at any model size).
            model.optimizer.build(model.trainable_variables)
        model.jit_compile = jit  # a checkpoint brings back its own run's setting; this run's --jit decides
    out.mkdir(parents=True, exist_ok=True)
    config.write(out, cfg)
    if state and state["best_epoch"] == state["epoch"] + 1:
        # The last finished epoch was the best, and a kill may have come between state.json and model.keras:
        # the checkpoint just loaded is that model, so write it again.
        save_best(model, out / "model.keras")
    initial_epoch = state["epoch"] + 1 if state else 0
    gbs = cfg["global_batch_size"]
    print(f"{len(train_data)} train / {len(val_data)} validation slices from {data_dir}; "
          f"{model.count_params():,} parameters; {precision}; xla {model.jit_compile}; {strategy.num_replicas_in_sync} replica(s), "
          f"global batch {gbs}, lr {cfg['effective_lr']:g} (= {args.lr:g} x replicas)", flush=True)
    if initial_epoch >= args.epochs:
        print(f"{out} already finished {initial_epoch} epochs; nothing to do (raise --epochs to train more)")
        return state
    if state and early_stopped(state, args.early_stopping):
        print(f"{out} stopped early after epoch {initial_epoch} (no better {MONITOR} for {args.early_stopping} "
              f"epochs); nothing to do (resume with a larger --early-stopping, or 0, to train on)")
        return state

    gpus = tf.config.list_logical_devices("GPU")
    # One GPU: copy the next batch to it during the current step (tf.distribute does this itself).
    device = gpus[0].name if len(gpus) == 1 and strategy.num_replicas_in_sync == 1 else None
    augment = pipeline.augmentation(args.augment, unit_range=args.norm != "zscore")
    train_ds = pipeline.make_dataset(train_data, gbs, args.target_ids, shuffle=True, augment=augment, seed=args.seed,
                                    epochs=None, initial_epoch=initial_epoch, device=device)
    val_ds = pipeline.make_dataset(val_data, gbs, args.target_ids)
    if strategy.num_replicas_in_sync > 1:
        build_from_one_batch(model, val_ds)
    others = {}  # callbacks whose state state.json keeps, by name
    if args.schedule == "plateau":
        others["plateau"] = keras.callbacks.ReduceLROnPlateau(MONITOR, mode="max", factor=0.5, patience=args.patience,
                                                              min_lr=1e-5, verbose=1)
    if args.early_stopping:
        others["early_stopping"] = keras.callbacks.EarlyStopping(MONITOR, mode="max", patience=args.early_stopping,
                                                                 verbose=1)
    test_dir = data_dir / dataset.SPLITS["test"][0]
    test_slices = sum(1 for _ in test_dir.glob("*.nii*")) if test_dir.is_dir() else 0
    run_state = RunState(out, others, state, names[1:] if channels > 1 else names, test_slices / max(len(val_data), 1))
    # Validation (and so the best model) with the averaged weights; it keeps no state for state.json.
    swap = [keras.callbacks.SwapEMAWeights()] if args.ema else []
    logs = [keras.callbacks.TensorBoard(str(out / "logs"), write_graph=False, profile_batch=0)] if args.tensorboard else []
    start = time.perf_counter()
    model.fit(train_ds, epochs=args.epochs, initial_epoch=initial_epoch,
              steps_per_epoch=steps_per_epoch, validation_data=val_ds, shuffle=False,
              callbacks=[*others.values(), *swap, run_state, *logs], verbose=1 if sys.stdout.isatty() and not args.quiet else 0)
    st = run_state.state
    print(f"done in {time.perf_counter() - start:.0f}s: best {MONITOR} {st['best']:.4f} at epoch {st['best_epoch']}; "
          f"model in {out / 'model.keras'}")
    return st


def main(argv=None) -> int:
    args = parse_args(argv)
    policy = keras.mixed_precision.global_policy()
    try:
        train(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        keras.mixed_precision.set_global_policy(policy)  # callers in the same process (tests) keep theirs
    return 0


if __name__ == "__main__":
    sys.exit(main())
