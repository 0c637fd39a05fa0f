"""The 4-level U-Net of the original design, its Dice metrics and losses, and model saving.

Dice convention (used everywhere in this project): Dice is computed per image and per foreground
class, 2|T∩P| / (|T| + |P|). An image where a class is absent from both truth and prediction has
no Dice for that class: it is left out of that class's mean (and counted in no `n`), rather than
scored 1 (which would flatter rare classes) or 0 (which would punish a correct "absent"). Background
is never part of the mean. This is much stricter than a Dice pooled over the batch with background
included, which reads 0.97 while the prostate scores near 0.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from atomic_io import atomic_path

PACKAGE = "hipmri"


# ----------------------------------------------------------------------------- network

def conv_block(x, filters: int, name: str, sync_bn: bool = False):
    """Two 3x3 convolutions with ReLU, batch normalisation after the second (as the original design)."""
    x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"{name}_conv1")(x)
    x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"{name}_conv2")(x)
    # momentum 0.9 (PyTorch's default) rather than Keras' 0.99: with a few hundred steps per run the
    # moving statistics must catch up with the training ones, or inference-mode output is garbage.
    return layers.BatchNormalization(momentum=0.9, synchronized=sync_bn, name=f"{name}_bn")(x)


def encoder_block(x, filters: int, name: str, sync_bn: bool = False):
    """conv_block then 2x2 max pooling; returns (pooled, skip)."""
    skip = conv_block(x, filters, name, sync_bn)
    return layers.MaxPooling2D(2, name=f"{name}_pool")(skip), skip


def decoder_block(x, skip, filters: int, name: str, sync_bn: bool = False):
    """2x2 transposed-convolution upsampling, concatenation with the skip, conv_block."""
    x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"{name}_up")(x)
    x = layers.Concatenate(name=f"{name}_concat")([x, skip])
    return conv_block(x, filters, name, sync_bn)


def build_unet(input_shape=(256, 128, 1), num_classes: int = 6, base_filters: int = 16, levels: int = 4,
               sync_bn: bool = False):
    """U-Net: `levels` encoder blocks, a bottleneck, `levels` decoder blocks, 1x1 output.

    num_classes == 1 gives a sigmoid (binary target), otherwise a softmax over all labels.
    sync_bn: batch statistics over the global batch when training on several replicas.
    """
    rows, cols = input_shape[:2]
    if rows % 2**levels or cols % 2**levels:
        raise ValueError(f"input {rows}x{cols}: both sides must divide by {2**levels} for {levels} poolings")
    inputs = keras.Input(input_shape, name="image")
    x, skips = inputs, []
    for i in range(levels):
        x, skip = encoder_block(x, base_filters * 2**i, f"enc{i + 1}", sync_bn)
        skips.append(skip)
    x = conv_block(x, base_filters * 2**levels, "bottleneck", sync_bn)
    for i in reversed(range(levels)):
        x = decoder_block(x, skips[i], base_filters * 2**i, f"dec{i + 1}", sync_bn)
    # float32 output: softmax/sigmoid and the losses are unstable in float16/bfloat16.
    activation = "sigmoid" if num_classes == 1 else "softmax"
    outputs = layers.Conv2D(num_classes, 1, activation=activation, dtype="float32", name="mask")(x)
    return keras.Model(inputs, outputs, name=f"unet{levels}_b{base_filters}")  # (batch, rows, cols, classes)


# ----------------------------------------------------------------------------- numpy scores

def dice_per_class(truth: np.ndarray, pred: np.ndarray, labels) -> np.ndarray:
    """Dice of each label between two label maps; NaN where the label is in neither."""
    out = np.full(len(labels), np.nan)
    for i, c in enumerate(labels):
        t, p = truth == c, pred == c
        total = t.sum() + p.sum()
        if total:
            out[i] = 2.0 * np.logical_and(t, p).sum() / total
    return out


def iou_per_class(truth: np.ndarray, pred: np.ndarray, labels) -> np.ndarray:
    """Intersection over union of each label; NaN where the label is in neither."""
    out = np.full(len(labels), np.nan)
    for i, c in enumerate(labels):
        t, p = truth == c, pred == c
        union = np.logical_or(t, p).sum()
        if union:
            out[i] = np.logical_and(t, p).sum() / union
    return out


# ----------------------------------------------------------------------------- Keras metrics and losses

def _one_hot_pair(y_true, y_pred):
    """Hard one-hot truth and prediction (batch, pixels, channels); binary targets give one channel."""
    channels = y_pred.shape[-1]
    if channels == 1:
        t = ops.cast(ops.cast(y_true, "float32") > 0.5, "float32")
        p = ops.cast(y_pred > 0.5, "float32")
    else:
        t = ops.one_hot(ops.cast(ops.squeeze(y_true, -1), "int32"), channels)
        p = ops.one_hot(ops.argmax(y_pred, axis=-1), channels)
    batch = ops.shape(y_pred)[0]
    return ops.reshape(t, (batch, -1, channels)), ops.reshape(p, (batch, -1, channels))


@keras.saving.register_keras_serializable(PACKAGE)
class DiceScore(keras.metrics.Metric):
    """Per-image hard Dice, averaged over the images where the class is present in truth or prediction.

    class_id=None reports the mean over foreground classes (1..C-1; the single channel of a binary
    model); an integer reports that channel alone.
    """

    def __init__(self, num_classes: int, class_id=None, name="dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes, self.class_id = num_classes, class_id
        self.sums = self.add_variable((num_classes,), "zeros", name="sums")
        self.counts = self.add_variable((num_classes,), "zeros", name="counts")

    def update_state(self, y_true, y_pred, sample_weight=None):
        t, p = _one_hot_pair(y_true, y_pred)
        inter = ops.sum(t * p, axis=1)  # (batch, classes)
        total = ops.sum(t, axis=1) + ops.sum(p, axis=1)
        present = ops.cast(total > 0, "float32")
        dice = 2 * inter / ops.maximum(total, 1.0)
        self.sums.assign_add(ops.sum(dice * present, axis=0))
        self.counts.assign_add(ops.sum(present, axis=0))

    def result(self):
        per_class = self.sums / ops.maximum(self.counts, 1.0)
        if self.class_id is not None:
            return per_class[self.class_id]
        first = 0 if self.num_classes == 1 else 1
        seen = ops.cast(self.counts[first:] > 0, "float32")
        return ops.sum(per_class[first:] * seen) / ops.maximum(ops.sum(seen), 1.0)

    def reset_state(self):
        self.sums.assign(ops.zeros_like(self.sums))
        self.counts.assign(ops.zeros_like(self.counts))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "class_id": self.class_id}


def _soft_one_hot(y_true, y_pred):
    """Float one-hot truth matching y_pred's channels."""
    if y_pred.shape[-1] == 1:
        return ops.cast(y_true, y_pred.dtype)
    return ops.one_hot(ops.cast(ops.squeeze(y_true, -1), "int32"), y_pred.shape[-1], dtype=y_pred.dtype)


# The losses return one value per image: Keras then takes the batch mean and, under tf.distribute,
# scales it by the replica count (it does neither for a loss that is already a scalar).

@keras.saving.register_keras_serializable(PACKAGE)
def dice_loss(y_true, y_pred, smooth=1.0):
    """Per image: 1 - soft Dice averaged over foreground classes (smoothed, so absent classes push to 0)."""
    t = _soft_one_hot(y_true, y_pred)
    if y_pred.shape[-1] > 1:  # background would dominate: leave it out
        t, y_pred = t[..., 1:], y_pred[..., 1:]
    inter = ops.sum(t * y_pred, axis=(1, 2))  # (batch, classes)
    total = ops.sum(t, axis=(1, 2)) + ops.sum(y_pred, axis=(1, 2))
    return 1.0 - ops.mean((2 * inter + smooth) / (total + smooth), axis=-1)


@keras.saving.register_keras_serializable(PACKAGE)
def cross_entropy(y_true, y_pred):
    """Per image: pixel-mean cross-entropy, binary for one channel, sparse categorical otherwise."""
    if y_pred.shape[-1] == 1:
        pixel = keras.losses.binary_crossentropy(ops.cast(y_true, y_pred.dtype), y_pred)
    else:
        pixel = keras.losses.sparse_categorical_crossentropy(y_true, y_pred)
    return ops.mean(pixel, axis=(1, 2))


@keras.saving.register_keras_serializable(PACKAGE)
def dice_ce_loss(y_true, y_pred):
    """Dice + cross-entropy: Dice for the rare classes, cross-entropy for stable early gradients."""
    return dice_loss(y_true, y_pred) + cross_entropy(y_true, y_pred)


LOSSES = {"dice_ce": dice_ce_loss, "dice": dice_loss, "ce": cross_entropy}


def segmentation_metrics(num_classes: int, class_names) -> list:
    """Accuracy, mean foreground Dice, and one Dice per foreground class (named after the class)."""
    accuracy = (keras.metrics.BinaryAccuracy(name="accuracy") if num_classes == 1
                else keras.metrics.SparseCategoricalAccuracy(name="accuracy"))
    per_class = [DiceScore(num_classes, c, name=f"dice_{class_names[c]}")
                 for c in (range(1) if num_classes == 1 else range(1, num_classes))]
    return [accuracy, DiceScore(num_classes, name="dice"), *per_class]


def save_model(model, path) -> None:
    """model.save to a temporary name and rename: a kill never leaves a torn model.keras."""
    with atomic_path(path) as tmp:
        model.save(tmp)
