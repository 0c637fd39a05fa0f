"""Accuracy on real anatomy: this project against a MONAI U-Net and the seed's Keras U-Net, same data, steps and sizes.

    python benchmarks/real_anatomy.py --brats-dir ~/deepmedic --hippocampus-dir ~/hippocampus   # make real-anatomy
    python benchmarks/real_anatomy.py --datasets brats --brats-dir ~/deepmedic --systems ours \\
        --label "instance norm" --ours-flags="--norm-layer instance" --no-test    # an ablation: validation only
    python benchmarks/real_anatomy.py --datasets mni --variation scanner   # the robustness rows (corrupted MNI)
    python benchmarks/real_anatomy.py --datasets brats --brats-dir ~/deepmedic --regimes few --epochs-full 9 \\
        --work benchmarks/work/real-short -o short.json   # "short": 20 slices for 58 epochs (174 steps)

Data sets (each module's docstring says exactly how it is made):
  brats  six glioma patients (brats.py), FLAIR at 3 mm, 80x80; 3 patient-disjoint folds (3 train / 1 validate /
         2 test patients); read from --brats-dir (CC BY-NC-SA: never copied into the repo)
  mni    the MNI152 template (mni.py), 2 mm, 99x117; one subject cut into blocks: one fold
  hippocampus  60 patients of the decathlon's Task04 (hippocampus.py), 1 mm, 48x64; 3 patient-disjoint folds
         (30 train / 10 validate / 20 test patients); read from --hippocampus-dir; held out until
         2026-12-05 13:40 UTC, validation screens since (none kept)
Regimes: "full" (every training slice) and "few" (20 training slices spread over the training cases; the same
validation and test slices), with the same number of optimiser steps in both.

Every system gets the same input size, epochs, batch size and base filters, hence the same optimiser steps,
and each is run at its own documented practice: the project with its defaults (+ --ours-flags); MONAI with its
own z-score normalisation, flips, rotations, zooms and intensity transforms, DiceCE and Adam (peers/README.md);
the seed's Keras U-Net with the seed's per-slice min-max. Each run keeps its best epoch by validation Dice.
Every run is scored on its validation slices; decisions (keep a change, a rate) read only those columns.
The test slices are scored too unless --no-test: do that once per final configuration. Scores are
evaluate.py's per-slice mean foreground Dice at the slices' own size; rows give mean ± std over folds x seeds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))

import brats  # noqa: E402
import env  # noqa: E402  (benchmarks/peers/env.py)
import evaluate  # noqa: E402
import hippocampus  # noqa: E402
import mni  # noqa: E402
from atomic_io import atomic_write_json  # noqa: E402

FEW = 20
PEER_RUNS = {"monai": "monai-zscore", "keras_seed": "keras_seed"}  # run folders (MONAI's practice changed)
DATASETS = {  # classes, folds, network input, epochs of the full regime
    "brats": {"classes": brats.CLASSES, "folds": brats.FOLDS, "size": "80x80", "epochs": 20},
    "mni": {"classes": mni.CLASSES, "folds": 1, "size": "96x112", "epochs": 25},
    "hippocampus": {"classes": hippocampus.CLASSES, "folds": hippocampus.FOLDS, "size": "48x64", "epochs": 5},
}
SOURCES = {"brats": (brats, "brats_dir"), "hippocampus": (hippocampus, "hippocampus_dir")}  # read from a folder


# ----------------------------------------------------------------------------- data

def write_pair(out: Path, split: str, name: str, image: np.ndarray, labels: np.ndarray, affine) -> None:
    """One slice and its mask in the HipMRI layout."""
    for sub, prefix, arr in ((f"keras_slices_{split}", "case_", image), (f"keras_slices_seg_{split}", "seg_", labels)):
        (out / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), out / sub / (prefix + name))


def write_fold(module, root: Path, out: Path, fold: int, few: int | None) -> dict:
    """One fold of a patient data set in the HipMRI layout (every training slice, or `few` spread over them);
    {split: slice count}. Case numbers follow the patients' order, so a case is one patient in every fold."""
    data = module.load(root)
    names = list(data)
    splits = module.fold_splits(names, fold)
    train = [(name, z) for name in names if splits[name] == "train" for z in range(data[name][0].shape[2])]
    chosen = set(train) if few is None else {train[round(i)] for i in np.linspace(0, len(train) - 1, few)}
    counts = {"train": 0, "validate": 0, "test": 0}
    for case, name in enumerate(names, start=1):
        images, labels = data[name]
        for z in range(images.shape[2]):
            split = splits[name]
            if split == "train" and (name, z) not in chosen:
                continue
            write_pair(out, split, f"{case:03d}_week_0_slice_{z}.nii.gz", images[..., z], labels[..., z],
                       module.AFFINE)
            counts[split] += 1
    return counts


def data_folder(a, dataset: str, fold: int, regime: str) -> Path:
    """The HipMRI folder of one data set, fold and regime, written on first use."""
    variation = a.variation if dataset == "mni" else "none"
    out = a.work / f"data-{dataset}-{variation}-fold{fold}-{regime}"
    if dataset == "mni" and variation == "scanner":  # the folders of the earlier, one-data-set benchmark
        out = a.work / f"data-scanner-{regime}"
    if not (out / "done.json").exists():
        few = FEW if regime == "few" else None
        if dataset in SOURCES:
            module, key = SOURCES[dataset]
            if getattr(a, key) is None:
                flag = "--" + key.replace("_", "-")
                raise SystemExit(f"error: {flag} is needed for the {dataset} data set (see benchmarks/{dataset}.py)")
            counts = write_fold(module, getattr(a, key), out, fold, few)
        else:
            counts = mni.write_set(a.work, out, variation, few, write_pair)
        atomic_write_json(out / "done.json", {"dataset": dataset, "variation": variation, "fold": fold,
                                              "counts": counts})
    return out


def run_folder(work: Path, ds: str, variation: str, regime: str, fold: int, name: str, seed: int) -> Path:
    """Where one run lives (the corrupted MNI runs keep the folders of the earlier, one-data-set benchmark)."""
    tag = f"{variation}-{regime}" if ds == "mni" and variation == "scanner" else f"{ds}-{variation}-{regime}"
    return work / "runs" / tag / (f"fold{fold}" if ds in SOURCES else "") / name / f"seed{seed}"


# ----------------------------------------------------------------------------- systems

def check_length(out: Path, epochs: int, recorded: int) -> None:
    """Refuse a run folder that holds a run of another length (run folders do not name the epochs)."""
    if recorded != epochs:
        raise SystemExit(f"error: {out} holds a run of {recorded} epochs but this comparison asks for {epochs}; "
                         "give other epochs (--epochs-full) another --work folder")


def run_ours(data: Path, out: Path, a, seed: int, epochs: int, classes, size: str) -> dict:
    """train.py with the project's defaults (+ --ours-flags), then predict.py on validation (and test)."""
    flags = ["-d", str(data), "-o", str(out), "-e", str(epochs), "-f", str(a.base_filters), "--size", size,
             "-b", str(a.batch_size), "--seed", str(seed), "--class-names", ",".join(classes), "-q",
             *a.ours_flags.split()]
    if (out / "config.json").exists():
        check_length(out, epochs, json.loads((out / "config.json").read_text())["epochs"])
    if not (out / "state.json").exists() or json.loads((out / "state.json").read_text())["epoch"] + 1 < epochs:
        subprocess.run([sys.executable, str(a.repo / "train.py"), *flags, "--resume"], check=True, cwd=a.repo,
                       stdout=subprocess.DEVNULL)
    scores = {}
    for split in ("validate",) + (("test",) if a.test else ()):
        if not (out / f"eval-{split}" / "metrics.json").exists():
            subprocess.run([sys.executable, str(a.repo / "predict.py"), "--run", str(out), "--split", split,
                            "--figures", "0", "-q"], check=True, cwd=a.repo, stdout=subprocess.DEVNULL)
        metrics = json.loads((out / f"eval-{split}" / "metrics.json").read_text())
        scores[split] = (metrics["mean_foreground_dice"], {k: v["mean"] for k, v in metrics["dice_per_slice"].items()})
    history = json.loads((out / "state.json").read_text())["history"]
    return result(scores, [r["val_dice"] for r in history], sum(r["seconds"] for r in history))


def result(scores: dict, val_curve: list, seconds: float) -> dict:
    """One run's record: validation (and, when scored, test) Dice overall and per label, the curve, the time."""
    return {"val_dice": scores["validate"][0], "val_per_label": scores["validate"][1],
            "test_dice": scores["test"][0] if "test" in scores else None,
            "per_label": scores["test"][1] if "test" in scores else None,
            "val_curve": val_curve, "seconds": seconds}


def peer_arrays(data: Path, split: str, size, norm: str) -> tuple:
    """A peer's inputs: per-slice min-max to [0, 1] (the seed) or raw intensities (MONAI normalises itself),
    resized to the input size; labels nearest (centred). Also the slices' references and original labels."""
    import dataset
    from geometry import resample_slices
    from preprocess import read_slice, resize_labels
    refs = dataset.list_split(data, split)
    images, labels, truth = [], [], []
    for r in refs:
        img, lab = read_slice(r.image), read_slice(r.mask).astype(np.uint8)
        if norm == "minmax":
            img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
        images.append(resample_slices(img[None], size=size)[0])
        labels.append(resize_labels(lab, size))
        truth.append(lab)
    return refs, np.stack(images).astype(np.float32), np.stack(labels), truth


def run_peer(name: str, data: Path, out: Path, a, seed: int, epochs: int, classes, size: str) -> dict:
    """One peer script on the data's npz form; its labels go back to each slice's size and are scored here."""
    shape = tuple(int(s) for s in size.split("x"))
    norm = "raw" if name == "monai" else "minmax"
    npz = out.parents[1] / f"npz-{norm}"
    if not (npz / "test.npz").exists():
        npz.mkdir(parents=True, exist_ok=True)
        for split in ("train", "validate", "test"):
            _, images, labels, _ = peer_arrays(data, split, shape, norm)
            np.savez(npz / f"{split}.npz", images=images, labels=labels)
    path = out / "result.npz"
    if path.exists():
        with np.load(path) as z:
            stale = "val_pred" not in z.files  # from before validation was scored
            check_length(out, epochs, len(z["val_dice"]))
        if stale:
            path.unlink()
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        python = env.monai_python(a.peer_venv) if name == "monai" else env.keras_python()
        script = ROOT / "benchmarks" / "peers" / ("monai_unet.py" if name == "monai" else "keras_seed_unet.py")
        subprocess.run([str(python), str(script), "--data", str(npz), "--out", str(path), "--classes",
                        str(len(classes)), "--epochs", str(epochs), "--batch-size", str(a.batch_size),
                        "--base-filters", str(a.base_filters), "--seed", str(seed)], check=True,
                       stdout=subprocess.DEVNULL)
    from preprocess import resize_labels
    scores = {}
    with np.load(path) as z:
        curve, seconds = z["val_dice"].tolist(), float(z["seconds"])
        preds = {"validate": z["val_pred"], "test": z["test_pred"]}
    for split in ("validate",) + (("test",) if a.test else ()):
        refs, _, _, truth = peer_arrays(data, split, shape, norm)
        pred = [resize_labels(p, t.shape) for p, t in zip(preds[split], truth)]
        summary_, _ = evaluate.score_split(refs, truth, pred, list(range(1, len(classes))), classes[1:])
        scores[split] = (summary_["mean_foreground_dice"], {k: v["mean"] for k, v in summary_["dice_per_slice"].items()})
    return result(scores, curve, seconds)


# ----------------------------------------------------------------------------- table

def worst_drop(val_curve: list) -> float:
    """Largest fall of validation Dice from one epoch to the next after the first quarter of the epochs."""
    v = val_curve[len(val_curve) // 4:]
    return max([0.0] + [a - b for a, b in zip(v, v[1:])])


def summary(results: list) -> dict:
    """Mean and std over runs (folds x seeds) of the validation and test Dice, per-label means, worst drop, time."""
    val = np.array([r["val_dice"] for r in results])
    row = {"val_dice_mean": float(val.mean()), "val_dice_std": float(val.std()), "runs_n": len(results),
           "worst_val_drop": float(max(worst_drop(r["val_curve"]) for r in results)),
           "seconds_mean": float(np.mean([r["seconds"] for r in results]))}
    if all(r["test_dice"] is not None for r in results):
        test = np.array([r["test_dice"] for r in results])
        row.update(test_dice_mean=float(test.mean()), test_dice_std=float(test.std()),
                   per_label={k: float(np.nanmean([r["per_label"][k] for r in results])) for k in results[0]["per_label"]})
    return row


def print_table(rows: list) -> None:
    print("\n| system | data set | regime | epochs | runs | validation Dice | test Dice | worst val drop | s/run |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        test = f"{r['test_dice_mean']:.4f} ± {r['test_dice_std']:.4f}" if "test_dice_mean" in r else "(not scored)"
        print(f"| {r['system']} | {r.get('dataset', 'mni')}-{r['variation']} | {r['regime']} | {r['epochs']} | "
              f"{r.get('runs_n', r.get('seeds'))} | {r.get('val_dice_mean', float('nan')):.4f} ± "
              f"{r.get('val_dice_std', float('nan')):.4f} | {test} | {r['worst_val_drop']:.3f} | {r['seconds_mean']:.0f} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default=None,
                   help="comma-separated: brats, mni, hippocampus (default: brats, mni and hippocampus if its folder is given)")
    p.add_argument("--brats-dir", type=Path, default=None, help="folder holding the deepmedic BraTS patients")
    p.add_argument("--hippocampus-dir", type=Path, default=None,
                   help="folder holding the decathlon's Task04_Hippocampus (imagesTr/ and labelsTr/ or images/ and labels/)")
    p.add_argument("--systems", default="ours,monai,keras_seed", help="comma-separated: ours, monai, keras_seed")
    p.add_argument("--regimes", default="full,few", help="comma-separated: full, few")
    p.add_argument("--folds", default=None, help="comma-separated fold numbers (default: all of each data set)")
    p.add_argument("--seeds", default="42,43,44", help="comma-separated seeds")
    p.add_argument("--epochs-full", type=int, default=None, help="epochs of the full regime (default: per data set)")
    p.add_argument("--base-filters", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--variation", choices=["none", "scanner"], default="none",
                   help="MNI only: the template's intensities (main rows) or per-case scanner corruption (robustness)")
    p.add_argument("--ours-flags", default="", help="extra train.py flags for this project (an ablation)")
    p.add_argument("--label", default="ours", help="name of this project's row (e.g. the ablation)")
    p.add_argument("--no-test", dest="test", action="store_false",
                   help="score validation only (every decision); score test once per final configuration")
    p.add_argument("--repo", type=Path, default=ROOT,
                   help="the checkout whose train.py and predict.py are 'ours' (e.g. a worktree of an older commit)")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "real", help="data and runs")
    p.add_argument("--peer-venv", type=Path, default=ROOT / "benchmarks" / "work" / "peer-venv",
                   help="the MONAI peer's virtual environment (made on first use)")
    p.add_argument("-o", "--out", type=Path, default=ROOT / "benchmarks" / "real_anatomy.json",
                   help="JSON results (rows are added or replaced by system, data set, variation and regime)")
    a = p.parse_args(argv)
    a.datasets = a.datasets or "brats,mni" + (",hippocampus" if a.hippocampus_dir else "")
    if set(a.datasets.split(",")) - set(DATASETS) or set(a.systems.split(",")) - {"ours", "monai", "keras_seed"} \
            or set(a.regimes.split(",")) - {"full", "few"}:
        p.error("--datasets takes brats,mni,hippocampus; --systems ours,monai,keras_seed; --regimes full,few")
    for key in ("brats_dir", "hippocampus_dir", "repo", "work", "peer_venv", "out"):  # train.py runs in --repo:
        if getattr(a, key) is not None:  # no relative paths
            setattr(a, key, getattr(a, key).resolve())
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    for ds in a.datasets.split(","):
        spec = DATASETS[ds]
        variation = a.variation if ds == "mni" else "none"
        folds = [int(f) for f in a.folds.split(",")] if a.folds else list(range(spec["folds"]))
        full_epochs = a.epochs_full or spec["epochs"]
        for regime in a.regimes.split(","):
            for system in a.systems.split(","):
                name = a.label if system == "ours" else system
                results, epochs = [], full_epochs
                for fold in folds:
                    data = data_folder(a, ds, fold, regime)
                    n_train = json.loads((data_folder(a, ds, fold, "full") / "done.json").read_text())["counts"]["train"]
                    epochs = full_epochs if regime == "full" else round(full_epochs * n_train / FEW)  # same steps
                    for seed in map(int, a.seeds.split(",")):
                        run = run_folder(a.work, ds, variation, regime, fold, PEER_RUNS.get(system, name), seed)
                        print(f"{ds} {regime} fold {fold} {name} seed {seed}", flush=True)
                        go = run_ours if system == "ours" else lambda *x: run_peer(system, *x)
                        results.append(go(data, run, a, seed, epochs, spec["classes"], spec["size"]))
                        test = results[-1]["test_dice"]
                        print(f"  validation {results[-1]['val_dice']:.4f}"
                              + (f"  test {test:.4f}" if test is not None else "")
                              + f"  ({results[-1]['seconds']:.0f} s)", flush=True)
                row = {"system": name, "dataset": ds, "variation": variation, "regime": regime, "epochs": epochs,
                       "folds": folds, "seeds": a.seeds, "flags": a.ours_flags if system == "ours" else "",
                       **summary(results), "runs": results}
                rows = json.loads(a.out.read_text())["rows"] if a.out.exists() else []  # another run may have written
                key = (name, ds, variation, regime)
                rows = [r for r in rows if (r["system"], r.get("dataset", "mni"), r["variation"], r["regime"]) != key]
                rows.append(row)
                atomic_write_json(a.out, {"base_filters": a.base_filters, "batch_size": a.batch_size, "rows": rows})
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
