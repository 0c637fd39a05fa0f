"""Keras peer: the plain U-Net the seed describes, with Keras defaults (batch-norm momentum 0.99, Adam).

    python benchmarks/peers/keras_seed_unet.py --data DIR --out OUT.npz --classes C --epochs E \
        --batch-size B --base-filters F --seed S [--lr 1e-3]

DIR holds train.npz, validate.npz and test.npz (`images` float32 (n, H, W) in [0, 1], `labels` uint8
(n, H, W) in 0..C-1). No augmentation, float32, sparse categorical cross-entropy; the best epoch by
validation mean foreground Dice predicts the test set. Runs in the project's own environment.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder with train/validate/test.npz")
    p.add_argument("--out", type=Path, required=True, help="result .npz")
    p.add_argument("--classes", type=int, required=True, help="number of labels, background included")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--base-filters", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--lr", type=float, default=1e-3)
    return p.parse_args(argv)


def load_split(folder: Path, name: str, classes: int):
    """(images, labels) of one split, or exit with a message naming the file and what is wrong."""
    path = folder / f"{name}.npz"
    if not path.is_file():
        sys.exit(f"error: {path}: no such file")
    with np.load(path) as z:
        missing = {"images", "labels"} - set(z.files)
        if missing:
            sys.exit(f"error: {path}: missing array(s) {sorted(missing)} (has {z.files})")
        images, labels = z["images"], z["labels"]
    if images.ndim != 3 or images.shape != labels.shape:
        sys.exit(f"error: {path}: images {images.shape} and labels {labels.shape} must both be (n, H, W)")
    if images.shape[1] % 16 or images.shape[2] % 16:
        sys.exit(f"error: {path}: H and W ({images.shape[1]}, {images.shape[2]}) must divide by 16")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.max() >= classes):
        sys.exit(f"error: {path}: labels must be integers in 0..{classes - 1} (dtype {labels.dtype})")
    return images.astype(np.float32), labels.astype(np.uint8)


def mean_foreground_dice(truth: np.ndarray, pred: np.ndarray, classes: int) -> float:
    """Mean over foreground classes of the per-image Dice averaged over images.

    An image where a class is in neither truth nor prediction says nothing about it and is skipped.
    """
    per_class = []
    for c in range(1, classes):
        t, p = truth == c, pred == c
        total = t.sum(axis=(1, 2)) + p.sum(axis=(1, 2))
        inter = np.logical_and(t, p).sum(axis=(1, 2))
        if total.any():
            per_class.append(np.mean(2.0 * inter[total > 0] / total[total > 0]))
    return float(np.mean(per_class)) if per_class else float("nan")


def save_result(path: Path, **arrays) -> None:
    """np.savez to a temporary file beside `path`, then rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a plain open keeps the umask's permissions
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_unet(keras, rows: int, cols: int, classes: int, f: int):
    """4 encoder levels, a bottleneck and 4 decoder levels; every block conv-conv-BatchNormalization()."""
    layers = keras.layers

    def block(x, filters):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        return layers.BatchNormalization()(x)  # Keras defaults on purpose: that is what this peer measures

    inputs = keras.Input((rows, cols, 1))
    x, skips = inputs, []
    for level in range(4):
        skips.append(block(x, f * 2**level))
        x = layers.MaxPooling2D(2)(skips[-1])
    x = block(x, f * 16)
    for level in reversed(range(4)):
        x = layers.Conv2DTranspose(f * 2**level, 2, strides=2, padding="same")(x)
        x = block(layers.Concatenate()([x, skips[level]]), f * 2**level)
    outputs = layers.Conv2D(classes, 1, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def make_tracker(keras, val_images, val_labels, classes, batch_size, epochs):
    """A callback that scores each epoch on the validation set, keeps the best weights and prints a line."""

    class BestDice(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.val_dice, self.best, self.best_epoch, self.best_weights = [], -np.inf, 0, None

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            probs = self.model.predict(val_images, batch_size=batch_size, verbose=0)
            dice = mean_foreground_dice(val_labels, probs.argmax(axis=-1), classes)
            self.val_dice.append(dice)
            if self.best_weights is None or dice > self.best:  # a NaN Dice never wins over an earlier epoch
                self.best, self.best_epoch, self.best_weights = dice, epoch + 1, self.model.get_weights()
            print(f"epoch {epoch + 1}/{epochs}  loss {logs['loss']:.4f}  val_dice {dice:.4f}  "
                  f"{time.perf_counter() - self.t0:.1f}s", flush=True)

    return BestDice()


def main(argv=None) -> int:
    args = parse_args(argv)
    splits = {name: load_split(args.data, name, args.classes) for name in ("train", "validate", "test")}

    import keras  # after the checks: TensorFlow takes seconds to load

    keras.utils.set_random_seed(args.seed)
    keras.config.set_dtype_policy("float32")  # the default, stated: this peer is the plain float32 one
    (x_train, y_train), (x_val, y_val), (x_test, _) = (splits[s] for s in ("train", "validate", "test"))
    model = build_unet(keras, x_train.shape[1], x_train.shape[2], args.classes, args.base_filters)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=args.lr), loss="sparse_categorical_crossentropy")
    tracker = make_tracker(keras, x_val[..., None], y_val, args.classes, args.batch_size, args.epochs)

    start = time.perf_counter()
    model.fit(x_train[..., None], y_train, batch_size=args.batch_size, epochs=args.epochs, shuffle=True,
              callbacks=[tracker], verbose=0)
    seconds = time.perf_counter() - start

    model.set_weights(tracker.best_weights)
    test_pred = model.predict(x_test[..., None], batch_size=args.batch_size, verbose=0).argmax(axis=-1)
    save_result(args.out, test_pred=test_pred.astype(np.uint8), val_dice=np.array(tracker.val_dice, dtype=np.float64),
                best_epoch=np.int64(tracker.best_epoch), seconds=np.float64(seconds))
    print(f"best epoch {tracker.best_epoch} (val_dice {tracker.best:.4f}), {seconds:.1f}s training; "
          f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
