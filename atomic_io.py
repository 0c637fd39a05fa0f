"""Write files so that a kill at any moment leaves the old file or the new one, never a torn one."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

UMASK = os.umask(0o022)  # read once at import (it can only be read by setting it), then put back
os.umask(UMASK)


@contextlib.contextmanager
def atomic_path(path, fsync: bool = True):
    """Yield a temporary path beside `path`; on success fsync it (unless told not to) and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path, data: bytes, fsync: bool = True) -> None:
    """Write bytes atomically."""
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path, obj) -> None:
    """Write JSON atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())
