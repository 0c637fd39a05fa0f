"""geometry.py against known answers: orientation, resampling, tiling, padding."""
import math

import nibabel as nib
import numpy as np
import pytest

import geometry
from conftest import ROOT  # noqa: F401  (puts the repo root on sys.path)

SPACING = (1.0, 2.0, 3.0)  # mm along R, A, S of the canonical array
SHAPE = (5, 6, 7)


def canonical():
    """An asymmetric RAS array: every voxel value is distinct, so any wrong flip or transpose shows."""
    return np.random.default_rng(0).permutation(np.prod(SHAPE)).reshape(SHAPE).astype(np.float32)


def affine_from_columns(cols):
    """A 4x4 affine whose voxel-to-world columns are `cols` (3 world vectors), with some translation."""
    aff = np.eye(4)
    aff[:3, :3] = np.array(cols, dtype=float).T
    aff[:3, 3] = (10.0, -20.0, 30.0)
    return aff


def rotation_about_s(degrees):
    """World rotation about the S (z) axis."""
    t = math.radians(degrees)
    return np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])


R, A, S = (np.array(v, dtype=float) for v in np.eye(3))
# name: (file array made from the canonical one, voxel-to-world columns, the codes nibabel should read)
CASES = {
    "RAS": (lambda c: c, [R * 1, A * 2, S * 3], ("R", "A", "S")),
    "LPS": (lambda c: c[::-1, ::-1, :], [-R * 1, -A * 2, S * 3], ("L", "P", "S")),
    "SRA": (lambda c: c.transpose(2, 0, 1), [S * 3, R * 1, A * 2], ("S", "R", "A")),
    "PIR": (lambda c: c.transpose(1, 2, 0)[::-1, ::-1, :], [-A * 2, -S * 3, R * 1], ("P", "I", "R")),
}


def case(name, oblique_degrees=0.0):
    """(file array, affine) of a named layout, optionally rotated obliquely about S."""
    make, cols, codes = CASES[name]
    rot = rotation_about_s(oblique_degrees)
    aff = affine_from_columns([rot @ c for c in cols])
    assert nib.aff2axcodes(aff) == codes
    return np.ascontiguousarray(make(canonical())), aff


@pytest.mark.parametrize("name,degrees", [(n, 0.0) for n in CASES] + [("PIR", 20.0), ("SRA", -20.0)])
def test_reorient_to_ras_and_back_exactly(name, degrees):
    data, aff = case(name, degrees)
    ornt = geometry.orientation_transform(aff)
    out = geometry.reorient(data, ornt)
    np.testing.assert_array_equal(out, canonical())  # oblique: nibabel's nearest axes, i.e. the same voxels
    assert geometry.in_plane_spacing(aff, ornt) == pytest.approx(SPACING)
    back = geometry.undo_reorient(out, ornt, data.shape)
    assert back.dtype == data.dtype and np.array_equal(back, data)
    # Trailing axes (class probabilities) ride along and come back bit-exactly too.
    probs = np.stack([data, data / 3, -data], axis=-1)
    moved = geometry.reorient(probs, ornt)
    np.testing.assert_array_equal(moved[..., 1], canonical() / 3)
    assert np.array_equal(geometry.undo_reorient(moved, ornt, data.shape), probs)


def test_other_training_codes():
    data, aff = case("RAS")
    ornt = geometry.orientation_transform(aff, train_codes=("L", "P", "S"))
    np.testing.assert_array_equal(geometry.reorient(data, ornt), canonical()[::-1, ::-1, :])
    data, aff = case("SRA")
    ornt = geometry.orientation_transform(aff, train_codes=("A", "S", "R"))  # coronal-like training axes
    np.testing.assert_array_equal(geometry.reorient(data, ornt), canonical().transpose(1, 2, 0))


@pytest.mark.parametrize("name", list(CASES))
def test_slice_axis_override(name):
    data, aff = case(name)
    codes = CASES[name][2]
    axis_of = {c: codes.index(c) if c in codes else codes.index({"R": "L", "A": "P", "S": "I"}[c]) for c in "RAS"}
    # The natural slice axis gives the automatic answer.
    auto = geometry.reorient(data, geometry.orientation_transform(aff))
    np.testing.assert_array_equal(geometry.reorient(data, geometry.orientation_transform(aff, slice_axis=axis_of["S"])),
                                  auto)
    # Slicing along R: rows go along S (no in-plane code matches it), cols along A; the same whatever the file layout.
    ornt = geometry.orientation_transform(aff, slice_axis=axis_of["R"])
    out = geometry.reorient(data, ornt)
    np.testing.assert_array_equal(out, canonical().transpose(2, 1, 0))
    assert geometry.in_plane_spacing(aff, ornt) == pytest.approx((3.0, 2.0, 1.0))
    assert np.array_equal(geometry.undo_reorient(out, ornt, data.shape), data)
    # Slicing along A: rows along R (matches), cols along S.
    out = geometry.reorient(data, geometry.orientation_transform(aff, slice_axis=axis_of["A"] - 3))
    np.testing.assert_array_equal(out, canonical().transpose(0, 2, 1))


def test_slice_axis_override_oblique():
    data, aff = case("PIR", 20.0)
    out = geometry.reorient(data, geometry.orientation_transform(aff, slice_axis=2))  # the R-ish file axis
    np.testing.assert_array_equal(out, canonical().transpose(2, 1, 0))


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.__setitem__((0, 0), np.nan), "non-finite"),
    (lambda a: a.__setitem__((1, 3), np.inf), "non-finite"),
    (lambda a: a.__setitem__((slice(0, 3), 1), 0.0), "zero-size"),
    (lambda a: a.__setitem__((slice(0, 3), 2), a[:3, 0] * 2), "singular"),
    (lambda a: a.__setitem__((slice(0, 3), 2), a[:3, 0] + a[:3, 1]), "singular"),
])
def test_unusable_affines_raise(mutate, match):
    aff = np.diag([1.0, 2.0, 3.0, 1.0])
    mutate(aff)
    with pytest.raises(ValueError, match=match):
        geometry.orientation_transform(aff)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="4x4"):
        geometry.orientation_transform(np.eye(3))
    with pytest.raises(ValueError, match="three different world axes"):
        geometry.orientation_transform(np.eye(4), train_codes=("R", "L", "S"))
    with pytest.raises(ValueError, match="slice_axis"):
        geometry.orientation_transform(np.eye(4), slice_axis=3)


def centroid(image):
    """Intensity-weighted centroid (row, col) of a 2D image."""
    rows, cols = np.indices(image.shape)
    return np.array([(rows * image).sum(), (cols * image).sum()]) / image.sum()


@pytest.mark.parametrize("fr,fc,mode", [(0.7, 1.37, "auto"), (2.0, 0.5, "auto"), (1.6, 1.6, "auto"),
                                         (0.55, 2.3, "auto"), (0.3, 0.4, "auto"),
                                         (1.6, 1.3, "linear"), (0.9, 2.0, "linear")])  # linear aliases when shrinking
def test_resample_there_and_back(fr, fc, mode):
    slices = np.zeros((2, 64, 80), dtype=np.float32)
    slices[0, 17:37, 23:43] = 1.0
    slices[1, 40:51, 9:30] = 0.5
    there = geometry.resample_slices(slices, fr, fc, interpolation=mode)
    assert there.shape == (2, round(64 * fr), round(80 * fc)) and there.dtype == np.float32
    back = geometry.resample_slices(there, size=(64, 80), interpolation=mode)
    assert back.shape == slices.shape
    for a, b in zip(slices, back):
        assert np.abs(centroid(a) - centroid(b)).max() < 0.25
    # Pixel centres aligned: the forward centroid sits at (c + 0.5) * out/in - 0.5.
    scale = np.array([there.shape[1] / 64, there.shape[2] / 80])
    assert np.abs(centroid(there[0]) - ((centroid(slices[0]) + 0.5) * scale - 0.5)).max() < 0.25


def test_resample_auto_is_linear_growing_and_area_shrinking():
    image = np.random.default_rng(6).random((2, 30, 40, 3)).astype(np.float32)
    grow, shrink = geometry.resample_slices(image, 1.5, 1.2), geometry.resample_slices(image, 0.6, 0.45)
    assert np.array_equal(grow, geometry.resample_slices(image, 1.5, 1.2, interpolation="linear"))
    assert np.array_equal(shrink, geometry.resample_slices(image, 0.6, 0.45, interpolation="area"))
    np.testing.assert_allclose(geometry.resample_slices(image / image.sum(-1, keepdims=True), 0.6, 1.7).sum(-1), 1,
                               atol=1e-6)  # probabilities stay probabilities
    with pytest.raises(ValueError, match="labels are never resampled"):
        geometry.resample_slices(image, 2.0, interpolation="nearest")


def test_resample_channels_and_identity():
    rng = np.random.default_rng(1)
    probs = rng.random((3, 20, 30, 1)).astype(np.float32)
    assert geometry.resample_slices(probs, 1.5).shape == (3, 30, 45, 1)  # a single channel is kept
    many = rng.random((1, 8, 6, 300)).astype(np.float32)  # more channels than OpenCV 5 takes at once
    out = geometry.resample_slices(many, 2.0, 1.0)
    assert out.shape == (1, 16, 6, 300)
    np.testing.assert_allclose(out[..., 299], geometry.resample_slices(many[..., 299], 2.0, 1.0), atol=1e-6)
    same = geometry.resample_slices(probs, 1.0)
    assert same is not probs and np.array_equal(same, probs)
    assert np.array_equal(geometry.resample_slices(probs, 1.01), probs)  # rounds to the same size
    with pytest.raises(ValueError, match="positive"):
        geometry.resample_slices(probs, 0.0)


@pytest.mark.parametrize("tile,overlap", [(96, 0.5), (128, 0.5), (64, 0.25), (32, 0.0)])
def test_tile_starts_cover_and_overlap(tile, overlap):
    for length in range(1, 400):
        starts = geometry.tile_starts(length, tile, overlap)
        if length <= tile:
            assert starts == [0]
            continue
        assert starts[0] == 0 and starts[-1] == length - tile
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s:s + tile] = True
        assert covered.all()
        gaps = np.diff(starts)
        assert gaps.min() > 0 and gaps.max() <= tile * (1 - overlap)  # overlap at least as asked


def test_fit_plan():
    plan = geometry.fit_plan((300, 50), (128, 96))
    assert plan["pad"] == [(0, 0), (23, 23)] and plan["padded"] == (300, 96)
    assert plan["row_starts"] == [0, 57, 115, 172] and plan["col_starts"] == [0] and plan["n_tiles"] == 4
    with pytest.raises(ValueError, match="multiples of 16"):
        geometry.fit_plan((300, 50), (100, 96))


def onehot_threshold(batch):
    """A stand-in network: one-hot of image > 0.5 (2 channels)."""
    fg = (batch[..., 0] > 0.5).astype(np.float32)
    return np.stack([1 - fg, fg], axis=-1)


def sigmoid_net(batch):
    """A pixelwise stand-in network with soft, position-independent probabilities."""
    p = 1 / (1 + np.exp(-8 * (batch[..., 0] - 0.5)))
    return np.stack([1 - p, p], axis=-1).astype(np.float32)


def test_predict_tiled_reproduces_pixelwise_networks():
    rng = np.random.default_rng(2)
    slices = rng.random((3, 300, 200)).astype(np.float32)
    probs, n_tiles = geometry.predict_tiled(slices, (128, 96), onehot_threshold)
    assert n_tiles == 4 * 4 and probs.shape == (3, 300, 200, 2) and probs.dtype == np.float32
    np.testing.assert_array_equal(probs[..., 1], (slices > 0.5).astype(np.float32))
    np.testing.assert_array_equal(probs.sum(-1), 1.0)
    soft, _ = geometry.predict_tiled(slices, (128, 96), sigmoid_net, batch_size=5)
    np.testing.assert_allclose(soft, sigmoid_net(slices[..., None]), atol=1e-6)
    np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
    one, _ = geometry.predict_tiled(slices, (128, 96), sigmoid_net, batch_size=1)
    np.testing.assert_allclose(one, soft, atol=1e-6)


def test_predict_tiled_blends_with_gaussian_weights():
    # A network whose answer is the tile's start row: blended values must be the Gaussian-weighted mix.
    calls = []

    def tile_id(batch):
        calls.append(len(batch))
        p = np.repeat(batch[:, :1, :1, :], 128, axis=1).repeat(96, axis=2)  # the tile's top-left value
        return np.clip(p, 0, 1)
    rows = np.repeat((np.arange(300, dtype=np.float32) / 300)[:, None], 96, axis=1)[None]
    probs, n = geometry.predict_tiled(rows, (128, 96), tile_id, batch_size=3)
    assert n == 4 and calls == [3, 1]
    w = geometry.gaussian_importance((128, 96))[:, 48]
    starts, tops = [0, 57, 115, 172], [0 / 300, 57 / 300, 115 / 300, 172 / 300]
    r = 100  # covered by the tiles at 0 and 57
    expect = (tops[0] * w[r - starts[0]] + tops[1] * w[r - starts[1]]) / (w[r - starts[0]] + w[r - starts[1]])
    assert probs[0, r, 48, 0] == pytest.approx(expect, rel=1e-5)
    g = geometry.gaussian_importance((128, 96))
    assert g.max() == 1.0 and g.min() > 0
    assert g[63, 47] / g[63 - 16, 47] == pytest.approx(math.exp(0.5 * ((16.5 / 16) ** 2 - (0.5 / 16) ** 2)))


def test_predict_tiled_single_tile_is_exact_and_pads():
    rng = np.random.default_rng(3)
    slices = rng.random((4, 128, 96)).astype(np.float32)

    def net(batch):
        z = np.stack([batch[..., 0], 1 - batch[..., 0] ** 2, np.sin(batch[..., 0])], axis=-1)
        e = np.exp(z)
        return (e / e.sum(-1, keepdims=True)).astype(np.float32)
    probs, n = geometry.predict_tiled(slices, (128, 96), net)
    assert n == 1 and np.array_equal(probs, net(slices[..., None]))
    seen = []
    small = slices[:2, :100, :50] + 1.0
    out, n = geometry.predict_tiled(small, (128, 96), lambda b: seen.append(b.copy()) or net(b), pad_value=-7)
    assert n == 1 and out.shape == (2, 100, 50, 3)
    batch = seen[0][..., 0]
    assert np.all(batch[:, :14] == -7) and np.all(batch[:, 114:] == -7) and np.all(batch[:, :, :23] == -7)
    np.testing.assert_array_equal(batch[:, 14:114, 23:73], small)
    np.testing.assert_array_equal(out, net(seen[0])[:, 14:114, 23:73])
    seen.clear()
    geometry.predict_tiled(small, (128, 96), lambda b: seen.append(b.copy()) or net(b))  # default: slice minimum
    assert seen[0][0, 0, 0, 0] == small[0].min() and seen[0][1, 0, 0, 0] == small[1].min()


def test_predict_tiled_single_channel():
    slices = np.random.default_rng(4).random((1, 200, 130)).astype(np.float32)
    probs, _ = geometry.predict_tiled(slices, (64, 64), lambda b: 1 / (1 + np.exp(-b)))
    assert probs.shape == (1, 200, 130, 1) and probs.min() >= 0 and probs.max() <= 1


@pytest.mark.parametrize("shape,size", [((50, 30), (40, 40)), ((7, 3), (4, 8)), ((16, 16), (16, 16)),
                                        ((5, 9), (12, 2))])
def test_pad_or_crop_center_round_trip(shape, size):
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1
    fitted = geometry.pad_or_crop_center(image, size, pad_value=-1)
    assert fitted.shape == size
    back = geometry.undo_pad_or_crop_center(fitted, shape, fill=0)
    keep = tuple(slice((n - min(n, t)) // 2, (n - min(n, t)) // 2 + min(n, t)) for n, t in zip(shape, size))
    np.testing.assert_array_equal(back[keep], image[keep])  # the kept part is exact ...
    outside = np.ones(shape, bool)
    outside[keep] = False
    assert np.all(back[outside] == 0)  # ... and what was cropped off comes back as `fill`
    # Padding only: exact round trip, trailing channels ride along.
    cube = np.stack([image, -image], -1)
    big = tuple(max(n, t) for n, t in zip(shape, size))
    assert np.array_equal(geometry.undo_pad_or_crop_center(geometry.pad_or_crop_center(cube, big, 0), shape, 0), cube)


def test_pad_or_crop_center_known_layout():
    fitted = geometry.pad_or_crop_center(np.arange(1, 6, dtype=float)[:, None], (8, 1), pad_value=0)
    np.testing.assert_array_equal(fitted[:, 0], [0, 1, 2, 3, 4, 5, 0, 0])
    cropped = geometry.pad_or_crop_center(np.arange(1, 8, dtype=float)[:, None], (4, 1), pad_value=0)
    np.testing.assert_array_equal(cropped[:, 0], [2, 3, 4, 5])
