"""Window grids over rasters and the cosine taper that blends overlapping windows (NumPy)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from jax.typing import ArrayLike

from epilsr.metrics import NODATA_LABEL

__all__ = [
    "Window",
    "grid_starts",
    "tile_grid",
    "blend_weights",
    "SeamStats",
    "seam_disagreement",
]


class Window(NamedTuple):
    """A raster window: rows ``row:row+height``, columns ``col:col+width``."""

    row: int
    col: int
    height: int
    width: int


def grid_starts(size: int, k: int, stride: int) -> list[int]:
    """Start offsets of length-``k`` windows along an axis of ``size``: ``0, stride, ...``.

    The last window is shifted inward to end at ``size`` (it then overlaps its neighbour by
    more than ``k - stride``), so every window has length ``k`` and the axis is covered when
    ``stride <= k``. Requires ``1 <= k <= size`` and ``stride >= 1``.
    """
    if not 1 <= k <= size or stride < 1:
        raise ValueError(f"grid_starts: expected 1 <= k <= size and stride >= 1, got size={size}, "
                         f"k={k}, stride={stride}")
    starts = list(range(0, size - k + 1, stride))
    if starts[-1] != size - k:
        starts.append(size - k)
    return starts


def tile_grid(height: int, width: int, *, tile: int, overlap: int) -> list[Window]:
    """Overlapping windows of one static shape covering a ``height x width`` raster.

    Windows start every ``tile - overlap`` pixels; the last row/column of windows is shifted
    inward to end at the border (it then overlaps its neighbour by more than ``overlap``), so
    every window has the same shape and one JIT compilation serves all. Rasters smaller than
    ``tile`` in a dimension get windows as large as the raster in that dimension (shape
    ``(min(tile, H), min(tile, W))``): no padding. Order: raster order (row-major).

    Args:
      height, width: raster size.
      tile: window side.
      overlap: pixels shared by neighbouring windows, ``0 <= overlap < tile``.

    Returns:
      ``list[Window]``.
    """
    for name, v in (("height", height), ("width", width), ("tile", tile)):
        if int(v) != v or v < 1:
            raise ValueError(f"tile_grid: {name} must be a positive integer, got {v!r}")
    if int(overlap) != overlap or not 0 <= overlap < tile:
        raise ValueError(f"tile_grid: overlap must be an integer in [0, tile={tile}), "
                         f"got {overlap!r}")
    th, tw = min(tile, height), min(tile, width)
    stride = tile - overlap
    return [
        Window(r, c, th, tw)
        for r in grid_starts(height, th, stride)
        for c in grid_starts(width, tw, stride)
    ]


def _taper(n: int, overlap: int) -> np.ndarray:
    """``[n]`` weights: ``sin^2`` rise over ``overlap`` pixels at both ends, 1 inside, never 0."""
    w = np.ones(n, np.float64)
    ramp = min(overlap, n // 2)
    if ramp > 0:
        x = (np.arange(ramp) + 0.5) / ramp
        rise = np.sin(0.5 * np.pi * x) ** 2
        w[:ramp] = rise
        w[n - ramp :] = rise[::-1]
    return w


def blend_weights(tile: int | tuple[int, int], overlap: int) -> np.ndarray:
    """``[th, tw]`` separable blending weights for overlapping windows.

    Each axis rises as ``sin^2(pi/2 (i + 1/2) / overlap)`` over the first ``overlap`` pixels,
    is 1 in the middle and falls symmetrically; all weights are in ``(0, 1]``. Where two
    windows overlap by exactly ``overlap`` pixels the rise of one and the fall of the other sum
    to 1 (a cross-fade); in general the stitched map divides by the summed weights, which makes
    the weights a partition of unity.
    """
    th, tw = (tile, tile) if np.ndim(tile) == 0 else tile
    if min(th, tw) < 1 or overlap < 0:
        raise ValueError(f"blend_weights: expected tile >= 1 and overlap >= 0, got {tile}, "
                         f"{overlap}")
    return np.outer(_taper(th, overlap), _taper(tw, overlap)).astype(np.float32)


class SeamStats(NamedTuple):
    """Label disagreement between neighbouring pixels across window edges vs elsewhere."""

    border: float  # fraction of neighbour pairs across a window edge with different labels
    interior: float  # the same fraction for all other neighbour pairs
    ratio: float  # border / interior (1 = no visible seams)
    n_border: int
    n_interior: int


def seam_disagreement(
    labels: ArrayLike, windows: Sequence[Window], *, ignore: int | None = NODATA_LABEL
) -> SeamStats:
    """Seam metric of a stitched ``[H, W]`` label map.

    A pair of 4-neighbours is a *border* pair when the edge between them lies on a window
    edge (a window's first row/column or the one after its last, extended across the raster,
    excluding the raster border), else *interior*. Pairs with an ``ignore`` pixel are skipped.
    Stitching artefacts show up as ``border > interior`` (``ratio > 1``).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"seam_disagreement: expected [H, W] labels, got shape {labels.shape}")
    h, w = labels.shape
    row_edges = np.zeros(h + 1, bool)
    col_edges = np.zeros(w + 1, bool)
    for win in windows:
        row_edges[[win.row, min(win.row + win.height, h)]] = True
        col_edges[[win.col, min(win.col + win.width, w)]] = True
    n_b = d_b = n_i = d_i = 0
    for axis, edges in ((0, row_edges), (1, col_edges)):
        a = labels[1:] if axis == 0 else labels[:, 1:]
        b = labels[:-1] if axis == 0 else labels[:, :-1]
        diff = a != b
        ok = np.ones_like(diff) if ignore is None else (a != ignore) & (b != ignore)
        # The pair (k-1, k) straddles edge k; k runs over 1..n-1.
        on = edges[1:-1]
        on = on[:, None] if axis == 0 else on[None, :]
        border, inner = ok & on, ok & ~on
        n_b += int(border.sum())
        d_b += int((diff & border).sum())
        n_i += int(inner.sum())
        d_i += int((diff & inner).sum())
    fb = d_b / n_b if n_b else float("nan")
    fi = d_i / n_i if n_i else float("nan")
    ratio = fb / fi if fi > 0 else (float("nan") if fb != fb else float("inf") if fb > 0 else 1.0)
    return SeamStats(fb, fi, ratio, n_b, n_i)
