"""Turn labelled 3D scans into the HipMRI slice layout, split by patient, so that train.py can read them.

    python slice_scans.py --images imagesTr --labels labelsTr --out data/prostate
    python train.py --data-dir data/prostate --class-names background,peripheral,transition

Images and labels are paired by file name (an nnU-Net channel suffix such as `_0000` is ignored) or, with
`--key REGEX`, by a part of their paths (one folder per patient: `--images 'data/*/flair.nii.gz' --key ...`).
Every scan is turned to the closest canonical orientation (RAS, nibabel's `as_closest_canonical`) and cut
into its axial slices, each written with the affine of its place in the scan, so training records the pixel
spacing and orientation that `predict.py --input` later matches whole scans to. Intensities are kept as
stored (train.py scales each slice); labels must be integers. Patients, not slices, are split into train /
validate / test (`--split`, shuffled with `--seed`), so no patient is in two splits; scans of one patient
(`--patient REGEX`) stay together. `cases.csv` in the output says which scan became which case and split.
"""
from __future__ import annotations

import argparse
import csv
import glob
import gzip
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from atomic_io import atomic_path, atomic_write_bytes
from dataset import SPLITS
from preprocess import DataError, check_image, check_mask, load_nifti, read_voxels

CHANNEL_SUFFIX = re.compile(r"_\d{4}$")  # nnU-Net's imagesTr/NAME_0000.nii.gz
NIFTI = re.compile(r"\.nii(\.gz)?$")


def stem(path: Path) -> str:
    """The file name without .nii or .nii.gz."""
    return NIFTI.sub("", path.name)


def scan_files(where) -> list[Path]:
    """The NIfTI files in a folder, or those a glob pattern matches (`**` for any depth), sorted."""
    folder = Path(where)
    files = folder.glob("*.nii*") if folder.is_dir() else map(Path, glob.glob(str(where), recursive=True))
    return sorted(p for p in files if NIFTI.search(p.name) and not p.name.startswith(".") and p.is_file())


def scan_name(path: Path, kind: str, key: str | None) -> str:
    """What pairs an image with its labels: the first group of `key` in the file's path, or else the file name
    (for images without an nnU-Net channel suffix)."""
    if key is None:
        return CHANNEL_SUFFIX.sub("", stem(path)) if kind == "image" else stem(path)
    m = re.search(key, path.as_posix())
    if not m:
        raise DataError(f"{path}: --key {key!r} does not match its path; expected a regular expression whose "
                        "first group names the scan in both the image and the label paths")
    return m.group(1) if m.groups() else m.group(0)


def pair_scans(images, labels, key: str | None = None) -> list[tuple[str, Path, Path]]:
    """(name, image, label) of every scan, paired by name; an image without a label (or a label without an
    image) is an error naming it."""
    found = {}
    for kind, where in (("image", images), ("label", labels)):
        files = scan_files(where)
        if not files:
            raise DataError(f"{where}: no .nii or .nii.gz files; expected the {kind} scans (a folder or a "
                            "pattern such as 'data/**/flair.nii.gz')")
        for p in files:
            name = scan_name(p, kind, key)
            if name in found.get(kind, {}):
                raise DataError(f"{p}: a second {kind} for scan {name!r} (also {found[kind][name]}); expected one "
                                "file per scan (--key REGEX names scans by their path, --channel picks a channel)")
            found.setdefault(kind, {})[name] = p
    lonely = sorted(set(found["image"]) ^ set(found["label"]))
    if lonely:
        where = [str(found["image"].get(n) or found["label"].get(n)) for n in lonely[:5]]
        raise DataError(f"{len(lonely)} scans without a partner, e.g. {', '.join(where)}; expected each image in "
                        f"{images} to have a label file of the same name in {labels} (or the same --key)")
    return [(n, found["image"][n], found["label"][n]) for n in sorted(found["image"])]


def patient_of(name: str, pattern: str | None) -> str:
    """The patient a scan belongs to: the first group of `pattern` in its name, or the name itself."""
    if pattern is None:
        return name
    m = re.search(pattern, name)
    if not m:
        raise DataError(f"scan {name!r}: --patient {pattern!r} does not match its name; expected a regular "
                        "expression whose first group names the patient, e.g. 'Case_(\\d+)'")
    return m.group(1) if m.groups() else m.group(0)


def split_patients(patients: list[str], fractions: tuple, seed: int) -> dict:
    """{patient: split}: a seeded shuffle cut by the fractions (train, validate, test); at least one patient in
    each split."""
    n = len(patients)
    counts = [max(1, round(f * n)) for f in fractions[1:]]
    if n - sum(counts) < 1:
        raise DataError(f"{n} patients cannot fill the splits {fractions}: expected at least "
                        f"{sum(counts) + 1}, with at least one in each split")
    order = [patients[i] for i in np.random.default_rng(seed).permutation(n)]
    val, test = counts
    names = ["validate"] * val + ["test"] * test + ["train"] * (n - val - test)
    return dict(zip(order, names))


def read_scan(image_path: Path, label_path: Path, channel: int | None):
    """(voxels, labels, affine) of one scan turned to the closest canonical orientation (RAS), the labels
    checked against the image (shape, grid, integer values)."""
    image, labels = load_nifti(image_path), load_nifti(label_path)
    shape = image.shape
    if len(shape) == 4 and shape[3] > 1:
        if channel is None or not 0 <= channel < shape[3]:
            raise DataError(f"{image_path}: shape {shape} holds {shape[3]} channels or time points; expected one "
                            f"3D scan (pass --channel 0..{shape[3] - 1} to pick one)")
        image = image.slicer[..., channel]
    elif len(shape) == 4:
        image = image.slicer[..., 0]
    if len(image.shape) != 3 or min(image.shape) < 2:
        raise DataError(f"{image_path}: shape {shape}; expected a 3D scan (for 2D slices, use the HipMRI layout "
                        "directly)")
    if labels.shape[:3] != image.shape or (len(labels.shape) > 3 and np.prod(labels.shape[3:]) > 1):
        raise DataError(f"{label_path}: shape {labels.shape}, expected {image.shape} as its image {image_path}")
    if not np.allclose(labels.affine, image.affine, atol=1e-3 * max(1.0, np.abs(image.affine).max())):
        raise DataError(f"{label_path}: its affine differs from its image's ({image_path}); expected the labels "
                        f"on the image's voxel grid\nlabels:\n{labels.affine.round(3)}\n"
                        f"image:\n{image.affine.round(3)}")
    image, labels = nib.as_closest_canonical(image), nib.as_closest_canonical(labels)
    voxels = check_image(read_voxels(image, image_path), str(image_path))
    mask = check_mask(read_voxels(labels, label_path).reshape(image.shape), str(label_path), 256)
    return voxels, mask, image.affine


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """A .nii.gz of one slice (gzip mtime 0: the same slice always gives the same bytes)."""
    return gzip.compress(nib.Nifti1Image(array, affine).to_bytes(), compresslevel=1, mtime=0)


def write_scan(out: Path, split: str, case: int, week: int, voxels, mask, affine) -> int:
    """Every axial slice of one canonical scan, with the affine of its place; returns the slice count."""
    image_dir, mask_dir = (out / folder for folder in SPLITS[split])
    for z in range(voxels.shape[2]):
        place = affine.copy()
        place[:3, 3] = (affine @ [0, 0, z, 1])[:3]
        name = f"{case:03d}_week_{week}_slice_{z}.nii.gz"
        atomic_write_bytes(image_dir / f"case_{name}", nifti_bytes(voxels[:, :, z], place), fsync=False)
        atomic_write_bytes(mask_dir / f"seg_{name}", nifti_bytes(mask[:, :, z], place), fsync=False)
    return voxels.shape[2]


def convert(images, labels, out, split=(0.6, 0.2, 0.2), seed=42, patient=None, channel=None, key=None,
            relabel=None, progress=True) -> list[dict]:
    """Write the scans under `out` in the HipMRI layout (label values mapped by `relabel`, {old: new}, if given);
    returns the rows of cases.csv."""
    out = Path(out)
    taken = [f for pair in SPLITS.values() for f in pair if (out / f).exists() and any((out / f).iterdir())]
    if taken:
        raise DataError(f"{out}: already holds {', '.join(taken)}; expected a new or empty folder (nothing there "
                        "is overwritten; a conversion that was stopped has no cases.csv: delete its folder first)")
    scans = pair_scans(images, labels, key)
    owners = [patient_of(name, patient) for name, _, _ in scans]
    patients = sorted(set(owners))
    splits = split_patients(patients, split, seed)
    rows, weeks = [], {}
    for (name, image_path, label_path), owner in zip(tqdm(scans, desc="scans", disable=not progress), owners):
        voxels, mask, affine = read_scan(image_path, label_path, channel)
        if relabel:
            lookup = np.arange(256, dtype=np.uint8)
            lookup[list(relabel)] = list(relabel.values())
            mask = lookup[mask]
        case, week = patients.index(owner) + 1, weeks.setdefault(owner, 0)
        weeks[owner] += 1
        n = write_scan(out, splits[owner], case, week, voxels, mask, affine)
        rows.append({"case": case, "week": week, "split": splits[owner], "patient": owner, "slices": n,
                     "shape": "x".join(map(str, voxels.shape)),
                     "spacing_mm": "x".join(f"{s:.3g}" for s in nib.affines.voxel_sizes(affine)),
                     "labels": " ".join(map(str, np.unique(mask).tolist())),
                     "image": str(image_path), "label": str(label_path)})
    with atomic_path(out / "cases.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", required=True, help="folder of 3D image scans (.nii or .nii.gz), or a glob "
                                                     "pattern such as 'brats/**/Flair*.nii.gz'")
    p.add_argument("--labels", required=True, help="folder or pattern of their label maps")
    p.add_argument("--key", default=None,
                   help="regular expression whose first group in a file's path pairs image and labels, e.g. "
                        "'pat(\\d+)' for one folder per patient (none: the file name, less a _0000 suffix)")
    p.add_argument("--out", required=True, type=Path, help="new folder for the HipMRI layout")
    p.add_argument("--split", default="0.6,0.2,0.2", help="shares of the patients for train,validate,test")
    p.add_argument("--seed", type=int, default=42, help="seed of the patient shuffle")
    p.add_argument("--patient", default=None,
                   help="regular expression whose first group in a file name names the patient, so that "
                        "several scans of one patient share a split (none: one patient per scan)")
    p.add_argument("--channel", type=int, default=None, help="the channel of 4D images to take (e.g. 0 for T2)")
    p.add_argument("--relabel", default=None,
                   help="label values to change, OLD:NEW,... (e.g. 255:1 for masks saved as 0/255); others stay")
    a = p.parse_args(argv)
    try:
        shares = tuple(float(s) for s in a.split.split(","))
        assert len(shares) == 3 and min(shares) > 0
    except (ValueError, AssertionError):
        p.error(f"--split {a.split}: expected three shares above 0 for train,validate,test, e.g. 0.6,0.2,0.2")
    a.split = tuple(s / sum(shares) for s in shares)
    if a.relabel is not None:
        try:
            mapping = {int(old): int(new) for old, new in (pair.split(":") for pair in a.relabel.split(","))}
            assert all(0 <= v <= 255 for pair in mapping.items() for v in pair)
        except (ValueError, AssertionError):
            p.error(f"--relabel {a.relabel}: expected OLD:NEW pairs of labels 0..255, e.g. 255:1 or 1:1,2:1")
        a.relabel = mapping
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        rows = convert(a.images, a.labels, a.out, a.split, a.seed, a.patient, a.channel, a.key, a.relabel)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split in SPLITS:
        mine = [r for r in rows if r["split"] == split]
        print(f"{split}: {len({r['patient'] for r in mine})} patients, {len(mine)} scans, "
              f"{sum(r['slices'] for r in mine)} slices")
    print(f"wrote {a.out} (cases.csv lists each scan); next: python train.py --data-dir {a.out} --class-names ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
