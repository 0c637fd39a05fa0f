"""Score a trained U-Net on a split, or segment new 2D or 3D NIfTI files in their own geometry.

    python predict.py --run runs/demo                              # test split: numbers, CSVs, figures
    python predict.py --run runs/demo --split validate --tta --save-masks
    python predict.py --run runs/demo --input scan.nii.gz slice.nii --output-dir out/ --preview

Everything (input size, normalisation, fit, pixel spacing, orientation, target, class names) comes from the
run's config.json, and both commands predict through inference.Predictor: slices normalised as in training,
brought to the training pixel spacing, covered by the network's input, every step undone on the
probabilities, which only then become labels. Scores follow evaluate.py's convention (evaluate.CONVENTION);
binary runs predict 1 for their target.
"""
from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import config  # noqa: E402
import dataset  # noqa: E402
import evaluate  # noqa: E402
import figures  # noqa: E402
import geometry  # noqa: E402
import modules  # noqa: E402, F401  (registers the custom layers for load_model)
from atomic_io import atomic_write_bytes, atomic_write_json  # noqa: E402
from config import RunError  # noqa: E402
from inference import Predictor, entropy, keep_largest, labels_of  # noqa: E402
from preprocess import DataError, check_image, check_mask, load_nifti, make_target, read_slice, read_voxels, \
    slice_geometry, slice_thickness  # noqa: E402

ORGANS = ("bladder", "rectum", "prostate")  # labels that are one organ each: --postprocess keeps their largest part


@dataclass
class Run:
    """A trained model, its config, and what is needed to feed, score and draw it."""

    predictor: Predictor
    cfg: dict
    model_path: Path
    labels: list  # label ids scored in the predicted maps: 1..C-1, or [1] for a binary target
    names: list  # their names
    colours: np.ndarray  # RGBA per predicted label id


def load_run(run=None, model_path=None, tta: bool = False, batch_size: int = 32) -> Run:
    """Load model.keras and config.json (beside the model), check that they agree, and build the Predictor."""
    model_path = Path(model_path) if model_path else Path(run) / "model.keras"
    config_path = (Path(run) if run else model_path.parent) / config.NAME
    cfg = config.read(config_path)
    if not model_path.is_file():
        raise RunError(f"{model_path}: no such model file; train one with `python train.py --out "
                       f"{model_path.parent}` or pass --model path/to/model.keras")
    try:
        model = keras.models.load_model(model_path, compile=False)
    except Exception as e:  # Keras raises several types for a truncated or foreign file
        raise RunError(f"{model_path}: not a readable Keras model ({type(e).__name__}: {e}); expected the "
                       "model.keras written by train.py; copy it again or retrain") from None
    config.check_model(cfg, model.input_shape, model.output_shape[-1], config_path, model_path)
    if cfg["target_ids"] is not None:
        labels, names = [1], list(cfg["channel_names"])
        colours = figures.label_colours(cfg["num_classes"])[[0, cfg["target_ids"][0]]]  # the target's own colour
    else:
        labels, names = list(range(1, cfg["num_classes"])), cfg["class_names"][1:]
        colours = figures.label_colours(cfg["num_classes"])
    geo = cfg.get("geometry") or {}
    predictor = Predictor(model, config.preprocessing(cfg), geo.get("orientation"),
                          tuple(geo["spacing_mm_median"]) if geo.get("spacing_mm_median") else None, tta, batch_size)
    return Run(predictor, cfg, model_path, labels, names, colours)


def organ_labels(run: Run, spec: str | None) -> list:
    """Label ids that --postprocess reduces to their largest 3D part: named labels, or 'organs' (ORGANS present)."""
    if not spec:
        return []
    names = run.names
    wanted = [n for n in names if n in ORGANS] if spec == "organs" else [s.strip() for s in spec.split(",")]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise DataError(f"--postprocess {spec!r}: {unknown} are not among the run's labels {names}")
    return [run.labels[names.index(n)] for n in wanted]


# ----------------------------------------------------------------------------- scoring a split

def predict_split(run: Run, refs, progress: bool, keep=None) -> tuple[list, list, dict, list]:
    """Predicted labels and the raw image of each slice, a volume at a time; each volume's voxel spacing (None
    when its slices disagree on it); and warnings about the spacing read from the files.

    keep(i, probabilities), if given, receives each slice's probabilities (rows, cols, K) as they come."""
    preds, images, spacings, warnings, by_volume = [None] * len(refs), [None] * len(refs), {}, [], {}
    for i, ref in enumerate(refs):
        by_volume.setdefault(ref.volume, []).append(i)
    for volume, idx in tqdm(by_volume.items(), desc="predicting", unit="volume", disable=not progress):
        groups, voxels = {}, {}  # slices of one shape and spacing go through the network together
        for i in idx:
            image, nifti = read_slice(refs[i].image, with_image=True)
            images[i] = check_image(image, refs[i].image)
            _, pixel = slice_geometry(nifti.affine, nifti.shape)
            thickness, problem = slice_thickness(nifti, nifti.shape, refs[i].image)
            if problem:
                warnings.append(problem)
            voxels.setdefault((round(thickness, 3), *pixel), []).append(refs[i].image)
            groups.setdefault((images[i].shape, pixel), []).append(i)
        for (_, pixel), members in groups.items():
            try:
                probs, _ = run.predictor.slices(np.stack([images[i] for i in members]), pixel, refs[members[0]].image)
            except ValueError as e:  # a spacing or shape the file's header gets wrong
                raise DataError(f"{refs[members[0]].image}: {e}") from None
            for i, p in zip(members, probs):
                preds[i] = labels_of(p)
                if keep:
                    keep(i, p)
        if len(voxels) == 1:
            spacings[volume] = next(iter(voxels))  # (slice, row, col) mm, as evaluate stacks volumes
        else:
            spacings[volume] = None
            found = "; ".join(f"{list(k)} mm in {len(v)} slice(s), e.g. {Path(v[0]).name}" for k, v in voxels.items())
            warnings.append(f"{volume}: its slices disagree on the voxel spacing (slice, row, col): {found}; "
                            "the volume is scored without mL and distances")
    return preds, images, spacings, warnings


def postprocess_split(refs, preds, label_ids, in_2d: list | None = None) -> list:
    """--postprocess on each case-week volume (slices stacked in slice order), then back to slices. A volume whose
    slices differ in size does not stack: it is postprocessed slice by slice, in 2D, and named in `in_2d`."""
    if not label_ids:
        return preds
    out, in_2d = list(preds), [] if in_2d is None else in_2d
    by_volume = {}
    for i, ref in enumerate(refs):
        by_volume.setdefault(ref.volume, []).append(i)
    for volume, idx in by_volume.items():
        idx = sorted(idx, key=lambda i: refs[i].slice)
        if len({preds[i].shape for i in idx}) > 1:
            in_2d.append(volume)
            for i in idx:
                out[i] = keep_largest(preds[i], label_ids)
            continue
        kept = keep_largest(np.stack([preds[i] for i in idx]), label_ids)
        for k, i in enumerate(idx):
            out[i] = kept[k]
    return out


def score(args) -> dict:
    """Score a split: metrics.json, per_slice.csv, per_volume.csv, optional masks, figures and a Dice box plot."""
    start = time.perf_counter()
    run = load_run(args.run, args.model, args.tta, args.batch_size)
    data_dir = args.data_dir or run.cfg.get("data_dir")
    if not args.data_dir and not (data_dir and Path(data_dir).is_dir()):
        raise RunError(f"{run.model_path.parent / config.NAME}: the run's data_dir {data_dir!r} is not a folder "
                       f"here (working directory {Path.cwd()}); pass --data-dir")
    out = Path(args.out) if args.out else Path(args.run or run.model_path.parent) / f"eval-{args.split}"
    # load_split checks every pair (and --skip-bad leaves out the broken ones); the slices are then read as they
    # are on disk, since prediction goes through the same path as new files.
    data = dataset.load_split(data_dir, args.split, run.predictor.prep, cache_dir=args.cache_dir, progress=False,
                              skip_bad=args.skip_bad, max_bad_fraction=args.max_bad_fraction)
    if args.slices is not None and (bad := [i for i in args.slices if not 0 <= i < len(data)]):
        raise DataError(f"--slices {bad}: split {args.split!r} has {len(data)} slices (0..{len(data) - 1})")
    leaks = dataset.check_disjoint_cases(data_dir, args.strict)
    def keep(i, probs):  # --save-probabilities, --save-uncertainty: one file per slice, named as its mask
        like, name = nib.load(data.refs[i].image), Path(data.refs[i].image).name.replace("case_", "seg_", 1)
        write_extras(out / "masks", name, probs, like, args)

    extras = keep if args.save_probabilities or args.save_uncertainty else None
    preds, images, spacings, warnings = predict_split(run, data.refs, not args.quiet, extras)
    in_2d = []
    preds = postprocess_split(data.refs, preds, organ_labels(run, args.postprocess), in_2d)
    warnings += [f"{v}: slices of different sizes do not stack into one volume; --postprocess kept the largest "
                 "part per slice (2D) there" for v in in_2d]
    truths = [make_target(check_mask(read_slice(r.mask), r.mask, run.predictor.prep.num_classes),
                          run.cfg["target_ids"]) for r in data.refs]
    picks = args.slices if args.slices is not None else figure_slice(truths, run.labels)
    summary, arrays = evaluate.score_split(data.refs, truths, preds, run.labels, run.names, spacings)
    warnings = leaks + warnings + run.predictor.warnings + summary.pop("warnings", [])
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    evaluate.write_per_slice_csv(out / "per_slice.csv", data.refs, data.orig_shapes, arrays, run.names)
    evaluate.write_per_volume_csv(out / "per_volume.csv", arrays["volume_rows"], arrays["volume_dice_by_name"])
    if args.save_masks:
        for ref, labels in zip(data.refs, preds):
            write_nifti(out / "masks" / Path(ref.image).name.replace("case_", "seg_", 1), labels, nib.load(ref.image))
    n_figures = save_figures(out, args.split, data.refs, images, truths, preds, arrays, picks, args.figures, run)
    metrics = {"split": args.split, "n_slices": len(data), "n_volumes": len({r.volume for r in data.refs}),
               "classes": run.names, "label_ids": run.labels, "target_ids": run.cfg["target_ids"], **summary,
               "convention": evaluate.CONVENTION, "physical_convention": evaluate.PHYSICAL, "tta": args.tta,
               "postprocess": args.postprocess, "run": str(run.model_path.parent), "model": str(run.model_path),
               "data_dir": str(data_dir), "data_fingerprint": data.fingerprint, "skipped": data.skipped,
               "postprocessed_in_2d": in_2d, "masks": str(out / "masks") if args.save_masks else None,
               "warnings": warnings,
               "seconds": round(time.perf_counter() - start, 2)}
    atomic_write_json(out / "metrics.json", metrics)
    evaluate.print_table(metrics)
    print(f"wrote {out}/metrics.json, per_slice.csv, per_volume.csv and {n_figures} figure(s) in "
          f"{metrics['seconds']:.1f}s")
    return metrics


def figure_slice(truths, labels) -> list:
    """The default comparison figure: the slice nearest the split's middle whose truth holds every scored label
    (else the one holding the most), so the figure shows each of them."""
    if not truths:
        return []
    held = np.array([sum(bool(np.any(t == c)) for c in labels) for t in truths])
    best = np.flatnonzero(held == held.max())
    return [int(best[np.argmin(np.abs(best - len(truths) // 2))])]


def save_figures(out: Path, split: str, refs, images, truths, preds, arrays: dict, picks, n_worst: int, run: Run) -> int:
    """Comparison figures of the chosen slices and of the n_worst by mean foreground Dice, and the box plot."""
    tag = " (TTA)" if run.predictor.tta else ""
    ranked = [i for i in np.argsort(arrays["mean_dice"], kind="stable") if np.isfinite(arrays["mean_dice"][i])]
    panels = [(f"{split}_image_prediction_comparison_{i}.png", i) for i in picks]
    panels += [(f"{split}_worst_{rank}_{i}.png", i) for rank, i in enumerate(ranked[:n_worst], start=1)]
    for name, i in panels:
        scores = " ".join(f"{n} {d:.2f}" if np.isfinite(d) else f"{n} -"  # '-': label in neither
                          for n, d in zip(run.names, arrays["dice"][i]))
        figures.save_comparison_figure(out / name, images[i], preds[i], run.colours, run.names,
                                       f"{split} slice {i}: {Path(refs[i].image).name}{tag}\nDice {scores}",
                                       truth=truths[i])
    figures.save_dice_boxplot(out / "dice_boxplot.png", arrays, run.names, run.colours, f"{split}: Dice per label{tag}")
    return len(panels) + 1


# ----------------------------------------------------------------------------- new files

def write_nifti(path: Path, data: np.ndarray, like, labels: bool = True) -> None:
    """Write data with the shape, affine, qform and sform (codes too) and header of `like`, atomically.

    Labels: the smallest integer type that holds them, intent "label", scaling reset (slope 1, intercept 0),
    so they read back exactly. Otherwise float32 (probabilities, uncertainty).
    """
    if data.size == np.prod(like.shape):
        data = data.reshape(like.shape)  # e.g. a (rows, cols) mask of a (rows, cols, 1) slice file
    header = like.header.copy()
    if labels:
        dtype = np.uint8 if data.max(initial=0) < 256 else np.int16
        header.set_data_dtype(dtype)
        header.set_intent("label")
        header["cal_min"], header["cal_max"] = 0, max(int(data.max(initial=0)), 1)
    else:
        dtype = np.float32
        header.set_data_dtype(dtype)
        header.set_intent("none")
        header["cal_min"], header["cal_max"] = float(data.min(initial=0)), float(data.max(initial=0))
    image = type(like)(data.astype(dtype), like.affine, header)
    image.set_qform(like.header.get_qform(), int(like.header["qform_code"]))
    image.set_sform(like.header.get_sform(), int(like.header["sform_code"]))
    image.header.set_slope_inter(1, 0)
    raw = image.to_bytes()
    atomic_write_bytes(path, gzip.compress(raw, compresslevel=6, mtime=0) if str(path).endswith(".gz") else raw)


def write_extras(folder: Path, name: str, probs: np.ndarray, like, args) -> None:
    """--save-probabilities (float32, the file's 3D shape x classes) and --save-uncertainty (the predictive
    entropy, the file's shape), as NAME_probabilities.nii[.gz] and NAME_uncertainty.nii[.gz] in folder."""
    shape3 = tuple(like.shape[:3]) + (1,) * (3 - len(like.shape))
    if args.save_probabilities:
        write_nifti(folder / output_name(name, "probabilities"), probs.reshape(shape3 + probs.shape[-1:]), like,
                    labels=False)
    if args.save_uncertainty:
        write_nifti(folder / output_name(name, "uncertainty"), entropy(probs).reshape(like.shape), like, labels=False)


def read_scan(path: str, axis):
    """(image, voxels (X, Y, Z) float32, affine or None) of a 2D or 3D NIfTI file; refusals name the file."""
    image = load_nifti(path)
    data = read_voxels(image, path)
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3 or data.ndim < 2:
        raise DataError(f"{path}: shape {shape}; expected a 2D slice or a 3D volume (a 4D series has no single "
                        "segmentation: split it into 3D volumes first)")
    data = check_image(data.reshape(data.shape + (1,) * (3 - data.ndim)), path)
    if int(image.header["qform_code"]) == 0 and int(image.header["sform_code"]) == 0:
        if axis is None:
            raise DataError(f"{path}: no usable affine (qform_code and sform_code are both 0), so its orientation "
                            "is unknown; pass --axis N to slice it along array axis N without reorienting")
        return image, data, None
    try:
        geometry.check_affine(image.affine)
    except ValueError as e:
        raise DataError(f"{path}: no usable affine ({e})") from None
    return image, data, image.affine


def output_name(path, suffix: str) -> str:
    """`scan.nii.gz` -> `scan_<suffix>.nii.gz` (a .nii input keeps .nii)."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)] + f"_{suffix}" + ext
    raise DataError(f"{path}: expected a NIfTI file ending in .nii or .nii.gz")


def segment_files(args) -> list:
    """Segment each input file in its own geometry: the mask (and probabilities, uncertainty, a preview)."""
    run = load_run(args.run, args.model, args.tta, args.batch_size)
    organs = organ_labels(run, args.postprocess)
    out_dir = Path(args.output_dir) if args.output_dir else Path(args.run or run.model_path.parent) / "predictions"
    names = [output_name(p, "mask") for p in args.input]
    if len(set(names)) < len(names):
        raise DataError(f"inputs {args.input} give duplicate output names {names}; segment them in separate runs")
    if args.axis is not None:
        print(f"warning: --axis {args.axis}: slicing along that array axis, whatever the files' orientation says",
              file=sys.stderr)
    for path, name in zip(args.input, names):
        image, data, affine = read_scan(path, args.axis)
        try:
            probs, done = run.predictor.volume(data, affine, args.axis, path)
        except ValueError as e:  # geometry or spacing the file's header gets wrong
            raise DataError(f"{path}: {e}") from None
        labels = keep_largest(labels_of(probs), organs) if organs else labels_of(probs)
        shape = image.shape[:3] if len(image.shape) >= 3 else image.shape
        write_nifti(out_dir / name, labels.reshape(shape), image)
        write_extras(out_dir, name.replace("_mask", "", 1), probs, image, args)
        if args.preview:
            figures.save_three_planes(out_dir / (name.split(".nii")[0] + ".png"), data, labels, affine, run.colours,
                                      run.names, f"{Path(path).name} ({done['orientation']}): the mask in three planes")
        for w in run.predictor.warnings:
            print(f"warning: {w}", file=sys.stderr)
        run.predictor.warnings.clear()
        resampled = f"resampled x{done['resampled']}" if done["resampled"] else "not resampled"
        fit = "resized whole to the network input (no pixel spacing known)" if done["fit"] == "resize" \
            else f"{done['centred']} slice(s) on one input centred on the anatomy, the others in " \
                 f"{done['tiles']} tile(s)" if done["centred"] else f"{done['tiles']} tile(s) per slice"
        print(f"{path}: {'x'.join(map(str, data.shape))} {done['orientation']}, {done['slices']} slice(s) along "
              f"axis {done['slice_axis']}, spacing {done['spacing_mm']} mm, {resampled}, {fit}"
              f"{', TTA' if args.tta else ''}{', postprocessed' if organs else ''} -> {out_dir / name}", flush=True)
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
    p.add_argument("-b", "--batch-size", type=int, default=32, help="network inputs per model call (default: 32)")
    p.add_argument("--tta", action="store_true",
                   help="average each prediction with its flip along the first axis of the training orientation "
                        "(left-right for the HipMRI slices and the phantom, whose rows run along R-L), as training "
                        "augmented")
    p.add_argument("--postprocess", nargs="?", const="organs", default=None, metavar="LABELS",
                   help=f"keep only the largest 3D connected part of each of these labels (comma-separated names; "
                        f"alone: {', '.join(ORGANS)}, those the run has)")
    p.add_argument("--save-masks", action="store_true", help="write each predicted mask as OUT/masks/seg_*.nii[.gz]")
    p.add_argument("--figures", type=int, default=3,
                   help="comparison figures of the N worst slices by mean foreground Dice (default: 3)")
    p.add_argument("--slices", type=index_list, default=None,
                   help="comma-separated split indices to draw (default: 100, if the split has it)")
    p.add_argument("--cache-dir", default=None, help="decoded-data cache (default $HIPMRI_CACHE or ~/.cache/hipmri-unet)")
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable pairs, reporting each")
    p.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="with --skip-bad, refuse above this share (default: 0.05)")
    p.add_argument("-i", "--input", nargs="+", default=None,
                   help="segment these 2D or 3D NIfTI files instead of scoring a split")
    p.add_argument("--output-dir", default=None, help="with --input: where outputs go (default: RUN/predictions)")
    p.add_argument("--axis", type=int, default=None, help="with --input: slice along this array axis instead of "
                   "the one the file's orientation gives (a warning says so)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also NAME_probabilities.nii[.gz]: float32, one volume per class (4D); for a split, one "
                        "per slice in OUT/masks/")
    p.add_argument("--save-uncertainty", action="store_true",
                   help="also NAME_uncertainty.nii[.gz]: the predictive entropy, 0 (sure) to 1 (uniform)")
    p.add_argument("--preview", action="store_true", help="with --input: a PNG of the mask in three planes per file")
    p.add_argument("--strict", action="store_true", help="refuse data whose splits share a case (default: warn)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    checks = [(args.run or args.model, "give --run RUN_FOLDER or --model path/to/model.keras"),
              (args.batch_size >= 1, f"--batch-size {args.batch_size}: expected 1 or more"),
              (args.figures >= 0, f"--figures {args.figures}: expected 0 or more"),
              (0 <= args.max_bad_fraction <= 1, f"--max-bad-fraction {args.max_bad_fraction:g}: expected a share "
               "between 0 and 1"),
              (args.axis is None or -3 <= args.axis < 3, f"--axis {args.axis}: expected an axis of a 3D volume "
               "(0, 1 or 2)"),
              (args.input or not (args.output_dir or args.axis is not None or args.preview),
               "--output-dir, --axis and --preview go with --input FILE ..."),
              (not args.input or args.out is None, "--out is for scoring a split; with --input use --output-dir")]
    for ok, message in checks:
        if not ok:
            p.error(message)
    return args


def main(argv=None) -> int:
    """Score a split, or segment --input files; user errors print `error: ...` and return 2."""
    args = parse_args(argv)
    try:
        segment_files(args) if args.input else score(args)
    except (DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output folder that cannot be written, a disk that is full: the error names the path
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
