"""What the two peers share: their command line, reading the .npz splits, the Dice they track, and the result file.

Plain NumPy, so that both environments (the project's venv and the MONAI one) can import it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def parse_args(description: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", type=Path, required=True, help="folder with train/validate/test.npz")
    p.add_argument("--out", type=Path, required=True, help="result .npz")
    p.add_argument("--classes", type=int, required=True, help="number of labels, background included")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--base-filters", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--lr", type=float, default=1e-3)
    return p.parse_args(argv)


def load_split(folder: Path, name: str, classes: int):
    """(images, labels) of one split, or exit with a message naming the file and what is wrong."""
    path = folder / f"{name}.npz"
    if not path.is_file():
        sys.exit(f"error: {path}: no such file")
    with np.load(path) as z:
        missing = {"images", "labels"} - set(z.files)
        if missing:
            sys.exit(f"error: {path}: missing array(s) {sorted(missing)} (has {z.files})")
        images, labels = z["images"], z["labels"]
    if images.ndim != 3 or images.shape != labels.shape:
        sys.exit(f"error: {path}: images {images.shape} and labels {labels.shape} must both be (n, H, W)")
    if images.shape[1] % 16 or images.shape[2] % 16:
        sys.exit(f"error: {path}: H and W ({images.shape[1]}, {images.shape[2]}) must divide by 16")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.max() >= classes):
        sys.exit(f"error: {path}: labels must be integers in 0..{classes - 1} (dtype {labels.dtype})")
    return images.astype(np.float32), labels.astype(np.uint8)


def mean_foreground_dice(truth: np.ndarray, pred: np.ndarray, classes: int) -> float:
    """Mean over foreground classes of the per-image Dice averaged over images.

    An image where a class is in neither truth nor prediction says nothing about it and is skipped.
    """
    per_class = []
    for c in range(1, classes):
        t, p = truth == c, pred == c
        total = t.sum(axis=(1, 2)) + p.sum(axis=(1, 2))
        inter = np.logical_and(t, p).sum(axis=(1, 2))
        if total.any():
            per_class.append(np.mean(2.0 * inter[total > 0] / total[total > 0]))
    return float(np.mean(per_class)) if per_class else float("nan")


def save_result(path: Path, **arrays) -> None:
    """np.savez to a temporary file beside `path`, then rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a plain open keeps the umask's permissions
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
