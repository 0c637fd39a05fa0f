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

import dataset  # noqa: E402
import figures  # noqa: E402
import modules  # noqa: E402
from atomic_io import atomic_write_bytes, atomic_write_json  # noqa: E402
from distribute import build_from_one_batch, chief_dir, make_strategy  # noqa: E402

MONITOR = "val_dice"  # mean foreground Dice on the validation split


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
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate for one replica")
    p.add_argument("-f", "--base-filters", type=int, default=16, help="filters of the first level (64 = classic U-Net)")
    p.add_argument("-t", "--target", default="all",
                   help="'all' for every label (softmax) or labels for a binary target, e.g. 'prostate'")
    p.add_argument("--class-names", default=",".join(dataset.CLASS_NAMES),
                   help="comma-separated names of the mask labels 0..N-1")
    p.add_argument("--num-classes", type=int, default=None, help="labels in the masks (default: len(class names))")
    p.add_argument("--size", default="256x128", help="network input ROWSxCOLS; both divisible by 16")
    p.add_argument("--norm", choices=["minmax", "zscore"], default="minmax", help="per-image intensity scaling")
    p.add_argument("--loss", choices=sorted(modules.LOSSES), default="dice_ce", help="training loss")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="paired flips, rotation, scale, gamma and noise on training batches")
    p.add_argument("--seed", type=int, default=42, help="seed for Python, NumPy, TensorFlow and the data order")
    p.add_argument("--deterministic", action="store_true",
                   help="TensorFlow op determinism: identical runs on the CPU (slower)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--precision", choices=["auto", "float32", "mixed_bfloat16", "mixed_float16"], default="auto",
                   help="auto: mixed_float16 on GPU, mixed_bfloat16 on a CPU with bf16 support, else float32")
    p.add_argument("--jit", choices=["auto", "on", "off"], default="auto", help="XLA compilation (auto: GPU only)")
    p.add_argument("--patience", type=int, default=4, help="epochs without improvement before halving the lr")
    p.add_argument("--early-stopping", type=int, default=0, help="stop after N epochs without improvement (0: off)")
    p.add_argument("--strategy", choices=["auto", "none", "mirrored", "multiworker"], default="auto",
                   help="tf.distribute strategy (auto: mirrored over all GPUs when there are several)")
    p.add_argument("--cpu-replicas", type=int, default=0,
                   help="split the CPU into N logical devices for --strategy mirrored (testing without GPUs)")
    p.add_argument("--cache-dir", default=None, help="decoded-data cache (default $HIPMRI_CACHE or ~/.cache/hipmri-unet)")
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable pairs, reporting each")
    p.add_argument("--max-bad-fraction", type=float, default=0.05, help="with --skip-bad, refuse above this share")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    args.class_names = [c.strip() for c in args.class_names.split(",")]
    args.num_classes = args.num_classes or len(args.class_names)
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
        args.target_ids = dataset.parse_target(args.target, args.class_names)
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


def run_config(args, precision, strategy, train, val) -> dict:
    """Everything predict.py needs to rebuild the run, plus what it ran on."""
    cfg = {k: v for k, v in vars(args).items() if k not in ("target_ids", "size", "quiet")}
    replicas = strategy.num_replicas_in_sync
    cfg.update(
        input_size=list(args.size), target_ids=list(args.target_ids) if args.target_ids else None,
        channel_names=channel_names(args), precision=precision, replicas=replicas,
        global_batch_size=args.batch_size * replicas, effective_lr=args.lr * replicas,
        preprocessing={"size": list(args.size), "norm": args.norm, "num_classes": args.num_classes},
        data={"train": {"pairs": len(train), "fingerprint": train.fingerprint},
              "validate": {"pairs": len(val), "fingerprint": val.fingerprint}},
        versions={"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
                  "numpy": np.__version__},
        device=[d.name for d in tf.config.list_logical_devices()])
    return cfg


def channel_names(args) -> list:
    """Names of the model's output channels: every class, or the binary target."""
    if args.target_ids is None:
        return list(args.class_names)
    return ["+".join(args.class_names[i] for i in args.target_ids)]


class RunState(keras.callbacks.Callback):
    """Per epoch: keep the best model, a resumable checkpoint, history.csv and plots, all atomically.

    state.json is the commit point: it names the checkpoint of the last finished epoch and holds the
    history and the states of the other callbacks, so a kill at any moment resumes exactly. The best model
    is written after it (a resume finishes that write if a kill cut it off: see train()).
    """

    def __init__(self, out: Path, stateful_callbacks: list, state: dict | None, summary_names: list):
        super().__init__()
        self.out, self.others, self.summary_names = out, stateful_callbacks, summary_names
        self.state = state or {"epoch": -1, "best": -np.inf, "best_epoch": -1, "history": [], "callbacks": []}
        self.epoch_start, self.epoch_lr = 0.0, 0.0

    def on_train_begin(self, logs=None):
        # Keras callbacks reset themselves here; put back what the interrupted run had reached.
        for cb, saved in zip(self.others, self.state["callbacks"]):
            for k, v in saved.items():
                setattr(cb, k, v)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()
        self.epoch_lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

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
        st["callbacks"] = [{k: _plain(getattr(cb, k)) for k in ("wait", "best", "cooldown_counter", "stopped_epoch")
                            if hasattr(cb, k)} for cb in self.others]
        atomic_write_json(self.out / "state.json", st)  # commit point
        if improved:
            modules.save_model(self.model, self.out / "model.keras")
        if old.exists():
            old.unlink()
        write_history_csv(self.out / "history.csv", st["history"])
        figures.save_training_plots(st["history"], self.out)
        per_class = " ".join(f"{n} {row.get('val_dice_' + n, float('nan')):.3f}" for n in self.summary_names)
        print(f"epoch {epoch + 1}/{self.params['epochs']} loss {row['loss']:.4f} val_loss {row['val_loss']:.4f} "
              f"val_dice {row[MONITOR]:.4f} | {per_class} | lr {row['learning_rate']:.2e} {row['seconds']:.0f}s", flush=True)


def early_stopped(state: dict, patience: int) -> bool:
    """Whether the saved run had reached --early-stopping's patience (EarlyStopping's restored `wait`)."""
    callbacks = state["callbacks"]  # [ReduceLROnPlateau, EarlyStopping if the run used it]
    return bool(patience) and len(callbacks) > 1 and callbacks[1].get("wait", 0) >= patience


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
    saved = json.loads((out / "config.json").read_text())
    # The checkpoint keeps its own loss, learning rate and layer precision, and predict.py names the channels
    # from config.json: a resume that changed any of these would be recorded but not done.
    for key in ("target_ids", "input_size", "base_filters", "num_classes", "class_names", "norm", "data", "seed",
                "global_batch_size", "loss", "lr", "precision"):
        if saved.get(key) != cfg.get(key):
            raise SystemExit(f"error: --resume: {out}/config.json has {key}={saved.get(key)!r} but this run has "
                             f"{cfg.get(key)!r}; resume with the same settings or use another --out")
    state = json.loads(state_path.read_text())
    model = keras.models.load_model(out / state["checkpoint"])
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

    data_dir = dataset.resolve_data_dir(args.data_dir, progress=not args.quiet)
    prep = dataset.Preprocessing(args.size, args.norm, args.num_classes)
    load = dict(prep=prep, cache_dir=args.cache_dir, progress=not args.quiet, skip_bad=args.skip_bad,
                max_bad_fraction=args.max_bad_fraction)
    train_data = dataset.load_split(data_dir, "train", **load)
    val_data = dataset.load_split(data_dir, "validate", **load)
    args.data_dir = str(data_dir.resolve())  # predict.py may run from another folder
    cfg = run_config(args, precision, strategy, train_data, val_data)

    names = channel_names(args)
    channels = 1 if args.target_ids else args.num_classes
    jit = args.jit == "on" or (args.jit == "auto" and bool(tf.config.list_physical_devices("GPU")))
    with strategy.scope():  # every worker reads the chief's checkpoint; only the chief writes
        state, model = load_state(Path(args.out), cfg) if args.resume else (None, None)
        if state is None and any((Path(args.out) / f).exists() for f in ("model.keras", "state.json")):
            raise SystemExit(f"error: {args.out} already holds a run; use --resume to continue it or another --out")
        if model is None:
            model = modules.build_unet((*args.size, 1), channels, args.base_filters,
                                       sync_bn=strategy.num_replicas_in_sync > 1)
            model.compile(keras.optimizers.Adam(cfg["effective_lr"]), modules.LOSSES[args.loss],
                          metrics=modules.segmentation_metrics(channels, names), jit_compile=jit)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", cfg)
    if state and state["best_epoch"] == state["epoch"] + 1:
        # The last finished epoch was the best, and a kill may have come between state.json and model.keras:
        # the checkpoint just loaded is that model, so write it again.
        modules.save_model(model, out / "model.keras")
    initial_epoch = state["epoch"] + 1 if state else 0
    gbs = cfg["global_batch_size"]
    print(f"{len(train_data)} train / {len(val_data)} validation slices from {data_dir}; "
          f"{model.count_params():,} parameters; {precision}; xla {jit}; {strategy.num_replicas_in_sync} replica(s), "
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
    train_ds = dataset.make_dataset(train_data, gbs, args.target_ids, shuffle=True,
                                    augment=dataset.Augment(unit_range=args.norm == "minmax") if args.augment else None, seed=args.seed,
                                    epochs=None, initial_epoch=initial_epoch, device=device)
    val_ds = dataset.make_dataset(val_data, gbs, args.target_ids)
    if strategy.num_replicas_in_sync > 1:
        build_from_one_batch(model, val_ds)
    others = [keras.callbacks.ReduceLROnPlateau(MONITOR, mode="max", factor=0.5, patience=args.patience,
                                                min_lr=1e-5, verbose=1)]
    if args.early_stopping:
        others.append(keras.callbacks.EarlyStopping(MONITOR, mode="max", patience=args.early_stopping, verbose=1))
    run_state = RunState(out, others, state, names[1:] if channels > 1 else names)
    start = time.perf_counter()
    model.fit(train_ds, epochs=args.epochs, initial_epoch=initial_epoch,
              steps_per_epoch=-(-len(train_data) // gbs), validation_data=val_ds, shuffle=False,
              callbacks=[*others, run_state], verbose=1 if sys.stdout.isatty() and not args.quiet else 0)
    st = run_state.state
    print(f"done in {time.perf_counter() - start:.0f}s: best {MONITOR} {st['best']:.4f} at epoch {st['best_epoch']}; "
          f"model in {out / 'model.keras'}")
    return st


def main(argv=None) -> int:
    args = parse_args(argv)
    policy = keras.mixed_precision.global_policy()
    try:
        train(args)
    except dataset.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        keras.mixed_precision.set_global_policy(policy)  # callers in the same process (tests) keep theirs
    return 0


if __name__ == "__main__":
    sys.exit(main())
