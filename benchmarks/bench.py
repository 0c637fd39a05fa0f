"""Speed of this project on this machine: loading, training, prediction and scoring, in one run.

    python benchmarks/bench.py            # full phantom (12,660 pairs), base 16 and 64
    python benchmarks/bench.py --quick    # demo phantom, base 16 only, fewer steps (~2 min)
    python benchmarks/bench.py --peers --peers-dir DIR   # also DIR/keras_unet_speed.py, the reference Keras script
    python benchmarks/bench.py --dice     # also the demo run under each precision: validation Dice (~20 min)

Prints a markdown table and writes every number, with the machine it ran on, to --out. Timings on a
shared machine drift: compare the ratios inside one run, and read the load average it reports.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dataset  # noqa: E402
import modules  # noqa: E402
import pipeline  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402
from atomic_io import atomic_write_json  # noqa: E402
from preprocess import Preprocessing, make_target  # noqa: E402

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
PEERS_ENV = "BENCH_PEERS"  # the folder of the reference script, when --peers-dir is not given
BATCH = 8  # train.py's default


# ----------------------------------------------------------------------------- machine

def machine_info() -> dict:
    """CPU model and the flags that decide the precision, cores, memory, library versions, load, date."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo, re.M).group(1).split()) if "flags" in cpuinfo else set()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    mem = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()) if Path("/proc/meminfo").exists() else None
    return {"cpu": model.group(1) if model else platform.processor(), "cpu_flags": [f for f in CPU_FLAGS if f in flags],
            "cores": len(os.sched_getaffinity(0)), "memory_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")], "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
            "load_average_start": os.getloadavg(), "date": datetime.datetime.now().isoformat(timespec="seconds")}


# ----------------------------------------------------------------------------- loading

def all_refs(data_dir) -> list:
    """Every image/mask pair of the three splits."""
    return [r for split in dataset.SPLITS for r in dataset.list_split(data_dir, split)]


def read_into_page_cache(refs) -> None:
    """Read every file once, so the naive loop and the loader both read from the OS page cache."""
    for r in refs:
        for p in (r.image, r.mask):
            with open(p, "rb") as f:
                while f.read(1 << 20):
                    pass


def naive_load(refs) -> float:
    """Seconds for the loop a user would write first: nibabel, one file at a time, float64."""
    start = time.perf_counter()
    for r in refs:
        nib.load(r.image).get_fdata(), nib.load(r.mask).get_fdata()
    return time.perf_counter() - start


COLD_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import dataset
start = time.perf_counter()
splits = [dataset.load_split({data!r}, s, use_cache=False, progress=False) for s in dataset.SPLITS]
seconds = time.perf_counter() - start
for d in splits:  # touch every page, as training does, so the arrays count in this process's peak
    float(d.images.reshape(-1)[::1024].sum()) + float(d.masks.reshape(-1)[::4096].sum())
print(json.dumps({{"pairs": sum(map(len, splits)), "seconds": seconds,
                  "array_mb": sum(d.images.nbytes + d.masks.nbytes for d in splits) / 2**20,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def cold_load_in_child(data_dir) -> dict:
    """Load every split without the cache in a fresh process: its time and peak resident memory (arrays touched)."""
    code = COLD_CHILD.format(root=str(ROOT), data=str(data_dir))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm_load(data_dir, cache_dir) -> tuple[float, dict]:
    """Fill the cache, then time a second load that is served from it (touching every page of the arrays)."""
    for split in dataset.SPLITS:
        dataset.load_split(data_dir, split, cache_dir=cache_dir, progress=False)
    start = time.perf_counter()
    splits = {s: dataset.load_split(data_dir, s, cache_dir=cache_dir, progress=False) for s in dataset.SPLITS}
    for d in splits.values():  # the cache maps the files: count the first touch of every 4 KiB page too
        float(d.images.reshape(-1)[::1024].sum()) + float(d.masks.reshape(-1)[::4096].sum())
    return time.perf_counter() - start, splits


def bench_loading(data_dir, cache_dir, rounds: int = 3) -> tuple[dict, dict]:
    """Naive loop vs the project's loader, cold and warm, in pairs/s; peak memory of the cold load.

    Naive and cold loads take turns, `rounds` times, and each reports its median: this VM's speed (and the
    cost of first touching fresh memory in it) drifts from one moment to the next.
    """
    refs = all_refs(data_dir)
    read_into_page_cache(refs)
    n = len(refs)
    naive, cold = [], []
    for _ in range(rounds):
        naive.append(n / naive_load(refs))
        cold.append(cold_load_in_child(data_dir))
    warm = []
    for _ in range(rounds):
        seconds, splits = warm_load(data_dir, cache_dir)
        warm.append(n / seconds)
    cold_rates = [n / c["seconds"] for c in cold]
    res = {"pairs": n, "rounds": rounds, "naive_pairs_per_s": float(np.median(naive)),
           "cold_pairs_per_s": float(np.median(cold_rates)), "warm_pairs_per_s": float(np.median(warm)),
           "naive_rounds": naive, "cold_rounds": cold_rates, "warm_rounds": warm,
           "cold_peak_rss_mb": max(c["peak_rss_mb"] for c in cold), "cold_array_mb": cold[0]["array_mb"],
           "page_cache": "warm for both (every file read once before timing)"}
    res["cold_vs_naive"] = res["cold_pairs_per_s"] / res["naive_pairs_per_s"]
    res["warm_vs_naive"] = res["warm_pairs_per_s"] / res["naive_pairs_per_s"]
    return res, splits


# ----------------------------------------------------------------------------- training and prediction

TRAIN_FLAGS: list = []  # --train-flags: train.py flags the model and the pipeline are built with


def build_model(base: int, precision: str, steps_per_epoch: int = 125):
    """The U-Net built and compiled exactly as train.py does it (its defaults, or --train-flags) under `precision`."""
    keras.mixed_precision.set_global_policy(precision)
    args = train.parse_args([*TRAIN_FLAGS, "-f", str(base)])
    model = modules.build_unet((*args.size, 1), len(args.class_names), base)
    jit = args.jit == "on" or (args.jit == "auto" and bool(tf.config.list_physical_devices("GPU")))  # as train.py
    lr = train.peak_lr(args, steps_per_epoch)  # the rate train.py would pick
    model.compile(train.make_optimizer(args, lr, steps_per_epoch), modules.SegmentationLoss(args.loss, args.dice_over),
                  metrics=modules.segmentation_metrics(args.class_names), jit_compile=jit)
    model.optimizer.build(model.trainable_variables)
    return model


class StepClock(keras.callbacks.Callback):
    """The wall time at the end of every training step."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())


def train_rate(model, feed, steps: int) -> float:
    """Images/s of one model.fit over steps + 1 batches, timed from the end of the first (feed: dataset or (x, y))."""
    clock = StepClock()
    if isinstance(feed, tuple):  # in-memory arrays: Keras slices them itself
        x, y = feed
        n = (steps + 1) * BATCH
        model.fit(x[:n], y[:n], batch_size=BATCH, epochs=1, shuffle=True, callbacks=[clock], verbose=0)
    else:
        model.fit(feed, epochs=1, steps_per_epoch=steps + 1, callbacks=[clock], verbose=0, shuffle=False)
    gc.collect()  # free this fit's tf.data iterator now, so its prefetching cannot run into the next measurement
    t = clock.times
    return BATCH * (len(t) - 1) / (t[-1] - t[0])


def predict_rate(model, images) -> float:
    """Images/s of model.predict at batch 32 (after one warm-up call)."""
    model.predict(images[:32], batch_size=32, verbose=0)
    start = time.perf_counter()
    model.predict(images, batch_size=32, verbose=0)
    return len(images) / (time.perf_counter() - start)


def bench_training(train_data, test_data, bases, precisions, rounds, steps) -> tuple[list, dict]:
    """Per base and precision: training images/s (pipeline with augmentation vs arrays) and prediction images/s.

    The configurations of a base take turns, `rounds` times, and each reports its median: a machine that
    slows down for a while slows them all, so the ratios hold even when the absolute numbers drift.
    """
    args = train.parse_args(TRAIN_FLAGS)
    batches = pipeline.make_dataset(train_data, BATCH, shuffle=True, epochs=None,
                                    augment=pipeline.augmentation(args.augment, unit_range=args.norm != "zscore"))
    n = (steps + 1) * BATCH
    memory = (np.ascontiguousarray(train_data.images[:n]), make_target(train_data.masks[:n], None)[..., None])
    test_images = np.ascontiguousarray(test_data.images)
    rows, models = [], {}
    for base in bases:
        s, r = (steps, rounds) if base <= 16 else (max(3, steps // 4), max(2, rounds // 2))  # base 64: ~15x slower
        group = {p: build_model(base, p) for p in precisions}
        for model in group.values():  # warm-up: trace, allocate, settle
            train_rate(model, batches, 2), train_rate(model, memory, 2)
        rates = {(p, feed): [] for p in precisions for feed in ("pipeline", "memory")}
        for _ in range(r):
            for (p, feed), got in rates.items():
                got.append(train_rate(group[p], batches if feed == "pipeline" else memory, s))
        for p, model in group.items():
            row = {"base": base, "precision": p, "batch": BATCH, "steps": s, "rounds": r,
                   "pipeline_img_s": float(np.median(rates[p, "pipeline"])),
                   "memory_img_s": float(np.median(rates[p, "memory"])),
                   "predict_img_s": predict_rate(model, test_images if base <= 16 else test_images[:96])}
            row["pipeline_overhead"] = 1 - row["pipeline_img_s"] / row["memory_img_s"]
            rows.append(row)
            models[(base, p)] = model
            print(f"  base {base} {p}: {row['pipeline_img_s']:.1f} img/s pipeline, "
                  f"{row['memory_img_s']:.1f} in memory, predict {row['predict_img_s']:.1f}", flush=True)
    keras.mixed_precision.set_global_policy("float32")
    return rows, models


# ----------------------------------------------------------------------------- scoring end to end

def write_run_folder(run: Path, model, base, data_dir, precision, train_data, val_data) -> None:
    """A run folder as train.py writes it (model.keras + config.json), from a model trained here."""
    args = train.parse_args(["-d", str(data_dir), "-o", str(run), "-f", str(base)])
    args.data_dir = str(data_dir)
    prep = Preprocessing(args.size, args.norm, args.num_classes, args.fit)
    cfg = train.run_config(args, prep, precision, tf.distribute.get_strategy(), train_data, val_data)
    modules.save_model(modules.with_probabilities(model), run / "model.keras")
    atomic_write_json(run / "config.json", cfg)


def score_end_to_end(run: Path, data_dir, cache_dir) -> dict:
    """Wall time of `python predict.py --run R --split test` as a user runs it: cold (no cache), then warm."""
    out = {}
    for label in ("cold", "warm"):
        cmd = [sys.executable, "predict.py", "--run", str(run), "--data-dir", str(data_dir), "--split", "test",
               "--out", str(run / "eval-test"), "--cache-dir", str(cache_dir), "--quiet"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"predict.py failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
        out[f"{label}_seconds"] = seconds
        out[f"{label}_inside_seconds"] = metrics.get("seconds")
        out["slices"] = metrics["n_slices"]
    return out


# ----------------------------------------------------------------------------- accuracy

def dice_check(work: Path, precisions) -> list:
    """Best validation Dice of the README's demo run (train.py defaults) under each precision.

    About 7 min in bfloat16 and 12 min in float32 on the 2-core development CPU.
    """
    data_dir = work / "phantom-demo"
    synthetic.generate(data_dir, "demo", seed=42, progress=False)
    rows = []
    for precision in precisions:
        run = work / f"dice-{precision}"
        shutil.rmtree(run, ignore_errors=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "train.py", "-d", str(data_dir), "-o", str(run), "--precision", precision,
                        "--cache-dir", str(work / "cache-dice"), "-q"], cwd=ROOT, check=True, capture_output=True)
        state = json.loads((run / "state.json").read_text())
        rows.append({"precision": precision, "best_val_dice": state["best"], "best_epoch": state["best_epoch"],
                     "seconds": time.perf_counter() - start})
    return rows


# ----------------------------------------------------------------------------- peers

def run_peer(peers: Path, base: int, precision: str) -> dict:
    """The reference Keras script peers/keras_unet_speed.py (random data, plain U-Net) under a precision policy:
    train and predict img/s."""
    code = (f"import sys, keras; keras.mixed_precision.set_global_policy({precision!r}); "
            f"sys.argv = ['keras_unet_speed.py', '{base}']; import runpy; "
            f"runpy.run_path({str(Path(peers) / 'keras_unet_speed.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    train_s, pred_s = (float(m) for m in re.findall(r"([\d.]+) img/s", proc.stdout))
    return {"base": base, "precision": precision, "train_img_s": train_s, "predict_img_s": pred_s}


# ----------------------------------------------------------------------------- report

def table(res: dict) -> str:
    """The markdown table printed at the end (and pasted in the README)."""
    m = res["machine"]
    rows = [("machine", f"{m['cpu']}, {m['cores']} cores, {', '.join(m['cpu_flags'])}; TF {m['tensorflow']}", "")]
    if ld := res.get("loading"):
        each = lambda k: "rounds: " + ", ".join(f"{v:.0f}" for v in ld.get(k, []))  # noqa: E731
        rows += [(f"load {ld['pairs']} pairs: naive nibabel loop (median)", f"{ld['naive_pairs_per_s']:.0f} pairs/s",
                  f"1.0x; {each('naive_rounds')}"),
                 ("load: project loader, cold (no cache)", f"{ld['cold_pairs_per_s']:.0f} pairs/s",
                  f"{ld['cold_vs_naive']:.1f}x; {each('cold_rounds')}; nibabel; threads, or 2 processes for splits of 2,000+ pairs"),
                 ("load: project loader, warm (cache)", f"{ld['warm_pairs_per_s']:.0f} pairs/s",
                  f"{ld['warm_vs_naive']:.0f}x; {each('warm_rounds')}"),
                 ("load: peak memory, cold", f"{ld['cold_peak_rss_mb']:.0f} MiB",
                  f"arrays {ld['cold_array_mb']:.0f} MiB")]
    f32 = {r["base"]: r for r in res.get("training", []) if r["precision"] == "float32"}
    for r in res.get("training", []):
        ratio = f"{r['pipeline_img_s'] / f32[r['base']]['pipeline_img_s']:.2f}x float32" if r["base"] in f32 else ""
        rows += [(f"train base {r['base']} {r['precision']}: tf.data + augmentation", f"{r['pipeline_img_s']:.1f} img/s", ratio),
                 (f"train base {r['base']} {r['precision']}: in-memory arrays", f"{r['memory_img_s']:.1f} img/s",
                  f"pipeline overhead {r['pipeline_overhead']:+.1%}"),
                 (f"predict base {r['base']} {r['precision']} (batch 32)", f"{r['predict_img_s']:.1f} img/s", "")]
    if "scoring" in res:
        s = res["scoring"]
        rows += [(f"score test split ({s['slices']} slices), predict.py, cold cache", f"{s['cold_seconds']:.1f} s", "whole command"),
                 (f"score test split ({s['slices']} slices), predict.py, warm cache", f"{s['warm_seconds']:.1f} s", "whole command")]
    for d in res.get("dice", []):
        rows.append((f"demo run ({d['precision']}): best validation Dice", f"{d['best_val_dice']:.4f}",
                     f"epoch {d['best_epoch']}, {d['seconds'] / 60:.0f} min"))
    for p in res.get("peers", []):
        rows.append((f"peer keras_unet_speed.py {p['base']} {p['precision']}", f"{p['train_img_s']:.1f} img/s",
                     f"predict {p['predict_img_s']:.1f} img/s"))
    rows.append(("load average (1 min) at start / end", f"{m['load_average_start'][0]:.2f} / {m['load_average_end'][0]:.2f}", ""))
    lines = ["| measure | value | ratio / note |", "|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-q", "--quick", action="store_true", help="demo phantom, base 16 only, fewer steps (~2 min)")
    p.add_argument("-o", "--out", default=str(ROOT / "benchmarks" / "results.json"), help="where the numbers go")
    p.add_argument("-w", "--work", default=str(ROOT / "benchmarks" / "work"), help="folder for the phantom, caches and runs")
    p.add_argument("--peers", action="store_true", help="also run the reference Keras script, float32 and bfloat16 "
                   "(needs --peers-dir)")
    p.add_argument("--peers-dir", default=os.environ.get(PEERS_ENV) or None, metavar="DIR",
                   help=f"folder holding the reference script keras_unet_speed.py, for --peers (default: the "
                   f"{PEERS_ENV} environment variable; no default otherwise)")
    p.add_argument("--dice", action="store_true", help="also train the demo run under each precision (~20 min)")
    p.add_argument("--parts", default="load,train,score", help="comma-separated subset of load,train,score")
    p.add_argument("--bases", default=None, help="comma-separated base filters to time (default: 16,64; quick: 16)")
    p.add_argument("--train-flags", default="", help="train.py flags for the timed model and pipeline, e.g. "
                   "'--augment wide'")
    p.add_argument("--precisions", default=None, help="comma-separated precisions to time (default: float32 and "
                   "what --precision auto picks here); e.g. float32 alone under ONEDNN_MAX_CPU_ISA=AVX2")
    args = p.parse_args(argv)
    if args.peers:
        if not args.peers_dir:
            p.error(f"--peers needs the reference script's folder: --peers-dir DIR (or {PEERS_ENV}=DIR)")
        if not (Path(args.peers_dir) / "keras_unet_speed.py").is_file():
            p.error(f"--peers-dir {args.peers_dir}: no keras_unet_speed.py there")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    TRAIN_FLAGS[:] = args.train_flags.split()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still removes its caches
    parts = set(args.parts.split(","))
    work = Path(args.work)
    preset = "demo" if args.quick else "full"
    res = {"preset": preset, "quick": args.quick, "train_flags": args.train_flags, "machine": machine_info()}
    data_dir = work / f"phantom-{preset}"
    synthetic.generate(data_dir, preset, seed=42)
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))  # a fresh cache every run: the first load is cold
    try:
        if "load" in parts:
            print(f"loading the {preset} phantom ({data_dir})", flush=True)
            res["loading"], splits = bench_loading(data_dir, cache)
        else:
            splits = {s: dataset.load_split(data_dir, s, cache_dir=cache, progress=False) for s in dataset.SPLITS}
        precisions = (args.precisions.split(",") if args.precisions
                      else list(dict.fromkeys(["float32", train.choose_precision("auto")])))
        if "train" in parts or "score" in parts:
            bases = [16] if args.quick or "train" not in parts else [16, 64]
            bases = [int(b) for b in args.bases.split(",")] if args.bases else bases
            rounds, steps = (2, 10) if args.quick or "train" not in parts else (4, 12)
            print(f"training throughput, batch {BATCH}: bases {bases}, {precisions}", flush=True)
            res["training"], models = bench_training(splits["train"], splits["test"], bases, precisions, rounds, steps)
        if "score" in parts:
            print("scoring the test split with predict.py", flush=True)
            run = work / "run-b16"
            write_run_folder(run, models[(16, precisions[-1])], 16, data_dir, precisions[-1], splits["train"],
                             splits["validate"])
            res["scoring"] = score_end_to_end(run, data_dir, cache / "score")
        if args.dice:
            print("demo runs for the validation Dice of each precision", flush=True)
            res["dice"] = dice_check(work, precisions)
        if args.peers:
            print("reference peers", flush=True)
            res["peers"] = [run_peer(Path(args.peers_dir), 16, p) for p in precisions]
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # gigabytes on the full preset
    res["machine"]["load_average_end"] = os.getloadavg()
    res["table"] = table(res)
    atomic_write_json(args.out, res)
    print(res["table"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
