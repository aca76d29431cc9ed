"""The one atomic writer: old file intact on failure, no temporary left, usual permissions."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from epilsr.io import atomic


def test_helpers_round_trip(tmp_path):
    atomic.write_json_atomic(tmp_path / "a.json", {"x": np.float32(1.5), "y": np.arange(3)})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1.5, "y": [0, 1, 2]}
    atomic.save_npz_atomic(tmp_path / "b.npz", acc=np.ones((2, 3)), path=np.zeros(1))
    with np.load(tmp_path / "b.npz") as z:
        np.testing.assert_array_equal(z["acc"], np.ones((2, 3)))
        assert z["path"].shape == (1,)
    atomic.save_npy_atomic(tmp_path / "c.npy", np.arange(4, dtype=np.int16))
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), np.arange(4))
    atomic.write_bytes_atomic(tmp_path / "sub" / "d.bin", b"abc")  # parents created
    assert (tmp_path / "sub" / "d.bin").read_bytes() == b"abc"
    atomic.atomic_write_path(tmp_path / "e.txt", lambda p: p.write_text("hi"))
    assert (tmp_path / "e.txt").read_text() == "hi"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.json", "b.npz", "c.npy", "e.txt", "sub"]


@pytest.mark.parametrize("how", ["file", "path"])
def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, how):
    path = tmp_path / "out.json"
    atomic.write_json_atomic(path, {"old": True})

    def crash_file(f):
        f.write(b'{"new": tr')
        raise OSError("disk full")

    def crash_path(p):
        p.write_bytes(b'{"new": tr')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        if how == "file":
            atomic.atomic_write(path, crash_file)
        else:
            atomic.atomic_write_path(path, crash_path)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_bytes_atomic(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


def test_fingerprint_is_stable_and_sensitive():
    a = atomic.fingerprint(tile=3, table=np.eye(2, dtype=np.float32))
    assert a == atomic.fingerprint(table=np.eye(2, dtype=np.float32), tile=3)
    assert a != atomic.fingerprint(tile=3, table=np.eye(2, dtype=np.float32) * 2)
