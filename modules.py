"""The 4-level U-Net of the original design, its Keras Dice metrics and losses, and model saving.

The Dice metric follows evaluate.py's convention: per image and per foreground class, an image where a
class is in neither truth nor prediction left out of that class's mean, background never averaged in.
"""
from __future__ import annotations

import keras
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


NORM_LAYERS = ("batch", "instance")


def conv_block(x, filters: int, name: str, sync_bn: bool = False, norm: str = "batch"):
    """Two 3x3 convolutions with ReLU, batch normalisation after the second (as the original design), or
    instance normalisation (norm="instance": per image and channel, as MONAI's BasicUNet and nnU-Net)."""
    x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"{name}_conv1")(x)
    x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"{name}_conv2")(x)
    if norm == "instance":  # one group per channel; no moving statistics, the same in training and inference
        return layers.GroupNormalization(groups=-1, epsilon=1e-5, name=f"{name}_in")(x)
    # momentum 0.9 (PyTorch's default) rather than Keras' 0.99: with a few hundred steps per run the
    # moving statistics must catch up with the training ones, or inference-mode output is garbage.
    return FusedBatchNormalization(momentum=0.9, synchronized=sync_bn, name=f"{name}_bn")(x)


def encoder_block(x, filters: int, name: str, sync_bn: bool = False, norm: str = "batch"):
    """conv_block then 2x2 max pooling; returns (pooled, skip)."""
    skip = conv_block(x, filters, name, sync_bn, norm)
    return layers.MaxPooling2D(2, name=f"{name}_pool")(skip), skip


def decoder_block(x, skip, filters: int, name: str, sync_bn: bool = False, norm: str = "batch"):
    """2x2 transposed-convolution upsampling, concatenation with the skip, conv_block."""
    x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"{name}_up")(x)
    x = layers.Concatenate(name=f"{name}_concat")([x, skip])
    return conv_block(x, filters, name, sync_bn, norm)


def build_unet(input_shape=(256, 128, 1), num_classes: int = 6, base_filters: int = 16, levels: int = 4,
               sync_bn: bool = False, norm: str = "batch"):
    """U-Net: `levels` encoder blocks, a bottleneck, `levels` decoder blocks, a 1x1 output of logits.

    This is the model that trains (the losses work on logits); `with_probabilities` puts the softmax (or, for
    one channel, the sigmoid) on top for prediction and saving. sync_bn: batch statistics over the global
    batch when training on several replicas. norm: "batch" (the design's) or "instance" (see conv_block).
    """
    if norm not in NORM_LAYERS:
        raise ValueError(f"norm {norm!r}: expected one of {NORM_LAYERS}")
    rows, cols = input_shape[:2]
    if rows % 2**levels or cols % 2**levels:
        raise ValueError(f"input {rows}x{cols}: both sides must divide by {2**levels} for {levels} poolings")
    inputs = keras.Input(input_shape, name="image")
    x, skips = inputs, []
    for i in range(levels):
        x, skip = encoder_block(x, base_filters * 2**i, f"enc{i + 1}", sync_bn, norm)
        skips.append(skip)
    x = conv_block(x, base_filters * 2**levels, "bottleneck", sync_bn, norm)
    for i in reversed(range(levels)):
        x = decoder_block(x, skips[i], base_filters * 2**i, f"dec{i + 1}", sync_bn, norm)
    # float32 output: log-softmax, softmax and the losses are unstable in float16/bfloat16.
    logits = layers.Conv2D(num_classes, 1, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=f"unet{levels}_b{base_filters}")  # (batch, rows, cols, classes)


def with_probabilities(model):
    """The same network (shared weights) with probabilities as its output: what model.keras holds."""
    activation = "sigmoid" if model.output.shape[-1] == 1 else "softmax"
    probs = layers.Activation(activation, dtype="float32", name="mask")(model.output)
    return keras.Model(model.input, probs, name=model.name)


# ----------------------------------------------------------------------------- Keras metrics and losses

def _labels_and_prediction(y_true, logits):
    """Hard labels of truth and prediction (batch, pixels): argmax, or logit > 0 for one channel."""
    batch = ops.shape(logits)[0]
    if logits.shape[-1] == 1:
        t, p = ops.cast(y_true, "float32") > 0.5, logits > 0
    else:
        t, p = ops.squeeze(y_true, -1), ops.argmax(logits, axis=-1)
    return ops.reshape(ops.cast(t, "int32"), (batch, -1)), ops.reshape(ops.cast(p, "int32"), (batch, -1))


@keras.saving.register_keras_serializable(PACKAGE)
class DiceScores(keras.metrics.Metric):
    """Per-image hard Dice of every class, averaged over the images where the class is in truth or prediction.

    Reports {"dice": mean over the foreground classes (1..C-1, or the one channel of a binary model) that some
    image scored (0 if none did), "dice_<name>": each foreground class, NaN while no image scored it}, from one
    pass over the batch. Works on logits or probabilities alike for several classes (argmax); for one channel,
    on logits (threshold 0).
    """

    def __init__(self, class_names, name="dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.class_names = list(class_names)
        self.num_classes = max(2, len(self.class_names))  # one channel: background and the target
        self.sums = self.add_variable((self.num_classes,), "zeros", name="sums")
        self.counts = self.add_variable((self.num_classes,), "zeros", name="counts")

    def update_state(self, y_true, y_pred, sample_weight=None):
        t, p = _labels_and_prediction(y_true, y_pred)
        t, p = ops.one_hot(t, self.num_classes), ops.one_hot(p, self.num_classes)  # (batch, pixels, classes)
        inter = ops.sum(t * p, axis=1)
        total = ops.sum(t, axis=1) + ops.sum(p, axis=1)
        present = ops.cast(total > 0, "float32")
        self.sums.assign_add(ops.sum(2 * inter / ops.maximum(total, 1.0) * present, axis=0))
        self.counts.assign_add(ops.sum(present, axis=0))

    def result(self):
        per_class = self.sums / ops.maximum(self.counts, 1.0)  # 0 where no image scored the class
        seen = ops.cast(self.counts[1:] > 0, "float32")
        # A class that no image scored has no value (evaluate.CONVENTION), not 0; the mean is over those that do.
        reported = ops.where(self.counts > 0, per_class, float("nan"))
        names = self.class_names[1:] if len(self.class_names) > 1 else self.class_names
        return {self.name: ops.sum(per_class[1:] * seen) / ops.maximum(ops.sum(seen), 1.0),
                **{f"{self.name}_{n}": reported[i] for i, n in enumerate(names, start=1)}}

    def reset_state(self):
        # zeros of the variable's shape, not zeros_like(variable): JAX cannot take a Keras Variable's dtype there
        self.sums.assign(ops.zeros(self.sums.shape, self.sums.dtype))
        self.counts.assign(ops.zeros(self.counts.shape, self.counts.dtype))

    def get_config(self):
        return {**super().get_config(), "class_names": self.class_names}


def _one_hot(y_true, logits):
    """Float one-hot truth matching the logits' channels (for one channel, the target itself)."""
    if logits.shape[-1] == 1:
        return ops.cast(y_true, "float32")
    return ops.one_hot(ops.cast(ops.squeeze(y_true, -1), "int32"), logits.shape[-1], dtype="float32")


# The losses return one value per image: Keras then takes the batch mean and, under tf.distribute, scales it
# by the replica count (it does neither for a loss that is already a scalar). They take logits: the
# cross-entropy comes from log-softmax, so a confidently wrong pixel still has a gradient.

def _soft_dice(t, probs, smooth, over_batch: bool):
    """1 - smoothed soft Dice over the foreground classes, per image or pooled over the batch (one value)."""
    axes = (0, 1, 2) if over_batch else (1, 2)
    inter = ops.sum(t * probs, axis=axes)  # (batch, classes), or (classes,)
    total = ops.sum(t, axis=axes) + ops.sum(probs, axis=axes)
    dice = (2 * inter + smooth) / (total + smooth)
    dice = dice[..., 1:] if probs.shape[-1] > 1 else dice
    loss = 1.0 - ops.mean(dice, axis=-1)
    return loss * ops.ones((ops.shape(probs)[0],)) if over_batch else loss  # one value per image either way


def _cross_entropy(t, logits):
    """Per image: pixel-mean cross-entropy from logits (sigmoid for one channel, softmax otherwise)."""
    if logits.shape[-1] == 1:
        return ops.mean(ops.binary_crossentropy(t, logits, from_logits=True), axis=(1, 2, 3))
    return -ops.mean(ops.sum(t * ops.log_softmax(logits, axis=-1), axis=-1), axis=(1, 2))


def _probabilities(logits):
    return ops.sigmoid(logits) if logits.shape[-1] == 1 else ops.softmax(logits, axis=-1)


@keras.saving.register_keras_serializable(PACKAGE)
class SegmentationLoss(keras.losses.Loss):
    """Dice + cross-entropy on logits ("dice_ce"), or either term alone ("dice", "ce").

    Dice for the rare classes, cross-entropy for well-scaled gradients from the first step. The Dice is per
    image (smoothed, so an absent class counts as a perfect 0) or, with dice_over="batch", pooled over the
    batch (as nnU-Net does in 2D): an empty slice's few false-positive pixels then weigh what they are.
    """

    def __init__(self, terms: str = "dice_ce", dice_over: str = "image", smooth: float = 1.0, **kwargs):
        super().__init__(name=kwargs.pop("name", terms), **kwargs)
        if terms not in LOSSES or dice_over not in ("image", "batch"):
            raise ValueError(f"loss {terms!r} over {dice_over!r}: expected one of {LOSSES} over image or batch")
        self.terms, self.dice_over, self.smooth = terms, dice_over, smooth

    def call(self, y_true, logits):
        logits = ops.cast(logits, "float32")
        t = _one_hot(y_true, logits)
        loss = 0.0
        if self.terms in ("dice_ce", "dice"):
            loss += _soft_dice(t, _probabilities(logits), self.smooth, self.dice_over == "batch")
        if self.terms in ("dice_ce", "ce"):
            loss += _cross_entropy(t, logits)
        return loss

    def get_config(self):
        return {**super().get_config(), "terms": self.terms, "dice_over": self.dice_over, "smooth": self.smooth}


LOSSES = ("dice_ce", "dice", "ce")


def segmentation_metrics(channel_names) -> list:
    """Accuracy, and the Dice of each foreground channel and their mean (on logits)."""
    accuracy = (keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0) if len(channel_names) == 1
                else keras.metrics.SparseCategoricalAccuracy(name="accuracy"))
    return [accuracy, DiceScores(channel_names)]


def save_model(model, path) -> None:
    """model.save to a temporary name and rename: a kill never leaves a torn model.keras."""
    with atomic_path(path) as tmp:
        model.save(tmp)
