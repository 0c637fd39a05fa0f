"""config.json, the record of a run: written by train.py, read and checked by predict.py and export.py.

It holds every training flag, the preprocessing that turns a file into a network input, the class and
channel names, the training slices' geometry, the data fingerprints and the library versions, so that a
run folder alone rebuilds everything.
"""
from __future__ import annotations

import json
from pathlib import Path

from atomic_io import atomic_write_json
from preprocess import FITS, NORMS, Preprocessing

NAME = "config.json"
REQUIRED = ("input_size", "target_ids", "channel_names", "class_names", "num_classes", "preprocessing")
# What the checkpoint keeps for itself (weights' shapes, loss, learning rate, layer precision) or what
# predict.py reads: a resume that changed one of these would be recorded but not done.
RESUME_KEYS = ("target_ids", "input_size", "base_filters", "num_classes", "class_names", "preprocessing", "data",
               "seed", "global_batch_size", "loss", "dice_over", "optimizer", "schedule", "warmup", "ema", "augment",
               "effective_lr", "precision", "norm_layer")
ADDED_KEYS = {"norm_layer": "batch"}  # keys newer than some runs, with the value those runs had


class RunError(ValueError):
    """A run folder that cannot be used as it is; the message names the file and what to do."""


def channel_names(class_names, target_ids) -> list:
    """Names of the model's output channels: every class, or the one binary target."""
    if target_ids is None:
        return list(class_names)
    return ["+".join(class_names[i] for i in target_ids)]


def build(flags: dict, prep: Preprocessing, *, target_ids, replicas: int, precision: str, data: dict,
          geometry: dict, versions: dict, devices: list) -> dict:
    """The config of a run: its flags plus what they imply and what it ran on."""
    cfg = {k: v for k, v in flags.items() if k not in ("target_ids", "size", "quiet")}
    cfg.update(
        input_size=list(prep.size), target_ids=list(target_ids) if target_ids else None,
        channel_names=channel_names(flags["class_names"], target_ids), precision=precision, replicas=replicas,
        global_batch_size=flags["batch_size"] * replicas, effective_lr=flags["lr"] * replicas,
        preprocessing={"size": list(prep.size), "norm": prep.norm, "num_classes": prep.num_classes, "fit": prep.fit,
                       "spacing": list(prep.spacing) if prep.spacing else None},
        data=data, geometry=geometry, versions=versions, device=devices)
    return cfg


def write(folder: Path, cfg: dict) -> None:
    """config.json into the run folder, atomically."""
    atomic_write_json(Path(folder) / NAME, cfg)


def read(path: Path) -> dict:
    """A run's config.json, checked to hold what predict.py needs and to agree with itself."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
        missing = [k for k in REQUIRED if k not in cfg]
    except (OSError, ValueError, TypeError) as e:
        raise RunError(f"{path}: cannot read the run's config ({type(e).__name__}: {e}); expected the "
                       "config.json that train.py writes beside model.keras") from None
    if missing:
        raise RunError(f"{path}: keys {missing} are missing; expected a config.json written by train.py")
    p, binary = cfg["preprocessing"], cfg["target_ids"] is not None
    consistent = (list(p.get("size", [])) == list(cfg["input_size"]) and p.get("num_classes") == cfg["num_classes"]
                  and len(cfg["class_names"]) == cfg["num_classes"] and p.get("norm") in NORMS
                  and p.get("fit", "resize") in FITS
                  and len(cfg["channel_names"]) == (1 if binary else cfg["num_classes"]))
    if not consistent:
        raise RunError(f"{path} contradicts itself: channel_names {cfg['channel_names']}, {cfg['num_classes']} "
                       f"classes {cfg['class_names']}, target_ids {cfg['target_ids']}, input_size "
                       f"{cfg['input_size']}, preprocessing {p}; use the config.json written with the model")
    return cfg


def preprocessing(cfg: dict) -> Preprocessing:
    """The run's preprocessing, exactly as training used it (runs from before the spacing was recorded in it: the
    spacing their geometry implies, which is what their prediction used)."""
    p = cfg["preprocessing"]
    fit = p.get("fit", "resize")
    spacing = p["spacing"] if "spacing" in p else network_spacing(cfg.get("geometry"), fit, cfg["input_size"])
    return Preprocessing(tuple(p["size"]), p["norm"], p["num_classes"], fit, tuple(spacing) if spacing else None)


def network_spacing(geometry: dict | None, fit: str, size):
    """(row mm, col mm) of one network pixel, from the training split's geometry summary; None without one.

    With --fit crop a network pixel is a pixel of the median training slice; with --fit resize the median
    training slice fills the network input, so its pixel spacing scales by shape / size.
    """
    geo = geometry or {}
    spacing, shape = geo.get("spacing_mm_median"), geo.get("shape_median")
    if not spacing:
        return None
    if fit == "crop":
        return tuple(float(s) for s in spacing)
    return tuple(round(float(s) * n / t, 6) for s, n, t in zip(spacing, shape, size))


def check_model(cfg: dict, input_shape, output_channels: int, config_path, model_path) -> None:
    """Refuse a config.json that does not describe this model."""
    found = {"input size": list(input_shape[1:3]), "output channels": output_channels}
    expected = {"input size": list(cfg["input_size"]), "output channels": len(cfg["channel_names"])}
    if found != expected:
        raise RunError(f"{config_path} does not match {model_path}: the model has {found}, the config expects "
                       f"{expected}; use the config.json written with this model")


def resume_conflict(saved: dict, new: dict):
    """The first setting that a resume may not change and that differs: (key, saved value, new value), or None.

    The learning rate is compared as the effective rate (lr x replicas) the optimizer runs with: a resume on
    another replica count with a compensating --batch-size keeps the global batch but changes the rate. With a
    decaying schedule the number of epochs may not change either.
    """
    # A decaying schedule is fixed by the run's length (the checkpoint holds it): more epochs would not follow it.
    for key in RESUME_KEYS + (("epochs",) if new.get("schedule", "plateau") != "plateau" else ()):
        old = saved.get(key, ADDED_KEYS.get(key))
        if old != new.get(key):
            return key, old, new.get(key)
    return None
