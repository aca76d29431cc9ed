"""Input checks shared by the public functions.

Shape checks run at trace time (they only read static shapes). Value checks (NaN, ranges)
run only on concrete arrays, i.e. when a function is called outside ``jax.jit``; under
``jit`` they are skipped silently, so the functions stay traceable.
"""

from __future__ import annotations

import jax
import numpy as np


def is_concrete(x) -> bool:
    """True when ``x`` holds values (not a tracer under ``jit``/``vmap``/``grad``)."""
    return not isinstance(x, jax.core.Tracer)


def check_rank(name: str, x, rank: int, layout: str) -> None:
    if np.ndim(x) != rank:
        raise ValueError(f"{name}: expected rank {rank} {layout}, got shape {np.shape(x)}")


def check_finite(name: str, x) -> None:
    if is_concrete(x):
        arr = np.asarray(x)
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise ValueError(f"{name}: expected finite values, found {bad} NaN/inf entries")


def check_index_range(name: str, x, n: int, what: str) -> None:
    """``x`` must be integer with values in ``[0, n)`` (checked when concrete)."""
    if not np.issubdtype(np.asarray(x).dtype if is_concrete(x) else x.dtype, np.integer):
        raise ValueError(f"{name}: expected integer {what} indices, got dtype {x.dtype}")
    if is_concrete(x) and np.size(x):
        arr = np.asarray(x)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= n:
            raise ValueError(
                f"{name}: expected {what} indices in [0, {n}), found values in [{lo}, {hi}]"
            )


def check_distribution_table(name: str, table, used_rows=None) -> np.ndarray | None:
    """Rows of ``table`` must be non-negative; rows in ``used_rows`` must not be all zero.

    Returns the concrete table as NumPy (or None under tracing).
    """
    if not is_concrete(table):
        return None
    arr = np.asarray(table, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite probabilities, found NaN/inf")
    if np.any(arr < 0):
        r, c = np.argwhere(arr < 0)[0]
        raise ValueError(
            f"{name}: expected non-negative probabilities, found {arr[r, c]} at row {r}, col {c}"
        )
    if used_rows is not None:
        sums = arr.sum(axis=-1)
        bad = [int(r) for r in used_rows if sums[r] <= 0]
        if bad:
            raise ValueError(
                f"{name}: rows {bad} sum to zero but those classes occur in the data; "
                "expected a distribution over labels for every class that occurs"
            )
    return arr


def check_same_grid(name: str, shape, height: int, width: int, image: str = "image") -> None:
    """A companion raster (classes, validity mask) must cover exactly the imagery's grid:
    a larger or smaller one is refused, never cropped or padded silently."""
    if shape is None:
        return
    got = tuple(int(s) for s in tuple(shape)[:2])
    if got != (int(height), int(width)):
        raise ValueError(
            f"{name}: expected a {height}x{width} raster matching the {image}, got "
            f"{got[0]}x{got[1]} (rasters are never cropped or padded to fit)"
        )


def check_class_prior(name: str, prior, table) -> None:
    """A concrete ``[Cc]`` prior: non-negative, finite, positive sum; its rows defined."""
    if is_concrete(prior):
        p = np.asarray(prior)
        if np.any(p < 0) or not np.isfinite(p).all() or p.sum() <= 0:
            raise ValueError(f"{name}: expected non-negative weights with a positive sum")
        check_distribution_table("label_given_class", table, np.flatnonzero(p > 0))
