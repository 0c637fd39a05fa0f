"""Export a run's model for serving without this repo: a versioned TensorFlow SavedModel and a TFLite file.

    python export.py --run runs/demo                  # runs/demo/export/1/ (SavedModel), model.tflite, config.json
    python export.py --run runs/demo --version 2      # add version 2 beside 1 (TF Serving serves the highest)
    python export.py --run runs/demo --force          # replace version 1

Layout of OUT (default RUN/export), the model base path that TF Serving expects:

    OUT/<version>/saved_model.pb, variables/, ...   the SavedModel (signature `serve`, also `serving_default`)
    OUT/<version>/assets.extra/config.json          the run's config.json, kept with the version it belongs to
    OUT/model.tflite, OUT/config.json               the TFLite file and config.json of the version exported last

The version is a positive integer (default 1). An existing version is never overwritten unless --force is given:
a served version should not change under its number; export a new number instead. The SavedModel is written in a
staging folder inside OUT (a dot-name, which TF Serving ignores) and renamed into place, so a version folder is
either absent or complete.

Both models take a batch of preprocessed slices, float32 (batch, rows, cols, 1) - normalised and fitted to the
network input as config.json says (predict.py's preprocessing) - and return the probabilities of each class,
(batch, rows, cols, classes). TF Serving, `tf.saved_model.load` or any TensorFlow runtime can run the SavedModel,
and the TFLite file runs on tf.lite (or LiteRT) interpreters.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import config  # noqa: E402
import modules  # noqa: E402, F401  (registers the custom layers for load_model)
from atomic_io import atomic_write_bytes  # noqa: E402
from config import RunError  # noqa: E402


def check_version(version) -> int:
    """The version as a positive int (TF Serving reads version folders as integers), or RunError."""
    text = str(version).strip()
    if isinstance(version, bool) or not text.isdigit() or not 1 <= int(text) < 2**63:  # TF Serving: int64
        raise RunError(f"version {version!r}: expected a positive integer (the SavedModel goes to OUT/<version>/)")
    return int(text)


def export(run: Path, out: Path | None = None, version: int = 1, force: bool = False) -> Path:
    """Write OUT/<version>/ (a SavedModel, renamed into place whole), OUT/model.tflite and OUT/config.json.

    Refuses (RunError) to replace an existing OUT/<version>/ unless `force`. Returns the version folder.
    """
    run = Path(run)
    out = Path(out) if out else run / "export"
    version = check_version(version)
    target = out / str(version)
    if target.exists() and not force:  # before the slow part: say so at once
        raise RunError(f"{target} exists: export a new version (--version {next_version(out)}; TF Serving serves "
                       f"the highest) or pass --force to replace version {version}")
    cfg = config.read(run / config.NAME)
    try:
        model = keras.models.load_model(run / "model.keras", compile=False)
    except Exception as e:  # Keras raises several types for a missing, truncated or foreign file
        raise RunError(f"{run / 'model.keras'}: not a readable Keras model ({type(e).__name__}: {e})") from None
    config.check_model(cfg, model.input_shape, model.output_shape[-1], run / config.NAME, run / "model.keras")
    cfg_bytes = (run / config.NAME).read_bytes()
    out.mkdir(parents=True, exist_ok=True)
    # A dot-name: TF Serving only loads folders named by an integer, so it never sees a half-written version.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        staged = staging / str(version)
        model.export(str(staged), format="tf_saved_model", verbose=False)
        (staged / "assets.extra").mkdir(exist_ok=True)
        (staged / "assets.extra" / config.NAME).write_bytes(cfg_bytes)
        tflite = tf.lite.TFLiteConverter.from_saved_model(str(staged)).convert()
        if target.exists():  # --force: move the old version aside, then rename the new one in
            os.replace(target, staging / "replaced")
        os.replace(staged, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write_bytes(out / "model.tflite", tflite)
    atomic_write_bytes(out / config.NAME, cfg_bytes)
    rows, cols = cfg["input_size"]
    print(f"wrote {target}/ (SavedModel, signature 'serve': float32 (batch, {rows}, {cols}, 1) -> probabilities of "
          f"{cfg['channel_names']}), {out}/model.tflite and {out}/{config.NAME}")
    if (out / "saved_model").is_dir():
        print(f"note: {out}/saved_model is an export of the former unversioned layout; TF Serving ignores it, and "
              f"it can be deleted")
    return target


def next_version(out: Path) -> int:
    """One more than the highest version folder in OUT (1 when there is none)."""
    out = Path(out)
    numbers = [int(p.name) for p in out.iterdir() if p.is_dir() and p.name.isdigit()] if out.is_dir() else []
    return max(numbers, default=0) + 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-r", "--run", required=True, help="run folder written by train.py (model.keras + config.json)")
    p.add_argument("-o", "--out", default=None,
                   help="output folder, TF Serving's model base path (default: RUN/export)")
    p.add_argument("-v", "--version", default="1",
                   help="version number: the SavedModel goes to OUT/VERSION/ (a positive integer; default 1)")
    p.add_argument("-f", "--force", action="store_true", help="replace OUT/VERSION/ if it exists (default: refuse)")
    args = p.parse_args(argv)
    try:
        export(args.run, args.out, args.version, args.force)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
