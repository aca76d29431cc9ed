"""Shared fixtures. XLA_FLAGS is set before anything imports jax (4 virtual CPU devices)."""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=4"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import sys  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# `from tests.reference import ...` must work whether pytest runs as `pytest` or `python -m pytest`.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# No example database: keeps test runs from writing .hypothesis/ into the working tree.
settings.register_profile("epilsr", database=None, deadline=None)
settings.load_profile("epilsr")


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A NumPy generator seeded from the test's node id (stable per test, distinct across tests)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def data_root():
    """Root of the shared real data; skips when ``<root>/chesapeake_wv`` is missing."""
    from epilsr.data.chesapeake import data_root as _data_root

    root = _data_root()
    if not (root / "chesapeake_wv").is_dir():
        pytest.skip(f"real data not found at {root / 'chesapeake_wv'}; set EPILSR_DATA")
    return root


@pytest.fixture
def consep_root():
    """The shared CoNSeP patches; skips when ``<data_root>/consep`` is missing."""
    from epilsr.data.consep import consep_root as _consep_root

    root = _consep_root()
    if not (root / "images").is_dir():
        pytest.skip(f"CoNSeP data not found at {root}; set EPILSR_DATA")
    return root
