"""The MNI152 data set of real_anatomy.py: one template brain cut into blocks of slices, written in the HipMRI layout.

The MNI152 2009a T1 template and its grey- and white-matter maps, shipped inside the nilearn wheel (fetched
once with `pip download`; nothing else is fetched). Labels: 0 outside the brain, 1 CSF and other tissue inside
the brain mask, 2 grey matter, 3 white matter (the larger tissue probability where it is at least 0.5). Axial
slices, 2 mm in-plane (area-averaged from 1 mm). Each block of 6 consecutive slices is one "case"; blocks go to
train, validate or test, and 3 slices are dropped between blocks of different splits, so no test slice is a
neighbour or a copy of a training slice. One subject: this measures interpolation within one brain, not
generalisation across patients (brats.py does that). Variation "none" keeps the template's intensities (the
main rows); "scanner" gives each case its own gain, offset, smooth bias field, Rician noise and, in about 30%
of the slices, hot pixels (the robustness rows).
"""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np

NILEARN = "nilearn==0.14.1"
TEMPLATE = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
CLASSES = ("background", "csf", "grey_matter", "white_matter")
BLOCK, GAP, PATTERN = 6, 3, ("train", "test", "train", "validate", "train", "test", "train")


def template_file(work: Path, key: str) -> Path:
    """One of the template's files ("t1", "gm" or "wm"), taken from the nilearn wheel (downloaded once)."""
    folder = work / "mni152"
    path = folder / Path(TEMPLATE.format(key)).name
    if not path.exists():
        wheels = work / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels), NILEARN],
                       check=True)
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(next(wheels.glob("nilearn-*.whl"))) as z:
            for k in ("t1", "gm", "wm"):
                (folder / Path(TEMPLATE.format(k)).name).write_bytes(z.read(TEMPLATE.format(k)))
    return path


def template(work: Path) -> dict:
    """The T1 template and the grey/white-matter maps as float arrays (1 mm, RAS)."""
    return {k: np.asarray(nib.load(template_file(work, k)).dataobj, np.float32) for k in ("t1", "gm", "wm")}


def labels_1mm(t: dict) -> np.ndarray:
    """0 outside the brain mask, 1 other tissue inside it, 2 grey matter, 3 white matter."""
    gm, wm = t["gm"] / 255, t["wm"] / 255
    labels = (t["t1"] > 0).astype(np.uint8)
    labels[(gm >= 0.5) & (gm >= wm)] = 2
    labels[(wm >= 0.5) & (wm > gm)] = 3
    return labels


def downsample(volume: np.ndarray, labels: bool) -> np.ndarray:
    """Halve each in-plane axis (x, y) of a 1 mm volume: area average, or one-hot area average + argmax."""
    x, y, z = volume.shape
    size = (-(-y // 2), -(-x // 2))  # cv2: (cols, rows)
    if not labels:
        return np.stack([cv2.resize(volume[..., k], size, interpolation=cv2.INTER_AREA) for k in range(z)], -1)
    onehot = [np.stack([cv2.resize((volume[..., k] == c).astype(np.float32), size, interpolation=cv2.INTER_AREA)
                        for k in range(z)], -1) for c in range(len(CLASSES))]
    return np.argmax(onehot, axis=0).astype(np.uint8)


def scanner(image: np.ndarray, rng, hot: bool) -> np.ndarray:
    """One case's acquisition: gain and offset, a smooth multiplicative bias field, Rician noise, hot pixels."""
    rows, cols = image.shape
    u, v = np.meshgrid(np.linspace(-1, 1, rows), np.linspace(-1, 1, cols), indexing="ij")
    a = rng.normal(0, 0.15, 3)
    bias = np.exp(a[0] * u + a[1] * v + a[2] * u * v).astype(np.float32)
    signal = image * bias * rng.uniform(0.5, 2.5)
    sigma = rng.uniform(0.02, 0.05) * float(signal.max())
    out = np.hypot(signal + sigma * rng.standard_normal(image.shape), sigma * rng.standard_normal(image.shape))
    out += rng.uniform(0, 200)
    if hot:  # isolated spikes, as from a bad k-space sample or an implant
        idx = rng.integers(0, image.size, 3)
        out.flat[idx] = out.max() * rng.uniform(3, 8, 3)
    return out.astype(np.float32)


def split_plan(labels: np.ndarray) -> list:
    """(split, case, [z, ...]) blocks of consecutive brain slices, with GAP slices dropped between splits."""
    zs = [z for z in range(labels.shape[2]) if (labels[..., z] > 0).mean() > 0.02]
    blocks, z, k = [], zs[0], 0
    while z + BLOCK - 1 <= zs[-1]:
        split = PATTERN[k % len(PATTERN)]
        if blocks and blocks[-1][0] != split:
            z += GAP
        blocks.append((split, k + 1, list(range(z, z + BLOCK))))
        z, k = z + BLOCK, k + 1
    return [b for b in blocks if b[2][-1] <= zs[-1]]


def write_set(work: Path, out: Path, variation: str, few: int | None, write_pair) -> dict:
    """Write the HipMRI folder (every training slice, or `few` spread over them); {split: slice count}."""
    t = template(work)
    image, labels = downsample(t["t1"], False), downsample(labels_1mm(t), True)
    affine = np.diag([2.0, 2.0, 1.0, 1.0])
    plan = split_plan(labels)
    train = [(case, z) for split, case, zs in plan if split == "train" for z in zs]
    chosen = set(train) if few is None else {train[round(i)] for i in np.linspace(0, len(train) - 1, few)}
    counts = {"train": 0, "validate": 0, "test": 0}
    for split, case, zs in plan:
        rng = np.random.default_rng([case, 7])
        for z in zs:
            if split == "train" and (case, z) not in chosen:
                continue
            img = image[..., z] if variation == "none" else scanner(image[..., z], rng, hot=rng.random() < 0.3)
            write_pair(out, split, f"{case:03d}_week_0_slice_{z}.nii.gz", img, labels[..., z], affine)
            counts[split] += 1
    return counts
