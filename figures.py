"""Every figure: training curves, comparison panels, the Dice box plot, the phantom preview, a scan in three planes.

Slices (`view`) are drawn as stored, not reoriented: array axis 0 across (index 0 at the viewer's left), axis 1
up (its last index at the top). For slices in RAS, as the phantom's (axis 0 toward the patient's right, axis 1
toward anterior), that is the neurological convention: the patient's right on the viewer's right, anterior up;
slices stored with axis 0 toward the patient's left would come out radiological. The three-plane view turns the
scan to RAS first, and so is always neurological. Labels keep one colour everywhere (LABEL_COLOURS).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from nibabel import orientations as nio  # noqa: E402

from atomic_io import atomic_path  # noqa: E402

# One RGBA colour per label (alpha for overlays on the image; background clear): background, body, bone,
# bladder, rectum, prostate; labels beyond these take tab10's colours.
LABEL_COLOURS = ((0, 0, 0, 0), (0.2, 0.8, 0.2, 0.15), (1, 0.85, 0, 0.5), (0.1, 0.5, 1, 0.6),
                 (1, 0.45, 0, 0.7), (0.95, 0.1, 0.3, 0.7))


def save_figure(fig, path) -> None:
    """Save a figure as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def label_colours(n: int) -> np.ndarray:
    """RGBA for labels 0..n-1: the fixed palette, then tab10 for extra labels."""
    extra = [(*plt.get_cmap("tab10")(i % 10)[:3], 0.6) for i in range(max(0, n - len(LABEL_COLOURS)))]
    return np.concatenate([np.array(LABEL_COLOURS), np.array(extra).reshape(-1, 4)])[:n]


def view(a: np.ndarray) -> np.ndarray:
    """A slice for imshow, not reoriented: array axis 0 across (index 0 at the left), axis 1 up (last index at the
    top). RAS slices (the phantom's) come out in the neurological convention: the patient's right on the viewer's
    right, anterior up."""
    return np.flipud(np.swapaxes(a, 0, 1))


def save_comparison_figure(path, image, pred, colours, names, title, truth=None) -> None:
    """Input, ground truth, prediction and prediction over the input, labels in fixed colours with a legend."""
    opaque = colours.copy()
    opaque[:, 3], opaque[0] = 1, (0, 0, 0, 1)
    lo, hi = np.percentile(image, [0.5, 99.5])
    # (title, label map or None, drawn over the image?)
    panels = [("input", None, True), *([("ground truth", truth, False)] if truth is not None else []),
              ("prediction", pred, False), ("prediction over input", pred, True)]
    rows, cols = (2, 2) if len(panels) == 4 else (1, len(panels))
    height = 4.3 * image.shape[1] / image.shape[0] + 0.4  # of one panel: the slice is shown transposed
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, height * rows + 0.9), squeeze=False,
                             layout="constrained")
    for ax, (name, labels, over_image) in zip(axes.flat, panels):
        if over_image:
            ax.imshow(view(image), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        if labels is not None:
            ax.imshow(view((colours if over_image else opaque)[labels]), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    handles = [Patch(color=colours[i][:3], label=f"{i} {n}") for i, n in enumerate(names, start=1)]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def save_dice_boxplot(path, arrays: dict, names, colours, title) -> None:
    """Box plot of the per-slice Dice of each label, with the per-volume Dice as black dots."""
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 4))
    per_slice = [c[np.isfinite(c)] for c in arrays["dice"].T]
    boxes = ax.boxplot([c if len(c) else [np.nan] for c in per_slice], patch_artist=True, widths=0.5,
                       medianprops={"color": "black"})
    for box, colour in zip(boxes["boxes"], colours[1:]):
        box.set(facecolor=(*colour[:3], 0.5))
    for i, col in enumerate(arrays["volume_dice"].T, start=1):
        col = col[np.isfinite(col)]
        ax.plot(np.full(len(col), i + 0.3), col, "kD", markersize=4, label="per volume" if i == 1 else None)
    ax.set_xticks(range(1, len(names) + 1), [f"{n}\nn = {len(c)}" for n, c in zip(names, per_slice)])
    ax.set(ylabel="Dice", ylim=(-0.02, 1.02), title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def save_training_plots(history: list, out: Path) -> None:
    """Loss, accuracy and Dice against epochs for training and validation, as in the original README."""
    epochs = [h["epoch"] for h in history]
    for key, title in (("loss", "Loss"), ("accuracy", "Accuracy"), ("dice", "Mean foreground Dice")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(epochs, [h[key] for h in history], "o-", label="training")
        ax.plot(epochs, [h["val_" + key] for h in history], "o-", label="validation")
        ax.set(xlabel="epoch", ylabel=key, title=f"{title} vs epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        save_figure(fig, out / f"training_validation_{key}.png")


def save_phantom_preview(path, slices, names, title) -> None:
    """Slices (title, image, labels) drawn by `view` (the phantom's RAS slices: patient's right on the viewer's
    right, anterior up - neurological convention), above the same slices with their labels overlaid."""
    colours = label_colours(len(names))
    cols, rows = 3, -(-len(slices) // 3)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(4.4 * cols, 4.6 * rows), squeeze=False)
    for i, (name, img, mask) in enumerate(slices):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        lo, hi = np.percentile(img, [0.5, 99.5])
        for ax in (top, bottom):
            ax.imshow(view(img), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.axis("off")
        bottom.imshow(view(colours[mask.astype(int)]), interpolation="nearest")
        top.set_title(f"{name}\n{img.shape[0]}x{img.shape[1]}, intensities {img.min():.0f}..{img.max():.0f}",
                      fontsize=8)
    handles = [Patch(color=colours[i][:3], label=f"{i} {n}") for i, n in enumerate(names) if i]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def save_three_planes(path, image, labels, affine, colours, names, title) -> None:
    """Axial, coronal and sagittal slices through the middle of the mask's foreground, labels over the scan.

    With a known affine the scan is turned to RAS first and drawn in the neurological convention: axial with the
    patient's right on the viewer's right and anterior up, coronal with the right on the right and superior up,
    sagittal with anterior on the right and superior up. Without one, the array's own axes: axial and coronal
    with axis 0 across, sagittal with axis 1 across, the first index at the left and bottom. Pixels keep their
    physical aspect.
    """
    zooms = np.ones(3)
    if affine is not None:
        ornt = nio.io_orientation(affine)  # file axes -> R, A, S
        image, labels = nio.apply_orientation(image, ornt), nio.apply_orientation(labels, ornt)
        zooms = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)[np.argsort(ornt[:, 0])]
    fg = np.argwhere(labels > 0)
    centre = fg.mean(axis=0).round().astype(int) if len(fg) else np.array(labels.shape) // 2
    lo, hi = np.percentile(image, [0.5, 99.5])
    planes = [("axial", np.s_[:, :, centre[2]], (0, 1)), ("coronal", np.s_[:, centre[1], :], (0, 2)),
              ("sagittal", np.s_[centre[0], :, :], (1, 2))]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8), layout="constrained")
    for ax, (name, where, (h, v)) in zip(axes, planes):
        aspect = zooms[v] / zooms[h]
        ax.imshow(image[where].T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect, interpolation="nearest")
        ax.imshow(colours[labels[where]].transpose(1, 0, 2), origin="lower", aspect=aspect, interpolation="nearest")
        ax.set_title(f"{name} (voxel {int(centre[3 - h - v])})" if affine is not None else name, fontsize=9)
        ax.axis("off")
    handles = [Patch(color=colours[i][:3], label=f"{i} {n}") for i, n in enumerate(names, start=1)]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
