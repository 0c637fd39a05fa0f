"""tf.data batches for training and validation, with paired augmentation: the only TensorFlow code on the data side.

`make_dataset` turns a loaded split (dataset.SplitData) into batches whose order and augmentation depend
only on (seed, epoch), so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import tensorflow as tf

from preprocess import make_target



@dataclass(frozen=True)
class Augment:
    """Paired augmentation settings; geometry is applied with one draw to image and mask alike."""

    flip: bool = True  # left-right (array axis 0)
    rotate_deg: float = 10.0
    scale: tuple = (0.9, 1.1)  # zoom range
    shift: float = 0.0  # move by up to this share of the height and width (the anatomy off-centre, as in a tile)
    gamma: float = 0.3  # log-gamma range, intensity only
    noise: float = 0.03  # max Gaussian noise std, intensity only
    brightness: float = 0.0  # multiply by 1 +- this
    contrast: float = 0.0  # stretch about the image's mean by 1 +- this
    blur: float = 0.0  # share of images blurred (sigma 0.5-1 px)
    low_res: float = 0.0  # share of images downsampled (by 1-2x) and upsampled again
    # Images in [0, 1] (--norm minmax, percentile). False (zscore): gamma bends each image's own min..max range
    # instead, rather than clipping it to [0, 1].
    unit_range: bool = True


AUGMENTATIONS = {
    "none": "no augmentation",
    "basic": "left-right flips, rotation +-10 degrees, zoom 0.9-1.1, gamma, noise",
    "wide": "as basic with rotation +-15 degrees, zoom 0.7-1.4, shifts up to 10% of the size, brightness and "
            "contrast +-25%, blur (20%) and low resolution (25%), close to nnU-Net's 2D set without elastic "
            "deformation",
}


def augmentation(name: str, unit_range: bool) -> Augment | None:
    """The Augment of an AUGMENTATIONS name."""
    if name == "none":
        return None
    if name == "wide":
        return Augment(rotate_deg=15.0, scale=(0.7, 1.4), shift=0.1, brightness=0.25, contrast=0.25, blur=0.2,
                       low_res=0.25, unit_range=unit_range)
    return Augment(unit_range=unit_range)


def _warp_pairs(images: np.ndarray, targets: np.ndarray, maps: np.ndarray, sigmas: np.ndarray, shrink: np.ndarray):
    """OpenCV's affine warp of each (image, target) pair by its inverse map (2 x 3: output x, y -> input),
    then, on the image only, a Gaussian blur (sigma > 0) and a round trip through a lower resolution (shrink < 1).

    Images bilinear, targets nearest, edges repeated. The warp takes a third of the CPU time of TensorFlow's
    ImageProjectiveTransformV3 here (`python benchmarks/augment.py`), which matters because it runs beside training.
    """
    out_images, out_targets = np.empty_like(images), np.empty_like(targets)
    rows, cols = images.shape[1:3]
    for k, m in enumerate(maps):
        for src, dst, interpolation in ((images, out_images, cv2.INTER_LINEAR), (targets, out_targets, cv2.INTER_NEAREST)):
            dst[k, ..., 0] = cv2.warpAffine(src[k, ..., 0], m, (cols, rows), flags=interpolation | cv2.WARP_INVERSE_MAP,
                                            borderMode=cv2.BORDER_REPLICATE)
        image = out_images[k, ..., 0]
        if sigmas[k] > 0:
            image[:] = cv2.GaussianBlur(image, (0, 0), float(sigmas[k]), borderType=cv2.BORDER_REPLICATE)
        if shrink[k] < 1:
            small = cv2.resize(image, (max(1, round(cols * shrink[k])), max(1, round(rows * shrink[k]))),
                               interpolation=cv2.INTER_NEAREST)
            image[:] = cv2.resize(small, (cols, rows), interpolation=cv2.INTER_CUBIC)
    return out_images, out_targets


def augment_batch(images, targets, seed, aug: Augment):
    """Apply one random draw per sample to image and target: geometry to both, intensity to image only.

    seed: two int64 numbers; the same seed gives the same draw (stateless random ops). The warp is OpenCV's
    (through tf.numpy_function), so this runs in tf.data or eagerly, not inside an XLA-compiled step.
    """
    b = tf.shape(images)[0]
    rows, cols = tf.cast(tf.shape(images)[1], tf.float32), tf.cast(tf.shape(images)[2], tf.float32)
    u = tf.random.stateless_uniform((b, 5), seed=seed)  # flip, angle, scale, gamma, noise
    v = tf.random.stateless_uniform((b, 8), seed=seed + [0, 1])  # brightness, contrast, blur, low res, shift
    angle = (2 * u[:, 1] - 1) * aug.rotate_deg * np.pi / 180
    scale = aug.scale[0] + u[:, 2] * (aug.scale[1] - aug.scale[0])
    flip = tf.where(u[:, 0] < 0.5, -1.0, 1.0) if aug.flip else tf.ones((b,))
    # Inverse map output (x=col, y=row) -> input about the centre: flip rows, rotate, scale.
    c, s = tf.cos(angle) / scale, tf.sin(angle) / scale
    cx, cy = (cols - 1) / 2, (rows - 1) / 2
    a0, a1 = c, -s * flip
    b0, b1 = s, c * flip
    dx, dy = (2 * v[:, 6] - 1) * aug.shift * cols, (2 * v[:, 7] - 1) * aug.shift * rows
    maps = tf.reshape(tf.stack([a0, a1, cx - a0 * cx - a1 * cy + dx, b0, b1, cy - b0 * cx - b1 * cy + dy], axis=1),
                      (-1, 2, 3))
    sigmas = tf.where(v[:, 2] < aug.blur, 0.5 + 0.5 * v[:, 3], 0.0)
    shrink = tf.where(v[:, 4] < aug.low_res, 0.5 + 0.5 * v[:, 5], 1.0)
    warped = tf.numpy_function(_warp_pairs, [images, targets, maps, sigmas, shrink], [images.dtype, targets.dtype],
                               stateful=False)
    # numpy_function loses the static shape; without it the model is traced for any size, and e.g. the fused
    # batch norm cannot be used (a quarter of the training speed on the CPU).
    images, targets = (tf.ensure_shape(w, x.shape) for w, x in zip(warped, (images, targets)))
    if aug.gamma:
        gamma = tf.exp((2 * u[:, 3] - 1) * aug.gamma)[:, None, None, None]
        if aug.unit_range:  # bilinear interpolation keeps the images in [0, 1]; the clip only guards the log
            unit = tf.clip_by_value(images, 0.0, 1.0)
            lo = span = None
        else:
            lo = tf.reduce_min(images, axis=(1, 2, 3), keepdims=True)
            span = tf.maximum(tf.reduce_max(images, axis=(1, 2, 3), keepdims=True) - lo, 1e-6)
            unit = tf.clip_by_value((images - lo) / span, 0.0, 1.0)
        unit = tf.exp(gamma * tf.math.log(unit))  # unit ** gamma (0 -> 0), 5x cheaper than tf.pow's broadcast
        images = unit if lo is None else lo + span * unit
    if aug.brightness:
        images = images * (1 + (2 * v[:, 0] - 1) * aug.brightness)[:, None, None, None]
    if aug.contrast:
        mean = tf.reduce_mean(images, axis=(1, 2, 3), keepdims=True)
        images = mean + (images - mean) * (1 + (2 * v[:, 1] - 1) * aug.contrast)[:, None, None, None]
    if aug.noise:
        std = (u[:, 4] * aug.noise)[:, None, None, None]
        images = images + std * tf.random.stateless_normal(tf.shape(images), seed=seed[::-1])
    return images, targets


def make_dataset(data, batch_size: int, target_ids=None, shuffle=False, augment: Augment | None = None,
                 seed=42, epochs=1, initial_epoch=0, device=None):
    """Batches of (image (b, rows, cols, 1), target (b, rows, cols, 1)) for epochs initial_epoch..epochs-1.

    epochs=None never ends (for Keras fit with steps_per_epoch, which reads one iterator across epochs).
    device (e.g. "/gpu:0") prefetches batches into that device's memory while the previous step runs.
    The order and augmentation of epoch e depend only on (seed, e), so a resumed run sees exactly
    the batches an uninterrupted run would have seen.
    """
    n = len(data)
    images = tf.constant(data.images)
    targets = tf.constant(make_target(data.masks, target_ids)[..., None])

    def epoch_indices(epoch):
        order = tf.range(n, dtype=tf.int64)
        if shuffle:
            keys = tf.random.stateless_uniform((n,), seed=tf.stack([tf.cast(seed, tf.int64), epoch]))
            order = tf.cast(tf.argsort(keys), tf.int64)
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
        return batches.enumerate().map(lambda step, idx: (epoch, step, idx))

    def gather(epoch, step, idx):
        x, y = tf.gather(images, idx), tf.gather(targets, idx)
        if augment is not None:
            x, y = augment_batch(x, y, tf.stack([epoch * 100_003 + step, tf.cast(seed, tf.int64)]), augment)
        return x, y

    ds = tf.data.Dataset.counter(initial_epoch)
    if epochs is not None:
        ds = ds.take(epochs - initial_epoch)
    ds = ds.flat_map(epoch_indices)
    options = tf.data.Options()
    # Under tf.distribute each worker takes its own share of every global batch (there are no files to shard).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    ds = ds.with_options(options)
    if epochs is not None:  # a known length lets Keras evaluate without an "ran out of data" warning
        ds = ds.apply(tf.data.experimental.assert_cardinality((epochs - initial_epoch) * -(-n // batch_size)))
    ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if device:  # must be the last transformation
        return ds.apply(tf.data.experimental.prefetch_to_device(device))
    return ds.prefetch(tf.data.AUTOTUNE)
