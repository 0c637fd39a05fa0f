"""Shared fixtures: a tiny phantom made once per session, and hand-made NIfTI files."""
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
# Training tests run a base-4 U-Net at 64x32: the code paths are those of a full-size run, at a fraction of the cost.
SMALL = ["-f", "4", "--size", "64x32", "--fit", "resize", "-q"]
# The session's trained run: base 8 (base 4 does not find bone or bladder at 64x32 in a few epochs), a decaying rate,
# no weight average (60 steps that still climb fast at the end: the average lags them, bladder 0.49 against 0.56).
TINY_RUN_EPOCHS = 12
TINY_RUN_FLAGS = ["-f", "8", "--size", "64x32", "--fit", "resize", "-q", "--precision", "float32", "--batch-size", "10",
                  "--schedule", "cosine", "--warmup", "1", "--lr", "5e-3", "--ema", "0"]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One thread per TensorFlow process: pytest-xdist already runs a worker per core, and the tests' subprocesses
# inherit this (several processes each spreading ops over every core only thrash).
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
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


def _shared(tmp_path_factory, name: str) -> Path:
    """A folder that every pytest-xdist worker of this session sees (the session's own without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The tiny synthetic phantom, generated once for the whole session (whichever worker comes first)."""
    import synthetic
    out = _shared(tmp_path_factory, "tiny")
    with FileLock(f"{out}.lock"):
        synthetic.generate(out, "tiny", seed=42, progress=False)  # returns at once once phantom.json is there
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """The session's trained run: float32, base 8, 64x32, global batches of 10 (the tiny phantom's 48 training
    slices leave a short last batch), 12 epochs. test_train checks that it learned; test_predict,
    test_inference and test_export score, segment and export with it. Trained once, by the first worker."""
    import train
    out = _shared(tmp_path_factory, "runs") / "tiny"
    with FileLock(f"{out}.lock"):
        if not (out / "model.keras").exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            assert train.main(["-d", str(tiny_data), "-o", str(out), "-e", str(TINY_RUN_EPOCHS),
                               *TINY_RUN_FLAGS]) == 0
    return out


def pytest_collection_modifyitems(config, items):
    """The tests that use the tiny run go to one pytest-xdist worker (`--dist loadgroup`, as `make test` runs):
    the other worker then never sits idle waiting for the run's lock; it takes the other tests."""
    for item in items:
        if "tiny_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("tiny_run"))


def pytest_configure(config):
    """Keras' NumPy-2 deprecation chatter hides real warnings."""
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:keras")


def pytest_unconfigure(config):
    """Remove the session's cache folder."""
    import shutil
    shutil.rmtree(os.environ["HIPMRI_CACHE"], ignore_errors=True)
