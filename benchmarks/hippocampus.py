"""The hippocampus data set of real_anatomy.py: 60 patients' T1 MRI, patient-disjoint folds, in the HipMRI layout.

The Medical Segmentation Decathlon's Task04_Hippocampus (Simpson et al. 2019; Vanderbilt, CC BY-SA 4.0): T1
volumes cropped around one hippocampus, about 35x50x35 at 1 mm, labelled 1 anterior and 2 posterior
hippocampus. The repo never holds them; --hippocampus-dir points to a folder that does: the decathlon's own
(imagesTr/, labelsTr/), an nnU-Net copy (the _0000 suffix) or the copy that github.com/udacity/
nd320-c3-3d-imaging-starter commits (data/TrainingSet/images/ and labels/, 260 cases), e.g.

    git clone --depth 1 https://github.com/udacity/nd320-c3-3d-imaging-starter ~/hippocampus
    python benchmarks/real_anatomy.py --datasets hippocampus --hippocampus-dir ~/hippocampus

60 training cases are used (CASES). Each volume is turned to the closest canonical orientation
(nibabel), its axial slices are padded or cropped about their centre to 48x64 (zeros outside), and the slices
where the hippocampus covers at least 1% are kept. Intensities stay as stored: each system scales its own. Fold
k (0..2) tests patients 20k..20k+19, validates on the next 10 and trains on the other 30, so every patient is
tested once and no patient is in two splits of a fold. Added after every decision of the recipe; since
2026-12-05 13:43 UTC changes are screened on its validation slices too (none kept; its test slices are never
scored for a change).
"""
from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np

from geometry import pad_or_crop_center  # the project's own (real_anatomy.py puts the repo on the path)

CLASSES = ("background", "anterior", "posterior")
FOLDS = 3
# The 60 cases used: the first 60 by number of the 260 in the copy named above (its case 010 has no usable image).
CASES = (1, 3, 4, 6, 7, 8, 11, 14, 15, 17, 19, 20, 23, 24, 25, 26, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 44, 45,
         46, 48, 49, 50, 51, 52, 53, 56, 57, 58, 60, 64, 65, 67, 68, 70, 74, 75, 77, 83, 84, 87, 88, 89, 90, 91, 92, 93,
         94, 95, 96, 97)
PATIENTS = len(CASES)
SHAPE = (48, 64)
MIN_SHARE = 0.01
AFFINE = np.eye(4)  # 1 mm


def cases(root: Path) -> list:
    """[(name, image, label)] of the CASES under root, or a clear error saying what is missing."""
    root = Path(root).expanduser()
    files = [p for p in sorted(root.rglob("hippocampus_*.nii*")) if not p.name.startswith(".")]  # not macOS' "._"
    labels = {p.name.split(".nii")[0]: p for p in files if p.parent.name in ("labelsTr", "labels")}
    images = {re.sub(r"_0000$", "", p.name.split(".nii")[0]): p for p in files
              if p.parent.name in ("imagesTr", "images")}
    wanted = [f"hippocampus_{n:03d}" for n in CASES]
    missing = [name for name in wanted if name not in labels or name not in images]
    if missing:
        raise SystemExit(f"error: {root}: {len(missing)} of the {PATIENTS} hippocampus cases lack an image (imagesTr/ "
                         f"or images/) or labels (labelsTr/ or labels/), e.g. {missing[0]}; expected the decathlon's "
                         "Task04_Hippocampus training cases")
    return [(name, images[name], labels[name]) for name in wanted]


def patient_slices(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (48, 64, n) float32, labels (48, 64, n) uint8): the axial slices that hold hippocampus."""
    image, label = nib.as_closest_canonical(nib.load(image_path)), nib.as_closest_canonical(nib.load(label_path))
    img, lab = np.asarray(image.dataobj, np.float32), np.rint(np.asarray(label.dataobj)).astype(np.uint8)
    if img.shape != lab.shape or img.ndim != 3:
        raise SystemExit(f"error: {image_path}: image {img.shape} and labels {lab.shape} ({label_path}); "
                         "expected one 3D grid")
    if lab.max() >= len(CLASSES):
        raise SystemExit(f"error: {label_path}: label {lab.max()}; expected 0..{len(CLASSES) - 1}")
    img, lab = pad_or_crop_center(img, SHAPE, 0), pad_or_crop_center(lab, SHAPE, 0)
    keep = (lab > 0).mean(axis=(0, 1)) >= MIN_SHARE
    return img[..., keep], lab[..., keep]


def fold_splits(names: list, fold: int) -> dict:
    """{patient: split} of one fold: a third of them test, the next sixth validates, the rest train."""
    n = len(names)
    test = {names[(n // FOLDS * fold + i) % n] for i in range(n // FOLDS)}
    validate = {names[(n // FOLDS * (fold + 1) + i) % n] for i in range(n // (2 * FOLDS))}
    return {p: "test" if p in test else "validate" if p in validate else "train" for p in names}


def load(root: Path) -> dict:
    """{patient name: (images, labels)} of the CASES, in name order."""
    return {name: patient_slices(image, label) for name, image, label in cases(root)}
