"""The on-disk cache of loaded splits: keyed by their files and settings, memory-mapped when read back.

A cache folder holds one .npy file per array and meta.json, written last and atomically: a folder without
meta.json is never used. Reading maps the arrays copy-on-write, so a warm load takes a fraction of a second
and never changes the files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
import zlib
from pathlib import Path

import numpy as np

from atomic_io import atomic_write_json

VERSION = 2


def default_dir() -> Path:
    """Where loaded splits are cached: $HIPMRI_CACHE or ~/.cache/hipmri-unet."""
    return Path(os.environ.get("HIPMRI_CACHE", Path.home() / ".cache" / "hipmri-unet"))


def key(paths, settings) -> str:
    """The files' names, sizes and mtimes plus the settings: a changed file or setting gives another key."""
    h = hashlib.sha256(json.dumps([VERSION, settings], sort_keys=True).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:24]


def source(paths, settings) -> str:
    """What a cache was made from, without the files' sizes and mtimes: their folders and the settings."""
    folders = sorted({os.path.dirname(p) for p in paths})
    return hashlib.sha256(json.dumps([VERSION, settings, folders], sort_keys=True).encode()).hexdigest()[:24]


def read(folder: Path, expected: dict):
    """(arrays, meta) of a cache folder, or None when it is missing or fails a check (then with a warning).

    expected: {name: (shape after the first axis, dtype)}; every array has meta["n"] rows, and the arrays
    named in meta["crc32"] must match their checksums (an images file of the wrong size fails to map).
    """
    if not (folder / "meta.json").exists():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="c").view(np.ndarray) for name in expected}
        ok = all(a.shape == (meta["n"], *expected[k][0]) and a.dtype == expected[k][1] for k, a in arrays.items())
        ok = ok and all(zlib.crc32(arrays[k]) == crc for k, crc in meta["crc32"].items())
    except (OSError, ValueError, KeyError, EOFError):
        ok = False
    if not ok:
        warnings.warn(f"cache {folder} is corrupt or stale; rebuilding it")
        return None
    return arrays, meta


def write(folder: Path, arrays: dict, meta: dict, checksummed=(), made_from: str | None = None) -> None:
    """Write the arrays, then meta.json (atomically, last); `checksummed` arrays get a CRC-32 in meta.json.

    made_from: `source` of the split, kept in meta.json so that `drop_stale` can find this cache once stale.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        tmp = folder / f".{name}.{os.getpid()}.npy"
        try:
            np.save(tmp, arr)
            os.replace(tmp, folder / f"{name}.npy")
        finally:
            tmp.unlink(missing_ok=True)
    crc = {k: zlib.crc32(np.ascontiguousarray(arrays[k])) for k in checksummed}
    atomic_write_json(folder / "meta.json", {**meta, "crc32": crc, "source": made_from})


def drop_stale(folder: Path, made_from: str) -> None:
    """Remove the other caches of this split made from the same folders and settings: their files changed since.

    Caches of other data folders or settings stay (switching back to them is instant).
    """
    prefix = folder.name.rsplit("-", 1)[0]
    for other in folder.parent.glob(f"{prefix}-*"):
        if other == folder or not other.is_dir():
            continue
        try:
            stale = json.loads((other / "meta.json").read_text()).get("source") == made_from
        except (OSError, ValueError):
            continue  # being written, or not a cache: not ours to remove
        if stale:
            shutil.rmtree(other, ignore_errors=True)
