"""dataset.py and cache.py: discovery, pairing, whole splits on a thread pool, the cache, the info command."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, make_layout, write_nifti

import dataset
from preprocess import DataError, Preprocessing


# ----------------------------------------------------------------------------- discovery and pairing

def test_find_data_root_accepts_parent_and_errors(tmp_path):
    root = make_layout(tmp_path / "HipMRI_Study_open" / "keras_slices_data")
    assert dataset.find_data_root(tmp_path / "HipMRI_Study_open") == root
    assert dataset.find_data_root(tmp_path) == root
    assert dataset.find_data_root(root) == root
    with pytest.raises(DataError, match="does not exist"):
        dataset.find_data_root(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no keras_slices_"):
        dataset.find_data_root(tmp_path / "empty")


def test_pairing_survives_shuffled_listing(tmp_path, monkeypatch):
    root = make_layout(tmp_path, pairs=[(c, w, s) for c in (3, 10) for w in (0, 1) for s in range(4)],
                       splits=("train",))
    expected = dataset.list_split(root, "train")
    real_listdir = os.listdir

    def shuffled(path):
        names = real_listdir(path)
        random.Random(str(path)).shuffle(names)
        return names

    monkeypatch.setattr(os, "listdir", shuffled)
    refs = dataset.list_split(root, "train")
    assert refs == expected
    for r in refs:
        assert os.path.basename(r.mask) == os.path.basename(r.image).replace("case_", "seg_")
    assert [(r.case, r.week, r.slice) for r in refs] == sorted((r.case, r.week, r.slice) for r in refs)
    assert refs[0].volume == "case_003_week_0"


def test_unpaired_files_all_listed(tmp_path):
    root = make_layout(tmp_path, splits=("train",))
    os.remove(root / "keras_slices_seg_train" / "seg_001_week_0_slice_1.nii.gz")
    os.remove(root / "keras_slices_seg_train" / "seg_002_week_0_slice_0.nii.gz")
    write_nifti(root / "keras_slices_seg_train" / "seg_009_week_0_slice_0.nii.gz", np.zeros((256, 128)))
    with pytest.raises(DataError) as e:
        dataset.list_split(root, "train")
    msg = str(e.value)
    assert "3 file(s) without a partner" in msg
    assert "case_001_week_0_slice_1.nii.gz (no mask)" in msg and "case_002_week_0_slice_0.nii.gz (no mask)" in msg
    assert "seg_009_week_0_slice_0.nii.gz (no image)" in msg


def test_missing_and_empty_split_folders(tmp_path):
    root = make_layout(tmp_path, splits=("train",))
    with pytest.raises(DataError, match="keras_slices_validate is missing"):
        dataset.list_split(root, "validate")
    (root / "keras_slices_validate").mkdir()
    with pytest.raises(DataError, match="keras_slices_seg_validate is missing"):
        dataset.list_split(root, "validate")
    (root / "keras_slices_seg_validate").mkdir()
    with pytest.raises(DataError, match="holds no case_X"):
        dataset.list_split(root, "validate")


# ----------------------------------------------------------------------------- whole split and cache

def test_load_split_shapes_and_metadata(tiny_data, tmp_path):
    data = dataset.load_split(tiny_data, "train", cache_dir=tmp_path, progress=False)
    n = len(data)
    assert data.images.shape == (n, 256, 128, 1) and data.images.dtype == np.float32
    assert data.masks.shape == (n, 256, 128) and data.masks.dtype == np.uint8
    assert 0 <= data.images.min() and data.images.max() <= 1
    assert {(256, 128), (256, 144)} <= set(data.orig_shapes)
    assert data.label_counts.shape == (n, 6) and data.label_counts.sum() == sum(r * c for r, c in data.orig_shapes)
    assert data.masks.max() <= 5


def test_cache_hit_invalidation_and_corruption(tmp_path, monkeypatch):
    root = make_layout(tmp_path / "d", splits=("train",))
    cache = tmp_path / "cache"
    first = dataset.load_split(root, "train", cache_dir=cache, progress=False, workers=1)

    def boom(*a):
        raise AssertionError("files were read again")

    with monkeypatch.context() as m:
        m.setattr(dataset, "load_pair", boom)
        warm = dataset.load_split(root, "train", cache_dir=cache, progress=False, workers=1)
    np.testing.assert_array_equal(warm.images, first.images)
    assert warm.refs == first.refs

    # A changed file (new content, new mtime) invalidates the cache.
    img = root / "keras_slices_train" / "case_001_week_0_slice_0.nii.gz"
    write_nifti(img, np.full((256, 128), 3.0, np.float32))
    os.utime(img, ns=(1, 1))
    before = {p.name for p in cache.iterdir()}
    changed = dataset.load_split(root, "train", cache_dir=cache, progress=False, workers=1)
    assert np.all(changed.images[0] == 0) and not np.all(first.images[0] == 0)
    # The stale cache is gone; one of other settings stays.
    (after,) = {p.name for p in cache.iterdir()}
    assert after not in before and len(before) == 1
    zscore = Preprocessing(norm="zscore")
    dataset.load_split(root, "train", zscore, cache_dir=cache, progress=False, workers=1)
    assert len(list(cache.iterdir())) == 2

    # A corrupt cache is detected and rebuilt.
    for folder in cache.iterdir():
        with open(folder / "masks.npy", "r+b") as f:
            f.seek(200)
            f.write(b"\x07" * 64)
        (folder / "images.npy").write_bytes((folder / "images.npy").read_bytes()[:1000])
    with pytest.warns(UserWarning, match="corrupt or stale"):
        rebuilt = dataset.load_split(root, "train", cache_dir=cache, progress=False, workers=1)
    np.testing.assert_array_equal(rebuilt.masks, changed.masks)


@pytest.mark.parametrize("processes_from", [dataset.PROCESSES_FROM, 1], ids=["threads", "processes"])
def test_bad_pairs_listed_and_skip_bad(tmp_path, monkeypatch, processes_from):
    monkeypatch.setattr(dataset, "PROCESSES_FROM", processes_from)
    root = make_layout(tmp_path / "d", pairs=[(1, 0, s) for s in range(10)], splits=("train",))
    (root / "keras_slices_train" / "case_001_week_0_slice_3.nii.gz").write_bytes(b"")
    write_nifti(root / "keras_slices_seg_train" / "seg_001_week_0_slice_5.nii.gz", np.zeros((256, 144)))
    with pytest.raises(DataError) as e:
        dataset.load_split(root, "train", use_cache=False, progress=False)
    assert "2 of 10 pair(s) cannot be used" in str(e.value)
    assert "slice_3.nii.gz: the file is empty" in str(e.value)
    assert "image shape (256, 128) but its mask" in str(e.value) and "(256, 144)" in str(e.value)
    with pytest.raises(DataError, match="more than the allowed 5%"):
        dataset.load_split(root, "train", use_cache=False, progress=False, skip_bad=True)
    with pytest.warns(UserWarning, match="skipping"):
        data = dataset.load_split(root, "train", cache_dir=tmp_path / "cache", progress=False, skip_bad=True,
                                  max_bad_fraction=0.3)
    assert len(data) == 8 and len(data.skipped) == 2
    assert [r.slice for r in data.refs] == [0, 1, 2, 4, 6, 7, 8, 9]
    assert data.images.shape[0] == data.masks.shape[0] == data.label_counts.shape[0] == 8
    with pytest.warns(UserWarning, match="skipping"):  # from the cache, which kept the 8 rows and the 2 errors
        again = dataset.load_split(root, "train", cache_dir=tmp_path / "cache", progress=False, skip_bad=True,
                                   max_bad_fraction=0.3)
    np.testing.assert_array_equal(again.images, data.images)
    assert again.skipped == data.skipped
    assert not [p for p in (tmp_path / "cache").rglob(".*")], "temporary array files left in the cache"


def test_threads_processes_and_the_cache_agree(tiny_data, tmp_path, monkeypatch):
    a = dataset.load_split(tiny_data, "validate", use_cache=False, progress=False, workers=1)
    b = dataset.load_split(tiny_data, "validate", use_cache=False, progress=False, workers=2)
    with monkeypatch.context() as m:
        m.setattr(dataset, "PROCESSES_FROM", 1)  # worker processes, as for a split of 2,000 pairs or more
        p = dataset.load_split(tiny_data, "validate", use_cache=False, progress=False, workers=2)
    cache_dir = tmp_path / "cache"
    c = dataset.load_split(tiny_data, "validate", cache_dir=cache_dir, progress=False)
    d = dataset.load_split(tiny_data, "validate", cache_dir=cache_dir, progress=False)  # from the cache
    for other in (b, p, c, d):
        np.testing.assert_array_equal(other.images, a.images)
        np.testing.assert_array_equal(other.masks, a.masks)
        np.testing.assert_array_equal(other.label_counts, a.label_counts)
        assert other.orig_shapes == a.orig_shapes and other.refs == a.refs and other.geometry == a.geometry
    assert a.geometry[0] == ("RAS", (1.0, 1.0))  # the phantom's affine: 1 mm pixels, 3 mm slices
    d.images[0] = 7  # a copy-on-write map: the cache file never changes
    folder, = cache_dir.iterdir()
    assert not np.any(np.load(folder / "images.npy")[0] == 7)


def test_crop_fit_keeps_pixels_as_they_are(tiny_data):
    """--fit crop at the slices' own spacing: a 256x144 slice keeps 128 of its columns, the window around its
    anatomy (no labelled pixel lost), a 256x128 one is unchanged; its mask is cut at the same columns."""
    from preprocess import normalise_image, read_slice
    prep = Preprocessing(fit="crop", norm="percentile", spacing=(1.0, 1.0))
    data = dataset.load_split(tiny_data, "train", prep, use_cache=False, progress=False)
    wides = [i for i, s in enumerate(data.orig_shapes) if s == (256, 144)]
    narrow = next(i for i, s in enumerate(data.orig_shapes) if s == (256, 128))
    assert wides
    for i in [narrow, *wides]:
        raw, mask = read_slice(data.refs[i].image), read_slice(data.refs[i].mask)
        image = normalise_image(raw, "percentile")
        offsets = [c for c in range(raw.shape[1] - 127) if np.allclose(data.images[i, ..., 0], image[:, c:c + 128])]
        assert len(offsets) == 1, offsets  # the network input is the slice's own pixels, not resampled
        np.testing.assert_array_equal(data.masks[i], mask[:, offsets[0]:offsets[0] + 128])
        assert (data.masks[i] > 0).sum() == (mask > 0).sum()  # the anatomy is whole in the window


def test_a_wide_slice_and_its_mask_stay_aligned_through_the_loader(tmp_path):
    """A rectangle in a 256x144 image and in its mask, squeezed to 256x128 by the loader, keeps one centroid
    (0.89 px apart with INTER_NEAREST, 0.11 with INTER_NEAREST_EXACT)."""
    image, mask = np.zeros((256, 144), np.float32), np.zeros((256, 144), np.float32)
    image[61:98, 53:98], mask[61:98, 53:98] = 900.0, 3
    for split in ("train",):
        write_nifti(tmp_path / f"keras_slices_{split}" / "case_001_week_0_slice_0.nii.gz", image)
        write_nifti(tmp_path / f"keras_slices_seg_{split}" / "seg_001_week_0_slice_0.nii.gz", mask)
    data = dataset.load_split(tmp_path, "train", use_cache=False, progress=False)
    idx = np.indices((256, 128)).reshape(2, -1)
    weights = [data.images[0, ..., 0].ravel(), (data.masks[0] == 3).ravel().astype(float)]
    image_centre, mask_centre = (idx @ w / w.sum() for w in weights)
    assert np.abs(image_centre - mask_centre).max() <= 0.25, (image_centre, mask_centre)


def test_loader_processes_do_not_rerun_the_callers_script(tiny_data, tmp_path):
    # A script with no __main__ guard, as users write them: spawn-style workers would run it again (and again,
    # from inside each worker) and import whatever it imports. joblib's loky workers must not.
    marker = tmp_path / "imports.txt"
    script = tmp_path / "user_script.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
with open({str(marker)!r}, "a") as f:
    f.write("imported\\n")
import dataset
dataset.PROCESSES_FROM = 1
data = dataset.load_split({str(tiny_data)!r}, "validate", use_cache=False, progress=False, workers=2)
print(len(data), float(data.images.sum()))
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert marker.read_text() == "imported\n"
    expected = dataset.load_split(tiny_data, "validate", use_cache=False, progress=False, workers=1)
    n, total = out.stdout.split()
    assert int(n) == len(expected) and float(total) == pytest.approx(float(expected.images.sum()), rel=1e-6)


# ----------------------------------------------------------------------------- info

def test_info_command(tiny_data, capsys):
    assert dataset.main(["info", "--data-dir", str(tiny_data)]) == 0
    out = capsys.readouterr().out
    assert "== train" in out and "256x128" in out and "256x144" in out and "prostate" in out
    assert "orientation RAS (0 slice(s) differ" in out and "pixel spacing (mm) median [1.0, 1.0]" in out
    assert "problems: 0" in out


def test_info_missing_folder_message(tmp_path, capsys):
    assert dataset.main(["info", "--data-dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_skip_bad_also_skips_unpaired_and_info_lists_every_problem(tmp_path, capsys):
    root = make_layout(tmp_path, pairs=[(1, 0, s) for s in range(10)])
    os.remove(root / "keras_slices_seg_train" / "seg_001_week_0_slice_9.nii.gz")
    (root / "keras_slices_train" / "case_001_week_0_slice_2.nii.gz").write_bytes(b"not nifti")
    cache = tmp_path / "cache"
    for _ in range(2):  # from the files, then from the cache: the same report
        with pytest.warns(UserWarning, match="skipping"):
            data = dataset.load_split(root, "train", cache_dir=cache, progress=False, skip_bad=True,
                                      max_bad_fraction=0.25)
        assert len(data) == 8 and len(data.skipped) == 2
        assert "slice_9.nii.gz: no partner (no mask)" in data.skipped[0] and "slice_2" in data.skipped[1]
    assert dataset.main(["info", "--data-dir", str(root), "--cache-dir", str(cache)]) == 1
    out = capsys.readouterr().out
    assert "problems: 3" in out and "no partner" in out and "slice_2.nii.gz: truncated or corrupt gzip" in out
    assert "case 001 is also in the validate, test split(s)" in out  # make_layout puts case 1 in every split


def test_a_slice_stored_with_its_singleton_axis_first_keeps_its_own_pixel_spacing(tmp_path):
    """(1, rows, cols) files: the pixel spacing is that of the rows and columns, not of the singleton (slice) axis,
    in the loader and in the header pass that fixes the network's spacing; the thickness is the singleton's."""
    import nibabel as nib
    from preprocess import slice_geometry, slice_thickness
    affine = np.diag([5.0, 0.5, 0.8, 1.0])
    image = np.zeros((1, 64, 32), np.float32)
    image[0, 20:40, 8:24] = 900.0
    for split in ("train",):
        write_nifti(tmp_path / f"keras_slices_{split}" / "case_001_week_0_slice_0.nii.gz", image, affine)
        write_nifti(tmp_path / f"keras_slices_seg_{split}" / "seg_001_week_0_slice_0.nii.gz", image > 0, affine,
                    dtype=np.float32)
    assert slice_geometry(affine, (1, 64, 32)) == ("ASR", (0.5, 0.8))
    data = dataset.load_split(tmp_path, "train", use_cache=False, progress=False)
    assert data.geometry == [("ASR", (0.5, 0.8))] and data.orig_shapes == [(64, 32)]
    assert dataset.header_geometry(tmp_path, "train", cache_dir=tmp_path / "c")["spacing_mm_median"] == [0.5, 0.8]
    path = tmp_path / "keras_slices_train" / "case_001_week_0_slice_0.nii.gz"
    assert slice_thickness(nib.load(path), (1, 64, 32), path) == (5.0, None)
