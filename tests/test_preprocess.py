"""preprocess.py: reading one slice with nibabel, checks, normalisation, resizing (with aligned masks), targets."""
import gzip
import io

import numpy as np
import pytest
from conftest import write_nifti

import preprocess
from preprocess import DataError, Preprocessing


# ----------------------------------------------------------------------------- reading one slice

def test_read_slice_nii_and_gz_and_trailing_axis(tmp_path):
    a = np.arange(256 * 128, dtype=np.float32).reshape(256, 128)
    for name, arr in (("a.nii", a), ("b.nii.gz", a), ("c.nii.gz", a[..., None])):
        out = preprocess.read_slice(write_nifti(tmp_path / name, arr))
        assert out.shape == (256, 128) and out.dtype == np.float32
        np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float64, ">f4", ">i2"])
def test_read_slice_dtypes_including_big_endian(tmp_path, dtype):
    a = (np.arange(64 * 32).reshape(64, 32) % 200).astype(dtype)
    out = preprocess.read_slice(write_nifti(tmp_path / "x.nii.gz", a))
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
        got = preprocess.read_slice(tmp_path / name)
        np.testing.assert_array_equal(got, expected)
        assert got.flags.writeable
    assert not np.array_equal(preprocess.read_slice(tmp_path / "scaled.nii.gz"), a)  # the scaling was applied


def test_read_slice_refuses_headers_it_cannot_read(tmp_path):
    import nibabel as nib
    good = write_nifti(tmp_path / "good.nii", np.ones((64, 32), np.float32)).read_bytes()
    (tmp_path / "short.nii").write_bytes(good[:-100])  # a complete header but missing voxels
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(good))
    header["datatype"] = 2304  # RGBA: not a plain number per voxel
    (tmp_path / "rgba.nii").write_bytes(header.binaryblock + good[348:])
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(good))
    header["vox_offset"] = 0  # nibabel would read the header's own bytes as voxels
    (tmp_path / "offset0.nii").write_bytes(header.binaryblock + good[348:])
    for name, msg in (("short.nii", r"truncated or corrupt data \(OSError: Expected 8192 bytes, got 8092 bytes"),
                      ("rgba.nii", "not a readable NIfTI file: data type .* is not a plain numeric type"),
                      ("offset0.nii", r"data offset \(vox_offset\) 0 lies inside the 348-byte header; expected 352")):
        with pytest.raises(DataError, match=msg) as e:
            preprocess.read_slice(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("shape", [(256, 128, 3), (256, 128, 1, 2)])
def test_read_slice_refuses_volumes(tmp_path, shape):
    path = write_nifti(tmp_path / "vol.nii.gz", np.zeros(shape, np.float32))
    with pytest.raises(DataError, match=r"vol\.nii\.gz: shape \(256, 128, (3|1, 2)\), expected one 2D slice"):
        preprocess.read_slice(path)


def test_read_slice_broken_files(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", np.ones((64, 32), np.float32)).read_bytes()
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "trunc.nii.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.nii").write_bytes(b"this is not a NIfTI file at all" * 20)
    (tmp_path / "text.nii.gz").write_bytes(gzip.compress(b"hello" * 100))
    for name, msg in (("empty.nii.gz", "empty"), ("trunc.nii.gz", "truncated or corrupt"),
                      ("text.nii", "not a readable NIfTI"), ("text.nii.gz", "not a readable NIfTI")):
        with pytest.raises(DataError, match=msg) as e:
            preprocess.read_slice(tmp_path / name)
        assert name in str(e.value)


# ----------------------------------------------------------------------------- checks and preprocessing

def test_normalise_minmax_zscore_and_constant():
    img = np.array([[100.0, 300.0], [200.0, 500.0]], np.float32)
    np.testing.assert_allclose(preprocess.normalise_image(img), [[0, 0.5], [0.25, 1]])
    z = preprocess.normalise_image(img, "zscore")
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-5
    for mode in ("minmax", "zscore"):
        out = preprocess.normalise_image(np.full((4, 4), 7.0, np.float32), mode)
        assert np.all(out == 0) and np.all(np.isfinite(out))



def test_normalise_percentile_hand_values():
    """0.5th..99.5th percentile to 0..1, clipped: a hot pixel no longer sets the scale. The values 0..998 and one
    pixel of 1e6 (1000 pixels): numpy's linear percentiles sit at sorted positions 0.005 * 999 = 4.995 and
    0.995 * 999 = 994.005, between 4 and 5 and between 994 and 995, so lo = 4.995 and hi = 994.005."""
    values = np.arange(1000, dtype=np.float32)
    values[999] = 1e6
    img = values[np.random.default_rng(0).permutation(1000)].reshape(25, 40)  # where each value lies: no matter
    out = preprocess.normalise_image(img, "percentile")
    assert out.shape == (25, 40) and out.dtype == np.float32
    lo, hi = 4.995, 994.005
    for value, expected in ((0.0, 0.0), (4.0, 0.0), (5.0, (5 - lo) / (hi - lo)), (500.0, (500 - lo) / (hi - lo)),
                            (994.0, (994 - lo) / (hi - lo)), (995.0, 1.0), (1e6, 1.0)):
        assert out[img == value] == pytest.approx(expected, abs=1e-6), value
    assert out.min() == 0.0 and out.max() == 1.0
    # Min-max of the same image puts everything but the hot pixel under 0.001.
    assert preprocess.normalise_image(img, "minmax")[img == 500.0] == pytest.approx(500 / 1e6)

def test_check_image_refuses_nan_inf():
    img = np.ones((4, 4), np.float32)
    img[1, 1] = np.nan
    img[2, 2] = np.inf
    with pytest.raises(DataError, match="f.nii: 2 NaN/Inf"):
        preprocess.check_image(img, "f.nii")


def test_check_mask_labels():
    ok = preprocess.check_mask(np.array([[0.0, 5.0], [2.0000001, 1.0]]), "m", 6)
    assert ok.dtype == np.uint8 and ok.tolist() == [[0, 5], [2, 1]]
    with pytest.raises(DataError, match=r"m: mask values \[0.5\] are not integer labels"):
        preprocess.check_mask(np.array([[0.0, 0.5]]), "m", 6)
    with pytest.raises(DataError, match=r"m: labels \[-1, 0\] found, expected 0..5"):
        preprocess.check_mask(np.array([[0.0, -1.0]]), "m", 6)
    with pytest.raises(DataError, match=r"labels \[0, 6\] found, expected 0..5"):
        preprocess.check_mask(np.array([[0.0, 6.0]]), "m", 6)
    assert preprocess.check_mask(np.array([[0.0, 6.0]]), "m", 7).max() == 6


@pytest.mark.parametrize("shape,size", [((256, 144), (256, 128)), ((256, 128), (512, 256)), ((200, 90), (256, 128))])
def test_resize_never_invents_labels(shape, size):
    rng = np.random.default_rng(0)
    labels = np.zeros(shape, np.uint8)
    labels[20:120, 10:60] = 1
    labels[rng.random(shape) < 0.05] = 5  # scattered speckle: any blending would create 2..4
    labels[100:140, 50:80] = 3
    out = preprocess.resize_labels(labels, size)
    assert out.shape == size
    assert set(np.unique(out)) <= {0, 1, 3, 5}


def test_resize_image_shape_and_range():
    img = np.random.default_rng(1).random((256, 144)).astype(np.float32)
    out, _ = preprocess.preprocess_pair(img * 1000, np.zeros((256, 144), np.uint8), Preprocessing(size=(256, 128)))
    assert out.shape == (256, 128) and out.min() >= 0 and out.max() <= 1


def test_targets():
    labels = np.array([[0, 1, 5], [3, 4, 5]], np.uint8)
    names = ("background", "body", "bone", "bladder", "rectum", "prostate")
    assert preprocess.parse_target("all", names) is None
    assert preprocess.parse_target("prostate", names) == (5,)
    assert preprocess.parse_target("bladder,4", names) == (3, 4)
    with pytest.raises(ValueError, match="not one of the classes"):
        preprocess.parse_target("kidney", names)
    with pytest.raises(ValueError, match="cannot include the background"):
        preprocess.parse_target("0,prostate", names)
    assert preprocess.make_target(labels, (5,)).tolist() == [[0, 0, 1], [0, 0, 1]]
    assert preprocess.make_target(labels, None).tolist() == labels.tolist()




def _centroid(a):
    """Centre of mass (row, col) of an intensity or label map."""
    idx = np.indices(a.shape).reshape(2, -1)
    w = a.astype(float).ravel()
    return idx @ w / w.sum()


@pytest.mark.parametrize("shape,size,square", [((256, 144), (256, 128), (61, 98, 53, 98)),
                                               ((200, 90), (256, 128), (60, 100, 38, 83))])
def test_resized_mask_stays_on_its_image(shape, size, square):
    """A rectangle drawn in an image and in its mask keeps one centroid through preprocessing: OpenCV resizes
    images with centred pixels, and the mask must be sampled at the same centres (INTER_NEAREST_EXACT).
    INTER_NEAREST samples at floor(x * scale): these two are 0.89 and 0.94 px off with it, 0.11 and 0.13 now."""
    image, mask = np.zeros(shape, np.float32), np.zeros(shape, np.uint8)
    r0, r1, c0, c1 = square
    image[r0:r1, c0:c1] = 1000.0
    mask[r0:r1, c0:c1] = 1
    net_image, net_mask = preprocess.preprocess_pair(image, mask, Preprocessing(size=size))
    assert np.abs(_centroid(net_image) - _centroid(net_mask)).max() <= 0.25
