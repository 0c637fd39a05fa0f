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

@keras.saving.register_keras_serializable(PACKAGE)
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras' BatchNormalization (same weights, options and moving-average update) run by TensorFlow's fused
    kernel, FusedBatchNormV3, which Keras 3 no longer uses.

    Keras 3 builds batch norm from separate float32 ops, several times slower on the CPU
    (`python benchmarks/batchnorm.py` times one layer both ways). The fused kernel is cuDNN's on a GPU
    (where Keras 2 used it by default) and computes the statistics in float32 for float16/bfloat16 inputs.
    Anything it does not cover (synchronized statistics, masks, renorm, another axis, other backends,
    a single value per channel) goes to Keras' own code.
    """

    def _fused(self, inputs, mask) -> bool:
        shape = inputs.shape
        return (keras.backend.backend() == "tensorflow" and not self.synchronized and not self.renorm
                and mask is None and len(shape) == 4 and self.axis in (3, -1)
                and shape[1] is not None and shape[2] is not None and shape[1] * shape[2] > 1)

    def call(self, inputs, training=None, mask=None):
        if not self._fused(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf  # only on the TensorFlow backend (checked above)

        channels = inputs.shape[-1]
        gamma = ops.cast(self.gamma, "float32") if self.scale else ops.ones((channels,), "float32")
        beta = ops.cast(self.beta, "float32") if self.center else ops.zeros((channels,), "float32")
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=self.epsilon, is_training=True)
            # The kernel returns the unbiased batch variance; Keras averages the biased one into the moving stats.
            n = ops.cast(ops.size(inputs) // channels, "float32")
            variance = variance * (n - 1.0) / n
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, mean=ops.cast(self.moving_mean, "float32"),
                variance=ops.cast(self.moving_variance, "float32"), epsilon=self.epsilon, is_training=False)
        return ops.cast(outputs, self.compute_dtype)


def conv_block(x, filters: int, name: str, sync_bn: bool = False):
    """Two 3x3 convolutions with ReLU, batch normalisation after the second (as the original design)."""
    x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"{name}_conv1")(x)
    x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"{name}_conv2")(x)
    # momentum 0.9 (PyTorch's default) rather than Keras' 0.99: with a few hundred steps per run the
    # moving statistics must catch up with the training ones, or inference-mode output is garbage.
    return FusedBatchNormalization(momentum=0.9, synchronized=sync_bn, name=f"{name}_bn")(x)


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

def _mean_soft_dice(t, y_pred, smooth, overlap=None):
    """Per image: smoothed soft Dice averaged over the foreground classes (background would dominate)."""
    overlap = t * y_pred if overlap is None else overlap
    inter = ops.sum(overlap, axis=(1, 2))  # (batch, classes)
    total = ops.sum(t, axis=(1, 2)) + ops.sum(y_pred, axis=(1, 2))
    dice = (2 * inter + smooth) / (total + smooth)
    return ops.mean(dice[:, 1:] if y_pred.shape[-1] > 1 else dice, axis=-1)


def _true_class_ce(overlap):
    """Per image: pixel-mean -log(probability of the true class), from the one-hot * prediction product.

    The same gradient (with respect to the logits) as Keras' sparse categorical cross-entropy on
    probabilities, which takes the log of all the channels and a softmax on top; this reuses the
    product the Dice term needs, so the two together cost one pass over the output less.
    """
    eps = keras.config.epsilon()
    return -ops.mean(ops.log(ops.clip(ops.sum(overlap, axis=-1), eps, 1.0 - eps)), axis=(1, 2))


@keras.saving.register_keras_serializable(PACKAGE)
def dice_loss(y_true, y_pred, smooth=1.0):
    """Per image: 1 - soft Dice averaged over foreground classes (smoothed, so absent classes push to 0)."""
    return 1.0 - _mean_soft_dice(_soft_one_hot(y_true, y_pred), y_pred, smooth)


@keras.saving.register_keras_serializable(PACKAGE)
def cross_entropy(y_true, y_pred):
    """Per image: pixel-mean cross-entropy, binary for one channel, categorical over the labels otherwise."""
    if y_pred.shape[-1] == 1:
        return ops.mean(keras.losses.binary_crossentropy(ops.cast(y_true, y_pred.dtype), y_pred), axis=(1, 2))
    return _true_class_ce(_soft_one_hot(y_true, y_pred) * y_pred)


@keras.saving.register_keras_serializable(PACKAGE)
def dice_ce_loss(y_true, y_pred, smooth=1.0):
    """Dice + cross-entropy: Dice for the rare classes, cross-entropy for stable early gradients."""
    if y_pred.shape[-1] == 1:
        return dice_loss(y_true, y_pred, smooth) + cross_entropy(y_true, y_pred)
    t = _soft_one_hot(y_true, y_pred)
    overlap = t * y_pred  # shared by both terms
    return 1.0 - _mean_soft_dice(t, y_pred, smooth, overlap) + _true_class_ce(overlap)


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
