"""Accuracy on real anatomy: this project against a MONAI U-Net and the seed's plain Keras U-Net, same data, seeds and epochs.

    python benchmarks/real_anatomy.py                          # all systems, both regimes, seeds 42-44 (make real-anatomy)
    python benchmarks/real_anatomy.py --systems ours --label zscore --ours-flags="--norm zscore"   # one ablation row
    python benchmarks/real_anatomy.py --systems ours --label before --repo ../old-checkout   # another checkout's code

Data: the MNI152 2009a T1 template and its grey- and white-matter maps, shipped inside the nilearn wheel
(fetched once with `pip download`; nothing else is fetched). Labels: 0 outside the brain, 1 CSF and other
tissue inside the brain mask, 2 grey matter, 3 white matter (the larger tissue probability where it is at
least 0.5). Axial slices, 2 mm in-plane (area-averaged from 1 mm), written in the HipMRI layout. Each block of
6 consecutive slices is one "case"; blocks go to train, validate or test, and 3 slices are dropped between
blocks of different splits, so no test slice is a neighbour or a copy of a training slice. Each case gets its
own scanner-like intensity (gain, offset, smooth bias field, Rician noise, a few hot pixels in some slices),
so normalisation choices are tested on intensities that differ between scans; `--variation none` keeps the
template's own.

Regimes: "full" (every training slice) and "few" (20 training slices spread over the training cases; the
same validation and test slices), with the same number of optimiser steps in both. Every system gets the
same epochs, batch size, base filters and input size; the peers get the seed's preprocessing (per-slice
min-max, resized to the input size); the project gets its own defaults plus --ours-flags. Scores are
evaluate.py's per-slice mean foreground Dice on the test slices at their original size.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))

import env  # noqa: E402  (benchmarks/peers/env.py)
import evaluate  # noqa: E402
from atomic_io import atomic_write_json  # noqa: E402

NILEARN = "nilearn==0.14.1"
TEMPLATE = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
CLASSES = ("background", "csf", "grey_matter", "white_matter")
BLOCK, GAP, PATTERN = 6, 3, ("train", "test", "train", "validate", "train", "test", "train")
FEW = 20


# ----------------------------------------------------------------------------- data

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


def write_data(work: Path, variation: str) -> dict:
    """Write the HipMRI-layout data sets "full" and "few" (once) and return their folders."""
    folders = {r: work / f"data-{variation}-{r}" for r in ("full", "few")}
    if all((f / "done.json").exists() for f in folders.values()):
        return folders
    t = template(work)
    image, labels = downsample(t["t1"], False), downsample(labels_1mm(t), True)
    affine = np.diag([2.0, 2.0, 1.0, 1.0])
    plan = split_plan(labels)
    train = [(case, z) for split, case, zs in plan if split == "train" for z in zs]
    few = {train[round(i)] for i in np.linspace(0, len(train) - 1, FEW)}
    for regime, folder in folders.items():
        for split, case, zs in plan:
            rng = np.random.default_rng([case, 7])
            for z in zs:
                if regime == "few" and split == "train" and (case, z) not in few:
                    continue
                img = image[..., z] if variation == "none" else scanner(image[..., z], rng, hot=rng.random() < 0.3)
                name = f"{case:03d}_week_0_slice_{z}.nii.gz"
                for sub, arr in ((f"keras_slices_{split}", img), (f"keras_slices_seg_{split}", labels[..., z])):
                    (folder / sub).mkdir(parents=True, exist_ok=True)
                    prefix = "case_" if "seg" not in sub else "seg_"
                    nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), folder / sub / (prefix + name))
        counts = {s: sum(1 for _ in (folder / f"keras_slices_{s}").iterdir()) for s in ("train", "validate", "test")}
        atomic_write_json(folder / "done.json", {"variation": variation, "counts": counts})
    return folders


# ----------------------------------------------------------------------------- systems

def run_ours(data: Path, out: Path, a, seed: int, epochs: int) -> dict:
    """train.py with the project's defaults (+ --ours-flags), then predict.py on the test split."""
    flags = ["-d", str(data), "-o", str(out), "-e", str(epochs), "-f", str(a.base_filters), "--size", a.size,
             "-b", str(a.batch_size), "--seed", str(seed), "--class-names", ",".join(CLASSES), "-q", *a.ours_flags.split()]
    repo = a.repo.resolve()
    if not (out / "state.json").exists() or json.loads((out / "state.json").read_text())["epoch"] + 1 < epochs:
        subprocess.run([sys.executable, str(repo / "train.py"), *flags, "--resume"], check=True, cwd=repo,
                       stdout=subprocess.DEVNULL)
    if not (out / "eval-test" / "metrics.json").exists():
        subprocess.run([sys.executable, str(repo / "predict.py"), "--run", str(out), "--figures", "0", "-q"],
                       check=True, cwd=repo, stdout=subprocess.DEVNULL)
    metrics = json.loads((out / "eval-test" / "metrics.json").read_text())
    history = json.loads((out / "state.json").read_text())["history"]
    return {"test_dice": metrics["mean_foreground_dice"],
            "per_label": {k: v["mean"] for k, v in metrics["dice_per_slice"].items()},
            "val_dice": [r["val_dice"] for r in history], "seconds": sum(r["seconds"] for r in history)}


def peer_arrays(data: Path, split: str, size) -> tuple:
    """The seed's preprocessing for a peer: per-slice min-max to [0, 1], resized; labels nearest (centred)."""
    import dataset
    from geometry import resample_slices
    from preprocess import read_slice, resize_labels
    refs = dataset.list_split(data, split)
    images, labels, truth = [], [], []
    for r in refs:
        img, lab = read_slice(r.image), read_slice(r.mask).astype(np.uint8)
        lo, hi = img.min(), img.max()
        images.append(resample_slices(((img - lo) / max(hi - lo, 1e-6))[None], size=size)[0])
        labels.append(resize_labels(lab, size))
        truth.append(lab)
    return refs, np.stack(images).astype(np.float32), np.stack(labels), truth


def run_peer(name: str, data: Path, out: Path, a, seed: int, epochs: int) -> dict:
    """One peer script on the data's npz form; its test labels go back to each slice's size and are scored here."""
    size = tuple(int(s) for s in a.size.split("x"))
    npz = out.parent / f"npz-{data.name}"
    if not (npz / "test.npz").exists():
        npz.mkdir(parents=True, exist_ok=True)
        for split in ("train", "validate", "test"):
            _, images, labels, _ = peer_arrays(data, split, size)
            np.savez(npz / f"{split}.npz", images=images, labels=labels)
    result = out / "result.npz"
    if not result.exists():
        out.mkdir(parents=True, exist_ok=True)
        python = env.monai_python(a.peer_venv) if name == "monai" else env.keras_python()
        script = ROOT / "benchmarks" / "peers" / ("monai_unet.py" if name == "monai" else "keras_seed_unet.py")
        subprocess.run([str(python), str(script), "--data", str(npz), "--out", str(result), "--classes",
                        str(len(CLASSES)), "--epochs", str(epochs), "--batch-size", str(a.batch_size),
                        "--base-filters", str(a.base_filters), "--seed", str(seed)], check=True,
                       stdout=subprocess.DEVNULL)
    with np.load(result) as z:
        pred, val_dice, seconds = z["test_pred"], z["val_dice"].tolist(), float(z["seconds"])
    from preprocess import resize_labels
    refs, _, _, truth = peer_arrays(data, "test", size)
    preds = [resize_labels(p, t.shape) for p, t in zip(pred, truth)]
    summary, _ = evaluate.score_split(refs, truth, preds, list(range(1, len(CLASSES))), CLASSES[1:])
    return {"test_dice": summary["mean_foreground_dice"],
            "per_label": {k: v["mean"] for k, v in summary["dice_per_slice"].items()},
            "val_dice": val_dice, "seconds": seconds}


# ----------------------------------------------------------------------------- table

def worst_drop(val_dice: list) -> float:
    """Largest fall of validation Dice from one epoch to the next after the first quarter of the epochs."""
    v = val_dice[len(val_dice) // 4:]
    return max([0.0] + [a - b for a, b in zip(v, v[1:])])


def summary(results: list) -> dict:
    """Mean and std over seeds of the test Dice, its per-label means, the worst validation drop and the time."""
    dice = np.array([r["test_dice"] for r in results])
    return {"test_dice_mean": float(dice.mean()), "test_dice_std": float(dice.std()), "seeds": len(results),
            "per_label": {k: float(np.mean([r["per_label"][k] for r in results])) for k in results[0]["per_label"]},
            "worst_val_drop": float(max(worst_drop(r["val_dice"]) for r in results)),
            "seconds_mean": float(np.mean([r["seconds"] for r in results]))}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems", default="ours,monai,keras_seed", help="comma-separated: ours, monai, keras_seed")
    p.add_argument("--regimes", default="full,few", help="comma-separated: full, few")
    p.add_argument("--seeds", default="42,43,44", help="comma-separated seeds")
    p.add_argument("--epochs-full", type=int, default=25, help="epochs of the full regime")
    p.add_argument("--base-filters", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", default="96x112", help="network input ROWSxCOLS for every system (slices: 99x117)")
    p.add_argument("--variation", choices=["scanner", "none"], default="scanner", help="per-case intensity changes")
    p.add_argument("--ours-flags", default="", help="extra train.py flags for this project (an ablation)")
    p.add_argument("--label", default="ours", help="name of this project's row (e.g. the ablation)")
    p.add_argument("--repo", type=Path, default=ROOT,
                   help="the checkout whose train.py and predict.py are 'ours' (e.g. a worktree of an older commit)")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "real", help="data and runs")
    p.add_argument("--peer-venv", type=Path, default=ROOT / "benchmarks" / "work" / "peer-venv",
                   help="the MONAI peer's virtual environment (made on first use)")
    p.add_argument("-o", "--out", type=Path, default=ROOT / "benchmarks" / "real_anatomy.json",
                   help="JSON results (rows are added or replaced by system, label, variation and regime)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    folders = write_data(a.work, a.variation)
    n_train = json.loads((folders["full"] / "done.json").read_text())["counts"]["train"]
    epochs = {"full": a.epochs_full, "few": round(a.epochs_full * n_train / FEW)}  # the same optimiser steps
    rows = []
    for regime in a.regimes.split(","):
        for system in a.systems.split(","):
            name = a.label if system == "ours" else system
            results = []
            for seed in map(int, a.seeds.split(",")):
                run = a.work / "runs" / f"{a.variation}-{regime}" / name / f"seed{seed}"
                print(f"{regime} {name} seed {seed}", flush=True)
                if system == "ours":
                    results.append(run_ours(folders[regime], run, a, seed, epochs[regime]))
                else:
                    results.append(run_peer(system, folders[regime], run, a, seed, epochs[regime]))
                print(f"  test mean foreground Dice {results[-1]['test_dice']:.4f} ({results[-1]['seconds']:.0f} s)",
                      flush=True)
            row = {"system": name, "variation": a.variation, "regime": regime, "epochs": epochs[regime],
                   "flags": a.ours_flags if system == "ours" else "", **summary(results), "runs": results}
            rows = json.loads(a.out.read_text())["rows"] if a.out.exists() else []  # another run may have written
            rows = [r for r in rows if (r["system"], r["variation"], r["regime"]) != (name, a.variation, regime)]
            rows.append(row)
            atomic_write_json(a.out, {"classes": CLASSES, "size": a.size, "base_filters": a.base_filters,
                                      "batch_size": a.batch_size, "rows": rows})
    print(f"\n| system | variation | regime | epochs | test mean fg Dice (mean ± std, {len(a.seeds.split(','))} seeds) "
          "| csf | grey | white | worst val drop | s/run |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        labels = " | ".join(f"{v:.3f}" for v in r["per_label"].values())
        print(f"| {r['system']} | {r['variation']} | {r['regime']} | {r['epochs']} | {r['test_dice_mean']:.4f} ± "
              f"{r['test_dice_std']:.4f} | {labels} | {r['worst_val_drop']:.3f} | {r['seconds_mean']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
