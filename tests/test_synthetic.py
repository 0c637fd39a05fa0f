"""Tests of the synthetic HipMRI phantom: layout, determinism, arrays and anatomy of the tiny preset."""
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataset  # noqa: E402
import synthetic  # noqa: E402

NAME = re.compile(r"^(case|seg)_(\d{3})_week_(\d+)_slice_(\d+)\.nii\.gz$")
TARGET_SHARES = {"background": 0.17, "body": 0.67, "bone": 0.13, "bladder": 0.02, "rectum": 0.004, "prostate": 0.004}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny phantom written once for the whole module."""
    out = tmp_path_factory.mktemp("tiny42")
    counts = synthetic.generate(out, "tiny", seed=42, workers=1, progress=False)
    return out, counts


def files(out, split, seg=False):
    """Sorted file names of one split's image or mask folder."""
    return sorted(p.name for p in (Path(out) / f"keras_slices_{'seg_' if seg else ''}{split}").iterdir())


def load(path):
    """Array and affine of a NIfTI file."""
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def volumes(out, split):
    """{(case, week): [(slice, image path, mask path)]} of a split, sorted by slice."""
    vols = defaultdict(list)
    for name in files(out, split):
        _, case, week, z = NAME.match(name).groups()
        vols[(case, int(week))].append((int(z), Path(out, f"keras_slices_{split}", name),
                                        Path(out, f"keras_slices_seg_{split}", "seg" + name[4:])))
    return {k: sorted(v) for k, v in vols.items()}


def test_layout_names_and_counts(tiny):
    out, counts = tiny
    folders = {p.name for p in out.iterdir() if p.is_dir()}
    assert folders == {f"keras_slices_{p}{s}" for s in synthetic.SPLITS for p in ("", "seg_")}
    for split in synthetic.SPLITS:
        for seg in (False, True):
            names = files(out, split, seg)
            assert len(names) == counts[split]
            assert all(NAME.match(n) and n.startswith("seg_" if seg else "case_") for n in names), names[:3]
    assert 40 <= counts["train"] <= 80 and 16 <= counts["validate"] <= 24 and 16 <= counts["test"] <= 24
    assert "case_" + files(out, "train", True)[0][4:] in files(out, "train")  # zero-padded ids in both
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))  # no temp files left behind


def test_every_image_has_its_mask(tiny):
    out, _ = tiny
    for split in synthetic.SPLITS:
        images = {n[len("case_"):] for n in files(out, split)}
        masks = {n[len("seg_"):] for n in files(out, split, seg=True)}
        assert images == masks


def test_slices_are_contiguous_volumes_and_splits_are_by_case(tiny):
    out, _ = tiny
    cases = {}
    for split in synthetic.SPLITS:
        vols = volumes(out, split)
        for (case, week), sl in vols.items():
            assert [z for z, _, _ in sl] == list(range(len(sl)))
        weeks = defaultdict(set)
        for case, week in vols:
            weeks[case].add(week)
        assert all(w == set(range(len(w))) for w in weeks.values())
        cases[split] = set(weeks)
    for a, b in (("train", "validate"), ("train", "test"), ("validate", "test")):
        assert not cases[a] & cases[b], f"cases in both {a} and {b}: {cases[a] & cases[b]}"
    assert len(volumes(out, "train")) > len(cases["train"])  # several weeks per case


def test_same_seed_gives_identical_bytes_with_any_worker_count(tiny, tmp_path):
    out, _ = tiny
    synthetic.generate(tmp_path, "tiny", seed=42, workers=2, progress=False)
    first = sorted(p.relative_to(out) for p in out.rglob("*.nii.gz"))
    assert first == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.nii.gz"))
    for rel in first:
        assert (out / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


def test_generate_with_workers_from_a_script_on_stdin_after_tensorflow(tiny, tmp_path):
    # multiprocessing's spawn (the safe choice once TensorFlow runs threads) re-runs the caller's script in
    # each worker; for a script read from stdin there is no file, and the pool restarted failing workers forever.
    out, _ = tiny
    root = Path(__file__).resolve().parents[1]
    code = (f"import sys; sys.path.insert(0, {str(root)!r})\nimport tensorflow\nimport synthetic\n"
            f"print(synthetic.generate({str(tmp_path)!r}, 'tiny', seed=42, workers=2, progress=False))\n")
    done = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / synthetic.MARKER).exists()
    for rel in sorted(p.relative_to(out) for p in out.rglob("*.nii.gz")):
        assert (out / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


def test_different_seed_gives_different_data(tiny, tmp_path):
    out, _ = tiny
    synthetic.generate(tmp_path, "tiny", seed=7, workers=1, progress=False)
    names = files(out, "train")
    assert names == files(tmp_path, "train")  # same names, so the contents are compared one to one
    same = sum((out / "keras_slices_train" / n).read_bytes() == (tmp_path / "keras_slices_train" / n).read_bytes()
               for n in names)
    assert same == 0
    a, _ = load(out / "keras_slices_seg_train" / ("seg" + names[len(names) // 2][4:]))
    b, _ = load(tmp_path / "keras_slices_seg_train" / ("seg" + names[len(names) // 2][4:]))
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_shapes_widths_and_singleton_axis(tiny):
    out, _ = tiny
    widths, singletons = defaultdict(set), 0
    for split in synthetic.SPLITS:
        for (case, week), sl in volumes(out, split).items():
            shapes = set()
            for z, img_path, mask_path in sl:
                img, img_affine = load(img_path)
                mask, mask_affine = load(mask_path)
                assert img.shape == mask.shape and img.shape[:2] in {(256, 128), (256, 144)}
                assert img.ndim == 2 or img.shape[2:] == (1,)
                assert np.array_equal(img_affine, mask_affine)
                singletons += img.ndim == 3
                shapes.add(img.shape[:2])
            assert len(shapes) == 1, f"case {case} week {week} mixes shapes {shapes}"
            widths[split] |= {s[1] for s in shapes}
    assert widths["train"] == {128, 144}
    assert sum(144 in w for w in widths.values()) >= 2
    assert singletons >= 1


def test_images_are_mr_intensities_with_per_case_ranges(tiny):
    out, _ = tiny
    highs = {}
    for (case, _), sl in volumes(out, "train").items():
        for _, img_path, _ in sl:
            img, _ = load(img_path)
            assert nib.load(str(img_path)).get_data_dtype() == np.float32
            assert img.min() >= 0 and img.max() > 100  # MR magnitudes, not [0, 1]
            assert not np.array_equal(img, np.round(img))
            highs.setdefault(case, []).append(np.percentile(img, 99))
    per_case = [np.median(v) for v in highs.values()]
    assert max(per_case) / min(per_case) > 1.15  # per-case gain differs


def test_masks_hold_integer_labels_0_to_5_as_floats(tiny):
    out, _ = tiny
    seen = set()
    for split in synthetic.SPLITS:
        for _, _, mask_path in sum(volumes(out, split).values(), []):
            mask, _ = load(mask_path)
            assert mask.dtype == np.float32
            assert np.array_equal(mask, np.round(mask))
            seen |= set(np.unique(mask).astype(int).tolist())
    assert seen == {0, 1, 2, 3, 4, 5}


def test_prostate_only_in_middle_slices_and_bladder_changes_by_week(tiny):
    out, _ = tiny
    bladder = defaultdict(dict)
    for (case, week), sl in volumes(out, "train").items():
        n = len(sl)
        pro = [z for z, _, m in sl if (load(m)[0] == 5).any()]
        assert pro, f"case {case} week {week} has no prostate"
        assert min(pro) >= 0.25 * n and max(pro) <= 0.85 * n, (pro, n)
        bladder[case][week] = sum(int((load(m)[0] == 3).sum()) for _, _, m in sl)
    for case, by_week in bladder.items():
        assert len(set(by_week.values())) == len(by_week), f"case {case}: bladder identical across weeks"


def test_label_shares_roughly_match_the_real_data(tiny):
    out, _ = tiny
    shares = dataset.label_shares(dataset.load_split(out, "train", use_cache=False, progress=False),
                                  dataset.CLASS_NAMES)
    assert abs(sum(shares.values()) - 1) < 1e-9
    for name, target in TARGET_SHARES.items():
        assert target / 2 < shares[name] < target * 2, (name, shares[name])


def test_marker_written_and_rerun_skipped(tiny, tmp_path):
    out, counts = tiny
    info = json.loads((out / "phantom.json").read_text())
    assert (info["preset"], info["seed"], info["version"], info["counts"]) == ("tiny", 42, synthetic.VERSION, counts)
    victim = next((out / "keras_slices_test").iterdir())
    data = victim.read_bytes()
    victim.unlink()  # a rerun that regenerated would bring it back
    try:
        assert synthetic.generate(out, "tiny", seed=42, progress=False) == counts
        assert not victim.exists()
    finally:
        victim.write_bytes(data)


def test_new_seed_replaces_old_phantom_and_foreign_folders_are_refused(tmp_path):
    synthetic.generate(tmp_path / "a", "tiny", seed=1, workers=1, progress=False)
    stray = tmp_path / "a" / "keras_slices_train" / "case_999_week_0_slice_0.nii.gz"
    stray.write_bytes(b"old")
    synthetic.generate(tmp_path / "a", "tiny", seed=2, workers=1, progress=False)
    assert not stray.exists() and json.loads((tmp_path / "a" / "phantom.json").read_text())["seed"] == 2
    real = tmp_path / "real" / "keras_slices_train"
    real.mkdir(parents=True)
    (real / "case_004_week_0_slice_0.nii.gz").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        synthetic.generate(tmp_path / "real", "tiny", progress=False)
    assert (real / "case_004_week_0_slice_0.nii.gz").read_bytes() == b"precious"


def test_preset_plans():
    full = synthetic.plan_volumes("full", 42)
    counts = {s: sum(v["slices"] for v in full if v["split"] == s) for s in synthetic.SPLITS}
    assert counts == {"train": 11460, "validate": 660, "test": 540}
    files_ = sum(v["slices"] for v in full)
    assert 0.03 < sum(v["slices"] for v in full if v["width"] == 144) / files_ < 0.08
    assert 0.02 < sum(len(v["singleton"]) for v in full) / files_ < 0.045
    demo = synthetic.plan_volumes("demo", 42)
    demo_counts = {s: sum(v["slices"] for v in demo if v["split"] == s) for s in synthetic.SPLITS}
    assert 900 <= demo_counts["train"] <= 1100 and all(120 <= demo_counts[s] <= 180 for s in ("validate", "test"))


def test_cli_and_preview(tiny, tmp_path):
    out, _ = tiny
    assert synthetic.main(["--out", str(out), "--preset", "tiny", "--preview", str(tmp_path / "p.png"), "-q"]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scans_are_the_test_volumes_stored_lps_slices_first(tiny_data, tmp_path):
    """synthetic.py --scans: each test case-week as one 3D file, LPS with the slices first; brought back to RAS
    with nibabel, it is the stack of its slices (slice 0, the top of the scan, highest)."""
    refs = defaultdict(list)
    for ref in dataset.list_split(tiny_data, "test"):
        refs[ref.volume].append(ref)
    paths = synthetic.write_scans(tiny_data, tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"{v}.nii.gz" for v in refs)
    for path in paths:
        scan = nib.load(path)
        assert nib.aff2axcodes(scan.affine) == ("S", "L", "P")
        slices = [np.squeeze(nib.load(r.image).get_fdata()) for r in refs[path.name[:-len(".nii.gz")]]]
        np.testing.assert_array_equal(nib.as_closest_canonical(scan).get_fdata(), np.stack(slices, -1)[..., ::-1])
        assert np.allclose(nib.affines.voxel_sizes(scan.affine), (3.0, 1.0, 1.0))
