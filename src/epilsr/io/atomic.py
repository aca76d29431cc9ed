"""The one atomic writer: temporary file in the same folder, fsync, ``os.replace``, fsync folder.

A crash or ``SIGKILL`` at any moment leaves either the old file or the new one at the final
name, never a truncated file. Every file-producing layer (checkpoints, GeoTIFF writers, resume
state of the pipelines, experiment results) calls :func:`atomic_write` or a thin helper.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "atomic_write",
    "atomic_write_path",
    "commit",
    "fingerprint",
    "fsync_dir",
    "fsync_file",
    "save_npy_atomic",
    "save_npz_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
]

PathLike = str | os.PathLike


def fsync_dir(directory: PathLike) -> None:
    """fsync a folder so a rename inside it is durable (skipped where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: PathLike) -> None:
    """fsync the data of an already-written file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    """A fresh hidden name next to ``path`` (created by the writer with the usual umask)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def commit(tmp: PathLike, path: PathLike) -> Path:
    """Make the finished file ``tmp`` durable and rename it over ``path`` (same folder)."""
    path = Path(path)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def atomic_write_path(path: PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp_path)`` into a temporary file next to ``path``, then :func:`commit` it.

    For writers that want a file name (``tifffile``, ``Path.write_text``). The temporary file
    is removed if ``write`` fails; parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        write(tmp)
        return commit(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """``write(f)`` into a binary file object, then fsync and rename it over ``path``."""

    def to_file(tmp: Path) -> None:
        with open(tmp, "xb") as f:
            write(f)

    return atomic_write_path(path, to_file)


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    return atomic_write(path, lambda f: f.write(data))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    return np.asarray(o).tolist()


def write_json_atomic(path: PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as JSON (NumPy scalars and arrays allowed)."""
    return write_bytes_atomic(path, json.dumps(obj, default=_json_default).encode())


def save_npz_atomic(path: PathLike, /, **arrays: np.ndarray) -> Path:
    """Atomically ``np.savez`` the arrays to ``path``."""
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def save_npy_atomic(path: PathLike, array: np.ndarray) -> Path:
    """Atomically ``np.save`` one array to ``path``."""
    return atomic_write(path, lambda f: np.save(f, array))


def fingerprint(**parts: Any) -> str:
    """A short sha256 of JSON-able settings (NumPy values allowed), stable across runs."""
    text = json.dumps(parts, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
