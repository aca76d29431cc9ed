"""The one atomic writer: write to a temporary name, fsync, rename over the final name."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    return np.asarray(o).tolist()


def _fingerprint(**parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_npz_atomic(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
