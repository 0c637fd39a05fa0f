"""dataset.py: discovery, pairing, reading, checks, normalisation, resizing, cache, tf.data pipeline."""
import gzip
import io
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, make_layout, write_nifti

import dataset
from dataset import DataError, Preprocessing


# ----------------------------------------------------------------------------- reading one slice

def test_read_slice_nii_and_gz_and_trailing_axis(tmp_path):
    a = np.arange(256 * 128, dtype=np.float32).reshape(256, 128)
    for name, arr in (("a.nii", a), ("b.nii.gz", a), ("c.nii.gz", a[..., None])):
        out = dataset.read_slice(write_nifti(tmp_path / name, arr))
        assert out.shape == (256, 128) and out.dtype == np.float32
        np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float64, ">f4", ">i2"])
def test_read_slice_dtypes_including_big_endian(tmp_path, dtype):
    a = (np.arange(64 * 32).reshape(64, 32) % 200).astype(dtype)
    out = dataset.read_slice(write_nifti(tmp_path / "x.nii.gz", a))
    np.testing.assert_array_equal(out, a.astype(np.float32))


def test_read_slice_matches_nibabel_on_scaled_nifti1_and_nifti2(tmp_path):
    """read_slice takes the voxels straight from the bytes: scaling, byte order and NIfTI-2 as nibabel reads them."""
    import nibabel as nib
    a = (np.arange(40 * 24).reshape(40, 24) % 300 - 150).astype(np.int16)
    scaled = nib.Nifti1Image(a, np.eye(4))
    scaled.header.set_slope_inter(2.5, -3.0)
    images = {"scaled.nii.gz": scaled, "scaled_be.nii": nib.Nifti1Image(a.astype(">i2"), np.eye(4)),
              "v2.nii.gz": nib.Nifti2Image(a.astype(np.float64), np.eye(4))}
    images["scaled_be.nii"].header.set_slope_inter(0.5, 10.0)
    for name, img in images.items():
        nib.save(img, tmp_path / name)
        expected = nib.load(tmp_path / name).get_fdata().astype(np.float32)
        got = dataset.read_slice(tmp_path / name)
        np.testing.assert_array_equal(got, expected)
        assert got.flags.writeable
    assert not np.array_equal(dataset.read_slice(tmp_path / "scaled.nii.gz"), a)  # the scaling was applied


def test_read_slice_refuses_headers_it_cannot_read(tmp_path):
    import nibabel as nib
    good = write_nifti(tmp_path / "good.nii", np.ones((64, 32), np.float32)).read_bytes()
    pair = bytearray(good)
    pair[344:348] = b"ni1\x00"  # header of a .hdr/.img pair: the voxels are in another file
    (tmp_path / "pair.nii").write_bytes(bytes(pair))
    (tmp_path / "short.nii").write_bytes(good[:-100])  # a complete header but missing voxels
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(good))
    header["datatype"] = 2304  # RGBA: not a plain number per voxel
    (tmp_path / "rgba.nii").write_bytes(header.binaryblock + good[348:])
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(good))
    header["vox_offset"] = 0  # nibabel would read the header's own bytes as voxels
    (tmp_path / "offset0.nii").write_bytes(header.binaryblock + good[348:])
    for name, msg in (("pair.nii", r"magic b'ni1', expected b'n\+1'"), ("short.nii", r"truncated: 8444 bytes, but the header describes 2048 voxels of float32 from byte 352 \(8544 bytes\)"),
                      ("rgba.nii", "is not a plain numeric type"),
                      ("offset0.nii", r"data offset \(vox_offset\) 0 lies inside the 348-byte header; expected 352")):
        with pytest.raises(DataError, match=msg) as e:
            dataset.read_slice(tmp_path / name)
        assert name in str(e.value) and "not a readable NIfTI file" in str(e.value)


@pytest.mark.parametrize("shape", [(256, 128, 3), (256, 128, 1, 2)])
def test_read_slice_refuses_volumes(tmp_path, shape):
    path = write_nifti(tmp_path / "vol.nii.gz", np.zeros(shape, np.float32))
    with pytest.raises(DataError, match=r"vol\.nii\.gz: shape \(256, 128, (3|1, 2)\), expected one 2D slice"):
        dataset.read_slice(path)


def test_read_slice_broken_files(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", np.ones((64, 32), np.float32)).read_bytes()
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "trunc.nii.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.nii").write_bytes(b"this is not a NIfTI file at all" * 20)
    (tmp_path / "text.nii.gz").write_bytes(gzip.compress(b"hello" * 100))
    for name, msg in (("empty.nii.gz", "empty"), ("trunc.nii.gz", "truncated or corrupt"),
                      ("text.nii", "not a readable NIfTI"), ("text.nii.gz", "not a readable NIfTI")):
        with pytest.raises(DataError, match=msg) as e:
            dataset.read_slice(tmp_path / name)
        assert name in str(e.value)


# ----------------------------------------------------------------------------- checks and preprocessing

def test_normalise_minmax_zscore_and_constant():
    img = np.array([[100.0, 300.0], [200.0, 500.0]], np.float32)
    np.testing.assert_allclose(dataset.normalise_image(img), [[0, 0.5], [0.25, 1]])
    z = dataset.normalise_image(img, "zscore")
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-5
    for mode in ("minmax", "zscore"):
        out = dataset.normalise_image(np.full((4, 4), 7.0, np.float32), mode)
        assert np.all(out == 0) and np.all(np.isfinite(out))


def test_check_image_refuses_nan_inf():
    img = np.ones((4, 4), np.float32)
    img[1, 1] = np.nan
    img[2, 2] = np.inf
    with pytest.raises(DataError, match="f.nii: 2 NaN/Inf"):
        dataset.check_image(img, "f.nii")


def test_check_mask_labels():
    ok = dataset.check_mask(np.array([[0.0, 5.0], [2.0000001, 1.0]]), "m", 6)
    assert ok.dtype == np.uint8 and ok.tolist() == [[0, 5], [2, 1]]
    with pytest.raises(DataError, match=r"m: mask values \[0.5\] are not integer labels"):
        dataset.check_mask(np.array([[0.0, 0.5]]), "m", 6)
    with pytest.raises(DataError, match=r"m: labels \[-1, 0\] found, expected 0..5"):
        dataset.check_mask(np.array([[0.0, -1.0]]), "m", 6)
    with pytest.raises(DataError, match=r"labels \[0, 6\] found, expected 0..5"):
        dataset.check_mask(np.array([[0.0, 6.0]]), "m", 6)
    assert dataset.check_mask(np.array([[0.0, 6.0]]), "m", 7).max() == 6


@pytest.mark.parametrize("shape,size", [((256, 144), (256, 128)), ((256, 128), (512, 256)), ((200, 90), (256, 128))])
def test_resize_never_invents_labels(shape, size):
    rng = np.random.default_rng(0)
    labels = np.zeros(shape, np.uint8)
    labels[20:120, 10:60] = 1
    labels[rng.random(shape) < 0.05] = 5  # scattered speckle: any blending would create 2..4
    labels[100:140, 50:80] = 3
    out = dataset.resize_labels(labels, size)
    assert out.shape == size
    assert set(np.unique(out)) <= {0, 1, 3, 5}


def test_resize_image_shape_and_range():
    img = np.random.default_rng(1).random((256, 144)).astype(np.float32)
    out = dataset.preprocess_image(img * 1000, Preprocessing(size=(256, 128)))
    assert out.shape == (256, 128) and out.min() >= 0 and out.max() <= 1


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
        m.setattr(dataset, "_load_chunk", boom)
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
    zscore = dataset.Preprocessing(norm="zscore")
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


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_bad_pairs_listed_and_skip_bad(tmp_path, processes):
    root = make_layout(tmp_path / "d", pairs=[(1, 0, s) for s in range(10)], splits=("train",))
    (root / "keras_slices_train" / "case_001_week_0_slice_3.nii.gz").write_bytes(b"")
    write_nifti(root / "keras_slices_seg_train" / "seg_001_week_0_slice_5.nii.gz", np.zeros((256, 144)))
    with pytest.raises(DataError) as e:
        dataset.load_split(root, "train", use_cache=False, progress=False, processes=processes)
    assert "2 of 10 pair(s) cannot be used" in str(e.value)
    assert "slice_3.nii.gz: the file is empty" in str(e.value)
    assert "image shape (256, 128) but its mask" in str(e.value) and "(256, 144)" in str(e.value)
    with pytest.raises(DataError, match="more than the allowed 5%"):
        dataset.load_split(root, "train", use_cache=False, progress=False, skip_bad=True)
    with pytest.warns(UserWarning, match="skipping"):
        data = dataset.load_split(root, "train", cache_dir=tmp_path / "cache", progress=False, skip_bad=True,
                                  max_bad_fraction=0.3, processes=processes)
    assert len(data) == 8 and len(data.skipped) == 2
    assert [r.slice for r in data.refs] == [0, 1, 2, 4, 6, 7, 8, 9]
    assert data.images.shape[0] == data.masks.shape[0] == data.label_counts.shape[0] == 8
    with pytest.warns(UserWarning, match="skipping"):  # from the cache, which kept the 8 rows and the 2 errors
        again = dataset.load_split(root, "train", cache_dir=tmp_path / "cache", progress=False, skip_bad=True,
                                   max_bad_fraction=0.3, processes=processes)
    np.testing.assert_array_equal(again.images, data.images)
    assert again.skipped == data.skipped
    assert not [p for p in (tmp_path / "cache").rglob(".*")], "temporary array files left in the cache"


def test_serial_threads_and_processes_agree(tiny_data, tmp_path):
    a = dataset.load_split(tiny_data, "validate", use_cache=False, progress=False, workers=1)
    b = dataset.load_split(tiny_data, "validate", use_cache=False, progress=False, workers=2)
    c = dataset.load_split(tiny_data, "validate", use_cache=False, progress=False, workers=2, processes=True)
    cache = tmp_path / "cache"
    d = dataset.load_split(tiny_data, "validate", cache_dir=cache, progress=False, workers=2, processes=True)
    e = dataset.load_split(tiny_data, "validate", cache_dir=cache, progress=False, workers=1)  # from the cache
    for other in (b, c, d, e):
        np.testing.assert_array_equal(other.images, a.images)
        np.testing.assert_array_equal(other.masks, a.masks)
        np.testing.assert_array_equal(other.label_counts, a.label_counts)
        assert other.orig_shapes == a.orig_shapes and other.refs == a.refs
    # The workers wrote the cache's files in place; what load_split hands out is a copy-on-write map of them.
    folder, = cache.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["images.npy", "label_counts.npy", "masks.npy", "meta.json"]
    d.images[0] = 7
    assert not np.any(np.load(folder / "images.npy")[0] == 7)


def test_loader_processes_do_not_rerun_the_callers_script(tiny_data, tmp_path):
    # A script with no __main__ guard, as users write them: spawn-style workers would run it again (and again,
    # from inside each worker) and import whatever it imports, TensorFlow included. Loky's workers must not.
    marker = tmp_path / "imports.txt"
    script = tmp_path / "user_script.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
with open({str(marker)!r}, "a") as f:
    f.write("imported\\n")
import dataset
data = dataset.load_split({str(tiny_data)!r}, "validate", use_cache=False, progress=False, workers=2, processes=True)
print(len(data), float(data.images.sum()))
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert marker.read_text() == "imported\n"
    expected = dataset.load_split(tiny_data, "validate", use_cache=False, progress=False, workers=1)
    n, total = out.stdout.split()
    assert int(n) == len(expected) and float(total) == pytest.approx(float(expected.images.sum()), rel=1e-6)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="lists child processes through /proc")
def test_idle_loader_processes_exit(tiny_data, tmp_path):
    # Idle loky workers would otherwise live on for joblib's default 300 s, ~100 MB each, into training.
    script = tmp_path / "load.py"
    script.write_text(f"""
import os, sys, time
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
import dataset

def loader_processes():
    me, found = str(os.getpid()), []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            cmd = (status.parent / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if fields.get("PPid", "").strip() == me and b"popen_loky" in cmd:
            found.append(status.parent.name)
    return found

dataset.WORKER_IDLE_S = 3
dataset.load_split({str(tiny_data)!r}, "validate", use_cache=False, progress=False, workers=2, processes=True)
print(len(loader_processes()))
deadline = time.monotonic() + 60
while loader_processes() and time.monotonic() < deadline:
    time.sleep(0.5)
print(len(loader_processes()))
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    right_after, later = map(int, out.stdout.split())
    assert right_after >= 1, "no loader processes were found right after the load"
    assert later == 0, "loader processes still alive a minute after the load"


def test_loader_falls_back_to_threads_when_the_array_files_cannot_be_made(tiny_data, tmp_path, monkeypatch):
    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dataset, "_array_files", no_space)
    with pytest.warns(UserWarning, match="No space left on device.*loading with threads"):
        data = dataset.load_split(tiny_data, "validate", cache_dir=tmp_path, progress=False, workers=2, processes=True)
    expected = dataset.load_split(tiny_data, "validate", use_cache=False, progress=False, workers=1)
    np.testing.assert_array_equal(data.images, expected.images)


# ----------------------------------------------------------------------------- targets and tf.data

def test_targets():
    labels = np.array([[0, 1, 5], [3, 4, 5]], np.uint8)
    assert dataset.parse_target("all") is None
    assert dataset.parse_target("prostate") == (5,)
    assert dataset.parse_target("bladder,4") == (3, 4)
    with pytest.raises(ValueError, match="not one of the classes"):
        dataset.parse_target("kidney")
    assert dataset.make_target(labels, (5,)).tolist() == [[0, 0, 1], [0, 0, 1]]
    assert dataset.make_target(labels, None).tolist() == labels.tolist()


def _tiny_split(n=12, seed=0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 64, 32), np.uint8)
    for i in range(n):
        r, c = rng.integers(8, 40), rng.integers(4, 20)
        masks[i, r:r + 16, c:c + 8] = 1 + i % 5
    images = (masks[..., None] / 5.0).astype(np.float32)
    refs = [dataset.SliceRef("i", "m", 1, 0, i) for i in range(n)]
    return dataset.SplitData(images, masks, refs, [(64, 32)] * n, np.zeros((n, 6)))


def test_dataset_batches_and_epoch_determinism():
    data = _tiny_split()
    ds = dataset.make_dataset(data, 5, shuffle=True, augment=dataset.Augment(), seed=7, epochs=3)
    batches = [(x.numpy(), y.numpy()) for x, y in ds]
    assert [len(x) for x, _ in batches] == [5, 5, 2] * 3
    assert batches[0][0].shape == (5, 64, 32, 1) and batches[0][1].shape == (5, 64, 32, 1)
    # Epochs differ from each other, and epoch 2 alone (a resumed run) equals epoch 2 of the full run.
    assert not np.array_equal(batches[0][0], batches[3][0])
    resumed = [(x.numpy(), y.numpy()) for x, y in dataset.make_dataset(
        data, 5, shuffle=True, augment=dataset.Augment(), seed=7, epochs=3, initial_epoch=2)]
    for (x1, y1), (x2, y2) in zip(batches[6:], resumed):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    # Validation order is the file order, untouched.
    x, y = next(iter(dataset.make_dataset(data, 12)))
    np.testing.assert_array_equal(x.numpy(), data.images)


def test_augmentation_moves_image_and_mask_together():
    data = _tiny_split(n=16, seed=3)
    geometric = dataset.Augment(gamma=0, noise=0, rotate_deg=15, scale=0.15)
    moved = []
    for x, y in dataset.make_dataset(data, 8, shuffle=True, augment=geometric, seed=1, epochs=2):
        x, y = x.numpy()[..., 0], y.numpy()[..., 0]
        assert set(np.unique(y)) <= set(range(6))  # nearest: no invented labels
        label_from_image = np.rint(x * 5)
        agree = (label_from_image == y).mean()
        assert agree > 0.97, agree  # only bilinear border pixels may differ
        moved += [not any(np.array_equal(m, o) for o in data.masks) for m in y]
    assert sum(moved) > len(moved) / 2  # the geometry really changed most samples


def test_gamma_keeps_zscored_images_unclipped():
    data = _tiny_split(n=8, seed=5)
    data.images += np.random.default_rng(0).random(data.images.shape, np.float32)  # texture between min and max
    data.images[:] = (data.images - data.images.mean()) / data.images.std()  # z-scored: about half below 0
    gamma_only = dict(flip=False, rotate_deg=0, scale=0, noise=0, gamma=0.3)
    x, _ = next(iter(dataset.make_dataset(data, 8, augment=dataset.Augment(unit_range=False, **gamma_only))))
    x, orig = x.numpy(), data.images
    # Each image keeps its own range and intensity order; only the curve between its min and max changes.
    np.testing.assert_allclose(x.min(axis=(1, 2, 3)), orig.min(axis=(1, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(x.max(axis=(1, 2, 3)), orig.max(axis=(1, 2, 3)), atol=1e-5)
    for a, b in zip(x, orig):
        order = np.argsort(b.ravel(), kind="stable")
        assert np.all(np.diff(a.ravel()[order]) >= -1e-5)
    assert not np.allclose(x, orig, atol=1e-3)  # the gamma did act
    # The [0, 1] variant (for minmax images) clips these to [0, 1]: what train.py used to do with z-scores.
    y, _ = next(iter(dataset.make_dataset(data, 8, augment=dataset.Augment(unit_range=True, **gamma_only))))
    assert y.numpy().min() >= 0 and orig.min() < 0


def test_augmented_batches_keep_their_static_shape():
    """The warp loses static shapes; without them Keras traces the model for any size (and the fused
    batch norm falls back to the slow path)."""
    import modules
    data = _tiny_split(n=8)
    ds = dataset.make_dataset(data, 4, shuffle=True, augment=dataset.Augment(), epochs=None)
    rows, cols = data.images.shape[1:3]
    assert [tuple(spec.shape[1:]) for spec in ds.element_spec] == [(rows, cols, 1)] * 2
    bn = modules.FusedBatchNormalization()
    x, _ = next(iter(ds))
    assert bn._fused(modules.layers.Conv2D(2, 3, padding="same")(x), None)


def test_info_command(tiny_data, capsys):
    assert dataset.main(["info", "--data-dir", str(tiny_data)]) == 0
    out = capsys.readouterr().out
    assert "== train" in out and "256x128" in out and "256x144" in out and "prostate" in out
    assert "problems: 0" in out


def test_info_missing_folder_message(tmp_path, capsys):
    assert dataset.main(["info", "--data-dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_prefetch_to_device_feeds_keras_fit():
    # The GPU path prefetches to "/gpu:0"; the same code runs here with the CPU as the device.
    import modules
    data = _tiny_split(n=8)
    ds = dataset.make_dataset(data, 4, shuffle=True, augment=dataset.Augment(), epochs=None, device="/cpu:0")
    model = modules.build_unet((64, 32, 1), 6, 4)
    model.compile("adam", modules.dice_ce_loss)
    history = model.fit(ds, epochs=2, steps_per_epoch=2, shuffle=False, verbose=0)
    assert len(history.history["loss"]) == 2 and all(np.isfinite(history.history["loss"]))


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
    assert "problems: 2" in out and "no partner" in out and "slice_2.nii.gz: truncated or corrupt gzip" in out
