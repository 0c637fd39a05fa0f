"""benchmarks/gpu.py: it trains and predicts on any Keras backend, and nothing it imports needs TensorFlow."""
import ast
import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu  # noqa: E402


def test_gpu_benchmark_times_training_and_prediction_on_this_backend(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu.main(["-f", "4", "-b", "2", "--size", "64x32", "--precision", "float32", "--steps", "2",
                     "--warmup", "1", "-o", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["base_filters"], r["batch"], r["size"]) for r in rows] == [(4, 2, [64, 32])]
    assert all(r["train_img_s"] > 0 and r["predict_img_s"] > 0 and r["backend"] == "tensorflow" for r in rows)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed[1:] == rows


def test_phantom_batch_is_preprocessed_as_training_preprocesses():
    images, labels = gpu.phantom_batch(3, (64, 32))
    assert images.shape == (3, 64, 32, 1) and labels.shape == (3, 64, 32, 1)
    assert 0 <= images.min() and images.max() <= 1 + 1e-6 and set(labels.ravel()) <= set(range(6))
    assert len(set(labels.ravel())) >= 4  # the phantom's anatomy, not an empty slice


def _project_imports(path):
    """Project modules that a file imports, and whether it imports tensorflow, at module level."""
    tree = ast.parse(path.read_text())
    names = []
    for node in tree.body:  # module level only: a function may import TensorFlow on its own backend
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module.split(".")[0])
    return {n for n in names if (ROOT / f"{n}.py").exists()}, "tensorflow" in names


def test_nothing_the_gpu_benchmark_imports_needs_tensorflow():
    """With KERAS_BACKEND=jax it must run where TensorFlow is not installed."""
    todo, seen = [ROOT / "benchmarks" / "gpu.py"], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        modules, uses_tf = _project_imports(path)
        assert not uses_tf, f"{path.name} imports tensorflow at module level"
        todo += [ROOT / f"{m}.py" for m in modules]
    assert {p.name for p in seen} >= {"gpu.py", "modules.py", "preprocess.py", "phantom.py"}
