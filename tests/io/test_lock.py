"""The run-folder lock: exclusive, names its owner, stale locks taken over, released."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from epilsr.io import lock
from epilsr.io.lock import LockError, RunLock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_lock_refuses_and_names_the_owner(tmp_path):
    with RunLock(tmp_path / "run") as first:
        rec = json.loads(first.path.read_text())
        assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname()
        with pytest.raises(LockError, match=rf"another run \(pid {os.getpid()} on "):
            RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / lock.LOCK_NAME).exists()  # released
    RunLock(tmp_path / "run").acquire().release()  # free again


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    path = tmp_path / lock.LOCK_NAME
    path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with caplog.at_level("WARNING", logger="epilsr.lock"):
        held = RunLock(tmp_path).acquire()
    assert held.held and json.loads(path.read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text
    held.release()


def test_lock_of_another_host_is_never_presumed_stale(tmp_path):
    path = tmp_path / lock.LOCK_NAME
    path.write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere.example"}))
    with pytest.raises(LockError, match="on elsewhere.example"):
        RunLock(tmp_path).acquire()


def test_empty_lock_is_stale_only_when_old(tmp_path):
    path = tmp_path / lock.LOCK_NAME
    path.write_text("")  # a writer killed between creating and filling the lock
    with pytest.raises(LockError, match="a run that is starting"):
        RunLock(tmp_path).acquire()
    old = time.time() - 2 * lock.STALE_EMPTY_SECONDS
    os.utime(path, (old, old))
    RunLock(tmp_path).acquire().release()


def test_release_leaves_a_lock_taken_over_by_another_process(tmp_path):
    held = RunLock(tmp_path).acquire()
    held.path.write_text(json.dumps({"pid": 1, "host": socket.gethostname()}))
    held.release()
    assert held.path.exists()
