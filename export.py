"""Export a run's model for serving without this repo: a TensorFlow SavedModel and a TFLite file.

    python export.py --run runs/demo       # runs/demo/export/{saved_model/, model.tflite, config.json}

Both take a batch of preprocessed slices, float32 (batch, rows, cols, 1) - normalised and fitted to the network
input as the config.json beside them says (predict.py's preprocessing) - and return the probabilities of each
class, (batch, rows, cols, classes). The SavedModel's signature is `serve`; TF Serving, `tf.saved_model.load` or
any TensorFlow runtime can run it, and the TFLite file runs on tf.lite (or LiteRT) interpreters.
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


def export(run: Path, out: Path | None = None) -> Path:
    """Write OUT/saved_model (replaced whole, never half-written), OUT/model.tflite and OUT/config.json."""
    run = Path(run)
    out = Path(out) if out else run / "export"
    cfg = config.read(run / config.NAME)
    try:
        model = keras.models.load_model(run / "model.keras", compile=False)
    except Exception as e:  # Keras raises several types for a missing, truncated or foreign file
        raise RunError(f"{run / 'model.keras'}: not a readable Keras model ({type(e).__name__}: {e})") from None
    config.check_model(cfg, model.input_shape, model.output_shape[-1], run / config.NAME, run / "model.keras")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".saved_model.", dir=out))
    try:
        model.export(str(staging / "saved_model"), format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(staging / "saved_model"))
        atomic_write_bytes(out / "model.tflite", converter.convert())
        old = out / "saved_model"
        if old.exists():
            shutil.rmtree(old)
        os.replace(staging / "saved_model", old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write_bytes(out / config.NAME, (run / config.NAME).read_bytes())
    rows, cols = cfg["input_size"]
    print(f"wrote {out}/saved_model (signature 'serve': float32 (batch, {rows}, {cols}, 1) -> probabilities of "
          f"{cfg['channel_names']}), {out}/model.tflite and {out}/{config.NAME}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-r", "--run", required=True, help="run folder written by train.py (model.keras + config.json)")
    p.add_argument("-o", "--out", default=None, help="output folder (default: RUN/export)")
    args = p.parse_args(argv)
    try:
        export(args.run, args.out)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
