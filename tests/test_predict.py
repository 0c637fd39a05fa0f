"""predict.py: scoring a split end to end (Dice, mL, the CSVs, masks), binary runs, TTA, postprocessing, errors."""
import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_layout, write_nifti

import predict

FOREGROUND = ["body", "bone", "bladder", "rectum", "prostate"]
METRIC_KEYS = {"split", "n_slices", "n_volumes", "classes", "dice_per_slice", "dice_per_volume", "iou_per_slice",
               "iou_per_volume", "mean_foreground_dice", "mean_foreground_dice_per_volume", "physical", "convention",
               "physical_convention", "run", "model", "data_dir", "tta", "postprocess", "seconds"}


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
