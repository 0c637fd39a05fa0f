"""export.py: a SavedModel and a TFLite file that serve without this repo and give model.keras's labels."""
import json
import subprocess
import sys

import keras
import numpy as np

import export
import modules  # noqa: F401  (registers the custom layers for load_model)

SERVE = """
import json, sys
import numpy as np
import tensorflow as tf
x = np.load(sys.argv[1])
loaded = tf.saved_model.load(sys.argv[2])  # keep it: its variables live as long as this object
served = loaded.serve(tf.constant(x)).numpy()
lite = tf.lite.Interpreter(model_path=sys.argv[3])
lite.resize_tensor_input(lite.get_input_details()[0]["index"], x.shape)
lite.allocate_tensors()
lite.set_tensor(lite.get_input_details()[0]["index"], x)
lite.invoke()
tflite = lite.get_tensor(lite.get_output_details()[0]["index"])
print(json.dumps({"repo_importable": any(p and __import__("os").path.exists(p + "/modules.py") for p in sys.path),
                  "saved_model": served.argmax(-1).tolist(), "tflite": tflite.argmax(-1).tolist(),
                  "sums": [float(served.sum(-1).mean()), float(tflite.sum(-1).mean())]}))
"""


def test_exported_models_serve_without_the_repo(tiny_run, tmp_path):
    out = export.export(tiny_run, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["input_size"] == [64, 32]
    x = np.random.default_rng(0).random((3, 64, 32, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = keras.models.load_model(tiny_run / "model.keras", compile=False).predict(x, verbose=0).argmax(-1)
    # A fresh interpreter in another folder, with nothing of this repo importable.
    done = subprocess.run([sys.executable, "-c", SERVE, str(tmp_path / "x.npy"), str(out / "saved_model"),
                           str(out / "model.tflite")], cwd=tmp_path, env={"PATH": "/usr/bin:/bin",
                                                                        "TF_CPP_MIN_LOG_LEVEL": "3"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["repo_importable"] is False
    assert np.array_equal(got["saved_model"], expected) and np.array_equal(got["tflite"], expected)
    np.testing.assert_allclose(got["sums"], 1, atol=1e-4)  # probabilities, as model.keras gives
