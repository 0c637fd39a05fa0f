"""Python interpreters for the benchmark peers: a MONAI virtual environment, and the project's own.

    from benchmarks.peers import env            # or sys.path.insert(0, "benchmarks/peers"); import env
    python = env.monai_python(Path("benchmarks/work/peer-venv"))
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().with_name("requirements-monai.txt")
STAMP = "requirements.sha256"


def _requirements_hash() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def monai_python(root: Path) -> Path:
    """Return the python of the MONAI venv at `root`, creating or reinstalling it when needed.

    The stamp is written only after a successful install, so an interrupted one is redone next time.
    """
    root = Path(root)
    python = root / "bin" / "python"
    stamp = root / STAMP
    wanted = _requirements_hash()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return python
    if not python.exists():
        # python3 from PATH, as a user would; not sys.executable, which may itself be a venv's.
        subprocess.run(["python3", "-m", "venv", str(root)], check=True)
    stamp.unlink(missing_ok=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS)], check=True)
    stamp.write_text(wanted + "\n")
    return python


def keras_python() -> Path:
    """The Keras peer runs in the project's own environment (TensorFlow and Keras 3 are there)."""
    return Path(sys.executable)
