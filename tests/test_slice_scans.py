"""slice_scans.py: labelled 3D scans into the HipMRI layout, canonical orientation, patients kept in one split."""
import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import dataset
import slice_scans
from preprocess import DataError, Preprocessing, read_slice, slice_geometry

LPS = np.diag([-0.5, -0.6, 3.0, 1.0])  # x to the left, y to the back: the DICOM order many scans keep


def scan(folder, name, image, labels=None, affine=LPS, label_affine=None):
    """Write an image into folder/images and, unless labels is None, its labels into folder/labels (named
    without an nnU-Net channel suffix)."""
    for sub, arr, aff, file in (("images", image, affine, name), ("labels", labels, label_affine,
                                                                    name.removesuffix("_0000"))):
        if arr is not None:
            (folder / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr, affine if aff is None else aff), folder / sub / f"{file}.nii.gz")


def volume(seed, shape=(20, 16, 5)):
    """A random image and labels with a block of label 1 at the image's low x (the patient's right in LPS)."""
    image = np.random.default_rng(seed).normal(300, 50, shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[1:4, 5:9, 2] = 1
    labels[10:14, 2:6, :] = 2
    return image, labels


def test_scans_become_canonical_slices_with_each_patient_in_one_split(tmp_path):
    names = ["Case_1_Week0", "Case_1_Week3", "Case_2_Week0", "Case_3_Week0", "Case_4_Week0", "Case_5_Week0"]
    for i, name in enumerate(names):
        scan(tmp_path, name + ("_0000" if i % 2 else ""), *volume(i))  # with and without nnU-Net's suffix
    rows = slice_scans.convert(tmp_path / "images", tmp_path / "labels", tmp_path / "out", patient=r"Case_(\d+)",
                               progress=False)
    table = list(csv.DictReader(open(tmp_path / "out" / "cases.csv")))
    assert [r["patient"] for r in table] == ["1", "1", "2", "3", "4", "5"] == [r["patient"] for r in rows]
    assert table[0]["split"] == table[1]["split"] and (table[0]["week"], table[1]["week"]) == ("0", "1")
    assert sorted(r["split"] for r in table[1:]) == ["test", "train", "train", "train", "validate"]

    refs = {split: dataset.list_split(tmp_path / "out", split) for split in dataset.SPLITS}
    assert sum(len(r) for r in refs.values()) == 6 * 5
    cases = {split: {ref.case for ref in r} for split, r in refs.items()}
    assert not (cases["train"] & cases["validate"]) and not (cases["train"] & cases["test"])

    # Case 2 (third scan): LPS turned to RAS flips x and y; label 1 sat at low x, so now at high x.
    image, labels = volume(2)
    split = table[2]["split"]
    got, nii = read_slice(tmp_path / "out" / dataset.SPLITS[split][0] / "case_002_week_0_slice_2.nii.gz", True)
    mask = read_slice(tmp_path / "out" / dataset.SPLITS[split][1] / "seg_002_week_0_slice_2.nii.gz")
    np.testing.assert_array_equal(got, image[::-1, ::-1, 2])
    np.testing.assert_array_equal(mask, labels[::-1, ::-1, 2])
    assert mask[16:19, 7:11].min() == 1 and mask[:4].max() == 0
    assert slice_geometry(nii.affine, got.shape) == ("RAS", (0.5, 0.6))
    # The slice's affine places it where it was in the scan.
    np.testing.assert_allclose(nii.affine[:3, 3], (LPS @ [19, 15, 2, 1])[:3])

    loaded = dataset.load_split(tmp_path / "out", "train", Preprocessing(size=(32, 16), num_classes=3),
                                use_cache=False)
    assert len(loaded) == 5 * sum(r["split"] == "train" for r in table) and set(np.unique(loaded.masks)) == {0, 1, 2}


def test_one_folder_per_patient_pairs_by_key(tmp_path):
    for i in range(3):
        image, labels = volume(i)
        folder = tmp_path / f"study_pat{i:04d}"
        folder.mkdir()
        nib.save(nib.Nifti1Image(image, LPS), folder / "flair.nii.gz")
        nib.save(nib.Nifti1Image(labels, LPS), folder / "truth.nii")
    images, labels = str(tmp_path / "**" / "flair.nii*"), str(tmp_path / "*" / "truth.nii*")
    with pytest.raises(DataError, match="a second image for scan 'flair'.*--key"):
        slice_scans.convert(images, labels, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match=r"truth.nii: --key 'flair_\(.\)' does not match"):
        slice_scans.pair_scans(str(tmp_path / "*" / "truth.nii"), labels, key="flair_(.)")
    rows = slice_scans.convert(images, labels, tmp_path / "out", key=r"pat(\d+)", progress=False)
    assert [(r["patient"], Path(r["image"]).parent, Path(r["label"]).parent) for r in rows] == [
        (f"{i:04d}", tmp_path / f"study_pat{i:04d}", tmp_path / f"study_pat{i:04d}") for i in range(3)]


def test_relabel_maps_label_values(tmp_path):
    for i in range(3):
        image, labels = volume(i)
        scan(tmp_path, f"s{i}", image, labels * 127)  # 0 / 127 / 254, as masks saved by an image editor
    rows = slice_scans.convert(tmp_path / "images", tmp_path / "labels", tmp_path / "out",
                               relabel={127: 1, 254: 2}, progress=False)
    assert {r["labels"] for r in rows} == {"0 1 2"}
    assert slice_scans.parse_args(["--images", "i", "--labels", "l", "--out", "o", "--relabel", "255:1,4:3"]
                                  ).relabel == {255: 1, 4: 3}
    for bad in ("255", "256:1", "a:b"):
        with pytest.raises(SystemExit):
            slice_scans.parse_args(["--images", "i", "--labels", "l", "--out", "o", "--relabel", bad])


def test_split_is_seeded_and_needs_a_patient_for_each_split():
    patients = [f"p{i}" for i in range(10)]
    a = slice_scans.split_patients(patients, (0.6, 0.2, 0.2), 42)
    assert a == slice_scans.split_patients(patients, (0.6, 0.2, 0.2), 42)
    assert a != slice_scans.split_patients(patients, (0.6, 0.2, 0.2), 43)
    assert sorted(a.values()).count("train") == 6 and list(a.values()).count("test") == 2
    assert sorted(slice_scans.split_patients(patients[:3], (0.8, 0.1, 0.1), 0).values()) == [
        "test", "train", "validate"]
    with pytest.raises(DataError, match="2 patients cannot fill"):
        slice_scans.split_patients(patients[:2], (0.6, 0.2, 0.2), 42)
    assert slice_scans.parse_args(["--images", "i", "--labels", "l", "--out", "o", "--split", "3,1,1"]).split == (
        0.6, 0.2, 0.2)
    with pytest.raises(SystemExit):
        slice_scans.parse_args(["--images", "i", "--labels", "l", "--out", "o", "--split", "1,0,1"])


def test_channels_pick_one_and_are_refused_without_a_choice(tmp_path, capsys):
    image, labels = volume(0)
    for i in range(3):
        scan(tmp_path, f"s{i}", np.stack([image, image * 0 + i], axis=-1), labels)
    argv = ["--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels")]
    assert slice_scans.main(argv + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "s0.nii.gz: shape (20, 16, 5, 2) holds 2 channels" in err and "--channel 0..1" in err
    assert slice_scans.main(argv + ["--out", str(tmp_path / "b"), "--channel", "1"]) == 0
    assert set(np.unique(read_slice(next((tmp_path / "b").glob("keras_slices_train/*"))))) <= {0.0, 1.0, 2.0}


@pytest.mark.parametrize("problem, message", [
    ("unpaired", "without a partner, e.g. .*s3.nii.gz"),
    ("shape", r"s0.nii.gz: shape \(20, 16, 4\), expected \(20, 16, 5\)"),
    ("affine", "s0.nii.gz: its affine differs from its image's"),
    ("fraction", r"s0.nii.gz: mask values \[0.5\] are not integer labels"),
    ("slice", r"s0.nii.gz: shape \(20, 16\); expected a 3D scan"),
    ("nan", "s0.nii.gz: 1 NaN/Inf intensities"),
])
def test_bad_scans_are_refused_with_the_file_named(tmp_path, problem, message):
    for i in range(3):
        scan(tmp_path, f"s{i}", *volume(i))
    image, labels = volume(0)
    if problem == "unpaired":
        scan(tmp_path, "s3", image)
    elif problem == "shape":
        scan(tmp_path, "s0", image, labels[:, :, :4])
    elif problem == "affine":
        scan(tmp_path, "s0", image, labels, label_affine=np.diag([0.5, 0.6, 3.0, 1.0]))
    elif problem == "fraction":
        scan(tmp_path, "s0", image, labels * 0.5)
    elif problem == "slice":
        scan(tmp_path, "s0", image[:, :, 0], labels[:, :, 0])
    else:
        image[3, 3, 3] = np.nan
        scan(tmp_path, "s0", image, labels)
    with pytest.raises(DataError, match=message):
        slice_scans.convert(tmp_path / "images", tmp_path / "labels", tmp_path / "out", progress=False)


def test_an_existing_layout_is_never_overwritten(tmp_path):
    for i in range(3):
        scan(tmp_path, f"s{i}", *volume(i))
    slice_scans.convert(tmp_path / "images", tmp_path / "labels", tmp_path / "out", progress=False)
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    with pytest.raises(DataError, match="already holds keras_slices_train"):
        slice_scans.convert(tmp_path / "images", tmp_path / "labels", tmp_path / "out", seed=7, progress=False)
    assert before == {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
