"""Bring a scan to the training orientation and pixel spacing, cut its slices into network tiles, and undo each step exactly.

Inverses: reorient/undo_reorient (flips and transposes only, so bit-exact), resample_slices back with an explicit
`size` (pixel centres aligned), undo_pad_or_crop_center; predict_tiled crops its own padding away. Labels are never
resampled: resample probabilities back, then take the argmax.
"""
from __future__ import annotations

import cv2
import numpy as np
from nibabel import orientations as nio

TILE_MULTIPLE = 16  # four 2x poolings in the U-Net: tiles must divide evenly down to the bottleneck
CV_MAX_CHANNELS = 128  # what cv2.resize takes from NumPy in OpenCV 5 (4.x took 512)
CV_AREA_MAX_CHANNELS = 4  # INTER_AREA at a non-integer factor refuses more (`func != 0 && cn <= 4`)
INTERPOLATIONS = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}
_WORLD = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


def check_affine(affine) -> np.ndarray:
    """The 3x3 voxel-to-world matrix of a usable 4x4 affine, or ValueError saying why it is unusable."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise ValueError("affine has non-finite values (NaN or inf); the scan's orientation is unknown")
    m = affine[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if np.any(norms <= 1e-8):
        raise ValueError(f"affine has a zero-size voxel axis (column norms {norms.tolist()}); cannot orient it")
    # Scale-free test: |det| / prod(norms) is 1 for orthogonal columns and 0 for parallel ones.
    if abs(np.linalg.det(m)) / np.prod(norms) < 1e-6:
        raise ValueError("affine is singular (its voxel axes are parallel or coplanar); cannot orient it")
    return m


def _code_vectors(train_codes) -> np.ndarray:
    """Unit world vectors (rows) of three axis codes that name three different world axes."""
    codes = [str(c).upper() for c in train_codes]
    if len(codes) != 3 or any(c not in _WORLD for c in codes) or len({_WORLD[c][0] for c in codes}) != 3:
        raise ValueError(f"train_codes must name three different world axes (e.g. R, A, S), got {train_codes!r}")
    vecs = np.zeros((3, 3))
    for i, c in enumerate(codes):
        axis, sign = _WORLD[c]
        vecs[i, axis] = sign
    return vecs


def orientation_transform(affine, train_codes=("R", "A", "S"), slice_axis=None) -> np.ndarray:
    """nibabel orientation transform ((3, 2): output axis and flip per file axis) into the training axes."""
    m = check_affine(affine)
    targets = _code_vectors(train_codes)
    if slice_axis is None:
        # nibabel picks the nearest world axis for each voxel axis (oblique scans included).
        ornt = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(train_codes)))
        if np.any(np.isnan(ornt)):
            raise ValueError("affine's voxel axes cannot be matched to distinct world axes")
        return ornt
    if int(slice_axis) != slice_axis or not -3 <= slice_axis < 3:
        raise ValueError(f"slice_axis must be 0, 1 or 2 (or -3..-1), got {slice_axis!r}")
    slice_axis = int(slice_axis) % 3
    dirs = m / np.linalg.norm(m, axis=0)  # unit world direction of each file axis (columns)
    a, b = [i for i in range(3) if i != slice_axis]
    # In-plane: the pairing (file axis -> row/col code) with the better total alignment; ties keep file order.
    keep = abs(dirs[:, a] @ targets[0]) + abs(dirs[:, b] @ targets[1])
    swap = abs(dirs[:, b] @ targets[0]) + abs(dirs[:, a] @ targets[1])
    out_of = {a: 0, b: 1} if keep >= swap - 1e-9 else {a: 1, b: 0}
    out_of[slice_axis] = 2
    ornt = np.zeros((3, 2))
    for axis, out in out_of.items():
        d = dirs[:, axis]
        s = d @ targets[out]
        if abs(s) < 1e-6:  # orthogonal to its slot's code: point it along whichever training code it lies on
            s = d @ targets[np.argmax(np.abs(targets @ d))]
        ornt[axis] = (out, -1.0 if s < 0 else 1.0)
    return ornt


def _inverse_ornt(ornt) -> np.ndarray:
    """The orientation transform that undoes `ornt`."""
    ornt = np.asarray(ornt)
    inv = np.zeros_like(ornt, dtype=np.float64)
    for axis, (out, flip) in enumerate(ornt):
        inv[int(out)] = (axis, flip)
    return inv


def reorient(array, ornt) -> np.ndarray:
    """The array's first three axes brought into the training axes (trailing axes ride along); a contiguous copy."""
    return np.ascontiguousarray(nio.apply_orientation(np.asarray(array), ornt))


def undo_reorient(array, ornt, original_shape) -> np.ndarray:
    """Exact inverse of reorient: back to the file's axes, checked against the file's 3D shape."""
    back = np.ascontiguousarray(nio.apply_orientation(np.asarray(array), _inverse_ornt(ornt)))
    if tuple(back.shape[:3]) != tuple(original_shape)[:3]:
        raise ValueError(f"undo_reorient gave shape {back.shape[:3]}, expected {tuple(original_shape)[:3]}")
    return back


def in_plane_spacing(affine, ornt) -> tuple[float, float, float]:
    """Voxel sizes in mm along the reoriented axes: (row_mm, col_mm, slice_mm)."""
    norms = np.linalg.norm(check_affine(affine), axis=0)
    out = [0.0, 0.0, 0.0]
    for axis, (dest, _) in enumerate(np.asarray(ornt)):
        out[int(dest)] = float(norms[axis])
    return tuple(out)


def _cv_resize(image: np.ndarray, rows: int, cols: int, flag: int) -> np.ndarray:
    """cv2.resize of one (rows, cols[, channels]) image, in chunks of channels OpenCV can take."""
    image = np.ascontiguousarray(image)
    limit = CV_AREA_MAX_CHANNELS if flag == cv2.INTER_AREA else CV_MAX_CHANNELS
    if image.ndim == 2 or image.shape[2] <= limit:
        out = cv2.resize(image, (cols, rows), interpolation=flag)
        return out.reshape((rows, cols) + image.shape[2:])  # OpenCV drops a single channel axis
    parts = [_cv_resize(image[..., i:i + limit], rows, cols, flag) for i in range(0, image.shape[2], limit)]
    return np.concatenate(parts, axis=2)


def _resize_one(image: np.ndarray, rows: int, cols: int, mode: str) -> np.ndarray:
    """One image resized; "auto" averages areas along a shrinking axis and interpolates along a growing one."""
    if mode != "auto":
        return _cv_resize(image, rows, cols, INTERPOLATIONS[mode])
    # Plain linear sampling skips pixels when shrinking (aliasing moves a shape's centroid by up to ~1 px
    # there-and-back at 0.3x); area averaging is still a convex combination, so probabilities keep summing to 1.
    r0, c0 = image.shape[:2]
    if (rows <= r0) == (cols <= c0):
        return _cv_resize(image, rows, cols, cv2.INTER_AREA if rows <= r0 else cv2.INTER_LINEAR)
    image = _cv_resize(image, rows, c0, cv2.INTER_AREA if rows < r0 else cv2.INTER_LINEAR)
    return _cv_resize(image, rows, cols, cv2.INTER_AREA if cols < c0 else cv2.INTER_LINEAR)


def resample_slices(slices, factor_rows=None, factor_cols=None, size=None, interpolation="auto") -> np.ndarray:
    """Resize (n, rows, cols[, channels]) float slices by factors (rounded) or to an exact size, centres aligned."""
    slices = np.asarray(slices)
    if slices.ndim not in (3, 4):
        raise ValueError(f"slices must be (n, rows, cols[, channels]), got shape {slices.shape}")
    if interpolation not in ("auto", *INTERPOLATIONS):
        raise ValueError(f"interpolation must be auto, linear or area, got {interpolation!r} "
                         "(labels are never resampled)")
    if slices.dtype not in (np.float32, np.float64):
        slices = slices.astype(np.float32)
    rows, cols = slices.shape[1:3]
    if size is None:
        factor_cols = factor_rows if factor_cols is None else factor_cols
        for f in (factor_rows, factor_cols):
            if f is None or not np.isfinite(f) or f <= 0:
                raise ValueError(f"resampling factors must be positive and finite, got {factor_rows}, {factor_cols}")
        size = (max(1, int(round(rows * factor_rows))), max(1, int(round(cols * factor_cols))))
    out_rows, out_cols = int(size[0]), int(size[1])
    if (out_rows, out_cols) == (rows, cols):
        return slices.copy()
    # Giving OpenCV the size (not fx/fy) makes its scale exactly in/out, so there-and-back maps centres to themselves.
    out = np.empty((len(slices), out_rows, out_cols) + slices.shape[3:], dtype=slices.dtype)
    for i, image in enumerate(slices):
        out[i] = _resize_one(image, out_rows, out_cols, interpolation)
    return out


def tile_starts(length: int, tile: int, overlap: float = 0.5) -> list[int]:
    """Starts of `tile` windows covering `length`: first 0, last flush, evenly spaced, overlap at least as asked."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if length <= tile:
        return [0]
    step = max(1, int(tile * (1 - overlap)))
    n = int(np.ceil((length - tile) / step)) + 1
    return [int(round(i * (length - tile) / (n - 1))) for i in range(n)]


def fit_plan(shape, tile, overlap: float = 0.5) -> dict:
    """How a (rows, cols) slice is padded up to the tile and where its tiles start along each axis."""
    tile = tuple(int(t) for t in tile)
    if len(tile) != 2 or any(t <= 0 or t % TILE_MULTIPLE for t in tile):
        raise ValueError(f"tile must be two positive multiples of {TILE_MULTIPLE}, got {tile}")
    extra = [max(0, t - int(n)) for n, t in zip(shape[:2], tile)]
    pads = [(e // 2, e - e // 2) for e in extra]  # central, the odd pixel after: as pad_or_crop_center
    padded = tuple(int(n) + sum(p) for n, p in zip(shape[:2], pads))
    starts = [tile_starts(n, t, overlap) for n, t in zip(padded, tile)]
    return {"shape": tuple(int(n) for n in shape[:2]), "tile": tile, "pad": pads, "padded": padded,
            "row_starts": starts[0], "col_starts": starts[1], "n_tiles": len(starts[0]) * len(starts[1])}


def gaussian_importance(tile) -> np.ndarray:
    """nnU-Net's blending weights for a tile: a Gaussian with sigma = tile/8 per axis, peak 1, strictly positive."""
    axes = []
    for t in tile:
        x = np.arange(t) - (t - 1) / 2
        axes.append(np.exp(-0.5 * (x / (t / 8)) ** 2))
    weights = np.outer(axes[0], axes[1])
    return weights / weights.max()  # corners are exp(-8) ~ 3e-4 per axis: never 0, so every pixel gets weight


def predict_tiled(slices, tile, predict_batch, pad_value=None, overlap=0.5, batch_size=16):
    """(n, rows, cols, K) float32 probabilities of (n, rows, cols) slices, predicted in Gaussian-blended tiles."""
    slices = np.asarray(slices, dtype=np.float32)
    if slices.ndim != 3 or not slices.size:
        raise ValueError(f"slices must be a non-empty (n, rows, cols) array, got shape {slices.shape}")
    plan = fit_plan(slices.shape[1:], tile, overlap)
    (R, C), ((pt, pb), (pl, pr)) = plan["tile"], plan["pad"]
    rows, cols = plan["shape"]
    corners = [(r, c) for r in plan["row_starts"] for c in plan["col_starts"]]
    weight = gaussian_importance(plan["tile"])[..., None]
    out, acc, wsum, current, padded = None, None, None, -1, None
    jobs = [(i, r, c) for i in range(len(slices)) for r, c in corners]  # slice by slice, so one padded copy at a time
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        batch = np.empty((len(chunk), R, C, 1), dtype=np.float32)
        for j, (i, r, c) in enumerate(chunk):
            if i != current:
                fill = float(slices[i].min()) if pad_value is None else float(pad_value)
                current, padded = i, np.pad(slices[i], ((pt, pb), (pl, pr)), constant_values=fill)
            batch[j, :, :, 0] = padded[r:r + R, c:c + C]
        probs = np.asarray(predict_batch(batch))
        if probs.ndim != 4 or probs.shape[:3] != (len(chunk), R, C):
            raise ValueError(f"predict_batch returned shape {probs.shape}, expected ({len(chunk)}, {R}, {C}, K)")
        if out is None:
            out = np.empty(slices.shape + (probs.shape[3],), dtype=np.float32)
        for j, (i, r, c) in enumerate(chunk):
            if plan["n_tiles"] == 1:  # nothing to blend: the network's output as it is, padding cropped away
                out[i] = probs[j, pt:pt + rows, pl:pl + cols]
                continue
            if (r, c) == corners[0]:
                acc = np.zeros(plan["padded"] + (probs.shape[3],))
                wsum = np.zeros(plan["padded"] + (1,))
            acc[r:r + R, c:c + C] += probs[j] * weight
            wsum[r:r + R, c:c + C] += weight
            if (r, c) == corners[-1]:
                out[i] = (acc / wsum)[pt:pt + rows, pl:pl + cols]
    return out, plan["n_tiles"]


def _center_window(length: int, target: int) -> tuple[int, int, int]:
    """(start in the source, start in the target, count) that centres `length` into `target` (crop or pad)."""
    n = min(length, target)
    return max(0, (length - target) // 2), max(0, (target - length) // 2), n


def pad_or_crop_center(image, size, pad_value) -> np.ndarray:
    """The first two axes centrally cropped where longer and padded with pad_value where shorter than size."""
    image = np.asarray(image)
    (sr, dr, nr), (sc, dc, nc) = (_center_window(n, int(t)) for n, t in zip(image.shape[:2], size))
    out = np.full((int(size[0]), int(size[1])) + image.shape[2:], pad_value, dtype=image.dtype)
    out[dr:dr + nr, dc:dc + nc] = image[sr:sr + nr, sc:sc + nc]
    return out


def undo_pad_or_crop_center(array, original_shape, fill) -> np.ndarray:
    """Back to original_shape[:2]: the padding cropped away and the cropped-off border filled with `fill`."""
    array = np.asarray(array)
    (sr, dr, nr), (sc, dc, nc) = (_center_window(int(n), t) for n, t in zip(original_shape[:2], array.shape[:2]))
    out = np.full(tuple(int(n) for n in original_shape[:2]) + array.shape[2:], fill, dtype=array.dtype)
    out[sr:sr + nr, sc:sc + nc] = array[dr:dr + nr, dc:dc + nc]
    return out
