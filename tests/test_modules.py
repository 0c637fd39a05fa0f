"""modules.py: the U-Net's shape, Dice against hand-computed values, losses, save/load."""
import keras
import numpy as np
import pytest
from keras import layers

import modules


def _count(model, kind):
    return sum(isinstance(layer, kind) for layer in model.layers)


@pytest.mark.parametrize("classes,activation", [(6, "softmax"), (1, "sigmoid")])
def test_unet_architecture(classes, activation):
    model = modules.build_unet((256, 128, 1), classes, base_filters=8)
    assert model.output_shape == (None, 256, 128, classes)
    assert _count(model, layers.MaxPooling2D) == 4
    assert _count(model, layers.Conv2DTranspose) == 4
    assert _count(model, layers.Concatenate) == 4
    # 2 convolutions per block: 4 encoder + bottleneck + 4 decoder, plus the 1x1 output.
    assert _count(model, layers.Conv2D) == 2 * 9 + 1
    assert _count(model, layers.BatchNormalization) == 9
    filters = [layer.filters for layer in model.layers if layer.name.endswith("_conv1")]
    assert filters == [8, 16, 32, 64, 128, 64, 32, 16, 8]
    out = model.get_layer("mask")
    assert out.kernel_size == (1, 1) and out.activation.__name__ == activation
    enc = [layer for layer in model.layers if layer.name.startswith("enc1_")]
    assert [type(layer).__name__ for layer in enc] == ["Conv2D", "Conv2D", "FusedBatchNormalization", "MaxPooling2D"]
    bn = model.get_layer("enc1_bn")  # a subclass of Keras' layer: its weights and options
    assert isinstance(bn, layers.BatchNormalization) and bn.momentum == 0.9 and bn.axis in (-1, 3)
    assert [w.name for w in bn.weights] == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert all(layer.activation.__name__ == "relu" for layer in enc[:2])


def test_unet_other_sizes_and_refusal():
    assert modules.build_unet((256, 144, 1), 6, 4).output_shape == (None, 256, 144, 6)
    with pytest.raises(ValueError, match="divide by 16"):
        modules.build_unet((256, 100, 1), 6, 4)


def test_output_layer_float32_under_mixed_precision():
    policy = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        model = modules.build_unet((64, 32, 1), 6, 4)
        assert model.get_layer("enc1_conv1").compute_dtype == "bfloat16"
        assert model.get_layer("mask").compute_dtype == "float32"
        assert model(np.zeros((1, 64, 32, 1), np.float32)).dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy(policy)


def test_dice_per_class_hand_values():
    truth = np.array([[1, 1, 0, 0], [2, 2, 0, 0]])
    pred = np.array([[1, 0, 0, 0], [0, 0, 0, 3]])
    d = modules.dice_per_class(truth, pred, [1, 2, 3, 4])
    assert d[0] == pytest.approx(2 * 1 / (2 + 1))  # 0.667
    assert d[1] == 0.0  # in truth, missed
    assert d[2] == 0.0  # predicted, absent from truth
    assert np.isnan(d[3])  # in neither: no Dice, left out of means
    iou = modules.iou_per_class(truth, pred, [1, 2, 4])
    assert iou[0] == pytest.approx(0.5) and iou[1] == 0 and np.isnan(iou[2])


def test_dice_metric_matches_numpy_per_image_rule():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (4, 16, 8))
    truth[0][truth[0] == 2] = 1  # class 2 absent from image 0's truth ...
    probs = rng.random((4, 16, 8, 4)).astype(np.float32)
    probs[..., 3] = 0  # ... class 3 predicted nowhere and in no truth: excluded everywhere
    probs[0, ..., 2] = 0  # ... and not predicted in image 0 either
    pred = probs.argmax(-1)
    expected = np.array([modules.dice_per_class(t, p, [1, 2, 3]) for t, p in zip(truth, pred)])
    assert np.isnan(expected[:, 2]).all()
    per_class = np.nanmean(expected[:, :2], axis=0)
    metric = modules.DiceScore(4)
    metric.update_state(truth[..., None], probs)
    assert float(metric.result()) == pytest.approx(per_class.mean(), abs=1e-6)
    for c in (1, 2):
        m = modules.DiceScore(4, class_id=c)
        m.update_state(truth[:2, ..., None], probs[:2])
        m.update_state(truth[2:, ..., None], probs[2:])  # streaming over batches
        assert float(m.result()) == pytest.approx(per_class[c - 1], abs=1e-6)


def test_binary_dice_metric():
    truth = np.zeros((2, 4, 4, 1), np.float32)
    truth[0, :2] = 1
    pred = np.zeros((2, 4, 4, 1), np.float32)
    pred[0, :1] = 0.9  # 4 of 8 found: Dice 2*4/12
    metric = modules.DiceScore(1)
    metric.update_state(truth, pred)  # image 1 empty in both: excluded
    assert float(metric.result()) == pytest.approx(8 / 12)


def test_losses_are_low_for_perfect_and_high_for_wrong():
    labels = np.zeros((2, 8, 8, 1), np.int32)
    labels[:, 2:6, 2:6] = 5
    perfect = keras.ops.one_hot(labels[..., 0], 6).numpy() * 0.998 + 0.0004
    wrong = np.roll(perfect, 1, axis=-1)
    for loss in (modules.dice_loss, modules.dice_ce_loss, modules.cross_entropy):
        good, bad = loss(labels, perfect).numpy(), loss(labels, wrong).numpy()
        assert good.shape == bad.shape == (2,)  # one value per image: Keras reduces and scales for replicas
        assert np.all(good < 0.05) and np.all(bad > good + 0.3)
    binary = (labels == 5).astype(np.float32)
    assert np.all(modules.dice_ce_loss(binary, binary * 0.99 + 0.005).numpy() < 0.05)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_matches_keras(policy):
    """Outputs, gradients, moving statistics and inference of the fused layer equal Keras' own."""
    import tensorflow as tf
    keras.mixed_precision.set_global_policy(policy)
    try:
        x = tf.constant(np.random.default_rng(0).normal(2, 3, (4, 16, 8, 5)).astype(np.float32))
        r = tf.constant(np.random.default_rng(1).normal(size=(4, 16, 8, 5)).astype(np.float32))
        ref, fused = layers.BatchNormalization(momentum=0.9), modules.FusedBatchNormalization(momentum=0.9)
        weights = [np.full(5, 1.5, np.float32), np.full(5, 0.2, np.float32), np.full(5, 0.5, np.float32),
                   np.full(5, 2.0, np.float32)]
        grads, outs = [], []
        for layer in (ref, fused):
            layer.build(x.shape)
            layer.set_weights(weights)
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(tf.cast(y, tf.float32) * r)
            grads.append([g.numpy() for g in tape.gradient(loss, [x, *layer.trainable_weights])])
            outs.append((y.dtype, tf.cast(y, tf.float32).numpy(), layer(x, training=False).numpy().astype(np.float32)))
        assert outs[0][0] == outs[1][0] == ("bfloat16" if policy == "mixed_bfloat16" else "float32")
        tol = 1e-4 if policy == "float32" else 2e-2  # bfloat16 keeps 8 bits of mantissa
        np.testing.assert_allclose(outs[1][1], outs[0][1], atol=tol * 10)
        np.testing.assert_allclose(outs[1][2], outs[0][2], atol=tol * 10)
        for g_fused, g_ref in zip(grads[1], grads[0]):
            np.testing.assert_allclose(g_fused, g_ref, rtol=tol, atol=tol * np.abs(g_ref).max())
        for w_fused, w_ref in zip(fused.get_weights()[2:], ref.get_weights()[2:]):  # moving mean and variance
            np.testing.assert_allclose(w_fused, w_ref, rtol=1e-5)
        assert not np.allclose(ref.get_weights()[2], weights[2])  # the update really happened
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_fused_batch_norm_falls_back_where_the_kernel_does_not_apply():
    layer = modules.FusedBatchNormalization()
    x = np.random.default_rng(0).random((2, 1, 1, 3)).astype(np.float32)  # one value per channel and image
    assert not layer._fused(keras.ops.convert_to_tensor(x), None)
    assert layer(x, training=True).shape == x.shape
    assert not modules.FusedBatchNormalization(synchronized=True)._fused(keras.ops.zeros((2, 4, 4, 3)), None)
    assert modules.FusedBatchNormalization()._fused(keras.ops.zeros((2, 4, 4, 3)), None)


def test_cross_entropy_matches_keras():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (3, 8, 4, 1))
    probs = keras.ops.softmax(rng.normal(size=(3, 8, 4, 6)).astype(np.float32)).numpy()
    keras_ce = keras.losses.sparse_categorical_crossentropy(labels, probs).numpy().mean(axis=(1, 2))
    np.testing.assert_allclose(modules.cross_entropy(labels, probs).numpy(), keras_ce, rtol=1e-5)
    np.testing.assert_allclose(modules.dice_ce_loss(labels, probs).numpy(),
                               modules.dice_loss(labels, probs).numpy() + keras_ce, rtol=1e-5)


def test_dice_loss_hand_value():
    truth = np.zeros((1, 2, 2, 1), np.float32)
    truth[0, 0, 0] = 1
    pred = np.full((1, 2, 2, 1), 0.5, np.float32)
    # soft Dice = (2 * 0.5 + 1) / (1 + 2 + 1) = 0.5
    assert modules.dice_loss(truth, pred).numpy() == pytest.approx([0.5])


def test_save_load_round_trip_without_custom_objects(tmp_path):
    model = modules.build_unet((32, 16, 1), 6, 4)
    model.compile("adam", modules.dice_ce_loss, metrics=modules.segmentation_metrics(6, [str(i) for i in range(6)]))
    x = np.random.default_rng(0).random((4, 32, 16, 1)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 6, (4, 32, 16, 1))
    model.fit(x, y, epochs=1, verbose=0)
    modules.save_model(model, tmp_path / "model.keras")
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]  # no temporary left behind
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert loaded.optimizer.iterations.numpy() == model.optimizer.iterations.numpy() == 1
    scores = loaded.evaluate(x, y, verbose=0, return_dict=True)
    assert {"loss", "accuracy", "dice", "dice_5"} <= set(scores)
