"""pipeline.py: batches, epoch determinism, paired augmentation, static shapes, prefetching to a device."""
import keras
import numpy as np

import dataset
import modules
import pipeline


def _tiny_split(n=12, seed=0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 64, 32), np.uint8)
    for i in range(n):
        r, c = rng.integers(8, 40), rng.integers(4, 20)
        masks[i, r:r + 16, c:c + 8] = 1 + i % 5
    images = (masks[..., None] / 5.0).astype(np.float32)
    refs = [dataset.SliceRef("i", "m", 1, 0, i) for i in range(n)]
    return dataset.SplitData(images, masks, refs, [(64, 32)] * n, np.zeros((n, 6)))


def test_dataset_batches_and_epoch_determinism():
    data = _tiny_split()
    ds = pipeline.make_dataset(data, 5, shuffle=True, augment=pipeline.Augment(), seed=7, epochs=3)
    batches = [(x.numpy(), y.numpy()) for x, y in ds]
    assert [len(x) for x, _ in batches] == [5, 5, 2] * 3
    assert batches[0][0].shape == (5, 64, 32, 1) and batches[0][1].shape == (5, 64, 32, 1)
    # Epochs differ from each other, and epoch 2 alone (a resumed run) equals epoch 2 of the full run.
    assert not np.array_equal(batches[0][0], batches[3][0])
    resumed = [(x.numpy(), y.numpy()) for x, y in pipeline.make_dataset(
        data, 5, shuffle=True, augment=pipeline.Augment(), seed=7, epochs=3, initial_epoch=2)]
    for (x1, y1), (x2, y2) in zip(batches[6:], resumed):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    # Validation order is the file order, untouched.
    x, y = next(iter(pipeline.make_dataset(data, 12)))
    np.testing.assert_array_equal(x.numpy(), data.images)


def test_augmentation_moves_image_and_mask_together():
    data = _tiny_split(n=16, seed=3)
    geometric = pipeline.Augment(gamma=0, noise=0, rotate_deg=15, scale=(0.85, 1.15))
    moved = []
    for x, y in pipeline.make_dataset(data, 8, shuffle=True, augment=geometric, seed=1, epochs=2):
        x, y = x.numpy()[..., 0], y.numpy()[..., 0]
        assert set(np.unique(y)) <= set(range(6))  # nearest: no invented labels
        label_from_image = np.rint(x * 5)
        agree = (label_from_image == y).mean()
        assert agree > 0.97, agree  # only bilinear border pixels may differ
        moved += [not any(np.array_equal(m, o) for o in data.masks) for m in y]
    assert sum(moved) > len(moved) / 2  # the geometry really changed most samples


def test_gamma_keeps_zscored_images_unclipped():
    data = _tiny_split(n=8, seed=5)
    data.images += np.random.default_rng(0).random(data.images.shape, np.float32)  # texture between min and max
    data.images[:] = (data.images - data.images.mean()) / data.images.std()  # z-scored: about half below 0
    gamma_only = dict(flip=False, rotate_deg=0, scale=(1.0, 1.0), noise=0, gamma=0.3)
    x, _ = next(iter(pipeline.make_dataset(data, 8, augment=pipeline.Augment(unit_range=False, **gamma_only))))
    x, orig = x.numpy(), data.images
    # Each image keeps its own range and intensity order; only the curve between its min and max changes.
    np.testing.assert_allclose(x.min(axis=(1, 2, 3)), orig.min(axis=(1, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(x.max(axis=(1, 2, 3)), orig.max(axis=(1, 2, 3)), atol=1e-5)
    for a, b in zip(x, orig):
        order = np.argsort(b.ravel(), kind="stable")
        assert np.all(np.diff(a.ravel()[order]) >= -1e-5)
    assert not np.allclose(x, orig, atol=1e-3)  # the gamma did act
    # The [0, 1] variant (for minmax images) clips these to [0, 1]: what train.py used to do with z-scores.
    y, _ = next(iter(pipeline.make_dataset(data, 8, augment=pipeline.Augment(unit_range=True, **gamma_only))))
    assert y.numpy().min() >= 0 and orig.min() < 0


def test_augmented_batches_keep_their_static_shape():
    """The warp loses static shapes; without them Keras traces the model for any size (and the fused
    batch norm falls back to the slow path)."""
    data = _tiny_split(n=8)
    ds = pipeline.make_dataset(data, 4, shuffle=True, augment=pipeline.Augment(), epochs=None)
    rows, cols = data.images.shape[1:3]
    assert [tuple(spec.shape[1:]) for spec in ds.element_spec] == [(rows, cols, 1)] * 2
    bn = modules.FusedBatchNormalization()
    x, _ = next(iter(ds))
    assert bn._fused(modules.layers.Conv2D(2, 3, padding="same")(x), None)


def test_prefetch_to_device_feeds_keras_fit():
    # The GPU path prefetches to "/gpu:0"; the same code runs here with the CPU as the device.
    data = _tiny_split(n=8)
    ds = pipeline.make_dataset(data, 4, shuffle=True, augment=pipeline.Augment(), epochs=None, device="/cpu:0")
    model = keras.Sequential([keras.Input((64, 32, 1)), keras.layers.Conv2D(6, 3, padding="same", activation="softmax")])
    model.compile("adam", modules.SegmentationLoss())  # a one-layer model: this is about the input, not the U-Net
    history = model.fit(ds, epochs=2, steps_per_epoch=2, shuffle=False, verbose=0)
    assert len(history.history["loss"]) == 2 and all(np.isfinite(history.history["loss"]))
