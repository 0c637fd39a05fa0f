"""From raw slices or a whole scan to probabilities on the file's own grid: the one inference path of predict.py.

Scoring a split and segmenting files both go through `Predictor`: each slice is normalised as in training,
brought to the pixel spacing of the network's input as training saw it (config.network_spacing), covered by
that input (padded when smaller, overlapping Gaussian-blended tiles when larger: never squashed), and every
step is undone on the probabilities, which only then become labels. Runs that recorded no geometry resize
whole slices, as they were trained. A 3D scan is first turned into the training
orientation (nibabel's orientation tools) and sliced along the axis that the training slices' normal points to.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from scipy import ndimage

import geometry
from preprocess import Preprocessing, normalise_image, preprocess_image

SPACING_TOLERANCE = 0.05  # slices whose pixel spacing is within 5% of the network's are not resampled
# Tiles overlap by 3/4 (nnU-Net: 1/2): a field of view padded around the training one then has a tile that sees
# exactly the training view, and the Gaussian weights let it decide the middle.
OVERLAP = 0.75
FAR_SPACING = 2.0  # a spacing more than 2x (or under 1/2) the network's: resampled, with a warning


@dataclass
class Predictor:
    """A model (probabilities out) with the preprocessing, pixel spacing and orientation it was trained with."""

    model: object
    prep: Preprocessing
    spacing: tuple | None = None  # (row mm, col mm) of a network pixel; None: slices are not resampled
    codes: str | None = None  # orientation of the training slices, e.g. "RAS" (the third code is the slice normal)
    tta: bool = False  # average with the left-right flip (array axis 0), as training augmented
    batch_size: int = 32
    warnings: list = field(default_factory=list)

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
        done = {"slices": len(raw), "shape": list(raw.shape[1:]), "resampled": None, "tiles": 1}
        if (self.spacing is None or spacing is None) and self.prep.fit == "resize":
            # No geometry known: the whole slice fitted as training fitted it (preprocess_image), and back.
            inputs = np.stack([preprocess_image(s, self.prep) for s in raw])[..., None]
            back = geometry.resample_slices(self._batched(inputs), size=raw.shape[1:], interpolation="linear")
            return back.reshape(*raw.shape, -1), {**done, "fit": "resize"}
        images = np.stack([normalise_image(s, self.prep.norm) for s in raw])
        if self.spacing is None or spacing is None:  # --fit crop: the file's pixels are taken as training's
            probs, done["tiles"], done["centred"] = self._cover(images)
            return probs, {**done, "fit": "tiles"}
        factors = [s / t for s, t in zip(spacing, self.spacing)]
        if max(abs(f - 1) for f in factors) <= SPACING_TOLERANCE:
            factors = None
        elif max(max(factors), 1 / min(factors)) > FAR_SPACING:
            self.warnings.append(f"{name}: pixel spacing {[round(s, 4) for s in spacing]} mm is far from the "
                                 f"network's {[round(s, 4) for s in self.spacing]} mm (x{max(factors):.2f}); resampled, "
                                 "but expect less accuracy than on data like the training data")
        if factors:
            images = geometry.resample_slices(images, *factors)
            done["resampled"] = [round(f, 4) for f in factors]
        probs, done["tiles"], done["centred"] = self._cover(images)
        if factors:
            probs = geometry.resample_slices(probs, size=raw.shape[1:])
        return probs, {**done, "fit": "tiles"}

    def _cover(self, images: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Probabilities of network-spacing slices: one network input where the slice (or its anatomy) fits in one,
        overlapping tiles elsewhere; also the tiles per tiled slice and the number of slices on a centred input."""
        tile = self.prep.size
        fits = images.shape[1] <= tile[0] and images.shape[2] <= tile[1]
        corners = [None if fits else anatomy_window(im, tile) for im in images]
        tiled = [i for i, c in enumerate(corners) if c is None]
        centred = [i for i, c in enumerate(corners) if c is not None]
        out, n_tiles = None, 1
        if tiled:
            probs, n_tiles = geometry.predict_tiled(images[tiled], tile, self._batched, overlap=OVERLAP,
                                                    batch_size=self.batch_size)
            out = np.empty(images.shape + probs.shape[-1:], np.float32)
            out[tiled] = probs
        if centred:
            # The anatomy fits in one network input: put it there whole, as training saw it, rather than let tiles
            # that cut it decide; the rest of the slice is darker than a tenth of its range, outside the body.
            inputs = np.stack([images[i][r:r + tile[0], c:c + tile[1]] for i, (r, c) in
                               ((i, corners[i]) for i in centred)])[..., None]
            probs = self._batched(inputs)
            if out is None:
                out = np.empty(images.shape + probs.shape[-1:], np.float32)
            background = np.zeros(probs.shape[-1], np.float32)
            background[0] = 1.0 if probs.shape[-1] > 1 else 0.0
            for i, p in zip(centred, probs):
                r, c = corners[i]
                out[i] = background
                out[i, r:r + tile[0], c:c + tile[1]] = p
        return out, n_tiles, len(centred)

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


def anatomy_window(image: np.ndarray, tile) -> tuple | None:
    """Top-left corner of a network input that holds all of a larger slice's anatomy (the pixels brighter than a
    tenth of its range, with 0.1% outliers such as hot pixels let go), centred on it; None when it does not fit."""
    lo = float(image.min())
    rows, cols = np.nonzero(image > lo + 0.1 * (float(np.percentile(image, 99.5)) - lo))
    if len(rows) == 0 or any(n < t for n, t in zip(image.shape, tile)):
        return None
    corner = []
    for where, n, t in ((rows, image.shape[0], tile[0]), (cols, image.shape[1], tile[1])):
        first, last = np.percentile(where, [0.1, 99.9])
        if last - first + 1 > t:
            return None
        corner.append(int(min(max(round((first + last + 1 - t) / 2), 0), n - t)))
    return tuple(corner)


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
