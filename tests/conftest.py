"""Shared fixtures: a tiny phantom made once per session, and hand-made NIfTI files."""
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keep test caches out of the user's ~/.cache.
os.environ["HIPMRI_CACHE"] = tempfile.mkdtemp(prefix="hipmri-test-cache-")

import nibabel as nib  # noqa: E402


def write_nifti(path, array, affine=None, dtype=None):
    """Save an array as NIfTI (.nii or .nii.gz by the name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array) if dtype is None else np.asarray(array).astype(dtype)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def make_layout(root, pairs=None, shape=(256, 128), seed=0, splits=("train", "validate", "test")):
    """A small HipMRI-layout folder: `pairs` of (case, week, slice) per split with random anatomy-free data."""
    rng = np.random.default_rng(seed)
    from dataset import SPLITS
    pairs = pairs or [(1, 0, 0), (1, 0, 1), (2, 0, 0)]
    for split in splits:
        img_dir, seg_dir = (Path(root) / d for d in SPLITS[split])
        for case, week, sl in pairs:
            mask = rng.integers(0, 6, shape).astype(np.float32)
            write_nifti(img_dir / f"case_{case:03d}_week_{week}_slice_{sl}.nii.gz", rng.random(shape) * 900 + 50,
                        dtype=np.float32)
            write_nifti(seg_dir / f"seg_{case:03d}_week_{week}_slice_{sl}.nii.gz", mask)
    return Path(root)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The tiny synthetic phantom, generated once for the whole session."""
    import synthetic
    out = tmp_path_factory.mktemp("tiny")
    synthetic.generate(out, "tiny", seed=42, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """A 2-epoch, base-4 run on the tiny phantom, trained once for the whole session."""
    import train
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert train.main(["-d", str(tiny_data), "-o", str(out), "-e", "2", "-f", "4", "-q"]) == 0
    return out


def pytest_configure(config):
    """Keras' NumPy-2 deprecation chatter hides real warnings."""
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:keras")


def pytest_unconfigure(config):
    """Remove the session's cache folder."""
    import shutil
    shutil.rmtree(os.environ["HIPMRI_CACHE"], ignore_errors=True)
