"""atomic_io.py: a failed write leaves the old file and no temporary; permissions are the usual ones."""
import os

import pytest

from atomic_io import UMASK, atomic_path, atomic_write_json


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"a": 2, "trunc')  # a torn write ...
            raise RuntimeError("killed")  # ... interrupted before the rename
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"a":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_written_file_has_umask_permissions(tmp_path):
    atomic_write_json(tmp_path / "x.json", [1])
    assert os.stat(tmp_path / "x.json").st_mode & 0o777 == 0o666 & ~UMASK
