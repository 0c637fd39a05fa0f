"""Does inference match training? Validation Dice of a run's best model with batch-norm moving statistics
(inference, as predict.py runs it) against each batch's own statistics (as in training).

    python benchmarks/bn_modes.py RUN [RUN ...]

A large gap means the moving averages lag the weights (Keras' momentum 0.99 on a few hundred steps does this);
the U-Net here uses 0.9.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import config  # noqa: E402
import dataset  # noqa: E402
import evaluate  # noqa: E402
import modules  # noqa: E402, F401  (registers the custom layers)
from preprocess import make_target  # noqa: E402


def main(runs) -> int:
    print("| run | validation mean foreground Dice, inference (moving statistics) | with batch statistics (batches of 8) |")
    print("|---|---|---|")
    for run in map(Path, runs):
        cfg = config.read(run / config.NAME)
        model = keras.models.load_model(run / "model.keras", compile=False)
        data = dataset.load_split(cfg["data_dir"], "validate", config.preprocessing(cfg), progress=False)
        truth = make_target(data.masks, cfg["target_ids"])
        labels = [1] if cfg["target_ids"] else list(range(1, cfg["num_classes"]))
        scores = []
        for training in (False, True):
            probs = np.concatenate([np.asarray(model(data.images[i:i + 8], training=training))
                                    for i in range(0, len(data), 8)])
            pred = (probs[..., 0] > 0.5).astype(np.uint8) if probs.shape[-1] == 1 else probs.argmax(-1)
            dice, _ = evaluate.score_slices(list(truth), list(pred), labels)
            with np.errstate(all="ignore"):
                scores.append(float(np.nanmean(np.nanmean(dice, axis=0))))
        print(f"| {run} | {scores[0]:.4f} | {scores[1]:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
