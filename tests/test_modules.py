"""modules.py: the U-Net's shape, the Dice metric and the losses against hand-computed values, save/load."""
import keras
import numpy as np
import pytest
from keras import layers

import evaluate
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
    logits = model.get_layer("logits")  # training works on logits ...
    assert logits.kernel_size == (1, 1) and logits.activation.__name__ == "linear"
    probs = modules.with_probabilities(model)  # ... the saved model outputs probabilities, with the same weights
    assert probs.get_layer("mask").activation.__name__ == activation and probs.count_params() == model.count_params()
    x = np.random.default_rng(0).random((2, 256, 128, 1)).astype(np.float32)
    p = np.asarray(probs(x))
    assert np.all((p >= 0) & (p <= 1)) and (classes == 1 or np.allclose(p.sum(-1), 1, atol=1e-5))
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


def test_instance_norm_layer_is_per_image_and_survives_saving(tmp_path):
    model = modules.build_unet((32, 16, 1), 3, 4, norm="instance")
    assert not model.non_trainable_weights  # no moving statistics to go stale
    assert not [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    rng = np.random.default_rng(0)
    a, b = rng.random((1, 32, 16, 1), np.float32), 50 * rng.random((1, 32, 16, 1), np.float32)
    alone = model(a, training=True).numpy()
    # An image's output does not depend on the batch it is in, nor on training mode.
    np.testing.assert_allclose(model(np.concatenate([a, b]), training=True).numpy()[:1], alone, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model(a, training=False).numpy(), alone, atol=1e-4)
    modules.save_model(model, tmp_path / "m.keras")
    np.testing.assert_allclose(keras.models.load_model(tmp_path / "m.keras")(a).numpy(), alone, atol=1e-4)
    with pytest.raises(ValueError, match="norm 'layer'"):
        modules.build_unet((32, 16, 1), 3, 4, norm="layer")


def test_output_layer_float32_under_mixed_precision():
    policy = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        model = modules.build_unet((64, 32, 1), 6, 4)
        assert model.get_layer("enc1_conv1").compute_dtype == "bfloat16"
        assert model.get_layer("logits").compute_dtype == "float32"
        assert model(np.zeros((1, 64, 32, 1), np.float32)).dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy(policy)


def test_dice_metric_matches_numpy_per_image_rule():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (4, 16, 8))
    truth[0][truth[0] == 2] = 1  # class 2 absent from image 0's truth ...
    logits = rng.normal(size=(4, 16, 8, 4)).astype(np.float32)
    logits[..., 3] = -9  # ... class 3 predicted nowhere and in no truth: excluded everywhere
    logits[0, ..., 2] = -9  # ... and not predicted in image 0 either
    pred = logits.argmax(-1)
    expected = np.array([evaluate.dice_per_class(t, p, [1, 2, 3]) for t, p in zip(truth, pred)])
    assert np.isnan(expected[:, 2]).all()
    per_class = np.nanmean(expected[:, :2], axis=0)
    metric = modules.DiceScores(["bg", "a", "b", "c"])
    metric.update_state(truth[:2, ..., None], logits[:2])
    metric.update_state(truth[2:, ..., None], logits[2:])  # streaming over batches
    result = {k: float(v) for k, v in metric.result().items()}
    assert result["dice"] == pytest.approx(per_class.mean(), abs=1e-6)
    assert result["dice_a"] == pytest.approx(per_class[0], abs=1e-6)
    assert result["dice_b"] == pytest.approx(per_class[1], abs=1e-6)



def test_dice_metric_reports_no_value_for_a_class_no_image_scored():
    """evaluate.CONVENTION: a class in no truth and no prediction of any image has no score (NaN), not 0; the
    mean foreground Dice stays finite, over the classes that have one. Eagerly and inside Keras' evaluate."""
    truth = np.zeros((2, 8, 4, 1), np.int32)
    truth[:, :4] = 1
    truth[0, 4:] = 2
    logits = np.full((2, 8, 4, 4), -5.0, np.float32)  # class 3 ("c") predicted nowhere and in no truth
    logits[:, :4, :, 1] = 5.0  # a: found in both images
    logits[0, 4:6, :, 2] = 5.0  # b: half found in image 0 (Dice 2*8/24), in neither truth nor prediction of image 1
    metric = modules.DiceScores(["bg", "a", "b", "c"])
    result = {k: float(v) for k, v in metric.result().items()}  # nothing seen yet: no value for any class
    assert np.isnan([result["dice_a"], result["dice_b"], result["dice_c"]]).all() and result["dice"] == 0.0
    metric.update_state(truth, logits)
    result = {k: float(v) for k, v in metric.result().items()}
    assert result["dice_a"] == pytest.approx(1.0) and result["dice_b"] == pytest.approx(16 / 24)
    assert np.isnan(result["dice_c"])
    assert result["dice"] == pytest.approx((1 + 16 / 24) / 2)
    # The same in graph mode, through the metrics train.py compiles: a model that predicts a everywhere.
    inputs = keras.Input((8, 4, 1))
    model = keras.Model(inputs, layers.Conv2D(4, 1, kernel_initializer="zeros", name="logits")(inputs))
    model.get_layer("logits").bias.assign([0.0, 1.0, 0.0, 0.0])
    model.compile(loss=modules.SegmentationLoss(), metrics=modules.segmentation_metrics(["bg", "a", "b", "c"]))
    scores = model.evaluate(np.zeros((2, 8, 4, 1), np.float32), np.ones((2, 8, 4, 1), np.int32), verbose=0,
                            return_dict=True)
    assert scores["dice_a"] == pytest.approx(1.0) and scores["dice"] == pytest.approx(1.0)
    assert np.isnan(scores["dice_b"]) and np.isnan(scores["dice_c"])
    binary = modules.DiceScores(["bladder"])
    binary.update_state(np.zeros((2, 4, 4, 1), np.float32), np.full((2, 4, 4, 1), -3.0, np.float32))
    assert np.isnan(float(binary.result()["dice_bladder"])) and float(binary.result()["dice"]) == 0.0

def test_binary_dice_metric_on_logits():
    truth = np.zeros((2, 4, 4, 1), np.float32)
    truth[0, :2] = 1
    logits = np.full((2, 4, 4, 1), -3.0, np.float32)
    logits[0, :1] = 2.0  # 4 of 8 found: Dice 2*4/12
    metric = modules.DiceScores(["bladder"])
    metric.update_state(truth, logits)  # image 1 empty in both: excluded
    result = metric.result()
    assert float(result["dice"]) == pytest.approx(8 / 12) and float(result["dice_bladder"]) == pytest.approx(8 / 12)


def _loss(terms="dice_ce", over="image"):
    return lambda y, logits: modules.SegmentationLoss(terms, over).call(y, logits).numpy()


def test_losses_are_low_for_perfect_and_high_for_wrong():
    labels = np.zeros((2, 8, 8, 1), np.int32)
    labels[:, 2:6, 2:6] = 5
    perfect = keras.ops.one_hot(labels[..., 0], 6).numpy() * 16 - 8  # confident logits
    wrong = np.roll(perfect, 1, axis=-1)
    for terms in modules.LOSSES:
        good, bad = _loss(terms)(labels, perfect), _loss(terms)(labels, wrong)
        assert good.shape == bad.shape == (2,)  # one value per image: Keras reduces and scales for replicas
        assert np.all(good < 0.05) and np.all(bad > good + 0.3)
    binary = (labels == 5).astype(np.float32)
    assert np.all(_loss()(binary, binary * 16 - 8) < 0.05)


def _every_label(n=2):
    """n 8x8 label maps with all six labels, each in a block of its own."""
    labels = np.zeros((n, 8, 8, 1), np.int32)
    labels[:, :4, 4:] = 1
    labels[:, 4:, :2] = 2
    labels[:, 4:, 2:4] = 3
    labels[:, 4:6, 4:] = 4
    labels[:, 6:, 4:] = 5
    return labels


@pytest.mark.parametrize("over", ["image", "batch"])
@pytest.mark.parametrize("terms", modules.LOSSES)
@pytest.mark.parametrize("label", [1, 2, 3, 4, 5])
def test_every_label_counts_in_the_loss(terms, over, label):
    """A prediction wrong only on one label's pixels (confident background there) costs more than the perfect
    one, and from an undecided start (equal logits) the gradient at those pixels raises that label's logit: no
    class is left out of the Dice or the cross-entropy (rectum and prostate, 4 and 5, are the ones a range such
    as 0..3 forgets; such a loss gives their logits a gradient 0, or under 3e-4 through the other classes' Dice,
    where these losses give 2e-3 or more)."""
    import tensorflow as tf
    labels = _every_label()
    perfect = keras.ops.one_hot(labels[..., 0], 6).numpy() * 16 - 8
    wrong = perfect.copy()
    wrong[labels[..., 0] == label] = np.eye(6, dtype=np.float32)[0] * 16 - 8  # background where `label` is
    assert np.all(_loss(terms, over)(labels, wrong) > _loss(terms, over)(labels, perfect) + 0.05)
    x = tf.Variable(np.zeros((2, 8, 8, 6), np.float32))  # (confident logits leave the soft Dice no gradient)
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(modules.SegmentationLoss(terms, over).call(labels, x))
    grad = tape.gradient(value, x).numpy()[..., label][labels[..., 0] == label]
    assert np.all(grad < -1e-3), grad  # descending the loss raises the right logit at every pixel of the label


def test_cross_entropy_from_logits_matches_keras_and_keeps_a_gradient_when_confidently_wrong():
    import tensorflow as tf
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (3, 8, 4, 1))
    logits = rng.normal(size=(3, 8, 4, 6)).astype(np.float32)
    keras_ce = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True).numpy().mean(axis=(1, 2))
    np.testing.assert_allclose(_loss("ce")(labels, logits), keras_ce, rtol=1e-5)
    np.testing.assert_allclose(_loss("dice_ce")(labels, logits), _loss("dice")(labels, logits) + keras_ce, rtol=1e-5)
    # A pixel whose true class has p ~ e^-40: clipped probabilities gave it no gradient, log-softmax does.
    wrong = np.zeros((1, 1, 1, 6), np.float32)
    wrong[..., 1] = 40.0
    x = tf.Variable(wrong)
    with tf.GradientTape() as tape:
        loss = modules.SegmentationLoss("ce").call(np.zeros((1, 1, 1, 1), np.int32), x)
    grad = tape.gradient(loss, x).numpy()
    assert grad[0, 0, 0, 0] == pytest.approx(-1.0, abs=1e-6) and grad[0, 0, 0, 1] == pytest.approx(1.0, abs=1e-6)


def test_dice_loss_hand_values_per_image_and_over_the_batch():
    truth = np.zeros((2, 2, 2, 1), np.float32)
    truth[0, 0, 0] = 1
    logits = np.zeros((2, 2, 2, 1), np.float32)  # p = 0.5 everywhere
    # image 0: (2 * 0.5 + 1) / (1 + 2 + 1) = 0.5; image 1 (empty): (0 + 1) / (0 + 2 + 1) = 1/3
    np.testing.assert_allclose(_loss("dice")(truth, logits), [0.5, 2 / 3], rtol=1e-6)
    # over the batch: (2 * 0.5 + 1) / (1 + 4 + 1) = 1/3, the same value for both images
    np.testing.assert_allclose(_loss("dice", "batch")(truth, logits), [2 / 3, 2 / 3], rtol=1e-6)


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
        assert len(grads[1]) == len(grads[0]) == 3  # the input, gamma and beta
        for g_fused, g_ref in zip(grads[1], grads[0]):
            np.testing.assert_allclose(g_fused, g_ref, rtol=tol, atol=tol * np.abs(g_ref).max())
        assert len(fused.get_weights()) == len(ref.get_weights()) == 4
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


def test_save_load_round_trip_without_custom_objects(tmp_path):
    model = modules.build_unet((32, 16, 1), 6, 4)
    model.compile("adam", modules.SegmentationLoss(), metrics=modules.segmentation_metrics([str(i) for i in range(6)]))
    model.optimizer.build(model.trainable_variables)
    x = np.random.default_rng(0).random((4, 32, 16, 1)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 6, (4, 32, 16, 1))
    model.fit(x, y, epochs=1, verbose=0)
    modules.save_model(model, tmp_path / "checkpoint.keras")
    modules.save_model(modules.with_probabilities(model), tmp_path / "model.keras")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.keras", "model.keras"]  # no temporaries left
    loaded = keras.models.load_model(tmp_path / "checkpoint.keras")
    assert loaded.optimizer.iterations.numpy() == model.optimizer.iterations.numpy() == 1
    scores = loaded.evaluate(x, y, verbose=0, return_dict=True)
    assert {"loss", "accuracy", "dice", "dice_5"} <= set(scores)
    probs = keras.models.load_model(tmp_path / "model.keras", compile=False)
    np.testing.assert_allclose(probs(x, training=False), keras.ops.softmax(model(x, training=False)), atol=1e-5)
