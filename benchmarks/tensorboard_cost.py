"""What TensorBoard logging costs an epoch: the time spent inside its callback against the epoch's time.

    python benchmarks/tensorboard_cost.py [--epochs 3] [--steps 25]

Trains train.py's model (its defaults) on the demo phantom for a few short epochs with Keras' TensorBoard
callback as train.py sets it up, timing every call into the callback; prints, per epoch, the epoch's wall
time and the callback's share of it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402

import dataset  # noqa: E402
import modules  # noqa: E402
import pipeline  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402
from preprocess import Preprocessing  # noqa: E402


HOOKS = ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_train_batch_begin",
         "on_train_batch_end", "on_test_begin", "on_test_end", "on_test_batch_begin", "on_test_batch_end")
SPENT = [0.0]  # seconds inside the TensorBoard callback so far


def timed(callback):
    """The callback with each of its hooks timed into SPENT."""
    for name in HOOKS:
        def hook(*args, _original=getattr(callback, name), **kwargs):
            start = time.perf_counter()
            _original(*args, **kwargs)
            SPENT[0] += time.perf_counter() - start
        setattr(callback, name, hook)
    return callback


class EpochClock(keras.callbacks.Callback):
    """Prints each epoch's wall time and the TensorBoard callback's share of it."""

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.tb = time.perf_counter(), SPENT[0]

    def on_epoch_end(self, epoch, logs=None):
        seconds, tb = time.perf_counter() - self.start, SPENT[0] - self.tb
        print(f"epoch {epoch + 1}: {seconds:.1f} s, TensorBoard {tb * 1000:.0f} ms ({tb / seconds:.2%})", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=25, help="training steps per epoch")
    a = p.parse_args(argv)
    args = train.parse_args([])
    data_dir = ROOT / "data" / "phantom-demo"
    synthetic.generate(data_dir, "demo", seed=42, progress=False)
    prep = Preprocessing(args.size, args.norm, args.num_classes, args.fit)
    data = dataset.load_split(data_dir, "validate", prep, progress=False)  # 160 slices: training and validation
    model = modules.build_unet((*args.size, 1), args.num_classes, args.base_filters)
    lr = train.peak_lr(args, a.steps)  # the rate train.py would pick
    model.compile(train.make_optimizer(args, lr, a.steps), modules.SegmentationLoss(args.loss, args.dice_over),
                  metrics=modules.segmentation_metrics(args.class_names))
    model.optimizer.build(model.trainable_variables)
    batches = pipeline.make_dataset(data, args.batch_size, shuffle=True, epochs=None,
                                    augment=pipeline.augmentation(args.augment, args.norm != "zscore"))
    with tempfile.TemporaryDirectory() as logs:
        model.fit(batches, epochs=a.epochs, steps_per_epoch=a.steps, validation_data=pipeline.make_dataset(data, 8),
                  callbacks=[EpochClock(), timed(keras.callbacks.TensorBoard(logs, write_graph=False, profile_batch=0))],
                  shuffle=False, verbose=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
