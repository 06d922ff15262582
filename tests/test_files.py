"""hf_hetermoe.files: a file is written whole or not at all, with the permissions ``open`` would give it."""

from __future__ import annotations

import json
import os
import stat

import pytest

from hf_hetermoe.files import atomic_write, write_json, write_text


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "new" / "plan.json"  # the folder is created
    write_json(path, {"a": 1}, indent=1)
    assert json.loads(path.read_text()) == {"a": 1} and path.read_text().endswith("\n")
    write_text(path, "second\n")
    assert path.read_text() == "second\n"
    assert os.listdir(path.parent) == ["plan.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = write_text(tmp_path / "results.csv", "old rows\n")
    with pytest.raises(RuntimeError, match="cut off"):
        with atomic_write(path, newline="") as f:
            f.write("half of the new rows")
            raise RuntimeError("cut off")
    assert path.read_text() == "old rows\n"
    with pytest.raises(TypeError):  # not JSON: raises before the file is touched
        write_json(path, {"x": object()})
    assert path.read_text() == "old rows\n"
    assert os.listdir(tmp_path) == ["results.csv"]


def test_permissions_are_those_open_would_give(tmp_path):
    umask = os.umask(0o022)
    try:
        fresh = write_text(tmp_path / "fresh.txt", "x")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # not mkstemp's 0o600
        kept = tmp_path / "kept.txt"
        kept.write_text("x")
        kept.chmod(0o640)
        write_text(kept, "y")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    finally:
        os.umask(umask)


def test_binary_and_bad_modes(tmp_path):
    with atomic_write(tmp_path / "blob.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"):
        with atomic_write(tmp_path / "log.txt", "a"):
            pass
    assert not (tmp_path / "log.txt").exists()
