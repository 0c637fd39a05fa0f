"""One slice from file to network input: read it with nibabel, check it, normalise it and fit it to the network.

The one path into the network, shared by training, validation, split scoring and `predict.py --input`:
`to_grid` normalises a slice and resamples it to the network's pixel spacing (`Preprocessing.spacing`), then
`input_window` places the network's input on it (centred padding where the slice is smaller, a window around
its anatomy where larger). `preprocess_pair` does both for a training pair; `inference.Predictor` does the
same per slice and, where the anatomy does not fit one input, covers the slice with tiles instead of cropping.
`Preprocessing` holds the settings, and every run keeps them in its config.json.
The training target of a mask (every label, or one binary target) is defined here too, once.
"""
from __future__ import annotations

import functools
import gzip
import os
import zlib
from dataclasses import dataclass

import cv2
import nibabel as nib
import numpy as np

import geometry

NORMS = {"minmax": "min..max to 0..1 (the original design)",
         "percentile": "0.5th..99.5th percentile to 0..1, clipped (one hot pixel no longer rescales the slice)",
         "zscore": "zero mean, unit variance"}
FITS = {"resize": "resampled so that the median training slice fills the network input (one scale for every "
                  "slice: squashed if its aspect differs); other sizes are then padded or cropped",
        "crop": "kept at the training slices' median pixel spacing, then padded or cropped to the network size"}
SPACING_TOLERANCE = 0.05  # slices within 5% of the network's pixel spacing are not resampled


class DataError(ValueError):
    """A problem with the user's data that they can act on; the message names the file."""


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a file into a network input; saved with each run."""

    size: tuple = (256, 128)  # (rows, cols) the network sees
    norm: str = "minmax"  # a key of NORMS
    num_classes: int = 6
    fit: str = "resize"  # a key of FITS
    spacing: tuple | None = None  # (row mm, col mm) of a network pixel; None: no geometry (resize whole, or as is)


# ----------------------------------------------------------------------------- reading

def load_nifti(path):
    """nibabel's image of a single-file NIfTI (.nii or .nii.gz), or a DataError saying what is wrong with it."""
    path = str(path)
    try:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: the file is empty; expected a NIfTI image")
        image = _open_gz(path) if path.endswith(".gz") else nib.load(path)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    except DataError:
        raise
    except Exception as e:  # nibabel raises several types for bytes that are not NIfTI
        raise DataError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: not a readable NIfTI file (nibabel reads it as {type(image).__name__}); expected a "
                        "single-file NIfTI (.nii or .nii.gz); convert .hdr/.img pairs and other formats first")
    header = image.header
    if header.get_data_dtype().kind not in "biuf":
        raise DataError(f"{path}: not a readable NIfTI file: data type {header.get_data_dtype()} is not a plain "
                        "numeric type")
    offset = int(getattr(image.dataobj, "offset", header.sizeof_hdr + 4))
    if offset < header.sizeof_hdr:  # nibabel would read the header's own bytes as voxels
        raise DataError(f"{path}: not a readable NIfTI file: data offset (vox_offset) {offset} lies inside the "
                        f"{header.sizeof_hdr}-byte header; expected {header.sizeof_hdr + 4} or more")
    return image


def _open_gz(path: str):
    """A .nii.gz inflated in one call, then read by nibabel from memory.

    zlib inflates a whole buffer with the GIL released, twice as fast as nibabel's gzip stream, and the loader's
    threads then run side by side (`benchmarks/README.md`: 2.8x a plain nibabel loop with 2 threads).
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        raw = zlib.decompress(raw, wbits=31)  # 31: a gzip member
    except zlib.error:
        try:
            raw = gzip.decompress(raw)  # several members, or what zlib alone refuses
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: truncated or corrupt gzip data ({e}); re-copy the file") from None
    for kind in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return kind.from_bytes(raw)
        except Exception:  # not this kind (nibabel raises several types)
            continue
    raise DataError(f"{path}: not a readable NIfTI file (neither a NIfTI-1 nor a NIfTI-2 header after inflating)")


def read_voxels(image, path) -> np.ndarray:
    """The voxels of a nibabel image as float32, scaled as its header says; a truncated file is a DataError."""
    try:
        # Scaling applied, float32 as stored without a copy (get_fdata would copy and cache one).
        return np.asarray(image.dataobj, dtype=np.float32)
    except Exception as e:  # EOFError, zlib.error, OSError, ValueError ("Expected N bytes")
        why = str(e).replace("\n", " ")
        raise DataError(f"{path}: truncated or corrupt data ({type(e).__name__}: {why}); re-copy the file") from None


def read_slice(path, with_image: bool = False):
    """One NIfTI slice as a 2D float32 array (and its nibabel image, for the affine, stored shape and header);
    anything but one 2D slice is refused."""
    image = load_nifti(path)
    data = read_voxels(image, path)
    if np.squeeze(data).ndim != 2:
        raise DataError(f"{path}: shape {data.shape}, expected one 2D slice (rows, cols) with at most "
                        "singleton extra axes; split labelled volumes into slices first (python slice_scans.py)")
    return (np.squeeze(data), image) if with_image else np.squeeze(data)


def plane_axes(shape) -> tuple[int, int, int]:
    """(row axis, col axis, slice axis) of a slice file's array: the two axes that are not singletons, in order
    (a (1, rows, cols) file has its rows on array axis 1), and the first remaining one as the slice normal."""
    shape = tuple(shape) + (1,) * (3 - len(shape))
    plane = [i for i, n in enumerate(shape[:3]) if n != 1][:2]
    plane += [i for i in range(3) if i not in plane][:2 - len(plane)]  # a 1-pixel-wide slice keeps array order
    return plane[0], plane[1], next(i for i in range(3) if i not in plane)


def slice_geometry(affine, shape=(2, 2)) -> tuple[str, tuple[float, float]]:
    """Orientation codes of (rows, cols, slice normal), e.g. 'RAS' (nibabel's aff2axcodes), and in-plane pixel
    spacing (row mm, col mm) of a slice file with this affine and array shape."""
    return _geometry(np.asarray(affine, np.float64)[:3, :3].tobytes(), plane_axes(shape))


@functools.lru_cache(maxsize=1024)
def _geometry(matrix: bytes, axes: tuple) -> tuple[str, tuple[float, float]]:
    """slice_geometry of a 3x3 affine (as bytes): the slices of a data set share a few, and aff2axcodes costs
    about as much as reading a slice."""
    m = np.frombuffer(matrix).reshape(3, 3)[:, list(axes)]
    codes = "".join(c or "?" for c in nib.aff2axcodes(np.block([[m, np.zeros((3, 1))], [np.zeros((1, 3)), 1]])))
    spacing = np.sqrt((m[:, :2] ** 2).sum(axis=0))
    return codes, (round(float(spacing[0]), 4), round(float(spacing[1]), 4))


def _stored_header(image, path):
    """The NIfTI header of `path` as stored, without nibabel's fixes (image: the loaded image, for its type)."""
    with (gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")) as f:
        return type(image.header).from_fileobj(f, check=False)


THICKNESS_MM = (0.1, 30.0)  # a slice thickness outside this range is taken as a header error


def slice_thickness(image, shape, path) -> tuple[float, str | None]:
    """A slice file's thickness in mm (the affine's slice axis) and, when the header gives none (pixdim 0, which
    nibabel reads as 1 mm) or an implausible one, a warning naming the file."""
    axis = plane_axes(shape)[2]
    thickness = float(np.linalg.norm(np.asarray(image.affine, np.float64)[:3, axis]))
    # An sform states the slice axis itself; otherwise it comes from pixdim, which nibabel turns from 0 into 1
    # as it loads: read the header again as stored.
    pixdim = 1.0 if int(image.header["sform_code"]) > 0 else float(_stored_header(image, path)["pixdim"][axis + 1])
    if not np.isfinite(pixdim) or pixdim <= 0:
        return thickness, (f"{path}: the header gives no slice thickness (pixdim[{axis + 1}] = {pixdim:g}); "
                           f"distances and mL assume {thickness:g} mm")
    if not THICKNESS_MM[0] <= thickness <= THICKNESS_MM[1]:
        return thickness, (f"{path}: slice thickness {thickness:g} mm is implausible (expected "
                           f"{THICKNESS_MM[0]:g}-{THICKNESS_MM[1]:g} mm); distances and mL use it as it is")
    return thickness, None


# ----------------------------------------------------------------------------- checks

def check_image(image: np.ndarray, path: str) -> np.ndarray:
    """Refuse NaN or Inf intensities: any normalisation of them gives a silent wrong result."""
    bad = ~np.isfinite(image)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} NaN/Inf intensities; expected finite values")
    return image


def check_mask(mask: np.ndarray, path: str, num_classes: int) -> np.ndarray:
    """Turn a float mask into integer labels, refusing fractional, negative or unknown labels."""
    with np.errstate(invalid="ignore"):  # NaN or negative values fail the comparison below
        exact = mask.astype(np.uint8)
    if exact.max(initial=0) < num_classes and np.array_equal(exact, mask):  # the usual case, in one pass
        return exact
    labels = np.rint(mask)
    if not np.all(np.isfinite(mask)) or np.abs(mask - labels).max(initial=0) > 1e-3:
        odd = np.unique(mask[~np.isclose(mask, labels, atol=1e-3)])[:5]
        raise DataError(f"{path}: mask values {odd.tolist()} are not integer labels; "
                        f"masks must hold labels 0..{num_classes - 1} (never interpolate or normalise masks)")
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
        found = np.unique(labels).astype(int).tolist()
        raise DataError(f"{path}: labels {found} found, expected 0..{num_classes - 1} "
                        f"(the run's classes; train.py --class-names sets them)")
    return labels.astype(np.uint8)


# ----------------------------------------------------------------------------- normalisation and size

def normalise_image(image: np.ndarray, mode: str = "minmax") -> np.ndarray:
    """Scale intensities per image (see NORMS); a constant image becomes zeros."""
    image = image.astype(np.float32, copy=False)
    if mode == "minmax":
        lo, hi = float(image.min()), float(image.max())
        scale, shift = hi - lo, lo
    elif mode == "percentile":
        lo, hi = np.percentile(image, (0.5, 99.5))
        image = np.clip(image, lo, hi)
        scale, shift = float(hi - lo), float(lo)
    elif mode == "zscore":
        scale, shift = float(image.std()), float(image.mean())
    else:
        raise ValueError(f"unknown normalisation {mode!r}; expected one of {list(NORMS)}")
    if not scale > 0:
        return np.zeros(image.shape, np.float32)
    # C order: NIfTI voxels come Fortran-ordered, and a split's arrays are filled row by row.
    out = np.subtract(image, np.float32(shift), dtype=np.float32, order="C")
    out /= np.float32(scale)
    return out


def resize_labels(labels: np.ndarray, size) -> np.ndarray:
    """Resize a label map by nearest neighbour only (any other interpolation invents labels).

    INTER_NEAREST_EXACT samples at pixel centres, as the image's resampling does; plain INTER_NEAREST samples at
    floor(x * scale) and puts the mask half a source pixel away from its image.
    """
    if labels.shape[:2] == tuple(size):
        return labels
    return cv2.resize(labels, (int(size[1]), int(size[0])), interpolation=cv2.INTER_NEAREST_EXACT)


def grid_shape(shape, spacing, prep: Preprocessing) -> tuple:
    """(rows, cols) of a slice of this shape and pixel spacing (mm) once on the network's pixel grid.

    Without geometry (no spacing recorded by the run, or none known for the slice) a resize run resizes the whole
    slice to the network size and a crop run takes the slice's pixels as they are.
    """
    shape = tuple(int(n) for n in shape[:2])
    if prep.spacing is None or spacing is None:
        return tuple(prep.size) if prep.fit == "resize" else shape
    factors = [float(s) / float(t) for s, t in zip(spacing, prep.spacing)]
    if not all(np.isfinite(f) and f > 0 for f in factors):
        raise ValueError(f"pixel spacing {list(spacing)} mm is not two positive numbers")
    if max(abs(f - 1) for f in factors) <= SPACING_TOLERANCE:
        return shape
    return tuple(max(1, int(round(n * f))) for n, f in zip(shape, factors))


def to_grid(image: np.ndarray, spacing, prep: Preprocessing) -> np.ndarray:
    """Normalised intensities (rows', cols') float32 of a raw slice on the network's pixel grid (see grid_shape)."""
    image = normalise_image(image, prep.norm)
    shape = grid_shape(image.shape, spacing, prep)
    if shape == image.shape:
        return image
    return geometry.resample_slices(image[None], size=shape)[0]  # area when shrinking, linear when enlarging


def input_window(image: np.ndarray, size) -> tuple[tuple, bool]:
    """Top-left corner of the network input on a grid slice, and whether all of the anatomy is inside it.

    Per axis: a slice no longer than the input is centred in it (a negative start: padding). A longer one gets a
    window centred on all of its anatomy (every pixel brighter than a tenth of the range up to the 99.5th
    percentile, so a few hot pixels do not set the scale, though they count as anatomy); when the anatomy is
    longer than the input, the window is centred on the anatomy's median pixel and `fits` is False: training
    takes that crop, prediction covers the slice with tiles instead.
    """
    if image.shape[0] <= size[0] and image.shape[1] <= size[1]:
        return (-((int(size[0]) - image.shape[0]) // 2), -((int(size[1]) - image.shape[1]) // 2)), True
    lo = float(image.min())
    rows, cols = np.nonzero(image > lo + 0.1 * (float(np.percentile(image, 99.5)) - lo))
    corner, fits = [], True
    for where, n, t in ((rows, image.shape[0], int(size[0])), (cols, image.shape[1], int(size[1]))):
        if n <= t:
            corner.append(-((t - n) // 2))  # the odd pixel after, as geometry.pad_or_crop_center
            continue
        if len(where) == 0:
            corner.append((n - t) // 2)
            continue
        first, last = int(where.min()), int(where.max())
        if last - first + 1 <= t:
            start = (first + last + 1 - t) // 2
        else:
            fits, start = False, int(np.median(where)) - t // 2
        corner.append(min(max(start, 0), n - t))
    return tuple(corner), fits


def take_window(array: np.ndarray, corner, size, fill) -> np.ndarray:
    """array[r:r + rows, c:c + cols] for a corner from input_window, padded with `fill` where it starts before 0."""
    pads = [(max(0, -int(c)), max(0, int(c) + int(t) - n)) for c, t, n in zip(corner, size, array.shape[:2])]
    if any(p for pair in pads for p in pair):
        array = np.pad(array, pads + [(0, 0)] * (array.ndim - 2), constant_values=fill)
    r, c = (max(0, int(k)) for k in corner)
    return array[r:r + int(size[0]), c:c + int(size[1])]


def preprocess_pair(image: np.ndarray, labels: np.ndarray, prep: Preprocessing, spacing=None):
    """A training pair brought to the network input: the image by to_grid, then input_window (padded with the
    slice's background); the labels along with it, by nearest neighbour."""
    grid = to_grid(image, spacing, prep)
    corner, _ = input_window(grid, prep.size)
    labels = resize_labels(labels, grid.shape)
    return (take_window(grid, corner, prep.size, float(grid.min())),
            np.ascontiguousarray(take_window(labels, corner, prep.size, 0)))


# ----------------------------------------------------------------------------- targets

def parse_target(spec: str, class_names) -> tuple | None:
    """'all' -> None (every label); 'prostate' or 'bladder,prostate' or '5' -> tuple of label ids."""
    if spec in (None, "", "all"):
        return None
    ids = []
    for item in str(spec).split(","):
        item = item.strip()
        if item.isdigit() and int(item) < len(class_names):
            ids.append(int(item))
        elif item in class_names:
            ids.append(list(class_names).index(item))
        else:
            raise ValueError(f"target {item!r} is not one of the classes {list(class_names)} (or their ids)")
    if 0 in ids:
        raise ValueError("a binary target cannot include the background label")
    return tuple(sorted(set(ids)))


def make_target(labels: np.ndarray, target_ids) -> np.ndarray:
    """The one target definition for training and scoring: labels as they are, or 1 where in target_ids."""
    if target_ids is None:
        return labels.astype(np.uint8)
    return np.isin(labels, target_ids).astype(np.uint8)
