"""HipMRI NIfTI slices on disk -> checked, normalised, resized arrays -> tf.data batches.

The path of a slice: `list_split` pairs image and mask files by name, `load_pair` reads and checks
one pair, `preprocess_pair` normalises and resizes it (the one function that training and
prediction share), `load_split` does a whole split in parallel behind an on-disk cache, and
`make_dataset` turns the arrays into shuffled, augmented batches.

Command line:
    python dataset.py synth --out DIR --preset tiny|demo|full [--seed 42]
    python dataset.py info --data-dir DIR
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import joblib
import nibabel as nib
import numpy as np
from isal import igzip
from isal.igzip_lib import IsalError
from nibabel.volumeutils import apply_read_scaling
from tqdm import tqdm

from atomic_io import atomic_write_json

CLASS_NAMES = ("background", "body", "bone", "bladder", "rectum", "prostate")
# One RGBA colour per label for every figure (alpha for overlays on the image; background clear).
LABEL_COLOURS = ((0, 0, 0, 0), (0.2, 0.8, 0.2, 0.15), (1, 0.85, 0, 0.5), (0.1, 0.5, 1, 0.6),
                 (1, 0.45, 0, 0.7), (0.95, 0.1, 0.3, 0.7))
SPLITS = {
    "train": ("keras_slices_train", "keras_slices_seg_train"),
    "validate": ("keras_slices_validate", "keras_slices_seg_validate"),
    "test": ("keras_slices_test", "keras_slices_seg_test"),
}
NAME_RE = re.compile(r"^(case|seg)_(\d+)_week_(\d+)_slice_(\d+)\.nii(\.gz)?$")
CACHE_VERSION = 1
# From this many pairs on, load_split uses worker processes: they take ~0.5 s to start, then decode faster than
# threads (the full phantom's train split on 2 cores: ~2,000-2,200 pairs/s against ~1,500-1,700 with threads).
PROCESS_MIN_PAIRS = 2000
# Seconds an idle loader process waits for more work before it exits (joblib's default, 300 s, would keep
# ~100 MB per process alive through the first minutes of training).
WORKER_IDLE_S = 10


class DataError(ValueError):
    """A problem with the user's data that they can act on; the message names the file."""


@dataclass(frozen=True)
class SliceRef:
    """One image/mask pair and where it sits in its volume."""

    image: str
    mask: str
    case: int
    week: int
    slice: int

    @property
    def volume(self) -> str:
        return f"case_{self.case:03d}_week_{self.week}"


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a file into a model input; saved with each run."""

    size: tuple = (256, 128)  # (rows, cols) the network sees
    norm: str = "minmax"  # "minmax" to [0, 1] as the original design, or "zscore"
    num_classes: int = len(CLASS_NAMES)


@dataclass
class SplitData:
    """A loaded split: model-size arrays plus what is needed to go back to the files."""

    images: np.ndarray  # (n, rows, cols, 1) float32
    masks: np.ndarray  # (n, rows, cols) uint8 labels
    refs: list
    orig_shapes: list  # (rows, cols) of each slice on disk
    label_counts: np.ndarray  # (n, num_classes) pixels per label at the original size
    skipped: list = field(default_factory=list)  # "file: reason" for pairs left out by skip_bad
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.refs)


# ----------------------------------------------------------------------------- discovery

def find_data_root(data_dir) -> Path:
    """Return the folder holding the keras_slices_* folders (accepts it or a parent of it)."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist; expected the HipMRI folder holding "
                        "keras_slices_train, keras_slices_seg_train, ... (or its parent)")
    wanted = SPLITS["train"][0]
    for candidate in (data_dir, data_dir / "keras_slices_data",
                      data_dir / "HipMRI_Study_open" / "keras_slices_data"):
        if (candidate / wanted).is_dir() or any((candidate / a).is_dir() for a, _ in SPLITS.values()):
            return candidate
    found = sorted(p.name for p in data_dir.iterdir())[:10]
    raise DataError(f"{data_dir} has no keras_slices_* folders (found: {found or 'nothing'}); expected "
                    "the HipMRI layout: keras_slices_train/ keras_slices_seg_train/ ... "
                    "or a parent folder such as HipMRI_Study_open/")


def _index_folder(folder: Path, prefix: str) -> dict:
    """Map (case, week, slice) -> file name for every NIfTI file in a folder."""
    index, strays = {}, []
    for name in os.listdir(folder):
        m = NAME_RE.match(name)
        if m and m.group(1) == prefix:
            index[(int(m.group(2)), int(m.group(3)), int(m.group(4)))] = name
        elif not name.startswith("."):
            strays.append(name)
    if strays:
        warnings.warn(f"{folder}: ignoring {len(strays)} file(s) not named {prefix}_X_week_Y_slice_Z.nii[.gz]: "
                      f"{sorted(strays)[:5]}")
    return index


def list_split(data_dir, split: str, unpaired: list | None = None) -> list:
    """Pair every image of a split with its mask by name, sorted by case, week and slice.

    Files without a partner are an error, or, when an `unpaired` list is given, are listed there.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    root = find_data_root(data_dir)
    image_dir, mask_dir = (root / d for d in SPLITS[split])
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DataError(f"split {split!r}: folder {folder} is missing; expected it beside "
                            f"{', '.join(sorted(p.name for p in root.iterdir() if p.is_dir()))}")
    images, masks = _index_folder(image_dir, "case"), _index_folder(mask_dir, "seg")
    if not images:
        raise DataError(f"split {split!r}: {image_dir} holds no case_X_week_Y_slice_Z.nii[.gz] files")
    lonely = [str(image_dir / images[k]) + " (no mask)" for k in sorted(images.keys() - masks.keys())]
    lonely += [str(mask_dir / masks[k]) + " (no image)" for k in sorted(masks.keys() - images.keys())]
    if lonely and unpaired is None:
        raise DataError(f"split {split!r}: {len(lonely)} file(s) without a partner; the mask of "
                        "case_X_week_Y_slice_Z is seg_X_week_Y_slice_Z:\n  " + "\n  ".join(lonely))
    if unpaired is not None:
        unpaired += [f"{f.rsplit(' (', 1)[0]}: no partner ({f.rsplit(' (', 1)[1]}" for f in lonely]
    image_dir, mask_dir = str(image_dir), str(mask_dir)  # os.path.join: ~10x cheaper than Path / for 25k files
    return [SliceRef(os.path.join(image_dir, images[k]), os.path.join(mask_dir, masks[k]), *k)
            for k in sorted(images.keys() & masks.keys())]


DEFAULT_DATA = Path("data")
DEMO_PHANTOM = DEFAULT_DATA / "phantom-demo"


def resolve_data_dir(data_dir=None, progress=True) -> Path:
    """The data to use: the given folder, else data/ if it holds the HipMRI layout, else the demo phantom."""
    if data_dir:
        return find_data_root(data_dir)
    try:
        return find_data_root(DEFAULT_DATA)
    except DataError:
        pass
    import synthetic

    if not (DEMO_PHANTOM / "phantom.json").exists():
        print(f"no --data-dir and no HipMRI data in {DEFAULT_DATA}/: writing the synthetic demo phantom to "
              f"{DEMO_PHANTOM}/ (once; about a minute)", flush=True)
    synthetic.generate(DEMO_PHANTOM, "demo", seed=42, progress=progress)
    return DEMO_PHANTOM


# ----------------------------------------------------------------------------- one pair

_NIFTI2_SIZEOF = (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")  # sizeof_hdr = 540, either byte order


def nifti_voxels(raw: bytes) -> np.ndarray:
    """The voxels of a single-file NIfTI-1 or NIfTI-2 image held in memory, scaled as its header says.

    nibabel's header object reads every field (byte order, data type, shape, offset, scaling); the voxels are
    then a view of the bytes. nibabel's from_fileobj + data_from_fileobj does the same through a file object
    and runs its whole header check: 6x the time (150 vs 25 us a slice), all of it holding the GIL, so the
    loader's threads queued there. The checks that matter for reading the voxels are made here.
    Raises ValueError (or nibabel's HeaderDataError) saying what is wrong.
    """
    header_class = nib.Nifti2Header if raw[:4] in _NIFTI2_SIZEOF else nib.Nifti1Header
    size = header_class.template_dtype.itemsize
    if len(raw) < size:
        raise ValueError(f"{len(raw)} bytes, shorter than a NIfTI header ({size} bytes)")
    header = header_class(raw[:size], check=False)
    magic = bytes(header["magic"]).rstrip(b"\0")
    if magic not in (b"n+1", b"n+2"):
        raise ValueError(f"magic {magic!r}, expected b'n+1' or b'n+2' (a single-file NIfTI; "
                         "convert .hdr/.img pairs and other formats to .nii first)")
    dim = header["dim"].tolist()
    if not 1 <= dim[0] <= 7 or min(dim[1:dim[0] + 1]) < 1:
        raise ValueError(f"header dimensions {dim} are not valid")
    shape, dtype = header.get_data_shape(), header.get_data_dtype()
    if dtype.kind not in "biuf":
        raise ValueError(f"data type {dtype} (code {int(header['datatype'])}) is not a plain numeric type")
    offset, count = int(header.get_data_offset()), math.prod(shape)
    if offset < size:  # nibabel would read header bytes as voxels
        raise ValueError(f"data offset (vox_offset) {offset} lies inside the {size}-byte header; "
                         f"expected {size + 4} or more")
    if offset + count * dtype.itemsize > len(raw):
        raise ValueError(f"truncated: {len(raw)} bytes, but the header describes {count} voxels of {dtype} "
                         f"from byte {offset} ({offset + count * dtype.itemsize} bytes)")
    data = np.frombuffer(raw, dtype, count, offset).reshape(shape, order="F")
    return apply_read_scaling(data, *header.get_slope_inter())


def read_slice(path, writable=True) -> np.ndarray:
    """Read one NIfTI slice as a 2D float32 array; refuse anything that is not one 2D slice.

    With writable=False the array may be a read-only view of the file's bytes, which saves a copy.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not raw:
        raise DataError(f"{path}: the file is empty; expected a NIfTI slice")
    if path.endswith(".gz"):
        try:  # whole-buffer inflate with ISA-L: ~3.5x faster than nibabel's gzip stream
            raw = igzip.decompress(raw)
        except (OSError, EOFError, IsalError) as e:  # gzip.BadGzipFile is an OSError
            raise DataError(f"{path}: truncated or corrupt gzip data ({e}); re-copy the file") from None
    try:
        data = nifti_voxels(raw)
    except Exception as e:  # nibabel raises several types for non-NIfTI bytes
        raise DataError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    shape = data.shape
    data = np.squeeze(data)
    if data.ndim != 2:
        raise DataError(f"{path}: shape {shape}, expected one 2D slice (rows, cols) with at most "
                        "singleton extra axes; split volumes into slices first")
    data = data.astype(np.float32, copy=False)
    return data.copy() if writable and not data.flags.writeable else data  # a view of read-only bytes


def check_image(image: np.ndarray, path: str) -> np.ndarray:
    """Refuse NaN or Inf intensities: any normalisation of them gives a silent wrong result."""
    bad = ~np.isfinite(image)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} NaN/Inf intensities; expected finite values")
    return image


def check_mask(mask: np.ndarray, path: str, num_classes: int) -> np.ndarray:
    """Turn a float mask into integer labels, refusing fractional, negative or unknown labels."""
    with np.errstate(invalid="ignore"):  # NaN or negative values fail the comparison below
        exact = mask.astype(np.uint8, order="C")  # C order, as in normalise_image
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
    return labels.astype(np.uint8, order="C")


def normalise_image(image: np.ndarray, mode: str = "minmax") -> np.ndarray:
    """Scale intensities per image: min-max to [0, 1] or z-score; a constant image becomes zeros."""
    # The result is always C-ordered (NIfTI data is Fortran-ordered): copying it into the split's arrays is then
    # sequential, which on first touch of their pages is ~10x faster than a transposing copy.
    image = image.astype(np.float32, copy=False)
    if mode == "minmax":
        lo, hi = float(image.min()), float(image.max())
        scale, shift = hi - lo, lo
    elif mode == "zscore":
        scale, shift = float(image.std()), float(image.mean())
    else:
        raise ValueError(f"unknown normalisation {mode!r}; expected 'minmax' or 'zscore'")
    if not scale > 0:
        return np.zeros(image.shape, np.float32)
    out = np.subtract(image, shift, dtype=np.float32, order="C")
    out /= scale
    return out


def resize_image(image: np.ndarray, size) -> np.ndarray:
    """Resize intensities: area interpolation when shrinking, linear when enlarging."""
    if image.shape[:2] == tuple(size):
        return image
    shrink = image.shape[0] * image.shape[1] > size[0] * size[1]
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_labels(labels: np.ndarray, size) -> np.ndarray:
    """Resize a label map with nearest neighbour only: any other interpolation invents labels."""
    if labels.shape[:2] == tuple(size):
        return labels
    return cv2.resize(labels, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)


def preprocess_image(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Model input from a raw slice: normalise, then resize (used by training and prediction)."""
    return resize_image(normalise_image(image, prep.norm), prep.size)


def load_pair(ref: SliceRef, prep: Preprocessing):
    """Read, check and preprocess one pair -> (image, labels, original shape, label counts)."""
    image = check_image(read_slice(ref.image, writable=False), ref.image)
    mask = read_slice(ref.mask, writable=False)
    if image.shape != mask.shape:
        raise DataError(f"{ref.image}: image shape {image.shape} but its mask {ref.mask} has shape "
                        f"{mask.shape}; expected the same shape")
    labels = check_mask(mask, ref.mask, prep.num_classes)
    if prep.num_classes <= 16:  # a comparison per label beats bincount's cast to int64 for a few labels
        counts = np.array([np.count_nonzero(labels == c) for c in range(prep.num_classes)], np.int64)
    else:
        counts = np.bincount(labels.ravel(order="K"), minlength=prep.num_classes)
    return preprocess_image(image, prep), resize_labels(labels, prep.size), image.shape, counts


def _load_chunk(args):
    """Worker: load pairs into rows start.. of the split's arrays; returns (shape, counts) or the error of each.

    In a worker process the arrays arrive as the paths of the .npy files that hold them, mapped here.
    """
    refs, prep, start, images, masks = args
    if isinstance(images, str):
        images, masks = np.load(images, mmap_mode="r+"), np.load(masks, mmap_mode="r+")
    out = []
    for i, ref in enumerate(refs, start):
        try:
            image, labels, shape, counts = load_pair(ref, prep)
        except DataError as e:
            out.append(str(e))
            continue
        images[i, ..., 0] = image
        masks[i] = labels
        out.append((shape, counts))
    return out


# ----------------------------------------------------------------------------- whole split

def default_cache_dir() -> Path:
    """Where decoded splits are cached: $HIPMRI_CACHE or ~/.cache/hipmri-unet."""
    return Path(os.environ.get("HIPMRI_CACHE", Path.home() / ".cache" / "hipmri-unet"))


def fingerprint(refs) -> str:
    """A content-free identity of a split: file names and sizes (stable across copies)."""
    h = hashlib.sha256()
    for r in refs:
        for p in (r.image, r.mask):
            h.update(f"{os.path.basename(p)}:{os.path.getsize(p)};".encode())  # 4x cheaper than Path(p).name
    return h.hexdigest()[:16]


def _cache_key(refs, prep: Preprocessing, skip_bad: bool) -> str:
    """Key the cache by the file list, sizes, mtimes and settings: a changed file invalidates it."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, asdict(prep), skip_bad]).encode())
    for r in refs:
        for p in (r.image, r.mask):
            st = os.stat(p)
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:24]


def _cache_source(refs, prep: Preprocessing, skip_bad: bool) -> str:
    """What a cache was made from, leaving out the files' sizes and mtimes: the folders and the settings."""
    folders = sorted({str(Path(p).parent) for r in refs for p in (r.image, r.mask)})
    return hashlib.sha256(json.dumps([CACHE_VERSION, asdict(prep), skip_bad, folders]).encode()).hexdigest()[:24]


def _drop_stale_caches(cache: Path, source: str) -> None:
    """Remove the split's other caches made from the same folders and settings: their files have changed since.

    Caches of other data folders or settings stay (switching back to them is instant); so do caches
    written before the source was recorded.
    """
    for other in cache.parent.glob(f"{cache.name.rsplit('-', 1)[0]}-*"):
        if other == cache or not other.is_dir():
            continue
        try:
            stale = json.loads((other / "meta.json").read_text()).get("source") == source
        except (OSError, ValueError):
            continue  # being written, or not a cache: not ours to remove
        if stale:
            shutil.rmtree(other, ignore_errors=True)


def _read_cache(folder: Path, n_expected_max: int, prep: Preprocessing):
    """Load a cached split, or None if it is missing or fails any consistency check."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        # Copy-on-write maps: pages come straight from the OS page cache when first used, with no read-and-copy
        # of the whole file up front and no second copy in memory; writing to the arrays never touches the file.
        images = np.load(folder / "images.npy", mmap_mode="c").view(np.ndarray)
        masks = np.load(folder / "masks.npy", mmap_mode="c").view(np.ndarray)
        counts = np.load(folder / "label_counts.npy")
        n = len(meta["refs"])
        # The masks were checked when the cache was written (with these settings: they are in the key), so
        # their checksum is the check; an image file of the wrong size fails to map.
        ok = (images.shape == (n, *prep.size, 1) and images.dtype == np.float32
              and masks.shape == (n, *prep.size) and masks.dtype == np.uint8
              and counts.shape == (n, prep.num_classes) and n <= n_expected_max
              and zlib.crc32(masks) == meta["masks_crc32"] and zlib.crc32(counts) == meta["counts_crc32"])
    except (OSError, ValueError, KeyError, json.JSONDecodeError, EOFError):
        ok = False
    if not ok:
        warnings.warn(f"cache {folder} is corrupt or stale; rebuilding it")
        return None
    return SplitData(images, masks, [SliceRef(**r) for r in meta["refs"]],
                     [tuple(s) for s in meta["orig_shapes"]], counts, meta["skipped"], meta["fingerprint"])


def _write_cache(folder: Path, data: SplitData, written: dict | None = None, source: str | None = None) -> None:
    """Write arrays first and meta.json last (atomically), so a half-written cache is never used.

    written: temporary .npy files in folder that already hold some of the arrays; they are renamed, not copied.
    source: _cache_source of the split, kept in meta.json to find this cache once it is stale.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = written or {}
    for name, arr in (("images", data.images), ("masks", data.masks), ("label_counts", data.label_counts)):
        if name in written:
            os.replace(written[name], folder / f"{name}.npy")
            continue
        tmp = folder / f".{name}.{os.getpid()}.npy"
        np.save(tmp, arr)
        os.replace(tmp, folder / f"{name}.npy")
    atomic_write_json(folder / "meta.json", {
        "refs": [asdict(r) for r in data.refs], "orig_shapes": [list(s) for s in data.orig_shapes],
        "skipped": data.skipped, "fingerprint": data.fingerprint,
        "masks_crc32": zlib.crc32(np.ascontiguousarray(data.masks)),
        "counts_crc32": zlib.crc32(np.ascontiguousarray(data.label_counts)), "source": source})


def _array_files(folder: Path, n: int, prep: Preprocessing, claim: bool = True) -> dict:
    """Empty .npy files (temporary names) for a split's images and masks; claim: reserve their space up front."""
    paths = {}
    try:
        for name, shape, dtype in (("images", (n, *prep.size, 1), np.float32), ("masks", (n, *prep.size), np.uint8)):
            paths[name] = folder / f".{name}.{os.getpid()}.npy"
            arr = np.lib.format.open_memmap(paths[name], "w+", dtype, shape)
            size = arr.offset + arr.nbytes
            del arr
            if claim and hasattr(os, "posix_fallocate"):  # a full disk fails here, not as SIGBUS in a worker
                with open(paths[name], "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, size)
    except BaseException:
        for p in paths.values():
            p.unlink(missing_ok=True)
        raise
    return paths


def _worker_files(split: str, cache: Path | None, n: int, prep: Preprocessing):
    """Array files for loader processes -> (paths, scratch folder to remove or None); (None, None) with a warning
    when they cannot be made (load_split then uses threads). In the cache folder, else in a scratch folder."""
    scratch, folder = None, cache or Path(_scratch_dir(n, prep) or tempfile.gettempdir())
    try:
        if cache is None:
            scratch = tempfile.TemporaryDirectory(prefix="hipmri-load-", dir=folder)
            folder = Path(scratch.name)
        folder.mkdir(parents=True, exist_ok=True)
        # Shared memory was checked for room, and reserving it would zero every page in this one process.
        return _array_files(folder, n, prep, claim=not (scratch and str(folder).startswith("/dev/shm"))), scratch
    except OSError as e:
        if scratch:
            scratch.cleanup()
        warnings.warn(f"cannot create the arrays of split {split!r} in {folder} ({e}); loading with threads")
        return None, None


def _scratch_dir(n: int, prep: Preprocessing):
    """Where an uncached split's array files go: shared memory when it has room, else the temporary folder."""
    need = 2 * n * math.prod(prep.size) * 5  # images float32 + masks uint8, with room to spare
    try:
        return "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > need else None
    except OSError:
        return None


def _check_bad_fraction(split: str, errors: list, total: int, max_bad_fraction: float) -> None:
    """Refuse a split with too many broken pairs; warn about each one left out."""
    if len(errors) > max_bad_fraction * total:
        raise DataError(f"split {split!r}: {len(errors)} of {total} pairs are broken, more than the "
                        f"allowed {max_bad_fraction:.0%}; fix the data first:\n  " + "\n  ".join(errors[:20]))
    for e in errors:
        warnings.warn(f"skipping: {e}")


def load_split(data_dir, split: str, prep: Preprocessing = Preprocessing(), cache_dir=None, use_cache=True,
               workers=None, progress=True, skip_bad=False, max_bad_fraction=0.05, processes=None) -> SplitData:
    """Load a whole split as model-size arrays, in parallel, served from the cache when unchanged.

    With skip_bad, broken pairs are reported and left out, unless more than max_bad_fraction are broken.
    workers: parallel workers (default: one per core); processes: worker processes rather than threads
    (default: from PROCESS_MIN_PAIRS pairs on, when there is more than one worker).
    """
    lonely = [] if skip_bad else None
    refs = list_split(data_dir, split, unpaired=lonely)
    lonely = lonely or []
    cache = Path(cache_dir or default_cache_dir()) / f"{split}-{_cache_key(refs, prep, skip_bad)}" if use_cache else None
    if use_cache and (cached := _read_cache(cache, len(refs), prep)) is not None:
        cached.skipped = lonely + cached.skipped
        _check_bad_fraction(split, cached.skipped, len(refs) + len(lonely), max_bad_fraction)
        return cached

    # Each worker writes its pairs straight into the split's arrays, so nothing is stacked afterwards. Decoding
    # holds the GIL for part of each pair, so threads give only ~1.5x on 2 cores; large splits use worker
    # processes (joblib's loky: fresh interpreters that import only this module, never the caller's script
    # or TensorFlow), which write into .npy files: the cache itself, or scratch files when there is no cache.
    n = len(refs)
    workers = max(1, workers or os.cpu_count() or 1)
    if processes is None:
        processes = workers > 1 and n >= PROCESS_MIN_PAIRS
    files, scratch = _worker_files(split, cache, n, prep) if processes and n else (None, None)
    try:
        if files:
            images, masks = (np.load(files[k], mmap_mode="r+").view(np.ndarray) for k in ("images", "masks"))
            targets = (str(files["images"]), str(files["masks"]))
        else:
            images = np.empty((n, *prep.size, 1), np.float32)  # (n, rows, cols, 1)
            masks = np.empty((n, *prep.size), np.uint8)
            targets = (images, masks)
        # Each task handed to a process costs a few ms (a bare joblib loop: 64-pair tasks 1,968 pairs/s, 256 2,625).
        chunk = max(1, min(256 if files else 64, n // (4 * workers) or 1))
        chunks = [(refs[i:i + chunk], prep, i, *targets) for i in range(0, n, chunk)]
        parallel = joblib.Parallel(n_jobs=max(1, min(workers, len(chunks))), return_as="generator",
                                   **({"backend": "loky", "idle_worker_timeout": WORKER_IDLE_S} if files
                                      else {"backend": "threading"}))
        results = []
        with tqdm(total=n, desc=f"loading {split}", unit="slice", disable=not progress) as bar:
            for c, out in zip(chunks, parallel(joblib.delayed(_load_chunk)(c) for c in chunks)):
                results += out
                bar.update(len(c[0]))

        errors = [r for r in results if isinstance(r, str)]
        if errors and not skip_bad:
            more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
            raise DataError(f"split {split!r}: {len(errors)} of {n} pair(s) cannot be used "
                            "(use --skip-bad to leave them out):\n  " + "\n  ".join(errors[:20]) + more)
        _check_bad_fraction(split, lonely + errors, n + len(lonely), max_bad_fraction)
        keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
        if len(keep) < n:  # close the rows of the pairs left out (a copy in memory)
            images, masks = images[keep], masks[keep]
        data = SplitData(
            images=images, masks=masks, refs=[refs[i] for i in keep],
            orig_shapes=[tuple(results[i][0]) for i in keep],
            label_counts=np.array([results[i][1] for i in keep], np.int64).reshape(len(keep), prep.num_classes),
            skipped=errors, fingerprint=fingerprint(refs))
        if use_cache:
            in_place = files if files and len(keep) == n else None
            source = _cache_source(refs, prep, skip_bad)
            try:
                _write_cache(cache, data, in_place, source)
            except OSError as e:
                warnings.warn(f"could not write the cache at {cache} ({e}); the next run loads from files again")
            else:
                _drop_stale_caches(cache, source)
                if in_place:  # hand out copy-on-write maps, as a cached load does: writes never reach the cache
                    data.images, data.masks = (np.load(cache / f"{k}.npy", mmap_mode="c").view(np.ndarray)
                                               for k in ("images", "masks"))
    finally:
        for p in (files or {}).values():
            p.unlink(missing_ok=True)  # left only if the cache was not written; the arrays stay mapped
        if scratch:
            scratch.cleanup()
    data.skipped = lonely + errors  # the cache keeps the load errors; unpaired files are found anew each time
    return data


# ----------------------------------------------------------------------------- targets

def parse_target(spec: str, class_names=CLASS_NAMES):
    """'all' -> None (every label); 'prostate' or 'bladder,prostate' or '5' -> tuple of label ids."""
    if spec in (None, "", "all"):
        return None
    ids = []
    for item in str(spec).split(","):
        item = item.strip()
        if item.isdigit() and int(item) < len(class_names):
            ids.append(int(item))
        elif item in class_names:
            ids.append(class_names.index(item))
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


# ----------------------------------------------------------------------------- tf.data

@dataclass(frozen=True)
class Augment:
    """Paired augmentation settings; geometry is applied with one draw to image and mask alike."""

    flip: bool = True  # left-right (array axis 0)
    rotate_deg: float = 10.0
    scale: float = 0.1
    gamma: float = 0.3  # log-gamma range, intensity only
    noise: float = 0.03  # max Gaussian noise std, intensity only
    # Images in [0, 1] (--norm minmax). False (zscore): gamma bends each image's own min..max range instead,
    # rather than clipping it to [0, 1].
    unit_range: bool = True


def _warp_pairs(images: np.ndarray, targets: np.ndarray, maps: np.ndarray):
    """OpenCV's affine warp of each (image, target) pair by its inverse map (2 x 3: output x, y -> input).

    Images bilinear, targets nearest, edges repeated. A third of the CPU time of TensorFlow's
    ImageProjectiveTransformV3 here (`python benchmarks/augment.py`: 1.3 against 3.5 ms for 8 pairs of
    256 x 128, calls included), which matters because the warp runs beside training.
    """
    out_images, out_targets = np.empty_like(images), np.empty_like(targets)
    rows, cols = images.shape[1:3]
    for k, m in enumerate(maps):
        for src, dst, interpolation in ((images, out_images, cv2.INTER_LINEAR), (targets, out_targets, cv2.INTER_NEAREST)):
            dst[k, ..., 0] = cv2.warpAffine(src[k, ..., 0], m, (cols, rows), flags=interpolation | cv2.WARP_INVERSE_MAP,
                                            borderMode=cv2.BORDER_REPLICATE)
    return out_images, out_targets


def augment_batch(images, targets, seed, aug: Augment):
    """Apply one random draw per sample to image and target: geometry to both, intensity to image only.

    seed: two int64 numbers; the same seed gives the same draw (stateless random ops). The warp is OpenCV's
    (through tf.numpy_function), so this runs in tf.data or eagerly, not inside an XLA-compiled step.
    """
    import tensorflow as tf

    b = tf.shape(images)[0]
    rows, cols = tf.cast(tf.shape(images)[1], tf.float32), tf.cast(tf.shape(images)[2], tf.float32)
    u = tf.random.stateless_uniform((b, 5), seed=seed)  # flip, angle, scale, gamma, noise
    angle = (2 * u[:, 1] - 1) * aug.rotate_deg * np.pi / 180
    scale = 1 + (2 * u[:, 2] - 1) * aug.scale
    flip = tf.where(u[:, 0] < 0.5, -1.0, 1.0) if aug.flip else tf.ones((b,))
    # Inverse map output (x=col, y=row) -> input about the centre: flip rows, rotate, scale.
    c, s = tf.cos(angle) / scale, tf.sin(angle) / scale
    cx, cy = (cols - 1) / 2, (rows - 1) / 2
    a0, a1 = c, -s * flip
    b0, b1 = s, c * flip
    maps = tf.reshape(tf.stack([a0, a1, cx - a0 * cx - a1 * cy, b0, b1, cy - b0 * cx - b1 * cy], axis=1), (-1, 2, 3))
    warped = tf.numpy_function(_warp_pairs, [images, targets, maps], [images.dtype, targets.dtype], stateful=False)
    # numpy_function loses the static shape; without it the model is traced for any size, and e.g. the fused
    # batch norm cannot be used (a quarter of the training speed on the CPU).
    images, targets = (tf.ensure_shape(w, x.shape) for w, x in zip(warped, (images, targets)))
    if aug.gamma:
        gamma = tf.exp((2 * u[:, 3] - 1) * aug.gamma)[:, None, None, None]
        if aug.unit_range:  # bilinear interpolation keeps the images in [0, 1]; the clip only guards the log
            unit = tf.clip_by_value(images, 0.0, 1.0)
            lo = span = None
        else:
            lo = tf.reduce_min(images, axis=(1, 2, 3), keepdims=True)
            span = tf.maximum(tf.reduce_max(images, axis=(1, 2, 3), keepdims=True) - lo, 1e-6)
            unit = tf.clip_by_value((images - lo) / span, 0.0, 1.0)
        unit = tf.exp(gamma * tf.math.log(unit))  # unit ** gamma (0 -> 0), 5x cheaper than tf.pow's broadcast
        images = unit if lo is None else lo + span * unit
    if aug.noise:
        std = (u[:, 4] * aug.noise)[:, None, None, None]
        images = images + std * tf.random.stateless_normal(tf.shape(images), seed=seed[::-1])
    return images, targets


def make_dataset(data: SplitData, batch_size: int, target_ids=None, shuffle=False, augment: Augment | None = None,
                 seed=42, epochs=1, initial_epoch=0, device=None):
    """Batches of (image (b, rows, cols, 1), target (b, rows, cols, 1)) for epochs initial_epoch..epochs-1.

    epochs=None never ends (for Keras fit with steps_per_epoch, which reads one iterator across epochs).
    device (e.g. "/gpu:0") prefetches batches into that device's memory while the previous step runs.
    The order and augmentation of epoch e depend only on (seed, e), so a resumed run sees exactly
    the batches an uninterrupted run would have seen.
    """
    import tensorflow as tf  # here, not at the top: loader worker processes never need TensorFlow

    n = len(data)
    images = tf.constant(data.images)
    targets = tf.constant(make_target(data.masks, target_ids)[..., None])

    def epoch_indices(epoch):
        order = tf.range(n, dtype=tf.int64)
        if shuffle:
            keys = tf.random.stateless_uniform((n,), seed=tf.stack([tf.cast(seed, tf.int64), epoch]))
            order = tf.cast(tf.argsort(keys), tf.int64)
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
        return batches.enumerate().map(lambda step, idx: (epoch, step, idx))

    def gather(epoch, step, idx):
        x, y = tf.gather(images, idx), tf.gather(targets, idx)
        if augment is not None:
            x, y = augment_batch(x, y, tf.stack([epoch * 100_003 + step, tf.cast(seed, tf.int64)]), augment)
        return x, y

    ds = tf.data.Dataset.counter(initial_epoch)
    if epochs is not None:
        ds = ds.take(epochs - initial_epoch)
    ds = ds.flat_map(epoch_indices)
    options = tf.data.Options()
    # Under tf.distribute each worker takes its own share of every global batch (there are no files to shard).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    ds = ds.with_options(options)
    if epochs is not None:  # a known length lets Keras evaluate without an "ran out of data" warning
        ds = ds.apply(tf.data.experimental.assert_cardinality((epochs - initial_epoch) * -(-n // batch_size)))
    ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if device:  # must be the last transformation
        return ds.apply(tf.data.experimental.prefetch_to_device(device))
    return ds.prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------- command line

def label_shares(data: SplitData, class_names=CLASS_NAMES) -> dict:
    """Pixel share of each label over a split, at the original size."""
    totals = data.label_counts.sum(axis=0)
    return {name: float(totals[i] / max(totals.sum(), 1)) for i, name in enumerate(class_names)}


def describe(data_dir, num_classes=len(CLASS_NAMES), cache_dir=None) -> dict:
    """Counts, shapes, label shares and every problem found, per split."""
    find_data_root(data_dir)  # a missing folder is one problem, not one per split
    report = {}
    names = CLASS_NAMES if num_classes == len(CLASS_NAMES) else tuple(f"label_{i}" for i in range(num_classes))
    for split in SPLITS:
        try:
            with warnings.catch_warnings():  # every skipped pair is in the report already
                warnings.simplefilter("ignore")
                data = load_split(data_dir, split, Preprocessing(num_classes=num_classes), cache_dir=cache_dir,
                                  skip_bad=True, max_bad_fraction=1.0, progress=sys.stderr.isatty())
        except DataError as e:
            report[split] = {"problems": [str(e)]}
            continue
        shapes = {}
        for s in data.orig_shapes:
            shapes[f"{s[0]}x{s[1]}"] = shapes.get(f"{s[0]}x{s[1]}", 0) + 1
        report[split] = {"pairs": len(data), "volumes": len({r.volume for r in data.refs}),
                         "cases": len({r.case for r in data.refs}), "shapes": shapes,
                         "label_shares": label_shares(data, names), "problems": data.skipped}
    return report


def _print_report(report: dict) -> None:
    """Human-readable form of `describe`."""
    for split, r in report.items():
        print(f"== {split}")
        if "pairs" in r:
            print(f"  pairs {r['pairs']}  volumes {r['volumes']}  cases {r['cases']}")
            print("  shapes " + ", ".join(f"{k}: {v}" for k, v in sorted(r["shapes"].items())))
            print("  label shares " + ", ".join(f"{k} {v:.2%}" for k, v in r["label_shares"].items()))
        print(f"  problems: {len(r['problems'])}")
        for p in r["problems"]:
            print("   - " + p.replace("\n", "\n     "))


def main(argv=None) -> int:
    """`synth` writes the phantom, `info` describes a data folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("synth", help="write the synthetic pelvic MRI phantom (see synthetic.py --help)",
                   add_help=False)
    info = sub.add_parser("info", help="counts, shapes, label shares and problems of a data folder")
    info.add_argument("-d", "--data-dir", required=True, help="HipMRI folder (or its parent)")
    info.add_argument("-c", "--num-classes", type=int, default=len(CLASS_NAMES), help="labels in the masks")
    info.add_argument("--cache-dir", default=None, help="cache folder (default $HIPMRI_CACHE or ~/.cache/hipmri-unet)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["synth"]:
        import synthetic
        return synthetic.main(argv[1:]) or 0
    args = parser.parse_args(argv)
    try:
        report = describe(args.data_dir, args.num_classes, args.cache_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1)) if args.json else _print_report(report)
    return 1 if any(r["problems"] for r in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
