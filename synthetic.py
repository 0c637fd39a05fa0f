"""Synthetic male pelvic MRI phantom, written in the HipMRI `keras_slices` layout.

Nobody here holds the real HipMRI files, so this module writes phantom.py's T2-like axial pelvis in a form
that a loader cannot tell apart by layout, names, shapes, dtypes or label statistics (the presets below give the real
split sizes; `python dataset.py info` shows the label shares).

Layout: `out/keras_slices_{split}/case_XXX_week_Y_slice_Z.nii.gz` and the mask of each image in
`out/keras_slices_seg_{split}/seg_XXX_week_Y_slice_Z.nii.gz`; one case-week is one volume and Z
runs 0..n-1 from the top (superior, iliac wings) to the bottom (inferior, thighs) of the scan.
Splits are by case. `out/phantom.json` is written last and marks a finished run.

Presets (pairs per split = volumes x slices per volume; weeks per case cycle through `weeks`):
    tiny   8 slices/volume    train 6 vols = 48 (3 cases),    validate 16 (1), test 16 (1)
    demo  20 slices/volume    train 50 vols = 1000 (17 cases), validate 160 (3), test 160 (3)
    full  30 slices/volume    train 382 vols = 11460 (64),    validate 660 (4), test 540 (3)
About 5% of volumes (at least one per split) are 256 x 144 instead of 256 x 128, and about 3% of
pairs (at least one per split) carry a trailing singleton axis, (256, 128, 1).

Arrays (drawn by phantom.py): axis 0 (256) runs from the patient's left to right (toward R) and axis 1
(128/144) from posterior to anterior (toward A), as every file's affine says: AFFINE, 1 mm pixels and 3 mm
slices, which nibabel's `aff2axcodes` reads as R, A, S. Images are float32 MR intensities; masks are float32
labels 0 background, 1 body, 2 bone, 3 bladder, 4 rectum, 5 prostate. Every random draw comes from a
generator seeded by (seed, case[, week[, split, slice]]), so the bytes do not depend on the number of worker
processes; gzip is written with mtime 0.

    python synthetic.py --out data/phantom-demo --preset demo --preview images/phantom_slices.png
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

import joblib
import nibabel as nib
import numpy as np
from tqdm import tqdm

from atomic_io import atomic_write_bytes, atomic_write_json
from dataset import CLASS_NAMES, SPLITS
from phantom import render_slice, volume_grid, volume_state

VERSION = 1
PRESETS = {
    "tiny": {"slices": 8, "volumes": {"train": 6, "validate": 2, "test": 2}, "weeks": (2,)},
    "demo": {"slices": 20, "volumes": {"train": 50, "validate": 8, "test": 8}, "weeks": (3, 2, 4, 3)},
    "full": {"slices": 30, "volumes": {"train": 382, "validate": 22, "test": 18}, "weeks": (6, 5, 7, 6)},
}
WIDE_SHARE, SINGLETON_SHARE = 0.05, 0.03
AFFINE = np.diag([1.0, 1.0, 3.0, 1.0])  # 1 mm pixels, 3 mm slices
MARKER = "phantom.json"
WORKER_IDLE_S = 10  # seconds an idle writer process waits for more work before it exits (joblib's default: 300)

def plan_volumes(preset: str, seed: int) -> list[dict]:
    """Every volume of a preset: split, case id, week, slices, width and which slices get (.., 1)."""
    cfg = PRESETS[preset]
    weeks_per_case = {}
    for split in SPLITS:
        left, cycle = cfg["volumes"][split], 0
        weeks_per_case[split] = []
        while left > 0:
            w = min(cfg["weeks"][cycle % len(cfg["weeks"])], left)
            weeks_per_case[split].append(w)
            left, cycle = left - w, cycle + 1
    # Case ids are fixed per preset (not per seed) so two seeds can be compared file by file.
    n_cases = sum(len(w) for w in weeks_per_case.values())
    id_rng = np.random.default_rng(n_cases)
    ids = list(id_rng.permutation(id_rng.choice(np.arange(1, 2 * n_cases + 4), n_cases, replace=False)))
    rng = np.random.default_rng([seed, 1])
    volumes = []
    for si, split in enumerate(SPLITS):
        cases = sorted(int(ids.pop()) for _ in weeks_per_case[split])
        vols = [(c, w) for c, n_w in zip(cases, weeks_per_case[split]) for w in range(n_w)]
        n_wide = max(1, round(WIDE_SHARE * len(vols)))
        wide = set(rng.choice(len(vols), n_wide, replace=False).tolist())
        n_files = len(vols) * cfg["slices"]
        single = set(rng.choice(n_files, max(1, round(SINGLETON_SHARE * n_files)), replace=False).tolist())
        for vi, (case, week) in enumerate(vols):
            zs = tuple(z for z in range(cfg["slices"]) if vi * cfg["slices"] + z in single)
            volumes.append({"split": split, "split_index": si, "case": case, "week": week,
                            "slices": cfg["slices"], "width": 144 if vi in wide else 128, "singleton": zs})
    return volumes


def nifti_gz(arr: np.ndarray) -> bytes:
    """A .nii.gz file's bytes, with gzip mtime 0 so the same array always gives the same bytes."""
    img = nib.Nifti1Image(arr, AFFINE)
    img.set_data_dtype(np.float32)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def write_pair(out_dir: Path, vol: dict, z: int, img: np.ndarray, mask: np.ndarray) -> None:
    """Write one image and its mask under the HipMRI names."""
    if z in vol["singleton"]:
        img, mask = img[..., None], mask[..., None]
    stem = f"{vol['case']:03d}_week_{vol['week']}_slice_{z}.nii.gz"
    # No fsync for 25,320 files: phantom.json, written last (with fsync), is what marks a finished phantom.
    atomic_write_bytes(out_dir / f"keras_slices_{vol['split']}" / f"case_{stem}", nifti_gz(img), fsync=False)
    atomic_write_bytes(out_dir / f"keras_slices_seg_{vol['split']}" / f"seg_{stem}", nifti_gz(mask), fsync=False)


def write_volume(job: tuple) -> int:
    """Render and write every slice of one volume (one worker task); returns the slice count."""
    out_dir, seed, vol = job
    anat, wk = volume_state(seed, vol)
    grid = volume_grid(anat, wk, vol["width"])
    for z in range(vol["slices"]):
        write_pair(Path(out_dir), vol, z, *render_slice(anat, wk, vol, z, grid))
    return vol["slices"]


def phantom_folders(out: Path) -> list[Path]:
    """The six keras_slices_* folders of a data set."""
    return [out / f"keras_slices_{prefix}{split}" for split in SPLITS for prefix in ("", "seg_")]


def clear_old_phantom(out: Path) -> None:
    """Remove the files of an earlier or unfinished phantom; refuse to touch a folder that is not one."""
    old = [f for d in phantom_folders(out) if d.is_dir() for f in d.iterdir() if f.name.endswith((".nii.gz", ".tmp"))]
    if old and not (out / MARKER).exists() and not (out / (MARKER + ".partial")).exists():
        raise FileExistsError(f"{out} holds {len(old)} NIfTI files but no {MARKER}: it does not look like a "
                              "phantom folder, so nothing was overwritten. Choose an empty --out folder.")
    for f in old:
        f.unlink()


def generate(out_dir, preset: str = "demo", seed: int = 42, workers: int | None = None, progress: bool = True) -> dict:
    """Write the phantom data set into out_dir and return pairs per split (skips a finished identical run)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out = Path(out_dir)
    marker = out / MARKER
    if marker.exists():
        info = json.loads(marker.read_text())
        if (info.get("preset"), info.get("seed"), info.get("version")) == (preset, seed, VERSION):
            return info["counts"]
    volumes = plan_volumes(preset, seed)
    counts = {s: sum(v["slices"] for v in volumes if v["split"] == s) for s in SPLITS}
    out.mkdir(parents=True, exist_ok=True)
    clear_old_phantom(out)
    marker.unlink(missing_ok=True)
    (out / (MARKER + ".partial")).write_text(json.dumps({"preset": preset, "seed": seed}))
    for folder in phantom_folders(out):
        folder.mkdir(exist_ok=True)
    jobs = [(str(out), seed, v) for v in volumes]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    bar = tqdm(total=sum(counts.values()), desc=f"phantom {preset}", unit="pair", disable=not progress)
    # joblib's loky workers are fresh interpreters (no fork of TensorFlow's threads) that import only this
    # module: multiprocessing's spawn would run the caller's script again in each, and fail for a script read
    # from stdin. With one worker joblib runs the jobs in this process.
    parallel = joblib.Parallel(n_jobs=workers, backend="loky", return_as="generator_unordered",
                               idle_worker_timeout=WORKER_IDLE_S)
    for n in parallel(joblib.delayed(write_volume)(job) for job in jobs):
        bar.update(n)
    bar.close()
    info = {"preset": preset, "seed": seed, "version": VERSION, "counts": counts,
            "slices_per_volume": PRESETS[preset]["slices"], "labels": list(CLASS_NAMES)}
    atomic_write_json(marker, info)
    (out / (MARKER + ".partial")).unlink(missing_ok=True)
    return counts


def preview_slices(data_dir, seed: int, preset: str = "demo") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Six (title, image, mask) slices from different cases, weeks and scan positions."""
    volumes = [v for v in plan_volumes(preset, seed) if v["split"] == "train"]
    by_case = {}
    for v in volumes:
        by_case.setdefault(v["case"], []).append(v)
    wide = [v for v in volumes if v["width"] == 144][:1]  # show one 256 x 144 volume too
    others = [c for c in by_case if not wide or c != wide[0]["case"]]
    picks = (wide + [by_case[c][(i + 1) % len(by_case[c])] for i, c in enumerate(others)])[:6]
    out = []
    for v, frac in zip(picks, [0.1, 0.3, 0.45, 0.6, 0.72, 0.9]):
        z = int(frac * v["slices"])
        pos = "top" if z < v["slices"] / 3 else "middle" if z < 2 * v["slices"] / 3 else "bottom"
        if data_dir is not None:
            stem = f"{v['case']:03d}_week_{v['week']}_slice_{z}.nii.gz"
            img = np.asarray(nib.load(Path(data_dir, "keras_slices_train", "case_" + stem)).dataobj)
            mask = np.asarray(nib.load(Path(data_dir, "keras_slices_seg_train", "seg_" + stem)).dataobj)
        else:
            img, mask = render_slice(*volume_state(seed, v), v, z)
        title = f"case {v['case']:03d} week {v['week']} slice {z}/{v['slices']} ({pos})"
        out.append((title, np.squeeze(img), np.squeeze(mask)))
    return out


def save_preview(path, data_dir=None, seed: int = 42) -> None:
    """PNG of phantom slices above the same slices with their labels overlaid, drawn by figures.view: anterior up
    and, the slices being RAS, the patient's right on the viewer's right (neurological convention)."""
    info = {"preset": "demo", "seed": seed}  # without a data folder the slices are rendered in memory
    if data_dir is not None:
        if not Path(data_dir, MARKER).exists():
            raise FileNotFoundError(f"{data_dir} has no {MARKER}: preview a finished phantom, or pass no data_dir")
        info = json.loads(Path(data_dir, MARKER).read_text())
    import figures  # here: the writer processes import this module and need no matplotlib

    figures.save_phantom_preview(path, preview_slices(data_dir, info["seed"], info["preset"]), CLASS_NAMES,
                                 "Synthetic T2 pelvis phantom (axial, anterior up)")


def write_scans(data_dir, out_dir, split: str = "test") -> list[Path]:
    """Each case-week of a split as one 3D scan, stored as a scanner might: LPS axes with the slices first.

    The affine says so: nibabel's `aff2axcodes` gives S, L, P (axis 0 the slices, toward superior; axis 1 toward
    the patient's left; axis 2 toward posterior).

    The slices are stacked in slice order (top of the scan first); wider volumes keep their own width. These are
    the whole-scan inputs that `predict.py --input` takes; their masks come back in this same geometry.
    """
    import dataset  # the phantom's reader: pairing and slice order

    volumes = {}
    for ref in dataset.list_split(data_dir, split):
        volumes.setdefault(ref.volume, []).append(np.squeeze(np.asarray(nib.load(ref.image).dataobj, np.float32)))
    written = []
    for name, slices in volumes.items():
        ras = np.stack(slices, axis=-1)[..., ::-1]  # RAS, as the slices' affine says; slice 0 (the top) last
        rows, cols, n = ras.shape
        # Stored slices first and flipped in x and y, with the affine that says so: the same anatomy, LPS.
        lps = np.ascontiguousarray(np.moveaxis(ras[::-1, ::-1], 2, 0))
        affine = AFFINE @ np.array([[0, -1, 0, rows - 1], [0, 0, -1, cols - 1], [1, 0, 0, 0], [0, 0, 0, 1]], float)
        path = Path(out_dir) / f"{name}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, gzip.compress(nib.Nifti1Image(lps, affine).to_bytes(), compresslevel=1, mtime=0))
        written.append(path)
    return written


def main(argv=None) -> int:
    """Command line: write a phantom data set, and optionally its preview figure."""
    parser = argparse.ArgumentParser(description="Write a synthetic pelvic MRI phantom in the HipMRI layout.")
    parser.add_argument("-o", "--out", required=True, help="folder to write the keras_slices_* folders into")
    parser.add_argument("-p", "--preset", choices=list(PRESETS), default="demo",
                        help="size: tiny (tests), demo (a CPU training run), full (the real data set's counts)")
    parser.add_argument("-s", "--seed", type=int, default=42, help="random seed; same seed, same bytes")
    parser.add_argument("-w", "--workers", type=int, default=None, help="processes (default: all CPU cores)")
    parser.add_argument("--preview", default=None, help="also write a PNG of a few slices with their masks")
    parser.add_argument("--scans", default=None, metavar="DIR",
                        help="also write each test case-week as one 3D scan (LPS, slices first) into DIR")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    counts = generate(args.out, args.preset, args.seed, args.workers, progress=not args.quiet)
    print(f"phantom {args.preset} (seed {args.seed}) in {args.out}: "
          + ", ".join(f"{split} {n}" for split, n in counts.items()))
    if args.preview:
        save_preview(args.preview, args.out, args.seed)
        print(f"preview written to {args.preview}")
    if args.scans:
        print(f"{len(write_scans(args.out, args.scans))} 3D scan(s) written to {args.scans}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
