"""Keras peer: the plain U-Net the seed describes, with Keras defaults (batch-norm momentum 0.99, Adam).

    python benchmarks/peers/keras_seed_unet.py --data DIR --out OUT.npz --classes C --epochs E \
        --batch-size B --base-filters F --seed S [--lr 1e-3]

DIR holds train.npz, validate.npz and test.npz (`images` float32 (n, H, W) in [0, 1], `labels` uint8
(n, H, W) in 0..C-1). No augmentation, float32, sparse categorical cross-entropy; the best epoch by
validation mean foreground Dice predicts the test set. Runs in the project's own environment.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


from common import load_split, mean_foreground_dice, parse_args, save_result  # this folder


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
    args = parse_args(__doc__.splitlines()[0], argv)
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
    val_pred = model.predict(x_val[..., None], batch_size=args.batch_size, verbose=0).argmax(axis=-1)
    save_result(args.out, test_pred=test_pred.astype(np.uint8), val_pred=val_pred.astype(np.uint8),
                val_dice=np.array(tracker.val_dice, dtype=np.float64),
                best_epoch=np.int64(tracker.best_epoch), seconds=np.float64(seconds))
    print(f"best epoch {tracker.best_epoch} (val_dice {tracker.best:.4f}), {seconds:.1f}s training; "
          f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
