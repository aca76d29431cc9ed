"""One run per output folder: an ``O_EXCL`` lock file holding the owner's pid, host and start.

    with RunLock(folder):            # raises LockError at once if another live run holds it
        ...

The lock is stale (and taken over, with a warning) when it names a process of this host that
no longer exists, or when it is empty/unreadable and older than :data:`STALE_EMPTY_SECONDS`
(a writer killed between creating and filling it). A lock of another host is never presumed
stale: the message says which file to remove once that run is known to be gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

__all__ = ["LockError", "RunLock", "LOCK_NAME"]

LOCK_NAME = ".epilsr.lock"
STALE_EMPTY_SECONDS = 60.0

log = logging.getLogger("epilsr.lock")


class LockError(RuntimeError):
    """The folder is locked by another live run (or cannot be locked at all)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner(path: Path) -> dict | None:
    """The lock's record, or None when it is empty/unreadable (a half-written lock)."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("pid"), int) else None


class RunLock:
    """Exclusive lock of ``folder`` (file ``folder/.epilsr.lock``); a context manager.

    Args:
      folder: the output folder (created if missing).
      name: lock file name.
    """

    def __init__(self, folder: str | os.PathLike, name: str = LOCK_NAME):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.held = False

    def _stale(self, owner: dict | None) -> bool:
        if owner is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return True
            return age > STALE_EMPTY_SECONDS
        return owner.get("host") == socket.gethostname() and not _alive(owner["pid"])

    def acquire(self) -> RunLock:
        """Takes the lock or raises :class:`LockError` naming the folder and the owner."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _owner(self.path)
                if self._stale(owner):
                    who = "an unreadable lock" if owner is None else f"pid {owner['pid']}"
                    log.warning("%s: removing the stale lock of %s (no such process)",
                                self.path, who)
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                who = ("a run that is starting" if owner is None else
                       f"pid {owner['pid']} on {owner.get('host')} since {owner.get('started')}")
                raise LockError(
                    f"{self.folder}: another run ({who}) is writing into this folder; wait for "
                    f"it or choose another output folder (remove {self.path} only if that run "
                    "is gone)"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise LockError(f"{self.path}: could not take the lock (it keeps reappearing)")

    def release(self) -> None:
        """Removes the lock if this process still owns it (idempotent)."""
        if not self.held:
            return
        self.held = False
        owner = _owner(self.path)
        if owner is not None and owner["pid"] == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
