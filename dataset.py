"""HipMRI-layout data sets: find and pair each split's files, load whole splits behind the cache, describe them.

The path of a slice: `list_split` pairs image and mask files by name, `load_pair` reads, checks and
preprocesses one pair (preprocess.py), and `load_split` does a whole split in parallel, served from the
on-disk cache (cache.py) when nothing changed.

    python dataset.py info --data-dir DIR     # per split: pairs, shapes, orientation, spacing, labels, problems
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import joblib
import numpy as np
from tqdm import tqdm

import cache
from atomic_io import atomic_write_json
from preprocess import DataError, Preprocessing, check_image, check_mask, load_nifti, plane_axes, preprocess_pair, \
    read_slice, slice_geometry

CLASS_NAMES = ("background", "body", "bone", "bladder", "rectum", "prostate")
SPLITS = {
    "train": ("keras_slices_train", "keras_slices_seg_train"),
    "validate": ("keras_slices_validate", "keras_slices_seg_validate"),
    "test": ("keras_slices_test", "keras_slices_seg_test"),
}
NAME_RE = re.compile(r"^(case|seg)_(\d+)_week_(\d+)_slice_(\d+)\.nii(\.gz)?$")
PROCESSES_FROM = 2000  # pairs; a smaller split is read by threads (worker processes take ~1 s to start)


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


@dataclass
class SplitData:
    """A loaded split: network-size arrays plus what is needed to go back to the files."""

    images: np.ndarray  # (n, rows, cols, 1) float32
    masks: np.ndarray  # (n, rows, cols) uint8 labels
    refs: list
    orig_shapes: list  # (rows, cols) of each slice on disk
    label_counts: np.ndarray  # (n, num_classes) pixels per label at the original size
    geometry: list = field(default_factory=list)  # (orientation codes, (row mm, col mm)) of each slice
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
    for candidate in (data_dir, data_dir / "keras_slices_data", data_dir / "HipMRI_Study_open" / "keras_slices_data"):
        if any((candidate / images).is_dir() for images, _ in SPLITS.values()):
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
    lonely = [(str(image_dir / images[k]), "no mask") for k in sorted(images.keys() - masks.keys())]
    lonely += [(str(mask_dir / masks[k]), "no image") for k in sorted(masks.keys() - images.keys())]
    if lonely and unpaired is None:
        raise DataError(f"split {split!r}: {len(lonely)} file(s) without a partner; the mask of "
                        "case_X_week_Y_slice_Z is seg_X_week_Y_slice_Z:\n  "
                        + "\n  ".join(f"{f} ({why})" for f, why in lonely))
    if unpaired is not None:
        unpaired += [f"{f}: no partner ({why})" for f, why in lonely]
    image_dir, mask_dir = str(image_dir), str(mask_dir)  # os.path.join: ~10x cheaper than Path / for 25k files
    return [SliceRef(os.path.join(image_dir, images[k]), os.path.join(mask_dir, masks[k]), *k)
            for k in sorted(images.keys() & masks.keys())]


# ----------------------------------------------------------------------------- loading

def load_pair(ref: SliceRef, prep: Preprocessing):
    """Read, check and preprocess one pair -> (image, labels, original shape, label counts, geometry)."""
    image, nifti = read_slice(ref.image, with_image=True)
    check_image(image, ref.image)
    mask = read_slice(ref.mask)
    if image.shape != mask.shape:
        raise DataError(f"{ref.image}: image shape {image.shape} but its mask {ref.mask} has shape "
                        f"{mask.shape}; expected the same shape")
    labels = check_mask(mask, ref.mask, prep.num_classes)
    if prep.num_classes <= 256:  # OpenCV's histogram of uint8 labels: 5x cheaper than bincount's cast to int64
        counts = cv2.calcHist([labels], [0], None, [prep.num_classes], [0, prep.num_classes]).ravel().astype(np.int64)
    else:
        counts = np.bincount(labels.ravel(), minlength=prep.num_classes)
    geometry = slice_geometry(nifti.affine, nifti.shape)
    return (*preprocess_pair(image, labels, prep, geometry[1]), image.shape, counts, geometry)


def fingerprint(refs) -> str:
    """A content-free identity of a split: file names and sizes (stable across copies)."""
    h = hashlib.sha256()
    for r in refs:
        for p in (r.image, r.mask):
            h.update(f"{os.path.basename(p)}:{os.path.getsize(p)};".encode())
    return h.hexdigest()[:16]


def _check_bad_fraction(split: str, errors: list, total: int, max_bad_fraction: float) -> None:
    """Refuse a split with too many broken pairs; warn about each one left out."""
    if len(errors) > max_bad_fraction * total:
        raise DataError(f"split {split!r}: {len(errors)} of {total} pairs are broken, more than the "
                        f"allowed {max_bad_fraction:.0%}; fix the data first:\n  " + "\n  ".join(errors[:20]))
    for e in errors:
        warnings.warn(f"skipping: {e}")


def _array_specs(prep: Preprocessing) -> dict:
    """Shapes (after the row axis) and dtypes of a split's cached arrays."""
    return {"images": ((*prep.size, 1), np.float32), "masks": (tuple(prep.size), np.uint8),
            "label_counts": ((prep.num_classes,), np.int64)}


def _load_rows(refs, prep: Preprocessing, start: int, images, masks) -> list:
    """Load pairs into rows start.. of a split's arrays (in a worker process, the paths of .npy files, mapped here);
    each pair's (shape, label counts, geometry), or its error message."""
    if isinstance(images, str):
        images, masks = (np.load(p, mmap_mode="r+") for p in (images, masks))
    out = []
    for i, ref in enumerate(refs, start):
        try:
            image, labels, shape, counts, geometry = load_pair(ref, prep)
        except DataError as e:
            out.append(str(e))
            continue
        images[i, ..., 0], masks[i] = image, labels
        out.append((shape, counts, geometry))
    return out


def _decode(split: str, refs, prep: Preprocessing, workers: int, progress: bool):
    """(images, masks, each pair's result) of a split, read by threads, or by worker processes for a large split.

    nibabel holds the GIL for about half of a pair's time: on 2 cores, 2 threads read the full phantom (12,660
    pairs) in 36 s, 2 processes in 24 s (`benchmarks/README.md`). Processes take a second to start, and write
    into .npy files that this process maps; joblib's loky workers never run the caller's script again.
    """
    n, chunk = len(refs), 64
    # The files are unlinked at the end; the maps of them stay valid (on Windows the folder is left behind).
    with tempfile.TemporaryDirectory(prefix="hipmri-load-", ignore_cleanup_errors=True) as tmp:
        if workers > 1 and n >= PROCESSES_FROM:
            targets = [str(Path(tmp, name)) for name in ("images.npy", "masks.npy")]
            np.lib.format.open_memmap(targets[0], "w+", np.float32, (n, *prep.size, 1))
            np.lib.format.open_memmap(targets[1], "w+", np.uint8, (n, *prep.size))
            backend = {"backend": "loky", "idle_worker_timeout": 10}  # not joblib's 300 s of ~100 MB each
        else:
            targets = [np.empty((n, *prep.size, 1), np.float32), np.empty((n, *prep.size), np.uint8)]
            backend = {"backend": "threading"}
        results = []
        with tqdm(total=n, desc=f"loading {split}", unit="slice", disable=not progress) as bar:
            for out in joblib.Parallel(n_jobs=workers, return_as="generator", **backend)(
                    joblib.delayed(_load_rows)(refs[i:i + chunk], prep, i, *targets) for i in range(0, n, chunk)):
                results += out
                bar.update(len(out))
        images, masks = (np.load(t, mmap_mode="c").view(np.ndarray) if isinstance(t, str) else t for t in targets)
    return images, masks, results


def load_split(data_dir, split: str, prep: Preprocessing = Preprocessing(), cache_dir=None, use_cache=True,
               workers=None, progress=True, skip_bad=False, max_bad_fraction=0.05) -> SplitData:
    """Load a whole split as network-size arrays in parallel, served from the cache when unchanged.

    With skip_bad, broken pairs are reported and left out, unless more than max_bad_fraction are broken.
    """
    lonely = [] if skip_bad else None
    refs = list_split(data_dir, split, unpaired=lonely)
    lonely = lonely or []
    settings = [asdict(prep), skip_bad]
    paths = [p for r in refs for p in (r.image, r.mask)]
    folder = Path(cache_dir or cache.default_dir()) / f"{split}-{cache.key(paths, settings)}" if use_cache else None
    if folder and (hit := cache.read(folder, _array_specs(prep))) is not None:
        (arrays, meta), n_total = hit, len(refs) + len(lonely)
        data = SplitData(arrays["images"], arrays["masks"], [SliceRef(**r) for r in meta["refs"]],
                         [tuple(s) for s in meta["orig_shapes"]], arrays["label_counts"],
                         [(c, tuple(s)) for c, s in meta["geometry"]], lonely + meta["skipped"], meta["fingerprint"])
        _check_bad_fraction(split, data.skipped, n_total, max_bad_fraction)
        return data

    n = len(refs)
    images, masks, results = _decode(split, refs, prep, max(1, workers or os.cpu_count() or 1), progress)
    errors = [r for r in results if isinstance(r, str)]
    if errors and not skip_bad:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DataError(f"split {split!r}: {len(errors)} of {n} pair(s) cannot be used "
                        "(use --skip-bad to leave them out):\n  " + "\n  ".join(errors[:20]) + more)
    _check_bad_fraction(split, lonely + errors, n + len(lonely), max_bad_fraction)
    keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
    if len(keep) < n:
        images, masks = images[keep], masks[keep]
    data = SplitData(images, masks, [refs[i] for i in keep], [tuple(results[i][0]) for i in keep],
                     np.array([results[i][1] for i in keep], np.int64).reshape(len(keep), prep.num_classes),
                     [results[i][2] for i in keep], errors, fingerprint(refs))
    if folder:
        made_from = cache.source(paths, settings)
        meta = {"n": len(data), "refs": [asdict(r) for r in data.refs], "orig_shapes": data.orig_shapes,
                "geometry": data.geometry, "skipped": errors, "fingerprint": data.fingerprint}
        try:
            cache.write(folder, {"images": data.images, "masks": data.masks, "label_counts": data.label_counts},
                        meta, checksummed=("masks", "label_counts"), made_from=made_from)
        except OSError as e:
            warnings.warn(f"could not write the cache at {folder} ({e}); the next run loads from files again")
        else:
            cache.drop_stale(folder, made_from)
    data.skipped = lonely + errors  # the cache keeps the load errors; unpaired files are found anew each time
    return data


def header_geometry(data_dir, split: str, cache_dir=None, workers=None) -> dict:
    """geometry_summary of a split from the image headers alone (no voxels read): what train.py needs to fix the
    network's pixel spacing before it loads the split through it. Kept in the cache folder (11,460 HipMRI
    headers take about 20 s to read on 2 cores)."""
    refs = list_split(data_dir, split, unpaired=[])
    paths = [r.image for r in refs]
    kept = Path(cache_dir or cache.default_dir()) / f"geometry-{split}-{cache.key(paths, ['header geometry'])}.json"
    if kept.is_file():
        return json.loads(kept.read_text())

    def one(path):
        try:
            image = load_nifti(path)
        except DataError:
            return None  # load_split reports it (or --skip-bad leaves it out)
        rows, cols, _ = plane_axes(image.shape)
        return slice_geometry(image.affine, image.shape), (image.shape[rows], image.shape[cols])

    found = [g for g in joblib.Parallel(n_jobs=max(1, workers or os.cpu_count() or 1), backend="threading")(
        joblib.delayed(one)(p) for p in paths) if g is not None]
    summary = geometry_summary([g for g, _ in found], [s for _, s in found])
    try:
        atomic_write_json(kept, summary)
    except OSError:
        pass  # read again next time
    return summary


def shared_cases(data_dir) -> dict:
    """{case: [splits]} for every case found in more than one split: several weeks of one patient in both
    training and test is a leak that flatters the test score."""
    seen = {}
    for split in SPLITS:
        try:
            for case in {r.case for r in list_split(data_dir, split, unpaired=[])}:
                seen.setdefault(case, []).append(split)
        except DataError:
            continue  # a missing split shares nothing
    return {case: splits for case, splits in sorted(seen.items()) if len(splits) > 1}


def check_disjoint_cases(data_dir, strict: bool = False) -> list:
    """Messages naming each case found in more than one split (a DataError with strict)."""
    messages = [f"case {case:03d} is in the {' and '.join(splits)} splits: its scans are not independent test "
                "data (split by case, not by week or slice)" for case, splits in shared_cases(data_dir).items()]
    if messages and strict:
        raise DataError(f"{find_data_root(data_dir)}: " + "; ".join(messages) + " (--strict)")
    return messages


# ----------------------------------------------------------------------------- description

def geometry_summary(geometry: list, shapes: list) -> dict:
    """Most common orientation, how many slices disagree with it, the in-plane spacing's median and range, and
    the slices' median shape."""
    codes = Counter(c for c, _ in geometry)
    spacing = np.array([s for _, s in geometry], float).reshape(-1, 2)
    common = codes.most_common(1)[0][0] if codes else None
    return {"orientation": common, "orientation_counts": dict(codes),
            "orientation_disagree": sum(v for k, v in codes.items() if k != common),
            "spacing_mm_median": np.median(spacing, axis=0).round(4).tolist() if len(spacing) else None,
            "spacing_mm_range": [spacing.min(axis=0).round(4).tolist(), spacing.max(axis=0).round(4).tolist()]
            if len(spacing) else None,
            "shape_median": np.median(np.array(shapes, float).reshape(-1, 2), axis=0).tolist() if shapes else None}


def label_shares(data: SplitData, class_names) -> dict:
    """Pixel share of each label over a split, at the original size."""
    totals = data.label_counts.sum(axis=0)
    return {name: float(totals[i] / max(totals.sum(), 1)) for i, name in enumerate(class_names)}


def absent_labels(data: SplitData, class_names, wanted=None) -> list:
    """'N (name)' for each foreground label (or each of `wanted`) that no mask of the split holds."""
    totals = data.label_counts.sum(axis=0)
    wanted = range(1, len(class_names)) if wanted is None else wanted
    return [f"{i} ({class_names[i]})" for i in wanted if not totals[i]]


def describe(data_dir, num_classes=len(CLASS_NAMES), cache_dir=None) -> dict:
    """Counts, shapes, orientation, spacing, label shares and every problem found, per split."""
    find_data_root(data_dir)  # a missing folder is one problem, not one per split
    report = {}
    leaks = shared_cases(data_dir)
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
        shapes = Counter(f"{s[0]}x{s[1]}" for s in data.orig_shapes)
        report[split] = {"pairs": len(data), "volumes": len({r.volume for r in data.refs}),
                         "cases": len({r.case for r in data.refs}), "shapes": dict(shapes),
                         **geometry_summary(data.geometry, data.orig_shapes), "label_shares": label_shares(data, names),
                         "problems": data.skipped + [
                             f"case {c:03d} is also in the {', '.join(x for x in where if x != split)} split(s)"
                             for c, where in leaks.items() if split in where]}
    return report


def _print_report(report: dict) -> None:
    """Human-readable form of `describe`."""
    for split, r in report.items():
        print(f"== {split}")
        if "pairs" in r:
            print(f"  pairs {r['pairs']}  volumes {r['volumes']}  cases {r['cases']}")
            print("  shapes " + ", ".join(f"{k}: {v}" for k, v in sorted(r["shapes"].items())))
            print(f"  orientation {r['orientation']} ({r['orientation_disagree']} slice(s) differ: "
                  f"{r['orientation_counts']})")
            lo, hi = r["spacing_mm_range"]
            print(f"  pixel spacing (mm) median {r['spacing_mm_median']}, range {lo} .. {hi}")
            print("  label shares " + ", ".join(f"{k} {v:.2%}" for k, v in r["label_shares"].items()))
        print(f"  problems: {len(r['problems'])}")
        for p in r["problems"]:
            print("   - " + p.replace("\n", "\n     "))


def main(argv=None) -> int:
    """`info`: describe a data folder; exit status 1 if any problem was found."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="counts, shapes, orientation, spacing, label shares and problems")
    info.add_argument("-d", "--data-dir", required=True, help="HipMRI folder (or its parent)")
    info.add_argument("-c", "--num-classes", type=int, default=len(CLASS_NAMES), help="labels in the masks")
    info.add_argument("--cache-dir", default=None, help="cache folder (default $HIPMRI_CACHE or ~/.cache/hipmri-unet)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
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
