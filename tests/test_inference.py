"""predict.py --input on 2D and 3D files: orientation, spacing and field of view undone exactly, the output files,
the --axis override, and a real 3D MRI volume (the MNI152 T1 template from the nilearn wheel) end to end."""
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT

import geometry
import inference
import predict
from preprocess import Preprocessing, resize_labels


def _canonical(tiny_data):
    """A phantom test volume as a 3D RAS scan: 256 x 128 pixels of 1 mm, 8 slices 3 mm apart."""
    files = sorted((tiny_data / "keras_slices_test").glob("case_*"))
    first = files[0].name.split("_slice_")[0]
    slices = [np.squeeze(nib.load(f).get_fdata(dtype=np.float32)) for f in files if f.name.startswith(first)]
    return np.stack(slices, axis=-1), np.diag([1.0, 1.0, 3.0, 1.0])


def _variants(volume, affine):
    """(name, data, affine, function bringing a mask of that file back onto the canonical grid)."""
    rows, cols, n = volume.shape
    flip = np.array([[-1, 0, 0, rows - 1], [0, -1, 0, cols - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    lps = affine @ flip  # the array flipped along axes 0 and 1, its affine saying so: the same anatomy, stored LPS
    perm = affine[:, [2, 0, 1, 3]]  # slices first
    angle = np.deg2rad(20)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    fine = affine @ np.diag([0.8, 0.8, 1.0, 1.0])  # 0.8 mm pixels, the same field of view
    fine_data = np.stack([resize_image_linear(volume[..., k], (320, 160)) for k in range(n)], -1)
    wide = affine.copy()
    wide[:2, 3] = [-64, -32]  # 64 and 32 mm more on each side
    # Air around the body: each slice padded with its own background level (its minimum).
    wide_data = np.stack([np.pad(volume[..., k], ((64, 64), (32, 32)), constant_values=float(volume[..., k].min()))
                          for k in range(n)], -1)
    return [("ras", volume, affine, lambda m: m),
            ("lps", volume[::-1, ::-1].copy(), lps, lambda m: m[::-1, ::-1]),
            ("slices_first", np.moveaxis(volume, 2, 0).copy(), perm, lambda m: np.moveaxis(m, 0, 2)),
            ("oblique", volume, rot @ affine, lambda m: m),
            ("spacing_0.8mm", fine_data, fine, lambda m: np.stack([resize_labels(m[..., k], (rows, cols))
                                                                   for k in range(n)], -1)),
            ("wider_fov", wide_data, wide, lambda m: m[64:-64, 32:-32])]


def resize_image_linear(image, size):
    import cv2
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def test_orientations_spacings_and_fields_of_view_give_the_canonical_mask(tiny_run, tiny_data, tmp_path, capsys):
    volume, affine = _canonical(tiny_data)
    variants = _variants(volume, affine)
    paths = []
    for name, data, aff, _ in variants:
        paths.append(tmp_path / "in" / f"{name}.nii.gz")
        paths[-1].parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(data, aff), paths[-1])
    out = tmp_path / "out"
    assert predict.main(["--run", str(tiny_run), "--input", *map(str, paths), "--output-dir", str(out), "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("slices_first.nii.gz: 8x256x128 SRA, 8 slice(s) along axis 0" in line for line in lines), lines
    assert any("spacing_0.8mm.nii.gz" in line and "resampled x[0.2, 0.2]" in line for line in lines), lines
    canonical = np.asanyarray(nib.load(out / "ras_mask.nii.gz").dataobj)
    assert len(np.unique(canonical)) >= 3, "the session's model should find several labels"
    for (name, data, aff, back), path in zip(variants, paths):
        written = nib.load(out / f"{name}_mask.nii.gz")
        assert written.shape == data.shape and np.allclose(written.affine, aff, atol=1e-5)
        assert written.header.get_intent()[0] == "label" and written.get_data_dtype() == np.uint8
        source = nib.load(path)
        for code in ("qform_code", "sform_code"):
            assert written.header[code] == source.header[code]
        agreement = (back(np.asanyarray(written.dataobj)) == canonical).mean()
        minimum = 0.97 if name in ("spacing_0.8mm", "wider_fov") else 0.99
        with capsys.disabled():  # shown with `pytest -s`
            print(f"\n{name}: {agreement:.4f} of voxels agree with the RAS volume's mask (minimum {minimum})")
        assert agreement >= minimum, (name, agreement)


def test_probabilities_uncertainty_preview_and_the_axis_override(tiny_run, tiny_data, tmp_path, capsys):
    volume, affine = _canonical(tiny_data)
    path = tmp_path / "scan.nii"
    nib.save(nib.Nifti1Image(volume, affine), path)
    flat = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(volume[..., 3:4], affine), flat)  # one slice, (256, 128, 1)
    out = tmp_path / "out"
    assert predict.main(["--run", str(tiny_run), "--input", str(path), str(flat), "--output-dir", str(out),
                         "--save-probabilities", "--save-uncertainty", "--preview", "-q"]) == 0
    probs = nib.load(out / "scan_probabilities.nii").get_fdata(dtype=np.float32)
    assert probs.shape == (*volume.shape, 6) and probs.min() >= 0 and probs.max() <= 1
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-4)
    unsure = nib.load(out / "scan_uncertainty.nii").get_fdata(dtype=np.float32)
    assert unsure.shape == volume.shape and 0 <= unsure.min() and unsure.max() <= 1 and unsure.std() > 0
    mask = np.asanyarray(nib.load(out / "scan_mask.nii").dataobj)
    np.testing.assert_array_equal(mask, inference.labels_of(probs))
    # A volume is segmented slice by slice: its slice 3 gets the probabilities of the same slice on its own (up to
    # float rounding: the network runs on batches of 8 slices, then of 1).
    alone = nib.load(out / "slice_probabilities.nii.gz").get_fdata(dtype=np.float32)[:, :, 0]
    np.testing.assert_allclose(probs[:, :, 3], alone, atol=1e-4)
    agree = mask[..., 3] == np.asanyarray(nib.load(out / "slice_mask.nii.gz").dataobj)[..., 0]
    assert agree.mean() > 0.999
    assert (out / "scan_mask.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert predict.main(["--run", str(tiny_run), "--input", str(path), "--output-dir", str(tmp_path / "axis"),
                         "--axis", "2", "-q"]) == 0
    assert "warning: --axis 2" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "axis" / "scan_mask.nii").dataobj), mask)


def test_entropy_and_largest_part():
    probs = np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], np.float32)
    np.testing.assert_allclose(inference.entropy(probs), [0, 1], atol=1e-5)
    np.testing.assert_allclose(inference.entropy(np.array([[0.5], [1.0]], np.float32)), [1, 0], atol=1e-5)
    labels = np.zeros((3, 8, 8), np.uint8)
    labels[:, 1:4, 1:4] = 3  # 27 voxels
    labels[1, 6, 6] = 3  # a stray voxel of the same organ
    labels[0, 6, 0] = 2  # another label, untouched
    kept = inference.keep_largest(labels, [3])
    assert kept[1, 6, 6] == 0 and (kept == 3).sum() == 27 and kept[0, 6, 0] == 2


def test_a_real_mri_volume_runs_end_to_end(tiny_run, tmp_path):
    """The MNI152 2009a T1 (197 x 233 x 189, 1 mm, RAS), shipped inside the nilearn wheel, through --input."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mni
    try:
        t1 = mni.template_file(tmp_path / "work", "t1")
    except subprocess.CalledProcessError as e:
        pytest.skip(f"the nilearn wheel could not be downloaded here ({e}); this test needs the package registry")
    out = tmp_path / "out"
    assert predict.main(["--run", str(tiny_run), "--input", str(t1), "--output-dir", str(out), "-q"]) == 0
    scan, mask = nib.load(t1), nib.load(out / "mni_icbm152_t1_tal_nlin_sym_09a_converted_mask.nii.gz")
    assert mask.shape == scan.shape == (197, 233, 189) and np.allclose(mask.affine, scan.affine)
    labels = np.asanyarray(mask.dataobj)
    assert labels.dtype == np.uint8 and labels.max() <= 5


class _ShapeModel:
    """A stand-in model: records the input shapes it is given; probability 1 for label 1 where the input is bright."""

    def __init__(self):
        self.shapes = []

    def predict_on_batch(self, batch):
        self.shapes.append(batch.shape[1:3])
        bright = (batch[..., 0] > 0.5).astype(np.float32)
        return np.stack([1 - bright, bright], -1)


@pytest.mark.parametrize("fit", ["resize", "crop"])
def test_without_geometry_slices_are_fitted_as_training_fitted_them(fit):
    """No pixel spacing known (an old run, or a file without an affine): a crop-trained model must get the
    file's own pixels, never a squashed slice; a resize-trained one gets the slice resized, as in training."""
    raw = np.zeros((1, 64, 40), np.float32)
    raw[0, 20:40, 8:24] = 100.0
    model = _ShapeModel()
    probs, done = inference.Predictor(model, Preprocessing(size=(32, 32), fit=fit, num_classes=2)).slices(raw)
    assert probs.shape == (1, 64, 40, 2)
    assert all(shape == (32, 32) for shape in model.shapes)
    assert done["fit"] == ("resize" if fit == "resize" else "pixels")
    labels = inference.labels_of(probs)[0]
    assert labels[20:40, 8:24].mean() > 0.9 and labels.sum() < 1.2 * 20 * 16


class _RingModel:
    """A stand-in network: class k where the normalised intensity is near k / (K - 1), pixel by pixel."""

    def __init__(self, classes):
        self.classes = classes

    def predict_on_batch(self, batch):
        centres = np.linspace(0, 1, self.classes, dtype=np.float32)
        logits = -60.0 * (batch - centres) ** 2  # (b, rows, cols, K)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)


def _rings(spacing, field=(112.0, 96.0), slices=2):
    """Concentric rings of labels 1..5 (10 mm wide) rendered at this (row, col) pixel spacing: voxels and labels."""
    rows, cols = (int(round(f / s)) for f, s in zip(field, spacing))
    r = (np.arange(rows) + 0.5) * spacing[0] - field[0] / 2
    c = (np.arange(cols) + 0.5) * spacing[1] - field[1] / 2
    radius = np.hypot(*np.meshgrid(r, c, indexing="ij"))
    labels = np.select([radius < 10, radius < 20, radius < 30, radius < 40, radius < 47], [5, 4, 3, 2, 1], 0)
    return np.repeat((labels * 200.0)[..., None], slices, -1).astype(np.float32), labels.astype(np.uint8)


@pytest.mark.parametrize("spacing", [0.47, 0.8, 1.5, 2.5, 3.0])
def test_input_at_any_spacing_gives_the_mask_of_the_model_spacing(spacing):
    """A 6-class model of 1 mm pixels segments a scan of other pixel spacings, per axis and both (OpenCV's area
    resize refuses more than 4 channels at a non-integer factor): the mask, brought to 1 mm, matches the mask of
    the same scan at 1 mm."""
    prep = Preprocessing(size=(128, 112), norm="minmax", num_classes=6, fit="crop", spacing=(1.0, 1.0))
    predictor = inference.Predictor(_RingModel(6), prep, codes="RAS", data_spacing=(1.0, 1.0))
    reference = inference.labels_of(predictor.volume(*_volume((1.0, 1.0)))[0])[..., 0]
    assert np.array_equal(reference, _rings((1.0, 1.0))[1])
    for pixel in [(spacing, 1.0), (1.0, spacing), (spacing, spacing)]:
        probs, done = predictor.volume(*_volume(pixel))
        assert probs.shape[:2] == _rings(pixel)[1].shape and probs.shape[-1] == 6
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
        mask = resize_labels(inference.labels_of(probs)[..., 0], reference.shape)
        for label in range(1, 6):
            t, p = reference == label, mask == label
            dice = 2 * (t & p).sum() / (t.sum() + p.sum())
            assert dice > 0.85, (pixel, label, dice)


def _volume(pixel):
    data, _ = _rings(pixel)
    return data, np.diag([pixel[0], pixel[1], 2.0, 1.0])


@pytest.mark.parametrize("classes", [1, 2, 4, 5, 6, 7, 32])
def test_probabilities_resample_for_any_class_count_and_factor(classes):
    rng = np.random.default_rng(classes)
    probs = rng.random((2, 40, 30, classes)).astype(np.float32)
    probs /= probs.sum(-1, keepdims=True)
    for factors in [(0.47, 1.0), (1.0, 0.8), (1.5, 2.5), (3.0, 0.47), (0.8, 0.8)]:
        out = geometry.resample_slices(probs, *factors)
        assert out.shape == (2, round(40 * factors[0]), round(30 * factors[1]), classes)
        np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-4)


def test_a_larger_slice_gets_one_input_around_its_anatomy_and_the_networks_own_air_outside():
    """A slice larger than the network input whose anatomy fits in one: the input is placed around the anatomy
    (off-centre here), and the pixels outside it get the network's probabilities for the padding value, not a
    made-up certain background."""
    model = _RingModel(6)
    prep = Preprocessing(size=(32, 32), norm="minmax", num_classes=6, fit="crop", spacing=(1.0, 1.0))
    raw = np.zeros((1, 64, 96), np.float32)
    raw[0, 40:56, 60:80] = 1000.0  # anatomy of label 5, far from the centre
    probs, done = inference.Predictor(model, prep).slices(raw, (1.0, 1.0))
    assert done["centred"] == 1 and done["tiles"] == 1
    labels = inference.labels_of(probs)[0]
    assert (labels[40:56, 60:80] == 5).all() and (labels == 5).sum() == 16 * 20
    air = model.predict_on_batch(np.zeros((1, 1, 1, 1), np.float32))[0, 0, 0]
    np.testing.assert_allclose(probs[0, 0, 0], air, atol=1e-6)  # far outside the window
    assert inference.entropy(probs)[0, 0, 0] > 0.1
