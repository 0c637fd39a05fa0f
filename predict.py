"""Score a trained U-Net on a split, or segment new NIfTI files, at each slice's original size.

    python predict.py --run runs/demo                              # test split: numbers, CSV, figures
    python predict.py --run runs/demo --split validate --tta --save-masks
    python predict.py --run runs/demo --input scan.nii.gz slice.nii --output-dir out/ --preview

Everything (input size, normalisation, target, class names) comes from the run's config.json. The
model sees each slice at the run's input size; its probabilities are resized back to the slice's
own shape with linear interpolation and only then turned into labels (labels are never
interpolated), and they are scored against the mask file on disk, not a resized copy.
Scores follow modules.py's convention (see CONVENTION). Binary runs predict 1 for their target.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import keras  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import dataset  # noqa: E402
import figures  # noqa: E402
import modules  # noqa: E402, F401  (registers the custom losses and metrics for load_model)
from atomic_io import atomic_write_bytes, atomic_write_json  # noqa: E402
from dataset import DataError  # noqa: E402

CONVENTION = ("Dice and IoU per image (slice or case-week volume) and foreground label; an image where the label "
              "is in neither truth nor prediction has no score and is left out of that label's mean, std and n; "
              "background is never scored; std is the population std (ddof 0).")
RUN_KEYS = ("input_size", "target_ids", "channel_names", "class_names", "num_classes", "preprocessing")


class RunError(ValueError):
    """A run folder that cannot be used as it is; the message names the file and what to do."""


@dataclass
class Run:
    """A trained model and what is needed to feed and score it."""

    model: object
    cfg: dict
    model_path: Path
    prep: dataset.Preprocessing
    labels: list  # label ids scored in the predicted maps: 1..C-1, or [1] for a binary target
    names: list  # their names
    colours: np.ndarray  # RGBA per predicted label id


# ----------------------------------------------------------------------------- the run

def load_run(run=None, model_path=None) -> Run:
    """Load model.keras and config.json (beside the model) and check that they agree."""
    model_path = Path(model_path) if model_path else Path(run) / "model.keras"
    config_path = (Path(run) if run else model_path.parent) / "config.json"
    try:
        cfg = json.loads(config_path.read_text())
        missing = [k for k in RUN_KEYS if k not in cfg]
    except (OSError, ValueError) as e:
        raise RunError(f"{config_path}: cannot read the run's config ({type(e).__name__}: {e}); expected the "
                       "config.json that train.py writes beside model.keras") from None
    if missing:
        raise RunError(f"{config_path}: keys {missing} are missing; expected a config.json written by train.py")
    if not model_path.is_file():
        raise RunError(f"{model_path}: no such model file; train one with `python train.py --out "
                       f"{model_path.parent}` or pass --model path/to/model.keras")
    try:
        model = keras.models.load_model(model_path, compile=False)
    except Exception as e:  # Keras raises several types for a truncated or foreign file
        raise RunError(f"{model_path}: not a readable Keras model ({type(e).__name__}: {e}); expected the "
                       "model.keras written by train.py; copy it again or retrain") from None
    check_run(cfg, model, config_path, model_path)
    channels, binary = cfg["channel_names"], cfg["target_ids"] is not None
    p = cfg["preprocessing"]
    prep = dataset.Preprocessing(tuple(p["size"]), p["norm"], p["num_classes"])
    if binary:
        labels, names = [1], list(channels)
        colours = figures.label_colours(cfg["num_classes"])[[0, cfg["target_ids"][0]]]  # the target's own colour
    else:
        labels, names = list(range(1, cfg["num_classes"])), cfg["class_names"][1:]
        colours = figures.label_colours(cfg["num_classes"])
    return Run(model, cfg, model_path, prep, labels, names, colours)


def check_run(cfg: dict, model, config_path, model_path) -> None:
    """Refuse a config.json that does not describe this model (or contradicts itself)."""
    p, binary = cfg["preprocessing"], cfg["target_ids"] is not None
    found = {"input size": list(model.input_shape[1:3]), "output channels": model.output_shape[-1]}
    expected = {"input size": list(cfg["input_size"]), "output channels": len(cfg["channel_names"])}
    consistent = (list(p.get("size", [])) == list(cfg["input_size"]) and p.get("num_classes") == cfg["num_classes"]
                  and len(cfg["class_names"]) == cfg["num_classes"] and p.get("norm") in ("minmax", "zscore")
                  and len(cfg["channel_names"]) == (1 if binary else cfg["num_classes"]))
    if found != expected or not consistent:
        raise RunError(f"{config_path} does not match {model_path}: the model has {found}, the config expects "
                       f"{expected} (channel_names {cfg['channel_names']}, {cfg['num_classes']} classes, target_ids "
                       f"{cfg['target_ids']}, preprocessing {p}); use the config.json written with this model")


# ----------------------------------------------------------------------------- prediction

def predict_probabilities(model, images: np.ndarray, tta: bool = False):
    """Probabilities (b, rows, cols, C) of one batch, and their mean with the left-right flip if tta."""
    if not tta:
        return model.predict_on_batch(images), None
    both = model.predict_on_batch(np.concatenate([images, images[:, ::-1]]))  # axis 1 = array axis 0
    plain, flipped = both[: len(images)], both[len(images):, ::-1]
    return plain, (plain + flipped) / 2


def to_original_size(probs: np.ndarray, shape) -> np.ndarray:
    """Labels at the slice's own shape: resize the probabilities linearly, then argmax (or > 0.5)."""
    if probs.shape[:2] != tuple(shape):
        probs = cv2.resize(probs, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR).reshape(*shape, -1)
    if probs.shape[-1] == 1:
        return (probs[..., 0] > 0.5).astype(np.uint8)
    return probs.argmax(-1).astype(np.uint8)


def predict_labels(model, images: np.ndarray, shapes, batch_size: int = 32, tta: bool = False, progress=True):
    """Label maps at the original shapes for model-size images (n, rows, cols, 1): {"plain": [...], "tta": [...]}."""
    batch_size = max(1, min(batch_size, len(images)))
    out = {"plain": [], **({"tta": []} if tta else {})}
    for start in tqdm(range(0, len(images), batch_size), desc="predicting", unit="batch", disable=not progress):
        batch = images[start:start + batch_size]
        # Pad the last batch to the full size: one traced graph serves every batch.
        padded = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]), batch.dtype)])
        for key, probs in zip(("plain", "tta"), predict_probabilities(model, padded, tta)):
            if probs is not None:
                out[key] += [to_original_size(p, s) for p, s in zip(probs, shapes[start:start + len(batch)])]
    return out


# ----------------------------------------------------------------------------- scores

def score_slices(truths, preds, labels):
    """Dice and IoU (n, labels) of each slice; NaN where a label is in neither truth nor prediction."""
    dice = np.array([modules.dice_per_class(t, p, labels) for t, p in zip(truths, preds)]).reshape(-1, len(labels))
    iou = np.array([modules.iou_per_class(t, p, labels) for t, p in zip(truths, preds)]).reshape(-1, len(labels))
    return dice, iou


def stack_volumes(refs, maps) -> dict:
    """{volume: (slices, rows, cols)} with each case-week's slices in slice order, whatever order they came in."""
    volumes = {}
    for ref, m in sorted(zip(refs, maps), key=lambda rm: (rm[0].case, rm[0].week, rm[0].slice)):
        volumes.setdefault(ref.volume, []).append(m)
    out = {}
    for name, slices in volumes.items():
        rows, cols = max(s.shape[0] for s in slices), max(s.shape[1] for s in slices)
        # A slice narrower than its volume is padded with background, which no foreground score sees.
        out[name] = np.stack([np.pad(s, ((0, rows - s.shape[0]), (0, cols - s.shape[1]))) for s in slices])
    return out


def summarise(scores: np.ndarray, names) -> dict:
    """{label: {"mean", "std", "n"}} over the images where the label has a score."""
    out = {}
    for name, col in zip(names, scores.T):
        col = col[np.isfinite(col)]
        out[name] = {"mean": float(col.mean()) if len(col) else None,
                     "std": float(col.std()) if len(col) else None, "n": int(len(col))}
    return out


def mean_of_means(summary: dict):
    """Mean over labels of the per-label means (labels that were never scored are left out)."""
    means = [s["mean"] for s in summary.values() if s["mean"] is not None]
    return float(np.mean(means)) if means else None


def score_split(refs, truths, preds, labels, names) -> tuple[dict, dict]:
    """Per-slice and per-volume Dice and IoU summaries, and the per-slice arrays behind them."""
    dice, iou = score_slices(truths, preds, labels)
    vol_truth, vol_pred = stack_volumes(refs, truths), stack_volumes(refs, preds)
    vol_dice, vol_iou = score_slices([vol_truth[v] for v in vol_truth], [vol_pred[v] for v in vol_truth], labels)
    summary = {"dice_per_slice": summarise(dice, names), "dice_per_volume": summarise(vol_dice, names),
               "iou_per_slice": summarise(iou, names), "iou_per_volume": summarise(vol_iou, names)}
    summary["mean_foreground_dice"] = mean_of_means(summary["dice_per_slice"])
    summary["mean_foreground_dice_per_volume"] = mean_of_means(summary["dice_per_volume"])
    with np.errstate(all="ignore"):  # a slice with no foreground anywhere has no mean
        slice_mean = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in dice])
    return summary, {"dice": dice, "iou": iou, "mean_dice": slice_mean, "volume_dice": vol_dice}


def load_truth(ref, run: Run) -> np.ndarray:
    """The target of one slice at its original size, from the mask file on disk."""
    labels = dataset.check_mask(dataset.read_slice(ref.mask), ref.mask, run.prep.num_classes)
    return dataset.make_target(labels, run.cfg["target_ids"])


# ----------------------------------------------------------------------------- files

def mask_nifti_bytes(labels: np.ndarray, like, gz: bool) -> bytes:
    """uint8 labels with the shape, affine and header of `like`; slope 1, intercept 0: labels read back exactly."""
    header = like.header.copy()
    header.set_data_dtype(np.uint8)
    image = type(like)(labels.reshape(like.shape).astype(np.uint8), like.affine, header)
    image.header.set_slope_inter(1, 0)
    image.header["cal_min"], image.header["cal_max"] = 0, max(int(labels.max(initial=0)), 1)
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if gz else raw


def write_mask(path: Path, labels: np.ndarray, like_path) -> None:
    """Write a predicted mask with the geometry and header of the image it came from, atomically."""
    like = nib.load(str(like_path))
    atomic_write_bytes(path, mask_nifti_bytes(labels, like, str(path).endswith(".gz")))


def write_per_slice_csv(path: Path, refs, shapes, results: dict, names) -> None:
    """One row per slice: where it is, its shape, and its scores (an empty cell where there is none)."""
    fields = ["file", "case", "week", "slice", "rows", "cols"]
    for key in results:
        pre = "" if key == "plain" else f"{key}_"
        fields += [f"{pre}mean_foreground_dice"] + [f"{pre}{m}_{n}" for m in ("dice", "iou") for n in names]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(fields)
    for i, (ref, shape) in enumerate(zip(refs, shapes)):
        row = [Path(ref.image).name, ref.case, ref.week, ref.slice, *shape]
        for arrays in results.values():
            row += [arrays["mean_dice"][i], *arrays["dice"][i], *arrays["iou"][i]]
        writer.writerow([_csv_cell(v) for v in row])
    atomic_write_bytes(path, buf.getvalue().encode())


def _csv_cell(v) -> str:
    """A number as text: scores with 6 decimals, an empty cell for a missing (NaN) score."""
    if isinstance(v, (float, np.floating)):
        return f"{v:.6f}" if np.isfinite(v) else ""
    return str(v)


# ----------------------------------------------------------------------------- the two commands

def save_figures(out: Path, split: str, data, truths, preds, arrays: dict, picks, n_worst: int, run: Run,
                 tag: str = "") -> int:
    """Comparison figures of the chosen slices and of the n_worst by mean foreground Dice, and the box plot."""
    ranked = [i for i in np.argsort(arrays["mean_dice"], kind="stable") if np.isfinite(arrays["mean_dice"][i])]
    panels = [(f"{split}_image_prediction_comparison_{i}.png", i) for i in picks]
    panels += [(f"{split}_worst_{rank}_{i}.png", i) for rank, i in enumerate(ranked[:n_worst], start=1)]
    for name, i in panels:
        ref = data.refs[i]
        scores = " ".join(f"{n} {d:.2f}" if np.isfinite(d) else f"{n} -"  # '-': label in neither
                          for n, d in zip(run.names, arrays["dice"][i]))
        figures.save_comparison_figure(out / name, dataset.read_slice(ref.image), preds[i], run.colours, run.names,
                                       f"{split} slice {i}: {Path(ref.image).name}{tag}\nDice {scores}",
                                       truth=truths[i])
    figures.save_dice_boxplot(out / "dice_boxplot.png", arrays, run.names, run.colours, f"{split}: Dice per label{tag}")
    return len(panels) + 1


def evaluate(args) -> dict:
    """Score a split: metrics.json, per_slice.csv, optional masks, comparison figures and a Dice box plot."""
    start = time.perf_counter()
    run = load_run(args.run, args.model)
    data_dir = args.data_dir or run.cfg.get("data_dir")
    if not args.data_dir and not (data_dir and Path(data_dir).is_dir()):
        raise RunError(f"{run.model_path.parent / 'config.json'}: the run's data_dir {data_dir!r} is not a folder "
                       f"here (working directory {Path.cwd()}); pass --data-dir")
    out = Path(args.out) if args.out else Path(args.run or run.model_path.parent) / f"eval-{args.split}"
    data = dataset.load_split(data_dir, args.split, run.prep, cache_dir=args.cache_dir, progress=not args.quiet,
                              skip_bad=args.skip_bad, max_bad_fraction=args.max_bad_fraction)
    picks = args.slices if args.slices is not None else [100] if len(data) > 100 else []  # the README's figure
    if bad := [i for i in picks if not 0 <= i < len(data)]:
        raise DataError(f"--slices {bad}: split {args.split!r} has {len(data)} slices (0..{len(data) - 1})")

    preds = predict_labels(run.model, data.images, data.orig_shapes, args.batch_size, args.tta, not args.quiet)
    truths = [load_truth(r, run) for r in tqdm(data.refs, desc="scoring", unit="slice", disable=args.quiet)]
    results = {k: score_split(data.refs, truths, p, run.labels, run.names) for k, p in preds.items()}
    write_per_slice_csv(out / "per_slice.csv", data.refs, data.orig_shapes, {k: r[1] for k, r in results.items()},
                        run.names)
    shown = "tta" if args.tta else "plain"  # masks and figures show the prediction asked for
    if args.save_masks:
        for ref, labels in zip(tqdm(data.refs, desc="writing masks", unit="mask", disable=args.quiet), preds[shown]):
            write_mask(out / "masks" / Path(ref.image).name.replace("case_", "seg_", 1), labels, ref.image)
    n_figures = save_figures(out, args.split, data, truths, preds[shown], results[shown][1], picks, args.figures,
                             run, " (TTA)" if args.tta else "")

    metrics = {"split": args.split, "n_slices": len(data), "n_volumes": len({r.volume for r in data.refs}),
               "classes": run.names, "label_ids": run.labels, "target_ids": run.cfg["target_ids"],
               **results["plain"][0], "convention": CONVENTION, "tta": results["tta"][0] if args.tta else None,
               "run": str(run.model_path.parent), "model": str(run.model_path), "data_dir": str(data_dir),
               "data_fingerprint": data.fingerprint, "skipped": data.skipped,
               "masks": str(out / "masks") if args.save_masks else None, "figures_and_masks_from": shown,
               "seconds": round(time.perf_counter() - start, 2)}
    atomic_write_json(out / "metrics.json", metrics)
    print_table(metrics)
    print(f"wrote {out}/metrics.json, per_slice.csv and {n_figures} figure(s) in {metrics['seconds']:.1f}s")
    return metrics


def print_table(metrics: dict) -> None:
    """Label, Dice per slice mean ± std (n), Dice per volume, IoU per slice (and the TTA Dice per slice)."""
    def cell(s):
        return "-" if s is None or s["mean"] is None else f"{s['mean']:.3f} ± {s['std']:.3f} ({s['n']})"

    def row(name, *cells):
        print(f"{name:<12}" + "".join(f"{c:>24}" for c in cells))

    tta = metrics["tta"]
    print(f"\n{metrics['split']}: {metrics['n_slices']} slices, {metrics['n_volumes']} volumes "
          "(mean ± std (n), per slice unless said)")
    row("label", "Dice", "Dice per volume", "IoU", *(["Dice with TTA"] if tta else []))
    for name in metrics["classes"]:
        row(name, cell(metrics["dice_per_slice"][name]), cell(metrics["dice_per_volume"][name]),
            cell(metrics["iou_per_slice"][name]), *([cell(tta["dice_per_slice"][name])] if tta else []))
    fg = [metrics["mean_foreground_dice"], metrics["mean_foreground_dice_per_volume"]]
    row("mean fg", *("-" if v is None else f"{v:.3f}" for v in fg), "",
        *([f"{tta['mean_foreground_dice']:.3f}"] if tta and tta["mean_foreground_dice"] is not None else []))


def split_slices(data: np.ndarray, axis, path) -> tuple[np.ndarray, int | None]:
    """Slices (n, rows, cols) of a 2D slice or a 3D volume (singleton axes allowed), and the slice axis's position."""
    core = [i for i, s in enumerate(data.shape) if s > 1]
    squeezed = data.reshape([data.shape[i] for i in core])
    if len(core) == 2:
        return squeezed[None], None
    if len(core) != 3:
        raise DataError(f"{path}: shape {data.shape}; expected a 2D slice or a 3D volume (singleton axes allowed)")
    axis = core[-1] if axis is None else axis
    if not -data.ndim <= axis < data.ndim or axis % data.ndim not in core:
        raise DataError(f"{path}: shape {data.shape} cannot be sliced along --axis {axis}; use one of {core}")
    position = core.index(axis % data.ndim)
    return np.moveaxis(squeezed, position, 0), position


def mask_name(path) -> str:
    """`scan.nii.gz` -> `scan_mask.nii.gz` (a .nii input keeps .nii)."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)] + "_mask" + ext
    raise DataError(f"{path}: expected a NIfTI file ending in .nii or .nii.gz")


def segment_array(run: Run, data: np.ndarray, axis=None, path="array", batch_size: int = 32):
    """Labels of a 2D slice or 3D volume, slice by slice, in the array's own shape; also its slices and their labels."""
    slices, position = split_slices(dataset.check_image(data, path), axis, path)
    inputs = np.stack([dataset.preprocess_image(s, run.prep) for s in slices])[..., None]  # (n, rows, cols, 1)
    labels = np.stack(predict_labels(run.model, inputs, [s.shape for s in slices], batch_size, progress=False)["plain"])
    mask = (labels[0] if position is None else np.moveaxis(labels, 0, position)).reshape(data.shape)
    return mask, slices, labels


def segment_files(args) -> list:
    """Segment each input file and write its mask (same shape, affine and header) and optionally a preview."""
    run = load_run(args.run, args.model)
    out_dir = Path(args.output_dir) if args.output_dir else Path(args.run or run.model_path.parent) / "predictions"
    names = [mask_name(p) for p in args.input]
    if len(set(names)) < len(names):
        raise DataError(f"inputs {args.input} give duplicate output names {names}; segment them in separate runs")
    for path, name in zip(tqdm(args.input, desc="segmenting", unit="file", disable=args.quiet), names):
        try:
            image = nib.load(path)
            data = np.asanyarray(image.dataobj).astype(np.float32)
        except Exception as e:  # nibabel raises several types for missing, truncated or foreign files
            raise DataError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
        mask, slices, labels = segment_array(run, data, args.axis, path, args.batch_size)
        atomic_write_bytes(out_dir / name, mask_nifti_bytes(mask, image, name.endswith(".gz")))
        if args.preview:
            mid = len(slices) // 2
            figures.save_comparison_figure(out_dir / (name.split(".nii")[0] + ".png"), slices[mid], labels[mid],
                                   run.colours, run.names, f"{Path(path).name}: slice {mid} of {len(slices)}")
    print(f"wrote {len(names)} mask(s) to {out_dir}")
    return [out_dir / n for n in names]


def index_list(text: str) -> list:
    """'100,200' -> [100, 200] for --slices."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated slice indices such as 100,200") from None


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--run", default=None, help="run folder written by train.py (model.keras + config.json)")
    p.add_argument("-m", "--model", default=None, help="a model.keras to use instead; config.json is read beside it")
    p.add_argument("-d", "--data-dir", default=None, help="HipMRI folder to score (default: the run's data_dir)")
    p.add_argument("-s", "--split", choices=list(dataset.SPLITS), default="test", help="split to score (default: test)")
    p.add_argument("-o", "--out", default=None, help="folder for metrics and figures (default: RUN/eval-SPLIT)")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="slices per model call (default: 32)")
    p.add_argument("--tta", action="store_true", help="also score the mean with the left-right flip; metrics.json "
                   "keeps the plain scores at the top and the TTA ones under 'tta'; masks and figures show TTA")
    p.add_argument("--save-masks", action="store_true", help="write each predicted mask as OUT/masks/seg_*.nii[.gz]")
    p.add_argument("--figures", type=int, default=3,
                   help="comparison figures of the N worst slices by mean foreground Dice (default: 3)")
    p.add_argument("--slices", type=index_list, default=None,
                   help="comma-separated split indices to draw (default: 100, if the split has it)")
    p.add_argument("--cache-dir", default=None,
                   help="decoded-data cache (default $HIPMRI_CACHE or ~/.cache/hipmri-unet)")
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable pairs, reporting each")
    p.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="with --skip-bad, refuse above this share (default: 0.05)")
    p.add_argument("-i", "--input", nargs="+", default=None,
                   help="segment these NIfTI slices or volumes instead of scoring a split")
    p.add_argument("--output-dir", default=None, help="with --input: where masks go (default: RUN/predictions)")
    p.add_argument("--axis", type=int, default=None, help="with --input: slice 3D volumes along this array axis "
                   "(default: the last axis longer than 1)")
    p.add_argument("--preview", action="store_true", help="with --input: a PNG per file (middle slice of a volume)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not (args.run or args.model):
        p.error("give --run RUN_FOLDER or --model path/to/model.keras")
    if args.batch_size < 1 or args.figures < 0:
        p.error("--batch-size must be at least 1 and --figures at least 0")
    return args


def main(argv=None) -> int:
    """Score a split, or segment --input files; user errors print `error: ...` and return 2."""
    args = parse_args(argv)
    try:
        segment_files(args) if args.input else evaluate(args)
    except (DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
