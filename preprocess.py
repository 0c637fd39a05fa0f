"""One slice from file to network input: read it with nibabel, check it, normalise it and fit it to the network.

`preprocess_image` is the one preprocessing function that training (dataset.load_split) and prediction
(predict.py) share; `Preprocessing` holds its settings, and every run keeps them in its config.json.
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

from geometry import pad_or_crop_center

NORMS = {"minmax": "min..max to 0..1 (the original design)",
         "percentile": "0.5th..99.5th percentile to 0..1, clipped (one hot pixel no longer rescales the slice)",
         "zscore": "zero mean, unit variance"}
FITS = {"resize": "resized to the network size (squashed if the aspect ratio differs)",
        "crop": "centrally padded or cropped to the network size, undistorted"}


class DataError(ValueError):
    """A problem with the user's data that they can act on; the message names the file."""


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a file into a network input; saved with each run."""

    size: tuple = (256, 128)  # (rows, cols) the network sees
    norm: str = "minmax"  # a key of NORMS
    num_classes: int = 6
    fit: str = "resize"  # a key of FITS


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


def read_slice(path, with_affine: bool = False):
    """One NIfTI slice as a 2D float32 array (and its affine); anything but one 2D slice is refused."""
    image = load_nifti(path)
    data = read_voxels(image, path)
    if np.squeeze(data).ndim != 2:
        raise DataError(f"{path}: shape {data.shape}, expected one 2D slice (rows, cols) with at most "
                        "singleton extra axes; split volumes into slices first")
    data = np.squeeze(data)
    return (data, image.affine) if with_affine else data


def slice_geometry(affine) -> tuple[str, tuple[float, float]]:
    """Orientation codes (e.g. 'RAS', nibabel's aff2axcodes) and in-plane pixel spacing (mm) of a slice's affine."""
    return _geometry(np.asarray(affine, np.float64)[:3, :3].tobytes())


@functools.lru_cache(maxsize=1024)
def _geometry(matrix: bytes) -> tuple[str, tuple[float, float]]:
    """slice_geometry of a 3x3 affine (as bytes): the slices of a data set share a few, and aff2axcodes costs
    about as much as reading a slice."""
    m = np.frombuffer(matrix).reshape(3, 3)
    codes = "".join(c or "?" for c in nib.aff2axcodes(np.block([[m, np.zeros((3, 1))], [np.zeros((1, 3)), 1]])))
    spacing = np.sqrt((m[:, :2] ** 2).sum(axis=0))
    return codes, (round(float(spacing[0]), 4), round(float(spacing[1]), 4))


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


def resize_image(image: np.ndarray, size) -> np.ndarray:
    """Resize intensities: area interpolation when shrinking, linear when enlarging."""
    if image.shape[:2] == tuple(size):
        return image
    shrink = image.shape[0] * image.shape[1] > size[0] * size[1]
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_labels(labels: np.ndarray, size) -> np.ndarray:
    """Resize a label map by nearest neighbour only (any other interpolation invents labels).

    INTER_NEAREST_EXACT samples at pixel centres, as the image's resize does; plain INTER_NEAREST samples at
    floor(x * scale) and puts the mask half a source pixel away from its image.
    """
    if labels.shape[:2] == tuple(size):
        return labels
    return cv2.resize(labels, (size[1], size[0]), interpolation=cv2.INTER_NEAREST_EXACT)


def preprocess_image(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Network input (rows, cols) float32 from a raw slice: normalise, then fit (training and prediction)."""
    image = normalise_image(image, prep.norm)
    if prep.fit == "resize":
        return resize_image(image, prep.size)
    return pad_or_crop_center(image, prep.size, float(image.min()))  # padded with the slice's background


def fit_labels(labels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """A label map brought to the network size exactly as preprocess_image brings its image."""
    if prep.fit == "resize":
        return resize_labels(labels, prep.size)
    return pad_or_crop_center(labels, prep.size, 0)


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
