"""benchmarks/brats.py, hippocampus.py and real_anatomy.py: patient-disjoint folds, the label mapping, clear errors, the summary rows."""
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
import brats  # noqa: E402
import hippocampus  # noqa: E402
import real_anatomy  # noqa: E402

import dataset  # noqa: E402

NAMES = [f"brats_2013_pat000{i}_1" for i in range(1, 7)]


def fake_brats(root, n=6):
    """n patient folders in deepmedic's layout: 12x12x9 volumes, a brain block with oedema and a core in it."""
    for i, name in enumerate(NAMES[:n]):
        folder = root / ("train" if i < 3 else "test") / name
        folder.mkdir(parents=True)
        flair = np.full((12, 12, 9), -3.0, np.float32)
        flair[3:9, 3:9, :] = i + 1.0
        brain = np.zeros((12, 12, 9), np.float32)
        brain[3:9, 3:9, :] = 1
        ot = np.zeros((12, 12, 9), np.float32)
        ot[3:6, 3:6, :] = 2  # oedema
        ot[6:9, 6:9, :] = 4  # enhancing tumour: part of the core
        for stem, arr in (("Flair_subtrMeanDivStd", flair), ("brainmask", brain), ("OTMultiClass", ot)):
            nib.save(nib.Nifti1Image(arr, np.eye(4)), folder / f"{stem}.nii.gz")
    return root


def test_every_patient_is_tested_once_and_no_fold_puts_a_patient_in_two_splits():
    tested = []
    for fold in range(brats.FOLDS):
        splits = brats.fold_splits(NAMES, fold)
        assert sorted(splits) == NAMES  # each patient has exactly one split in this fold
        by_split = {s: [p for p in NAMES if splits[p] == s] for s in ("train", "validate", "test")}
        assert [len(by_split[s]) for s in ("train", "validate", "test")] == [3, 1, 2]
        tested += by_split["test"]
    assert sorted(tested) == NAMES


def test_a_fold_is_written_in_the_hipmri_layout_with_patient_disjoint_cases(tmp_path):
    root = fake_brats(tmp_path / "src")
    out = tmp_path / "fold1"
    counts = real_anatomy.write_fold(brats, root, out, 1, None)
    assert counts == {"train": 9, "validate": 3, "test": 6}  # 3 slices of 3 mm per patient
    cases = {s: {r.case for r in dataset.list_split(out, s)} for s in ("train", "validate", "test")}
    assert not (cases["train"] & cases["test"]) and not (cases["train"] & cases["validate"])
    assert not (cases["validate"] & cases["test"]) and len(cases["test"]) == 2
    ref = dataset.list_split(out, "test")[0]
    labels = np.asarray(nib.load(ref.mask).dataobj)
    image = np.asarray(nib.load(ref.image).dataobj)
    assert labels.shape == image.shape == (4, 4)  # 12 mm at 3 mm
    assert labels[1, 1] == 2 and labels[2, 2] == 3 and labels[0, 0] == 0  # oedema, core (BraTS 4), outside
    few = real_anatomy.write_fold(brats, root, tmp_path / "few", 1, 2)
    assert few == {"train": 2, "validate": 3, "test": 6}


def fake_hippocampus(root, n=hippocampus.PATIENTS, nnunet=False):
    """n decathlon-style cases (macOS "._" files beside them, as in the decathlon's tar): 40x70x6 LPS volumes whose
    patient number is the image's value; anterior and posterior blocks in slices 1-4 only."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    for i in range(n):
        image = np.full((40, 70, 6), i + 1.0, np.float32)
        labels = np.zeros((40, 70, 6), np.uint8)
        labels[10:20, 30:40, 1:5] = 1
        labels[20:30, 30:40, 1:5] = 2
        labels[0, 10, 1:5] = 2  # a marker voxel near a corner: the canonical turn moves it
        stem = f"hippocampus_{hippocampus.CASES[i]:03d}"
        nib.save(nib.Nifti1Image(image, lps), root / "imagesTr" / f"{stem}{'_0000' if nnunet else ''}.nii.gz")
        nib.save(nib.Nifti1Image(labels, lps), root / "labelsTr" / f"{stem}.nii.gz")
        (root / "imagesTr" / f"._{stem}.nii.gz").write_bytes(b"resource fork")
    return root


@pytest.mark.parametrize("nnunet", [False, True])
def test_hippocampus_folds_are_patient_disjoint_slices_of_48x64(tmp_path, nnunet):
    root = fake_hippocampus(tmp_path / "src", nnunet=nnunet)
    names, tested = [f"p{i:02d}" for i in range(60)], []
    for fold in range(hippocampus.FOLDS):
        splits = hippocampus.fold_splits(names, fold)
        by_split = {s: [p for p in names if splits[p] == s] for s in ("train", "validate", "test")}
        assert [len(by_split[s]) for s in ("train", "validate", "test")] == [30, 10, 20]
        tested += by_split["test"]
    assert sorted(tested) == names
    out = tmp_path / "fold2"
    counts = real_anatomy.write_fold(hippocampus, root, out, 2, None)
    assert counts == {"train": 120, "validate": 40, "test": 80}  # 4 slices hold hippocampus in each case
    test_cases = {r.case for r in dataset.list_split(out, "test")}
    assert test_cases == set(range(41, 61))  # patients 41-60 by name
    ref = dataset.list_split(out, "test")[0]
    image, labels = (np.asarray(nib.load(p).dataobj) for p in (ref.image, ref.mask))
    assert image.shape == labels.shape == (48, 64) and np.all(image[4:44] == ref.case) and np.all(image[:4] == 0)
    # LPS turned to RAS flips both axes (row r -> 39 - r, column c -> 69 - c), then 40x70 -> 48x64 pads 4 rows
    # each side and crops 3 columns each side: anterior rows 10-19 -> 24-33, posterior 20-29 -> 14-23, columns
    # 30-39 -> 27-36, the marker (0, 10) -> (43, 56).
    assert np.all(labels[24:34, 27:37] == 1) and np.all(labels[14:24, 27:37] == 2)
    assert labels[43, 56] == 2 and (labels > 0).sum() == 201
    assert real_anatomy.write_fold(hippocampus, root, tmp_path / "few", 2, 20)["train"] == 20
    with pytest.raises(SystemExit, match=r"1 of the 60 hippocampus cases lack an image.*e\.g\. hippocampus_097"):
        hippocampus.cases(fake_hippocampus(tmp_path / "short", n=59))
    with pytest.raises(SystemExit, match="--hippocampus-dir is needed"):
        real_anatomy.data_folder(real_anatomy.parse_args(["--work", str(tmp_path / "w")]), "hippocampus", 0, "full")


def test_missing_patients_are_a_clear_error_naming_the_folder(tmp_path):
    root = fake_brats(tmp_path / "src", n=4)
    with pytest.raises(SystemExit, match=r"found 4 BraTS patient folders.*expected 6"):
        brats.patients(root)
    with pytest.raises(SystemExit, match="--brats-dir is needed"):
        real_anatomy.data_folder(real_anatomy.parse_args(["--work", str(tmp_path / "w")]), "brats", 0, "full")


def test_rows_give_mean_and_std_over_runs_and_leave_test_out_when_it_was_not_scored():
    runs = [{"val_dice": v, "test_dice": t, "per_label": {"a": t}, "val_curve": [0.1, 0.5, 0.4, 0.6, 0.7],
             "seconds": 10.0} for v, t in ((0.6, 0.5), (0.8, 0.7))]
    row = real_anatomy.summary(runs)
    assert row["val_dice_mean"] == pytest.approx(0.7) and row["val_dice_std"] == pytest.approx(0.1)
    assert row["test_dice_mean"] == pytest.approx(0.6) and row["runs_n"] == 2
    assert row["worst_val_drop"] == pytest.approx(0.1)  # 0.5 -> 0.4, after the first quarter
    untested = real_anatomy.summary([dict(r, test_dice=None, per_label=None) for r in runs])
    assert "test_dice_mean" not in untested and untested["val_dice_mean"] == pytest.approx(0.7)


def test_a_run_folder_of_another_length_is_refused_not_reused(tmp_path):
    a = real_anatomy.parse_args(["--work", str(tmp_path)])
    ours, peer = tmp_path / "ours", tmp_path / "peer"
    ours.mkdir()
    (ours / "config.json").write_text('{"epochs": 129}')
    with pytest.raises(SystemExit, match=r"ours holds a run of 129 epochs but this comparison asks for 58"):
        real_anatomy.run_ours(tmp_path / "data", ours, a, 42, 58, brats.CLASSES, "80x80")
    (peer / "npz-raw").mkdir(parents=True)  # the peer's arrays already written, so only the result is read
    (peer / "npz-raw" / "test.npz").touch()
    run = peer / "monai" / "seed42"
    run.mkdir(parents=True)
    np.savez(run / "result.npz", val_dice=np.zeros(129), val_pred=np.zeros(1))
    with pytest.raises(SystemExit, match=r"holds a run of 129 epochs but this comparison asks for 58"):
        real_anatomy.run_peer("monai", tmp_path / "data", run, a, 42, 58, brats.CLASSES, "80x80")


def test_relative_folders_are_made_absolute_because_train_py_runs_in_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = real_anatomy.parse_args(["--work", "w", "--brats-dir", "src", "--repo", ".", "-o", "r.json"])
    assert a.work == tmp_path / "w" and a.brats_dir == tmp_path / "src" and a.out == tmp_path / "r.json"
    assert a.repo == tmp_path and a.peer_venv.is_absolute()
