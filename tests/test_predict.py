"""predict.py: scoring a split end to end (Dice, mL, the CSVs, masks), binary runs, TTA, postprocessing, errors."""
import csv
import gzip
import json
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_layout, write_nifti

import dataset
import predict

FOREGROUND = ["body", "bone", "bladder", "rectum", "prostate"]
METRIC_KEYS = {"split", "n_slices", "n_volumes", "classes", "dice_per_slice", "dice_per_volume", "iou_per_slice",
               "iou_per_volume", "mean_foreground_dice", "mean_foreground_dice_per_volume", "physical", "convention",
               "physical_convention", "run", "model", "data_dir", "tta", "postprocess", "seconds"}


# Floors on the tiny run's mean per-slice Dice on the test split (test_scoring_a_split_end_to_end). It reached body
# 0.905-0.913, bone 0.55-0.60, bladder 0.25-0.42 (a few false-positive slices count 0); rectum and prostate stay at 0
# (see test_train.LEARNED). Probabilities flipped upside down before they become labels give body 0.83-0.86, bone
# 0.40-0.41; a shift of 3 pixels, body 0.90: test_scoring_keeps_every_pixel_where_it_is catches such shifts.
SCORED = {"body": 0.88, "bone": 0.45, "bladder": 0.1, "rectum": 0.0, "prostate": 0.0}


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def independent_dice(truth, pred, label):
    t, p = truth == label, pred == label
    return np.nan if t.sum() + p.sum() == 0 else 2 * (t & p).sum() / (t.sum() + p.sum())


def test_scoring_a_split_end_to_end(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "eval"
    assert predict.main(["--run", str(tiny_run), "--split", "test", "--out", str(out), "--save-masks",
                         "--save-probabilities", "--slices", "3", "--figures", "2", "-q"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics) and metrics["tta"] is False and metrics["postprocess"] is None
    assert metrics["classes"] == FOREGROUND and metrics["n_slices"] == 16 and metrics["n_volumes"] == 2
    assert set(metrics["dice_per_slice"]["prostate"]) == {"mean", "std", "n"}
    assert set(metrics["physical"]["body"]) == {"hd95_mm", "asd_mm", "volume_error_ml", "volumes_without_distance"}
    for name in ("test_image_prediction_comparison_3.png", "dice_boxplot.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert len(list(out.glob("test_worst_*.png"))) == 2

    rows = read_csv(out / "per_slice.csv")
    assert len(rows) == 16 and {"144"} <= {r["cols"] for r in rows}  # the tiny phantom has a 256x144 volume
    seg_dir, img_dir = tiny_data / "keras_slices_seg_test", tiny_data / "keras_slices_test"
    masks = {}
    for row in rows:
        mask_name = row["file"].replace("case_", "seg_", 1)
        written = nib.load(out / "masks" / mask_name)
        image = nib.load(img_dir / row["file"])
        assert written.shape == image.shape and np.allclose(written.affine, image.affine)
        pred = np.squeeze(np.asanyarray(written.dataobj))
        assert pred.dtype == np.uint8 and pred.shape == (int(row["rows"]), int(row["cols"]))
        truth = np.rint(np.squeeze(np.asanyarray(nib.load(seg_dir / mask_name).dataobj))).astype(int)
        masks[row["file"]] = truth
        probs = nib.load(out / "masks" / mask_name.replace(".nii.gz", "_probabilities.nii.gz")).get_fdata()
        assert probs.shape == (*pred.shape, 1, 6)
        np.testing.assert_array_equal(probs[:, :, 0].argmax(-1), pred)
        for label, name in enumerate(FOREGROUND, start=1):
            expected, cell = independent_dice(truth, pred, label), row[f"dice_{name}"]
            assert (cell == "") if np.isnan(expected) else float(cell) == pytest.approx(expected, abs=1e-6)
    body = [float(r["dice_body"]) for r in rows if r["dice_body"]]
    assert metrics["dice_per_slice"]["body"]["mean"] == pytest.approx(np.mean(body), abs=1e-5)
    assert metrics["dice_per_slice"]["body"]["n"] == len(body)
    dice = {name: metrics["dice_per_slice"][name]["mean"] for name in FOREGROUND}
    assert all(dice[name] >= floor for name, floor in SCORED.items()), dice  # a number, and no worse than this
    # per_volume.csv: the body's volume in mL from the masks on disk (1 x 1 mm pixels, 3 mm slices).
    volumes = read_csv(out / "per_volume.csv")
    assert len(volumes) == 2 * len(FOREGROUND)
    for v in (r for r in volumes if r["label"] == "body"):
        slices = [t for f, t in masks.items() if f.startswith(v["volume"])]
        assert float(v["truth_ml"]) == pytest.approx(sum((t == 1).sum() for t in slices) * 3 / 1000, rel=1e-6)


def test_binary_run_scores_its_target_label(tiny_run, tiny_data, tmp_path):
    import modules
    run = tmp_path / "binary"
    run.mkdir()
    cfg = json.loads((tiny_run / "config.json").read_text())
    cfg.update(target="prostate", target_ids=[5], channel_names=["prostate"])
    (run / "config.json").write_text(json.dumps(cfg))
    untrained = modules.with_probabilities(modules.build_unet((64, 32, 1), 1, 4))  # untrained is enough here
    modules.save_model(untrained, run / "model.keras")
    out = tmp_path / "eval"
    assert predict.main(["--run", str(run), "--out", str(out), "--save-masks", "--figures", "1", "-q"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["prostate"] and list(metrics["dice_per_volume"]) == ["prostate"]
    assert metrics["mean_foreground_dice"] == metrics["dice_per_slice"]["prostate"]["mean"]
    for row in read_csv(out / "per_slice.csv"):
        name = row["file"].replace("case_", "seg_", 1)
        pred = np.squeeze(np.asanyarray(nib.load(out / "masks" / name).dataobj))
        truth = np.squeeze(np.asanyarray(nib.load(tiny_data / "keras_slices_seg_test" / name).dataobj)) == 5
        assert set(np.unique(pred)) <= {0, 1}
        expected = independent_dice(truth.astype(int), pred, 1)
        cell = row["dice_prostate"]
        assert (cell == "") if np.isnan(expected) else float(cell) == pytest.approx(expected, abs=1e-6)


def test_tta_averages_the_left_right_flip_and_postprocess_names_its_labels(tiny_run, tmp_path):
    run = predict.load_run(tiny_run, tta=True)
    x = np.random.default_rng(0).random((2, 64, 32, 1), np.float32)
    model = run.predictor.model
    flipped = np.asarray(model(x[:, ::-1].copy(), training=False))[:, ::-1]
    np.testing.assert_allclose(run.predictor.network(x), (np.asarray(model(x, training=False)) + flipped) / 2,
                               atol=1e-5)
    out = tmp_path / "tta"
    assert predict.main(["--run", str(tiny_run), "--out", str(out), "--tta", "--postprocess", "--figures", "0",
                         "-q"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tta"] is True and metrics["postprocess"] == "organs"
    assert predict.organ_labels(run, "organs") == [3, 4, 5] and predict.organ_labels(run, "bone") == [2]
    with pytest.raises(predict.DataError, match=r"\['liver'\] are not among the run's labels"):
        predict.organ_labels(run, "bladder,liver")


def test_unusable_input_files_name_the_file(tiny_run, tmp_path, capsys):
    bad = np.ones((256, 128), np.float32)
    bad[3, 4] = np.nan
    nan_file = write_nifti(tmp_path / "nan.nii.gz", bad)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(nan_file.read_bytes()[:40])
    series = write_nifti(tmp_path / "series.nii.gz", np.ones((32, 16, 4, 3), np.float32))
    complex_file = tmp_path / "complex.nii"
    nib.save(nib.Nifti1Image(np.ones((32, 16, 4), np.complex64), np.eye(4)), complex_file)
    no_affine = nib.Nifti1Image(np.ones((32, 16, 4), np.float32), None)
    no_affine.set_qform(None, code=0)
    no_affine.set_sform(None, code=0)
    nib.save(no_affine, tmp_path / "no_affine.nii")
    flat = np.eye(4)
    flat[2, 2] = 0  # a voxel axis of size 0
    singular_image = nib.Nifti1Image(np.ones((32, 16, 4), np.float32), None)
    singular_image.set_qform(None, code=0)
    singular_image.set_sform(flat, code=2)
    singular = tmp_path / "singular.nii"
    nib.save(singular_image, singular)
    for path, message in ((nan_file, "NaN/Inf"), (broken, "truncated or corrupt gzip"), (tmp_path / "x.png", "NIfTI"),
                          (series, "a 4D series has no single segmentation"),
                          (complex_file, "not a plain numeric type"),
                          (tmp_path / "no_affine.nii", "no usable affine (qform_code and sform_code are both 0)"),
                          (singular, "no usable affine")):
        assert predict.main(["--run", str(tiny_run), "--input", str(path), "--output-dir", str(tmp_path), "-q"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(path) in err and message in err and "Traceback" not in err


# ----------------------------------------------------------------------------- errors

@pytest.fixture
def run_copy(tiny_run, tmp_path):
    return Path(shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoint", "eval-*")))


def expect_error(argv, capsys, *fragments):
    assert predict.main([*argv, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_missing_model_is_reported(run_copy, tmp_path, capsys):
    (run_copy / "model.keras").unlink()
    expect_error(["--run", str(run_copy), "--out", str(tmp_path / "o")], capsys, str(run_copy / "model.keras"),
                 "no such model file")


def test_truncated_model_is_reported(run_copy, tmp_path, capsys):
    path = run_copy / "model.keras"
    path.write_bytes(path.read_bytes()[:2000])
    expect_error(["--run", str(run_copy), "--out", str(tmp_path / "o")], capsys, str(path),
                 "not a readable Keras model")


def test_config_that_does_not_match_the_model_is_reported(run_copy, tmp_path, capsys):
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg["channel_names"] = cfg["class_names"] = ["background", "body", "bone"]
    cfg["num_classes"] = cfg["preprocessing"]["num_classes"] = 3  # a config of another run, true to itself
    (run_copy / "config.json").write_text(json.dumps(cfg))
    expect_error(["--run", str(run_copy), "--out", str(tmp_path / "o")], capsys, str(run_copy / "config.json"),
                 "'output channels': 6", "'output channels': 3")
    cfg["channel_names"] = ["background", "body"]  # one that contradicts itself
    (run_copy / "config.json").write_text(json.dumps(cfg))
    expect_error(["--run", str(run_copy), "--out", str(tmp_path / "o")], capsys, str(run_copy / "config.json"),
                 "contradicts itself")


def test_labels_beyond_the_runs_classes_are_reported(tiny_run, tmp_path, capsys):
    data = make_layout(tmp_path / "data", splits=("test",))
    seg = data / "keras_slices_seg_test" / "seg_001_week_0_slice_1.nii.gz"
    write_nifti(seg, np.full((256, 128), 7.0, np.float32))
    expect_error(["--run", str(tiny_run), "--data-dir", str(data), "--out", str(tmp_path / "o")], capsys,
                 str(seg), "labels [7] found, expected 0..5")


def test_skip_bad_and_max_bad_fraction(tiny_run, tmp_path, capsys):
    data = make_layout(tmp_path / "data", splits=("test",))  # 3 pairs
    seg = data / "keras_slices_seg_test" / "seg_001_week_0_slice_1.nii.gz"
    write_nifti(seg, np.full((256, 128), 7.0, np.float32))
    argv = ["--run", str(tiny_run), "--data-dir", str(data), "--out", str(tmp_path / "o"),
            "--cache-dir", str(tmp_path / "cache"), "--skip-bad", "--figures", "0"]
    expect_error(argv, capsys, "1 of 3 pairs are broken, more than the allowed 5%", str(seg))
    with pytest.warns(UserWarning, match="skipping"):
        assert predict.main([*argv, "--max-bad-fraction", "0.5", "-q"]) == 0
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["n_slices"] == 2


class _BandModel:
    """A stand-in network, pixel by pixel: label 1, 2, 3 or 4 by the band of the normalised intensity."""

    def predict_on_batch(self, batch):
        return np.eye(6, dtype=np.float32)[np.digitize(batch[..., 0], [0.1875, 0.5, 0.8125]) + 1]


def test_scoring_keeps_every_pixel_where_it_is(tiny_run, tmp_path):
    """Slices of four quadrants (intensities 100, 400, 600, 900: 0, 0.375, 0.625 and 1 after percentile scaling)
    through predict_split with the tiny run's preprocessing and a pixel-by-pixel stand-in network: every pixel
    away from the quadrants' borders gets its own quadrant's label, the image's edges included. Probabilities
    flipped or shifted on their way to labels fail this; a trained model's Dice is too coarse to."""
    image = np.full((256, 128), 900.0, np.float32)
    image[:128, :64], image[:128, 64:], image[128:, :64] = 100.0, 400.0, 600.0
    expected = np.full((256, 128), 4, np.uint8)
    expected[:128, :64], expected[:128, 64:], expected[128:, :64] = 1, 2, 3
    refs = []
    for sl in (0, 1):
        path = write_nifti(tmp_path / f"case_001_week_0_slice_{sl}.nii.gz", image)
        refs.append(dataset.SliceRef(str(path), str(path), 1, 0, sl))
    run = predict.load_run(tiny_run)
    run.predictor.model = _BandModel()
    preds = predict.predict_split(run, refs, False)[0]
    away = np.ones((256, 128), bool)
    away[120:136] = away[:, 56:72] = False  # the network sees 4 mm pixels: the borders blur over a few
    for pred in preds:
        assert pred.shape == (256, 128)
        assert np.array_equal(pred[away], expected[away]), np.argwhere((pred != expected) & away)[:5]


def _ref(case, slice_):
    return dataset.SliceRef(f"case_{case:03d}_week_0_slice_{slice_}.nii.gz",
                            f"seg_{case:03d}_week_0_slice_{slice_}.nii.gz", case, 0, slice_)


def test_postprocess_keeps_the_largest_3d_part_of_each_organ_per_volume():
    """--postprocess on each case-week volume stacked in slice order: a far-away bladder blob goes (to 0), the
    largest part stays; labels not named stay as they are; another volume is a volume of its own."""
    blank = np.zeros((4, 16, 16), np.uint8)
    vol = blank.copy()  # slices 0..3 of case 1
    vol[:, 0:4, 0:4] = 1  # body in two parts: not postprocessed, both stay
    vol[:, 12:16, 0:4] = 1
    vol[0:2, 6:10, 6:10] = 3  # bladder: 2 slices of 4x4, the largest part (32 voxels) ...
    vol[3, 6:11, 6:11] = 3  # ... and, after an empty slice 2, 25 voxels that touch it only if slices were misordered
    vol[0, 13:15, 13:15] = 3  # and a far-away speck
    other = blank[:2].copy()  # case 2: its only bladder part is small, and stays
    other[1, 0:2, 0:2] = 3
    # refs in file order, not slice order: 0, 1, 3, 2 stacked as given would join the two bladder parts.
    order = [0, 1, 3, 2]
    refs = [_ref(1, k) for k in order] + [_ref(2, 0), _ref(2, 1)]
    preds = [vol[k].copy() for k in order] + [other[0].copy(), other[1].copy()]
    before = [p.copy() for p in preds]
    out = predict.postprocess_split(refs, preds, [3, 4, 5])
    assert len(out) == len(preds) and all(np.array_equal(p, b) for p, b in zip(preds, before))  # inputs untouched
    kept = vol.copy()
    kept[3][kept[3] == 3] = 0
    kept[0, 13:15, 13:15] = 0
    for k, pred in zip(order, out):
        np.testing.assert_array_equal(pred, kept[k], err_msg=f"slice {k}")
    np.testing.assert_array_equal(out[4], other[0])
    np.testing.assert_array_equal(out[5], other[1])
    unchanged = predict.postprocess_split(refs, preds, [])  # no labels: nothing to do
    assert len(unchanged) == len(preds) and all(np.array_equal(a, b) for a, b in zip(unchanged, preds))


def _split_copy(tiny_data, root, volume="case_001_week_0"):
    """The tiny phantom's test volume `volume` alone as the test split of a new folder (train/validate kept)."""
    for split in ("train", "validate"):
        for kind in ("keras_slices_", "keras_slices_seg_"):
            shutil.copytree(tiny_data / f"{kind}{split}", root / f"{kind}{split}")
    for kind, prefix in (("keras_slices_test", "case_"), ("keras_slices_seg_test", "seg_")):
        (root / kind).mkdir(parents=True)
        for f in sorted((tiny_data / kind).glob(f"{prefix}{volume.split('_', 1)[1]}_slice_*")):
            shutil.copy(f, root / kind / f.name)
    return root


def _rewrite(path, change):
    """Rewrite a NIfTI file with its header changed by `change(image)`."""
    image = nib.load(path)
    image = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header)
    change(image)
    nib.save(image, str(path))


def test_volumes_with_gaps_mixed_spacing_or_no_thickness_are_scored_with_warnings(tiny_run, tiny_data, tmp_path,
                                                                                    capsys):
    """Each volume's spacing comes from its own slices: a gap in the slice numbers, slices that disagree on the
    spacing, or a header without a slice thickness give a warning naming the volume or file, and no distances
    (or the thickness the file implies) instead of numbers computed on a wrong grid."""
    data = _split_copy(tiny_data, tmp_path / "data")
    for kind, prefix in (("keras_slices_test", "case_"), ("keras_slices_seg_test", "seg_")):
        (data / kind / f"{prefix}001_week_0_slice_3.nii.gz").unlink()  # a gap: slices 0-2, 4-7
    out = tmp_path / "gap"
    assert predict.main(["--run", str(tiny_run), "-d", str(data), "--out", str(out), "--figures", "0", "-q"]) == 0
    err = capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert any("case_001_week_0" in w and "3" in w for w in metrics["warnings"]), metrics["warnings"]
    assert "case_001_week_0" in err
    rows = [r for r in read_csv(out / "per_volume.csv") if r["label"] == "body"]
    assert rows[0]["dice"] != "" and rows[0]["hd95_mm"] == "" and rows[0]["asd_mm"] == ""

    data = _split_copy(tiny_data, tmp_path / "data2")
    odd = data / "keras_slices_test" / "case_001_week_0_slice_5.nii.gz"
    _rewrite(odd, lambda im: im.set_sform(np.diag([1.0, 1.0, 5.0, 1.0]) @ np.eye(4), code=1) or
             im.set_qform(np.diag([1.0, 1.0, 5.0, 1.0]), code=1))
    thin = data / "keras_slices_test" / "case_001_week_0_slice_2.nii.gz"
    out = tmp_path / "mixed"
    assert predict.main(["--run", str(tiny_run), "-d", str(data), "--out", str(out), "--figures", "0", "-q"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert any("disagree" in w and "case_001_week_0" in w and odd.name in w for w in metrics["warnings"])
    rows = [r for r in read_csv(out / "per_volume.csv") if r["label"] == "body"]
    assert rows[0]["dice"] != "" and rows[0]["truth_ml"] == "" and rows[0]["hd95_mm"] == ""

    data = _split_copy(tiny_data, tmp_path / "data3")
    for f in sorted((data / "keras_slices_test").glob("case_*")):  # no sform, no qform, pixdim[3] 0
        raw = bytearray(gzip.decompress(f.read_bytes()))
        raw[88:92], raw[252:256] = struct.pack("<f", 0.0), struct.pack("<hh", 0, 0)
        f.write_bytes(gzip.compress(bytes(raw)))
    out = tmp_path / "nothick"
    assert predict.main(["--run", str(tiny_run), "-d", str(data), "--out", str(out), "--figures", "0", "-q"]) == 0
    warnings = json.loads((out / "metrics.json").read_text())["warnings"]
    assert any(thin.name in w and "no slice thickness" in w for w in warnings), warnings


def test_a_case_in_two_splits_is_named_and_refused_with_strict(tiny_run, tiny_data, tmp_path, capsys):
    data = _split_copy(tiny_data, tmp_path / "data")
    for kind, prefix in (("keras_slices_validate", "case_"), ("keras_slices_seg_validate", "seg_")):
        src = data / kind.replace("validate", "test") / f"{prefix}001_week_0_slice_0.nii.gz"
        shutil.copy(src, data / kind / f"{prefix}001_week_7_slice_0.nii.gz")  # case 1, another week, in validate
    args = ["--run", str(tiny_run), "-d", str(data), "--out", str(tmp_path / "e"), "--figures", "0", "-q"]
    assert predict.main(args) == 0
    assert "case 001 is in the validate and test splits" in capsys.readouterr().err
    assert predict.main(args + ["--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "case 001" in err and "Traceback" not in err


@pytest.mark.parametrize("flags,message", [
    (["--max-bad-fraction", "2"], "--max-bad-fraction 2"), (["--batch-size", "0"], "--batch-size 0"),
    (["--figures", "-1"], "--figures -1"), (["--input", "x.nii", "--axis", "3"], "--axis 3"),
    (["--axis", "1"], "--axis"), (["--input", "x.nii", "--out", "o"], "--output-dir")])
def test_flags_are_checked_before_anything_runs(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        predict.parse_args(["--run", "r", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_prints(capsys):
    with pytest.raises(SystemExit) as e:
        predict.parse_args(["--help"])
    assert e.value.code == 0 and "--split" in capsys.readouterr().out
