"""export.py: a versioned SavedModel (TF Serving's layout) and a TFLite file that serve without this repo and give
model.keras's labels; a version is never overwritten without --force."""
import json
import subprocess
import sys

import keras
import numpy as np
import pytest

import export
import modules  # noqa: F401  (registers the custom layers for load_model)
from config import RunError

SERVE = """
import json, os, sys
import numpy as np
import tensorflow as tf
x = np.load(sys.argv[1])
loaded = tf.saved_model.load(sys.argv[2])  # keep it: its variables live as long as this object
served = loaded.serve(tf.constant(x)).numpy()
default = loaded.signatures["serving_default"]  # what TF Serving's REST and gRPC predict call by default
(by_signature,) = default(**{next(iter(default.structured_input_signature[1])): tf.constant(x)}).values()
lite = tf.lite.Interpreter(model_path=sys.argv[3])
lite.resize_tensor_input(lite.get_input_details()[0]["index"], x.shape)
lite.allocate_tensors()
lite.set_tensor(lite.get_input_details()[0]["index"], x)
lite.invoke()
tflite = lite.get_tensor(lite.get_output_details()[0]["index"])
print(json.dumps({"repo_importable": any(p and os.path.exists(p + "/modules.py") for p in sys.path),
                  "shapes": [list(served.shape), list(by_signature.shape), list(tflite.shape)],
                  "saved_model": served.argmax(-1).tolist(), "tflite": tflite.argmax(-1).tolist(),
                  "serving_default": by_signature.numpy().argmax(-1).tolist(),
                  "sums": [float(served.sum(-1).mean()), float(tflite.sum(-1).mean())],
                  "min": float(min(served.min(), tflite.min()))}))
"""


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """The tiny run exported once with the defaults: OUT/1/."""
    return export.export(tiny_run, tmp_path_factory.mktemp("exported") / "export")


def test_exported_models_serve_without_the_repo(tiny_run, exported, tmp_path):
    out = exported.parent
    assert exported == out / "1" and (exported / "saved_model.pb").is_file() and (exported / "variables").is_dir()
    # TF Serving's model base path: version folders, and nothing half-written (no staging folder left).
    assert sorted(p.name for p in out.iterdir()) == ["1", "config.json", "model.tflite"]
    assert json.loads((out / "config.json").read_text())["input_size"] == [64, 32]
    assert (exported / "assets.extra" / "config.json").read_bytes() == (tiny_run / "config.json").read_bytes()
    x = np.random.default_rng(0).random((3, 64, 32, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = keras.models.load_model(tiny_run / "model.keras", compile=False).predict(x, verbose=0).argmax(-1)
    # A fresh interpreter in another folder, with nothing of this repo importable.
    done = subprocess.run([sys.executable, "-c", SERVE, str(tmp_path / "x.npy"), str(exported),
                           str(out / "model.tflite")], cwd=tmp_path, env={"PATH": "/usr/bin:/bin",
                                                                         "TF_CPP_MIN_LOG_LEVEL": "3"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["repo_importable"] is False
    assert got["shapes"] == [[3, 64, 32, 6]] * 3
    for key in ("saved_model", "serving_default", "tflite"):
        assert np.array_equal(got[key], expected), key
    np.testing.assert_allclose(got["sums"], 1, atol=1e-4)  # probabilities, as model.keras gives
    assert got["min"] >= 0


def test_a_version_is_replaced_only_with_force(tiny_run, exported, tmp_path, capsys):
    out = exported.parent
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(RunError, match=r"1 exists: export a new version \(--version 2.*--force"):
        export.export(tiny_run, out)
    assert export.main(["--run", str(tiny_run), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # refused before touching anything
    for bad in ("0", "-1", "1.5", "latest", ""):
        assert export.main(["--run", str(tiny_run), "--out", str(tmp_path / "bad"), "--version", bad]) == 2
    assert not (tmp_path / "bad").exists()

    # A copy of the export: a new version goes beside the old one; --force replaces one whole.
    copy = tmp_path / "export"
    subprocess.run(["cp", "-a", str(out), str(copy)], check=True)
    (copy / "1" / "stale").write_text("from the old version")
    assert export.main(["--run", str(tiny_run), "--out", str(copy), "--version", "2"]) == 0
    assert (copy / "2" / "saved_model.pb").is_file() and (copy / "1" / "stale").exists()
    assert export.main(["--run", str(tiny_run), "--out", str(copy), "--force"]) == 0
    assert (copy / "1" / "saved_model.pb").is_file() and not (copy / "1" / "stale").exists()
    assert sorted(p.name for p in copy.iterdir()) == ["1", "2", "config.json", "model.tflite"]
