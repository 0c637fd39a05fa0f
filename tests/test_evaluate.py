"""evaluate.py: Dice and IoU on hand-made masks, the empty-label rule, volumes reassembled in slice order."""
import itertools
import math

import numpy as np
import pytest

import evaluate
from dataset import SliceRef


def ref(case, week, sl):
    return SliceRef(f"case_{case:03d}_week_{week}_slice_{sl}.nii.gz", f"seg_{case:03d}_week_{week}_slice_{sl}.nii.gz",
                    case, week, sl)


def test_dice_per_class_hand_values():
    truth = np.array([[1, 1, 0, 0], [2, 2, 0, 0]])
    pred = np.array([[1, 0, 0, 0], [0, 0, 0, 3]])
    d = evaluate.dice_per_class(truth, pred, [1, 2, 3, 4])
    assert d[0] == pytest.approx(2 * 1 / (2 + 1))  # 0.667
    assert d[1] == 0.0  # in truth, missed
    assert d[2] == 0.0  # predicted, absent from truth
    assert np.isnan(d[3])  # in neither: no Dice, left out of means
    iou = evaluate.iou_per_class(truth, pred, [1, 2, 4])
    assert iou[0] == pytest.approx(0.5) and iou[1] == 0 and np.isnan(iou[2])


# ----------------------------------------------------------------------------- scores on hand-made masks

def test_slice_scores_known_answers_on_a_256x144_slice():
    truth, pred = np.zeros((256, 144), np.uint8), np.zeros((256, 144), np.uint8)
    truth[:10] = 1       # 1440 pixels of label 1
    pred[:5] = 1         # 720 of them predicted
    pred[200:202] = 3    # label 3 predicted but absent from truth -> 0
    truth[100:104] = 4   # label 4 in truth but never predicted -> 0; label 2 in neither -> no score
    dice, iou = evaluate.score_slices([truth], [pred], [1, 2, 3, 4])
    np.testing.assert_allclose(dice[0], [2 * 720 / (1440 + 720), np.nan, 0, 0])
    np.testing.assert_allclose(iou[0], [720 / 1440, np.nan, 0, 0])


def test_summary_leaves_out_images_without_the_label():
    dice = np.array([[1.0, np.nan, 0.0], [0.5, np.nan, np.nan], [0.0, np.nan, 1.0]])
    s = evaluate.summarise(dice, ["a", "b", "c"])
    assert s["a"] == {"mean": 0.5, "std": pytest.approx(np.std([1, 0.5, 0])), "n": 3}
    assert s["b"] == {"mean": None, "std": None, "n": 0}
    assert s["c"] == {"mean": 0.5, "std": 0.5, "n": 2}
    assert evaluate.mean_of_means(s) == 0.5  # (0.5 + 0.5) / 2, "b" never scored


# ----------------------------------------------------------------------------- volumes

def test_volumes_are_stacked_in_slice_order_and_scored_as_3d():
    refs = [ref(2, 0, 1), ref(1, 0, 2), ref(2, 0, 0), ref(1, 0, 0), ref(1, 0, 1)]
    maps = [np.full((4, 6), 10 * r.case + r.slice, np.uint8) for r in refs]
    volumes = evaluate.stack_volumes(refs, maps)
    assert list(volumes) == ["case_001_week_0", "case_002_week_0"]
    assert volumes["case_001_week_0"][:, 0, 0].tolist() == [10, 11, 12]
    assert volumes["case_002_week_0"][:, 0, 0].tolist() == [20, 21]

    truths, preds = [np.zeros((4, 6), np.uint8) for _ in refs], [np.zeros((4, 6), np.uint8) for _ in refs]
    truths[1][:2] = 1   # case 1: 12 truth pixels on slice 2, 6 of them predicted there
    preds[1][:1] = 1
    truths[3][:, :1] = 1  # case 1: 4 truth pixels on slice 0, all predicted, plus 4 false positives
    preds[3][:, :2] = 1
    summary, arrays = evaluate.score_split(refs, truths, preds, [1, 2], ["one", "two"])
    hand = 2 * (6 + 4) / ((12 + 4) + (6 + 8))
    np.testing.assert_allclose(arrays["volume_dice"][:, 0], [hand, np.nan])  # case 2 has label 1 nowhere
    assert summary["dice_per_volume"]["one"] == {"mean": pytest.approx(hand), "std": 0.0, "n": 1}
    assert summary["dice_per_slice"]["one"]["n"] == 2  # slices without label 1 anywhere are not counted
    assert summary["dice_per_slice"]["two"]["n"] == 0 and summary["mean_foreground_dice"] == pytest.approx(
        np.mean([2 * 6 / 18, 2 * 4 / 12]))


def test_volume_with_a_wider_slice_pads_with_background():
    # The narrower slice is centred, as geometry.pad_or_crop_center centres it: 1 column of background each side.
    refs = [ref(1, 0, 0), ref(1, 0, 1)]
    volumes = evaluate.stack_volumes(refs, [np.ones((4, 6), np.uint8), np.ones((4, 8), np.uint8)])
    assert volumes["case_001_week_0"].shape == (2, 4, 8)
    assert volumes["case_001_week_0"][0].sum(axis=0).tolist() == [0, 4, 4, 4, 4, 4, 4, 0]


def test_smaller_slice_is_centred_with_the_odd_pixel_after():
    refs = [ref(1, 0, 0), ref(1, 0, 1)]
    volumes = evaluate.stack_volumes(refs, [np.ones((2, 3), np.uint8), np.zeros((5, 5), np.uint8)])
    small = volumes["case_001_week_0"][0]
    assert small.any(axis=0).nonzero()[0].tolist() == [1, 2, 3]  # 3 wide in 5: columns 1..3
    assert small.any(axis=1).nonzero()[0].tolist() == [1, 2]  # 2 high in 5: rows 1..2, the odd row after


def test_volume_gaps_names_the_missing_slice_numbers():
    refs = [ref(1, 0, 3), ref(2, 0, 1), ref(1, 0, 0), ref(2, 0, 2), ref(1, 0, 1), ref(3, 0, 0), ref(3, 0, 5)]
    assert evaluate.volume_gaps(refs) == {"case_001_week_0": [2], "case_003_week_0": [1, 2, 3, 4]}


def split_with_blobs(slices_per_case):
    """Truth a 4x4 square on every slice, prediction the same square one column to the right."""
    refs = [ref(case, 0, sl) for case, slices in slices_per_case.items() for sl in slices]
    truths, preds = [np.zeros((8, 8), np.uint8) for _ in refs], [np.zeros((8, 8), np.uint8) for _ in refs]
    for t, p in zip(truths, preds):
        t[2:6, 2:6] = 1
        p[2:6, 3:7] = 1
    return refs, truths, preds


def test_volume_with_a_gap_has_dice_and_ml_but_no_distances():
    refs, truths, preds = split_with_blobs({1: [0, 1, 3], 2: [0, 1, 2]})
    spacings = {"case_001_week_0": (3.0, 1.0, 1.0), "case_002_week_0": (3.0, 1.0, 1.0)}
    summary, arrays = evaluate.score_split(refs, truths, preds, [1, 2], ["one", "two"], spacings)
    assert evaluate.volume_gaps(refs) == {"case_001_week_0": [2]}
    rows = {(r["volume"], r["label"]): r for r in arrays["volume_rows"]}
    gap, whole = rows["case_001_week_0", "one"], rows["case_002_week_0", "one"]
    assert arrays["volume_dice_by_name"]["case_001_week_0", "one"] == pytest.approx(0.75)  # 12 of 16 pixels overlap
    assert gap["truth_ml"] == pytest.approx(3 * 16 * 3 / 1000)  # the slices present
    assert math.isnan(gap["hd95_mm"]) and math.isnan(gap["asd_mm"])
    assert whole["hd95_mm"] == pytest.approx(1.0)  # the one volume without a gap is measured
    assert summary["physical"]["one"]["hd95_mm"]["n"] == 1
    assert summary["physical"]["one"]["volumes_without_distance"] == 1
    assert summary["physical"]["one"]["volume_error_ml"] == pytest.approx(0.0)  # same size, shifted
    assert summary["dice_per_volume"]["one"]["n"] == 2
    assert len(summary["warnings"]) == 1
    assert "case_001_week_0" in summary["warnings"][0] and "slice 2 missing" in summary["warnings"][0]


def test_unknown_spacing_gives_dice_but_no_ml_or_distances(tmp_path):
    refs, truths, preds = split_with_blobs({1: [0, 1], 2: [0, 1]})
    spacings = {"case_001_week_0": None, "case_002_week_0": (3.0, 1.0, 1.0)}
    summary, arrays = evaluate.score_split(refs, truths, preds, [1, 2], ["one", "two"], spacings)
    rows = {(r["volume"], r["label"]): r for r in arrays["volume_rows"]}
    unknown = rows["case_001_week_0", "one"]
    assert all(math.isnan(unknown[k]) for k in ("truth_ml", "pred_ml", "hd95_mm", "asd_mm"))
    assert arrays["volume_dice_by_name"]["case_001_week_0", "one"] == pytest.approx(0.75)
    assert summary["physical"]["one"]["volumes_without_distance"] == 1
    assert summary["physical"]["one"]["volume_error_ml"] == pytest.approx(0.0)  # the NaN volume left out
    assert summary["warnings"] == ["case_001_week_0: voxel spacing unknown; it has Dice and IoU but no mL, HD95 or ASD"]
    evaluate.write_per_volume_csv(tmp_path / "v.csv", arrays["volume_rows"], arrays["volume_dice_by_name"])
    lines = (tmp_path / "v.csv").read_text().splitlines()
    assert lines[1] == "case_001_week_0,one,0.750000,,,,"


def test_absent_labels_have_no_value_anywhere(tmp_path):
    # Label 2 is in no truth and no prediction: every summary says "no value" (None, NaN, an empty cell), never 0.
    refs, truths, preds = split_with_blobs({1: [0, 1]})
    summary, arrays = evaluate.score_split(refs, truths, preds, [1, 2], ["one", "two"], {"case_001_week_0": (1, 1, 1)})
    for key in ("dice_per_slice", "dice_per_volume", "iou_per_slice", "iou_per_volume"):
        assert summary[key]["two"] == {"mean": None, "std": None, "n": 0}
    two = summary["physical"]["two"]
    assert two["hd95_mm"]["mean"] is None and two["asd_mm"]["mean"] is None and two["volume_error_ml"] is None
    assert evaluate.mean_of_means({"two": summary["dice_per_slice"]["two"]}) is None
    evaluate.write_per_volume_csv(tmp_path / "v.csv", arrays["volume_rows"], arrays["volume_dice_by_name"])
    row = (tmp_path / "v.csv").read_text().splitlines()[2].split(",")
    assert row[:3] == ["case_001_week_0", "two", ""] and row[5:] == ["", ""]
    assert summary["warnings"] == []


def test_table_columns_stay_aligned_with_long_label_names(capsys):
    refs, truths, preds = split_with_blobs({1: [0, 1]})
    names = ["one", "a_label_named_at_length"]
    summary, _ = evaluate.score_split(refs, truths, preds, [1, 2], names, {"case_001_week_0": (1, 1, 1)})
    evaluate.print_table({**summary, "split": "test", "n_slices": 2, "n_volumes": 1, "classes": names})
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    assert lines[2].startswith("a_label_named_at_length ")
    assert len({len(line) for line in lines[:-1]}) == 1  # header and label rows end in the same column


def squares(spacing):
    """Truth 21x21 and pred 25x25 squares with the same centre in a 41x41 image."""
    truth, pred = np.zeros((41, 41), bool), np.zeros((41, 41), bool)
    truth[10:31, 10:31] = True
    pred[8:33, 8:33] = True
    return evaluate.surface_distances(truth, pred, spacing)


def test_surface_concentric_squares_isotropic():
    # Truth ring (80 px) is 2 px inside the pred ring everywhere. Pred ring (96 px): 84 at 2, the 8 next to the
    # corners at sqrt(5), the 4 corners at sqrt(8) from the truth ring's corners.
    d = squares((1.0, 1.0))
    assert d["defined"] is True
    assert d["hd"] == pytest.approx(math.sqrt(8))
    assert d["hd95"] == pytest.approx(math.sqrt(5))  # np.percentile at rank 90.25 of 96 sorted: both sqrt(5)
    assert d["asd"] == pytest.approx((80 * 2 + 84 * 2 + 8 * math.sqrt(5) + 4 * math.sqrt(8)) / 176)


def test_surface_concentric_squares_anisotropic():
    # Rows are 2 mm apart. Truth -> pred: 42 px on the column sides at 2 mm, 4 px at |col| = 9 at 3 mm, 34 px at
    # 4 mm. Pred -> truth: 42 at 2, 4 at sqrt(8), 42 at 4, 4 at sqrt(17), 4 corners at sqrt(20).
    d = squares((2.0, 1.0))
    assert d["hd"] == pytest.approx(math.sqrt(20))
    assert d["hd95"] == pytest.approx(math.sqrt(17))
    total = 42 * 2 + 4 * 3 + 34 * 4 + 42 * 2 + 4 * math.sqrt(8) + 42 * 4 + 4 * math.sqrt(17) + 4 * math.sqrt(20)
    assert d["asd"] == pytest.approx(total / 176)


def brute_border(mask):
    """Border voxels by looking at all 3**ndim - 1 neighbours (outside is background)."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for shift in itertools.product((-1, 0, 1), repeat=mask.ndim):
        window = tuple(slice(1 + s, 1 + s + n) for s, n in zip(shift, mask.shape))
        inner &= padded[window]
    return mask & ~inner


@pytest.mark.parametrize("k", [1, 3])
def test_surface_shifted_cube(k):
    truth, pred = np.zeros((20, 16, 16), bool), np.zeros((20, 16, 16), bool)
    truth[3:13, 3:13, 3:13] = True
    pred[3 + k:13 + k, 3:13, 3:13] = True
    spacing = (2.0, 1.0, 1.0)
    d = evaluate.surface_distances(truth, pred, spacing)
    # The face that moves is k voxels (2k mm) from the other cube's face; nothing is farther, and it is
    # over 5% of the surface, so HD95 = HD = 2k mm.
    assert d["hd"] == pytest.approx(2 * k) and d["hd95"] == pytest.approx(2 * k)
    bt, bp = (np.argwhere(brute_border(m)) * spacing for m in (truth, pred))
    assert len(bt) == 10 ** 3 - 8 ** 3
    dist = np.linalg.norm(bt[:, None] - bp[None], axis=-1)
    expect = (dist.min(1).sum() + dist.min(0).sum()) / (len(bt) + len(bp))
    assert d["asd"] == pytest.approx(expect)


def test_surface_crop_is_exact():
    rng = np.random.default_rng(5)
    truth = np.zeros((60, 50, 40), bool)
    pred = np.zeros_like(truth)
    truth[20:30, 10:25, 5:12] = rng.random((10, 15, 7)) > 0.3
    pred[22:33, 12:26, 0:10] = rng.random((11, 14, 10)) > 0.3  # touches the array's edge
    got = evaluate.surface_distances(truth, pred, (1.5, 0.7, 3.0))
    bt, bp = (np.argwhere(brute_border(m)) * (1.5, 0.7, 3.0) for m in (truth, pred))
    dist = np.linalg.norm(bt[:, None] - bp[None], axis=-1)
    a, b = dist.min(1), dist.min(0)
    assert got["hd"] == pytest.approx(max(a.max(), b.max()))
    assert got["hd95"] == pytest.approx(max(np.percentile(a, 95), np.percentile(b, 95)))
    assert got["asd"] == pytest.approx((a.sum() + b.sum()) / (a.size + b.size))


def test_surface_empty_rules_and_identity():
    empty, blob = np.zeros((9, 9), bool), np.zeros((9, 9), bool)
    blob[2:5, 3:7] = True
    for t, p, status in [(empty, empty, "both_empty"), (empty, blob, "truth_empty"), (blob, empty, "pred_empty")]:
        d = evaluate.surface_distances(t, p, (1, 1))
        assert d["defined"] is False and d["status"] == status
        assert all(math.isnan(d[k]) for k in ("hd95", "asd", "hd"))
    d = evaluate.surface_distances(blob, blob, (1, 1))
    assert d["defined"] is True and d["hd"] == d["hd95"] == d["asd"] == 0.0
    with pytest.raises(ValueError, match="spacing"):
        evaluate.surface_distances(blob, blob, (1, 1, 1))


def test_volume_ml():
    cube = np.zeros((20, 20, 20), bool)
    cube[5:15, 5:15, 5:15] = True
    assert evaluate.volume_ml(cube, (1, 1, 2)) == pytest.approx(2.0)
    assert evaluate.volume_ml(np.zeros((3, 3, 3), bool), (1, 1, 1)) == 0.0
