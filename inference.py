"""From raw slices or a whole scan to probabilities on the file's own grid: the one inference path of predict.py.

Scoring a split and segmenting files both go through `Predictor`, which brings each slice to the network exactly
as training did (preprocess.to_grid: normalised, at the network's pixel spacing; preprocess.input_window: one
input, centred on the anatomy), except that a slice whose anatomy does not fit one input is covered by
overlapping Gaussian-blended tiles instead of being cropped. Every step is undone on the probabilities, which
only then become labels. A 3D scan is first turned into the training orientation (nibabel's orientation tools)
and sliced along the axis that the training slices' normal points to.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from scipy import ndimage

import geometry
from preprocess import Preprocessing, grid_shape, input_window, take_window, to_grid

# Tiles overlap by 3/4 (nnU-Net: 1/2): a field of view padded around the training one then has a tile that sees
# exactly the training view, and the Gaussian weights let it decide the middle.
OVERLAP = 0.75
FAR_SPACING = 2.0  # a spacing more than 2x (or under 1/2) the network's: resampled, with a warning


@dataclass
class Predictor:
    """A model (probabilities out) with the preprocessing (pixel spacing included) and orientation it was trained
    with."""

    model: object
    prep: Preprocessing
    codes: str | None = None  # orientation of the training slices, e.g. "RAS" (the third code is the slice normal)
    data_spacing: tuple | None = None  # median pixel spacing (mm) of the training slices, for the warning below
    tta: bool = False  # average with the flip of array axis 0 (the training slices' first axis, R-L in RAS)
    batch_size: int = 32
    warnings: list = field(default_factory=list)
    _warned: set = field(default_factory=set, repr=False)  # spacings already warned about

    def network(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (b, rows, cols, K) of network-size inputs (b, rows, cols, 1), with the flip if tta."""
        if not self.tta:
            return np.asarray(self.model.predict_on_batch(batch))
        both = np.asarray(self.model.predict_on_batch(np.concatenate([batch, batch[:, ::-1]])))
        return (both[:len(batch)] + both[len(batch):, ::-1]) / 2

    def _batched(self, batch: np.ndarray) -> np.ndarray:
        """self.network over a batch of any length, in fixed-size calls (one traced graph serves them all)."""
        # Calls of a few fixed sizes (powers of two up to batch_size): one traced graph serves each.
        n, size = len(batch), min(self.batch_size, 1 << max(0, len(batch) - 1).bit_length())
        out = []
        for start in range(0, n, size):
            part = batch[start:start + size]
            padded = np.concatenate([part, np.zeros((size - len(part), *part.shape[1:]), part.dtype)])
            out.append(self.network(padded)[:len(part)])
        return np.concatenate(out)

    def slices(self, raw: np.ndarray, spacing=None, name: str = "") -> tuple[np.ndarray, dict]:
        """Probabilities (n, rows, cols, K) of raw slices (n, rows, cols) of one pixel spacing, and what was done."""
        shape = tuple(raw.shape[1:3])
        grid = grid_shape(shape, spacing, self.prep)
        done = {"slices": len(raw), "shape": list(shape), "resampled": None, "tiles": 1, "centred": 0,
                "fit": "spacing" if self.prep.spacing is not None and spacing is not None  # at the network's
                else "resize" if self.prep.fit == "resize" else "pixels"}  # no geometry: as training without it
        if grid != shape:
            done["resampled"] = [round(g / n, 4) for g, n in zip(grid, shape)]
        if spacing is not None and self.data_spacing:
            ratios = [s / t for s, t in zip(spacing, self.data_spacing)]
            if max(max(ratios), 1 / min(ratios)) > FAR_SPACING and tuple(spacing) not in self._warned:
                self._warned.add(tuple(spacing))
                self.warnings.append(f"{name}: pixel spacing {[round(s, 4) for s in spacing]} mm is far from the "
                                     f"training slices' {[round(s, 4) for s in self.data_spacing]} mm; resampled "
                                     "to the network's, but expect less accuracy than on data like the training data")
        images = np.stack([to_grid(s, spacing, self.prep) for s in raw])
        probs, done["tiles"], done["centred"] = self._cover(images)
        if grid != shape:
            probs = geometry.resample_slices(probs, size=shape)
        return probs, done

    def _cover(self, images: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Probabilities of grid slices: one network input (preprocess.input_window) where the anatomy fits in one,
        overlapping tiles elsewhere; also the tiles per tiled slice and the number of slices on one input."""
        tile = self.prep.size
        windows = [input_window(im, tile) for im in images]
        one = [i for i, (_, fits) in enumerate(windows) if fits]
        tiled = [i for i, (_, fits) in enumerate(windows) if not fits]
        out, n_tiles = None, 1
        if tiled:
            probs, n_tiles = geometry.predict_tiled(images[tiled], tile, self._batched, overlap=OVERLAP,
                                                    batch_size=self.batch_size)
            out = np.empty(images.shape + probs.shape[-1:], np.float32)
            out[tiled] = probs
        if one:
            inputs = np.stack([take_window(images[i], windows[i][0], tile, float(images[i].min())) for i in one])
            probs = self._batched(inputs[..., None])
            if out is None:
                out = np.empty(images.shape + probs.shape[-1:], np.float32)
            air = {}  # padding value -> the network's probabilities for it
            for i, p in zip(one, probs):
                fill = float(images[i].min())
                if fill not in air and (images.shape[1] > tile[0] or images.shape[2] > tile[1]):
                    constant = self._batched(np.full((1, *tile, 1), fill, np.float32))[0]
                    air[fill] = constant[tile[0] // 2, tile[1] // 2]  # the centre: away from the zero-padded edge
                out[i] = untake_window(p, windows[i][0], images.shape[1:3], air.get(fill))
        return out, n_tiles, sum(1 for i in one if images.shape[1] > tile[0] or images.shape[2] > tile[1])

    def volume(self, data: np.ndarray, affine, axis=None, name: str = "") -> tuple[np.ndarray, dict]:
        """Probabilities (*data.shape, K) of a 2D slice or 3D volume in its own voxel grid, and what was done.

        data is 3D (a 2D slice has a singleton axis); affine None means no usable orientation: the array axes
        are taken as they are (slice axis `axis`, default the last). axis overrides the slice axis.
        """
        if affine is None or self.codes is None:
            ornt = np.array([[0, 1], [1, 1], [2, 1]], float)
            if axis is not None:
                order = [a for a in range(3) if a != axis % 3] + [axis % 3]
                ornt = np.array([[order.index(a), 1] for a in range(3)], float)
            zooms = [1.0, 1.0, 1.0] if affine is None else np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
            spacing = tuple(float(zooms[int(np.flatnonzero(ornt[:, 0] == k)[0])]) for k in range(3))
            found = "unknown"
        else:
            if axis is None and 1 in data.shape:  # one slice: its singleton axis is the slice axis
                axis = data.shape.index(1)
            ornt = geometry.orientation_transform(affine, tuple(self.codes), axis)
            spacing = geometry.in_plane_spacing(affine, ornt)
            found = "".join(c or "?" for c in nib.aff2axcodes(affine))
        slices = np.moveaxis(geometry.reorient(data, ornt), 2, 0)  # (slices, rows, cols) in training axes
        probs, done = self.slices(slices, spacing[:2] if affine is not None else None, name)
        probs = geometry.undo_reorient(np.moveaxis(probs, 0, 2), ornt, data.shape)
        slice_axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
        return probs, {**done, "orientation": found, "slice_axis": slice_axis, "spacing_mm": [round(s, 4) for s in spacing]}


def untake_window(probs: np.ndarray, corner, shape, outside=None) -> np.ndarray:
    """Probabilities of one network input put back on its grid slice of `shape` (undoes take_window).

    Pixels of a larger slice outside the window hold no anatomy (all darker than a tenth of its range); they get
    `outside`, the network's own probabilities for an input of the padding value training used there, so their
    uncertainty is the network's, never a made-up certainty.
    """
    rows, cols = (int(n) for n in shape[:2])
    (r, c), (tr, tc) = (int(k) for k in corner), probs.shape[:2]
    out = np.empty((rows, cols, probs.shape[-1]), np.float32)
    if r > 0 or c > 0 or r + tr < rows or c + tc < cols:
        out[:] = outside
    r0, r1, c0, c1 = max(0, r), min(rows, r + tr), max(0, c), min(cols, c + tc)
    out[r0:r1, c0:c1] = probs[r0 - r:r1 - r, c0 - c:c1 - c]
    return out


def labels_of(probs: np.ndarray) -> np.ndarray:
    """Labels from probabilities (..., K): argmax, or > 0.5 for one channel."""
    if probs.shape[-1] == 1:
        return (probs[..., 0] > 0.5).astype(np.uint8)
    return probs.argmax(-1).astype(np.uint8)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy, 0 (certain) to 1 (uniform over the classes; for one channel, p = 0.5)."""
    p = np.concatenate([1 - probs, probs], -1) if probs.shape[-1] == 1 else probs
    p = np.clip(p, 1e-7, 1.0)
    return (-(p * np.log(p)).sum(-1) / np.log(p.shape[-1])).astype(np.float32)


def keep_largest(labels: np.ndarray, label_ids) -> np.ndarray:
    """Keep only the largest connected component (26-connected in 3D) of each of these labels; the rest becomes 0."""
    out = labels.copy()
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    for c in label_ids:
        parts, n = ndimage.label(labels == c, structure)
        if n > 1:
            sizes = np.bincount(parts.ravel())[1:]
            out[(parts > 0) & (parts != 1 + int(np.argmax(sizes)))] = 0
    return out
