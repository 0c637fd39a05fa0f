"""The BraTS data set of real_anatomy.py: six glioma patients, patient-disjoint folds, written in the HipMRI layout.

The six BraTS 2013 patients that the deepmedic repository ships as its example data
(github.com/deepmedic/deepmedic, examples/dataForExamples/brats2015TrainingData/{train,validation,test}/
brats_2013_pat000N_1/): FLAIR (z-scored inside the brain by deepmedic), brain mask and expert tumour labels
(OTMultiClass), 240x240x155 at 1 mm. Licence CC BY-NC-SA 3.0: this repo never holds them; --brats-dir points
to a folder that does (a clone of deepmedic, or any folder with the brats_2013_pat* subfolders), e.g.

    git clone --depth 1 https://github.com/deepmedic/deepmedic ~/deepmedic
    python benchmarks/real_anatomy.py --dataset brats --brats-dir ~/deepmedic

Each volume is area-averaged to 3 mm isotropic (80x80 axial slices; labels by one-hot average and argmax).
Labels: 0 outside the brain, 1 brain, 2 oedema (BraTS label 2), 3 tumour core (BraTS 1, 3 and 4). Axial
slices where the brain covers at least 2% are kept. Fold k (0..2) tests two patients, validates on a third and
trains on the other three, so every patient is tested once and no patient is in two splits of a fold.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

CLASSES = ("background", "brain", "oedema", "tumour_core")
FACTOR = 3  # 1 mm -> 3 mm
FOLDS = 3
AFFINE = np.diag([float(FACTOR)] * 3 + [1.0])  # 3 mm slices


def patients(root: Path) -> list:
    """The patient folders under root (sorted by name), or a clear error saying what is missing."""
    found = sorted({p.parent for p in Path(root).expanduser().rglob("OTMultiClass.nii*")
                    if p.parent.name.startswith("brats_")}, key=lambda p: p.name)
    if len(found) < 2 * FOLDS:
        raise SystemExit(f"error: {root}: found {len(found)} BraTS patient folders (brats_*/OTMultiClass.nii.gz), "
                         f"expected {2 * FOLDS}; clone github.com/deepmedic/deepmedic and pass its folder")
    return found


def _file(folder: Path, stem: str) -> Path:
    hits = sorted(folder.glob(f"{stem}*.nii*"))
    if not hits:
        raise SystemExit(f"error: {folder}: no {stem}*.nii[.gz] (a deepmedic BraTS patient folder has "
                         "Flair_subtrMeanDivStd, brainmask and OTMultiClass)")
    return hits[0]


def _pool(volume: np.ndarray) -> np.ndarray:
    """Mean over FACTOR^3 blocks (the edges that do not fill a block are dropped)."""
    x, y, z = (s // FACTOR for s in volume.shape)
    v = volume[:x * FACTOR, :y * FACTOR, :z * FACTOR]
    return v.reshape(x, FACTOR, y, FACTOR, z, FACTOR).mean(axis=(1, 3, 5))


def patient_slices(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (80, 80, n) float32, labels (80, 80, n) uint8) of one patient's axial slices that hold brain."""
    flair = np.asarray(nib.load(_file(folder, "Flair")).dataobj, np.float32)
    brain = np.asarray(nib.load(_file(folder, "brainmask")).dataobj) > 0.5
    tumour = np.rint(np.asarray(nib.load(_file(folder, "OTMultiClass")).dataobj)).astype(np.uint8)
    if not flair.shape == brain.shape == tumour.shape:
        raise SystemExit(f"error: {folder}: FLAIR {flair.shape}, brain mask {brain.shape} and labels "
                         f"{tumour.shape} differ; expected one grid")
    labels = brain.astype(np.uint8)
    labels[tumour == 2] = 2
    labels[np.isin(tumour, (1, 3, 4))] = 3
    image = _pool(flair)
    labels = np.argmax([_pool((labels == c).astype(np.float32)) for c in range(len(CLASSES))], axis=0)
    keep = (labels > 0).mean(axis=(0, 1)) >= 0.02
    return image[..., keep].astype(np.float32), labels[..., keep].astype(np.uint8)


def fold_splits(names: list, fold: int) -> dict:
    """{patient name: split} of one fold: two test patients, the next one validates, the rest train."""
    n = len(names)
    test = {names[(2 * fold) % n], names[(2 * fold + 1) % n]}
    validate = {names[(2 * fold + 2) % n]}
    return {p: "test" if p in test else "validate" if p in validate else "train" for p in names}


def load(root: Path) -> dict:
    """{patient name: (images, labels)} of every patient, in name order."""
    return {p.name: patient_slices(p) for p in patients(root)}
