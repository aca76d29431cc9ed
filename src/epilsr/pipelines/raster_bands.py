"""One huge raster divided among processes: bands of window strips, mosaicked by a VRT.

Process ``p`` of ``P`` runs ``lsr_raster(..., strips=split_strips(n, P)[p],
out_dir=<run>/band-<p>)`` (:func:`strip_count` gives ``n``); each band writes raster rows
``band_rows`` of its strips, bit-identical to those rows of a single-process run (global
window indices; the strips above a band are recomputed, unwritten, to rebuild its carry).
Once all are done, :func:`write_band_vrts` writes ``<prefix>labels.vrt`` (and probs, entropy
when present) mosaicking the band GeoTIFFs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from epilsr.io.geotiff import GeoInfo, RasterReader
from epilsr.io.vrt import write_row_vrt
from epilsr.windows import tile_grid

__all__ = ["strip_row_starts", "strip_count", "split_strips", "band_rows", "write_band_vrts"]


def strip_row_starts(height: int, width: int, *, tile: int, overlap: int) -> tuple[int, ...]:
    """``R_s``: the first row of each window strip of :func:`tile_grid`."""
    return tuple(sorted({w.row for w in tile_grid(height, width, tile=tile, overlap=overlap)}))


def strip_count(height: int, width: int, *, tile: int, overlap: int) -> int:
    """Number of window strips of a ``height x width`` raster."""
    return len(strip_row_starts(height, width, tile=tile, overlap=overlap))


def split_strips(n_strips: int, processes: int) -> list[tuple[int, int]]:
    """``(a, b)`` per process: contiguous strips, sizes differing by at most one (the first
    ``n_strips % processes`` one larger); processes beyond ``n_strips`` get none (omitted)."""
    if n_strips < 1 or processes < 1:
        raise ValueError(f"split_strips: n_strips and processes must be >= 1, got "
                         f"{n_strips}, {processes}")
    q, r = divmod(n_strips, processes)
    bounds = np.cumsum([0] + [q + (p < r) for p in range(processes)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def band_rows(row_starts: Sequence[int], height: int, strips: tuple[int, int]) -> tuple[int, int]:
    """Raster rows ``[R_a, R_b)`` (``R_n = height``) written by the band ``strips = (a, b)``."""
    a, b = strips
    return row_starts[a], row_starts[b] if b < len(row_starts) else height


def write_band_vrts(out_path_prefix: str | os.PathLike, band_dirs: Sequence[str | os.PathLike],
                    *, prefix: str = "", geo: GeoInfo | None = None) -> dict[str, Path]:
    """``<out_path_prefix>{labels,probs,entropy}.vrt`` mosaicking ``<dir>/<prefix><name>.tif``
    of each band folder (in raster order), for the outputs every band has. The band rows are
    read from the files' heights; ``geo`` = the whole raster's georeferencing."""
    made = {}
    for name, nodata in (("labels", 255), ("probs", "nan"), ("entropy", "nan")):
        files = [Path(d) / f"{prefix}{name}.tif" for d in band_dirs]
        if not all(f.exists() for f in files):
            continue
        sources, row0 = [], 0
        for f in files:
            with RasterReader(f) as r:
                shape, dtype = r.shape, r.dtype
            sources.append((f, row0, shape[0]))
            row0 += shape[0]
        made[name] = write_row_vrt(f"{os.fspath(out_path_prefix)}{name}.vrt", sources,
                                   width=shape[1], height=row0, dtype=dtype,
                                   bands=shape[2] if len(shape) == 3 else 1, geo=geo,
                                   nodata=nodata)
    return made
