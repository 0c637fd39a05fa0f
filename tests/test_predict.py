"""predict.py: scores on hand-made masks, volume reassembly, end-to-end scoring, NIfTI round trips, errors."""
import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_layout, write_nifti

import predict
from dataset import SliceRef

FOREGROUND = ["body", "bone", "bladder", "rectum", "prostate"]
METRIC_KEYS = {"split", "n_slices", "n_volumes", "classes", "dice_per_slice", "dice_per_volume", "iou_per_slice",
               "iou_per_volume", "mean_foreground_dice", "mean_foreground_dice_per_volume", "convention", "run",
               "model", "data_dir", "tta", "seconds"}
SCORE_KEYS = {"dice_per_slice", "dice_per_volume", "iou_per_slice", "iou_per_volume", "mean_foreground_dice",
              "mean_foreground_dice_per_volume"}


def ref(case, week, sl):
    return SliceRef(f"case_{case:03d}_week_{week}_slice_{sl}.nii.gz", f"seg_{case:03d}_week_{week}_slice_{sl}.nii.gz",
                    case, week, sl)


# ----------------------------------------------------------------------------- scores on hand-made masks

def test_slice_scores_known_answers_on_a_256x144_slice():
    truth, pred = np.zeros((256, 144), np.uint8), np.zeros((256, 144), np.uint8)
    truth[:10] = 1       # 1440 pixels of label 1
    pred[:5] = 1         # 720 of them predicted
    pred[200:202] = 3    # label 3 predicted but absent from truth -> 0
    truth[100:104] = 4   # label 4 in truth but never predicted -> 0; label 2 in neither -> no score
    dice, iou = predict.score_slices([truth], [pred], [1, 2, 3, 4])
    np.testing.assert_allclose(dice[0], [2 * 720 / (1440 + 720), np.nan, 0, 0])
    np.testing.assert_allclose(iou[0], [720 / 1440, np.nan, 0, 0])


def test_summary_leaves_out_images_without_the_label():
    dice = np.array([[1.0, np.nan, 0.0], [0.5, np.nan, np.nan], [0.0, np.nan, 1.0]])
    s = predict.summarise(dice, ["a", "b", "c"])
    assert s["a"] == {"mean": 0.5, "std": pytest.approx(np.std([1, 0.5, 0])), "n": 3}
    assert s["b"] == {"mean": None, "std": None, "n": 0}
    assert s["c"] == {"mean": 0.5, "std": 0.5, "n": 2}
    assert predict.mean_of_means(s) == 0.5  # (0.5 + 0.5) / 2, "b" never scored


def test_to_original_size_resizes_probabilities_then_decides():
    probs = np.zeros((256, 128, 3), np.float32)
    probs[:, :64, 1], probs[:, 64:, 2] = 1, 1
    labels = predict.to_original_size(probs, (256, 144))
    assert labels.shape == (256, 144) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {1, 2}  # never an interpolated label in between
    assert (labels[:, :71] == 1).all() and (labels[:, 73:] == 2).all()
    one = np.full((256, 128, 1), 0.2, np.float32)
    one[50:60] = 0.9
    binary = predict.to_original_size(one, (256, 144))
    assert binary.shape == (256, 144) and set(np.unique(binary)) == {0, 1} and binary[50:60].all()


# ----------------------------------------------------------------------------- volumes

def test_volumes_are_stacked_in_slice_order_and_scored_as_3d():
    refs = [ref(2, 0, 1), ref(1, 0, 2), ref(2, 0, 0), ref(1, 0, 0), ref(1, 0, 1)]
    maps = [np.full((4, 6), 10 * r.case + r.slice, np.uint8) for r in refs]
    volumes = predict.stack_volumes(refs, maps)
    assert list(volumes) == ["case_001_week_0", "case_002_week_0"]
    assert volumes["case_001_week_0"][:, 0, 0].tolist() == [10, 11, 12]
    assert volumes["case_002_week_0"][:, 0, 0].tolist() == [20, 21]

    truths, preds = [np.zeros((4, 6), np.uint8) for _ in refs], [np.zeros((4, 6), np.uint8) for _ in refs]
    truths[1][:2] = 1   # case 1: 12 truth pixels on slice 2, 6 of them predicted there
    preds[1][:1] = 1
    truths[3][:, :1] = 1  # case 1: 4 truth pixels on slice 0, all predicted, plus 4 false positives
    preds[3][:, :2] = 1
    summary, arrays = predict.score_split(refs, truths, preds, [1, 2], ["one", "two"])
    hand = 2 * (6 + 4) / ((12 + 4) + (6 + 8))
    np.testing.assert_allclose(arrays["volume_dice"][:, 0], [hand, np.nan])  # case 2 has label 1 nowhere
    assert summary["dice_per_volume"]["one"] == {"mean": pytest.approx(hand), "std": 0.0, "n": 1}
    assert summary["dice_per_slice"]["one"]["n"] == 2  # slices without label 1 anywhere are not counted
    assert summary["dice_per_slice"]["two"]["n"] == 0 and summary["mean_foreground_dice"] == pytest.approx(
        np.mean([2 * 6 / 18, 2 * 4 / 12]))


def test_volume_with_a_wider_slice_pads_with_background():
    refs = [ref(1, 0, 0), ref(1, 0, 1)]
    volumes = predict.stack_volumes(refs, [np.ones((4, 6), np.uint8), np.ones((4, 8), np.uint8)])
    assert volumes["case_001_week_0"].shape == (2, 4, 8) and volumes["case_001_week_0"][0, :, 6:].sum() == 0


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def loaded_run(tiny_run):
    return predict.load_run(tiny_run)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def independent_dice(truth, pred, label):
    t, p = truth == label, pred == label
    return np.nan if t.sum() + p.sum() == 0 else 2 * (t & p).sum() / (t.sum() + p.sum())


def test_scoring_a_split_end_to_end(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "eval"
    assert predict.main(["--run", str(tiny_run), "--split", "test", "--out", str(out), "--save-masks",
                         "--slices", "3", "--figures", "2", "-q"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics) and metrics["tta"] is None
    assert metrics["classes"] == FOREGROUND and metrics["n_slices"] == 16 and metrics["n_volumes"] == 2
    assert set(metrics["dice_per_slice"]["prostate"]) == {"mean", "std", "n"}
    for name in ("test_image_prediction_comparison_3.png", "dice_boxplot.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert len(list(out.glob("test_worst_*.png"))) == 2

    rows = read_csv(out / "per_slice.csv")
    assert len(rows) == 16 and {"144"} <= {r["cols"] for r in rows}  # the tiny phantom has a 256x144 volume
    seg_dir, img_dir = tiny_data / "keras_slices_seg_test", tiny_data / "keras_slices_test"
    for row in rows:
        mask_name = row["file"].replace("case_", "seg_", 1)
        written = nib.load(out / "masks" / mask_name)
        image = nib.load(img_dir / row["file"])
        assert written.shape == image.shape and np.allclose(written.affine, image.affine)
        pred = np.squeeze(np.asanyarray(written.dataobj))
        assert pred.dtype == np.uint8 and pred.shape == (int(row["rows"]), int(row["cols"]))
        truth = np.rint(np.squeeze(np.asanyarray(nib.load(seg_dir / mask_name).dataobj))).astype(int)
        for label, name in enumerate(FOREGROUND, start=1):
            expected, cell = independent_dice(truth, pred, label), row[f"dice_{name}"]
            assert (cell == "") if np.isnan(expected) else float(cell) == pytest.approx(expected, abs=1e-6)
    body = [float(r["dice_body"]) for r in rows if r["dice_body"]]
    assert metrics["dice_per_slice"]["body"]["mean"] == pytest.approx(np.mean(body), abs=1e-5)
    assert metrics["dice_per_slice"]["body"]["n"] == len(body)


def test_binary_run_scores_its_target_label(tiny_run, tiny_data, tmp_path):
    import modules
    run = tmp_path / "binary"
    run.mkdir()
    cfg = json.loads((tiny_run / "config.json").read_text())
    cfg.update(target="prostate", target_ids=[5], channel_names=["prostate"])
    (run / "config.json").write_text(json.dumps(cfg))
    modules.save_model(modules.build_unet((256, 128, 1), 1, 4), run / "model.keras")  # untrained is enough here
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


def test_tta_reports_plain_and_flipped_mean(tiny_run, loaded_run, tmp_path):
    out = tmp_path / "tta"
    assert predict.main(["--run", str(tiny_run), "--out", str(out), "--tta", "--figures", "0", "-q"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert SCORE_KEYS <= set(metrics["tta"]) and metrics["tta"]["dice_per_slice"].keys() == set(FOREGROUND)
    assert "tta_dice_prostate" in read_csv(out / "per_slice.csv")[0]

    run = loaded_run
    x = np.random.default_rng(0).random((2, 256, 128, 1), np.float32)
    plain, tta = predict.predict_probabilities(run.model, x, tta=True)
    flipped = np.asarray(run.model(x[:, ::-1].copy(), training=False))[:, ::-1]
    np.testing.assert_allclose(tta, (np.asarray(run.model(x, training=False)) + flipped) / 2, atol=1e-3)


# ----------------------------------------------------------------------------- new files

def test_segmenting_files_keeps_shape_affine_and_labels(tiny_run, loaded_run, tiny_data, tmp_path):
    slices = [np.squeeze(nib.load(p).get_fdata(dtype=np.float32))
              for p in sorted((tiny_data / "keras_slices_test").glob("case_*"))[:3]]
    slices = [s[:, :128] for s in slices]
    angle = np.deg2rad(30)
    affine = np.array([[0.8 * np.cos(angle), -1.1 * np.sin(angle), 0, -100],
                       [0.8 * np.sin(angle), 1.1 * np.cos(angle), 0, 50], [0, 0, 3.0, 20], [0, 0, 0, 1]])
    volume = write_nifti(tmp_path / "in" / "vol.nii.gz", np.stack(slices, axis=-1), affine, np.float32)
    flat = write_nifti(tmp_path / "in" / "flat.nii", slices[1][..., None], affine, np.float32)  # (256, 128, 1)
    wide = write_nifti(tmp_path / "in" / "wide.nii.gz", np.random.default_rng(0).random((256, 144, 1)) * 900,
                       affine, np.float32)
    out = tmp_path / "out"
    assert predict.main(["--run", str(tiny_run), "--input", str(volume), str(flat), str(wide), "--output-dir",
                         str(out), "--preview", "-q"]) == 0
    for src, name in ((volume, "vol_mask.nii.gz"), (flat, "flat_mask.nii"), (wide, "wide_mask.nii.gz")):
        mask, image = nib.load(out / name), nib.load(src)
        data = np.asanyarray(mask.dataobj)
        assert data.shape == image.shape and data.dtype == np.uint8 and mask.get_data_dtype() == np.uint8
        assert (mask.dataobj.slope, mask.dataobj.inter) == (1, 0)  # stored unscaled: labels read back exactly
        np.testing.assert_allclose(mask.affine, affine, atol=1e-5)
        assert set(np.unique(data)) <= set(range(6))
        assert (out / name.replace(".nii.gz", ".png").replace(".nii", ".png")).exists()
    # The volume is segmented slice by slice: its middle slice gets the same labels as the same 2D file.
    np.testing.assert_array_equal(np.asanyarray(nib.load(out / "vol_mask.nii.gz").dataobj)[..., 1],
                                  np.asanyarray(nib.load(out / "flat_mask.nii").dataobj)[..., 0])
    # Slicing along another axis gives the same labels, in that axis's place.
    across = np.stack(slices, axis=0)[:, None]  # (3, 1, 256, 128)
    mask = predict.segment_array(loaded_run, across, axis=0)[0]
    assert mask.shape == across.shape and mask.dtype == np.uint8
    by_last_axis = np.asanyarray(nib.load(out / "vol_mask.nii.gz").dataobj)
    np.testing.assert_array_equal(mask[:, 0], np.moveaxis(by_last_axis, -1, 0))
    with pytest.raises(predict.DataError, match="cannot be sliced along --axis 1"):
        predict.segment_array(loaded_run, across, axis=1)


def test_unusable_input_files_name_the_file(tiny_run, tmp_path, capsys):
    bad = np.ones((256, 128), np.float32)
    bad[3, 4] = np.nan
    nan_file = write_nifti(tmp_path / "nan.nii.gz", bad)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(nan_file.read_bytes()[:40])
    for path, message in ((nan_file, "NaN/Inf"), (broken, "not a readable NIfTI"), (tmp_path / "x.png", "NIfTI")):
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
    cfg["channel_names"] = ["background", "body", "bone"]
    (run_copy / "config.json").write_text(json.dumps(cfg))
    expect_error(["--run", str(run_copy), "--out", str(tmp_path / "o")], capsys, str(run_copy / "config.json"),
                 "'output channels': 6", "'output channels': 3")


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
