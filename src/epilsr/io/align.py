"""Rasters of any grid through rasterio/GDAL: readers, and a coarse map aligned on the fly.

This module needs the optional ``geo`` extra (``pip install epilsr[geo]``: rasterio, which
bundles GDAL and PROJ). Projections are GDAL's, never hand-written.

* :class:`RasterioReader`: any dataset GDAL opens (GeoTIFF, VRT, remote ``/vsicurl/`` files) as
  a window reader ``(row, col, h, w) -> [h, w(, C)]`` with ``.shape``, ``.geo`` and
  :meth:`~RasterioReader.valid` (GDAL's mask: no-data tag, internal/sidecar mask, alpha band).
* :class:`AlignedReader`: a coarse raster (any resolution, CRS, extent, grid) brought onto a
  target grid (the imagery's) by nearest-neighbour reprojection, one window at a time through
  a GDAL ``WarpedVRT`` with the exact transformer (``tolerance=1e-6`` pixel; GDAL refuses 0):
  the value of target pixel ``(r, c)`` is the source pixel containing its *centre*. Pixels
  outside the coarse extent or at its no-data value read as :attr:`AlignedReader.nodata`.
  Memory is one window (plus GDAL's block cache); no target-sized array is ever made.
* :func:`geoinfo_from_rasterio` / :func:`geoinfo_to_rasterio`: :class:`GeoInfo` <-> a rasterio
  CRS + affine transform (the latter is GDAL's own reading of the GeoTIFF tags, so a custom-WKT
  CRS is recognised where GDAL recognises it).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from epilsr.io.geotiff import GeoInfo, read_geoinfo

try:  # optional heavy dependency (the ``geo`` extra)
    import rasterio
    from rasterio.crs import CRS
    from rasterio.enums import Resampling
    from rasterio.io import MemoryFile
    from rasterio.transform import Affine
    from rasterio.vrt import WarpedVRT
    from rasterio.warp import transform as warp_transform
    from rasterio.warp import transform_bounds
    from rasterio.windows import Window, from_bounds
except ImportError:  # pragma: no cover - exercised only without the extra
    rasterio = None

__all__ = [
    "AlignedReader",
    "RasterioReader",
    "apply_affine",
    "coverage",
    "geoinfo_from_profile",
    "geoinfo_from_rasterio",
    "geoinfo_to_rasterio",
]

PathLike = str | os.PathLike


def _require_rasterio() -> None:
    if rasterio is None:
        raise ImportError("epilsr.io.align needs rasterio: pip install 'epilsr[geo]'")


def _name(ds) -> str:
    return Path(ds.name).name or str(ds.name)


def _file_stamp(path: str) -> dict[str, Any]:
    """Path, size and mtime of a local file (remote or virtual paths: the path only)."""
    try:
        st = os.stat(path)
    except OSError:
        return {"path": str(path)}
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# --------------------------------------------------------------------------------------------
# GeoInfo <-> rasterio

_GEOKEY_VERSION = (1, 1, 0)


def geoinfo_from_rasterio(crs, transform, *, nodata: float | int | None = None) -> GeoInfo:
    """GeoTIFF tags for a rasterio ``crs`` (EPSG-coded, or WKT as a citation) and ``Affine``.

    A north-up transform becomes a pixel scale + one tie point, any other a
    ModelTransformationTag; the CRS becomes an EPSG GeoKey (PixelIsArea). A CRS without an
    EPSG code is written as user-defined with its WKT in GTCitationGeoKey (GDAL may not
    recognise it: prefer copying the input file's own tags with :func:`read_geoinfo`).
    """
    _require_rasterio()
    t = Affine(*tuple(transform)[:6])
    if t.b == 0 and t.d == 0 and t.e < 0:
        changes: dict[str, Any] = dict(pixel_scale=(t.a, -t.e, 0.0),
                                       tiepoints=(0.0, 0.0, 0.0, t.c, t.f, 0.0))
    else:
        changes = dict(transformation=(t.a, t.b, 0.0, t.c, t.d, t.e, 0.0, t.f,
                                       0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    geo_ascii = None
    keys: list[tuple[int, int, int, int]] = [(1025, 0, 1, 1)]  # RasterPixelIsArea
    if crs is not None:
        crs = CRS.from_user_input(crs)
        code = crs.to_epsg()
        model = 2 if crs.is_geographic else 1
        keys.append((1024, 0, 1, model))
        crs_key = 2048 if model == 2 else 3072
        if code is not None:
            keys.append((crs_key, 0, 1, code))
        else:
            geo_ascii = crs.to_wkt() + "|"
            keys.append((1026, 34737, len(geo_ascii), 0))  # GTCitationGeoKey -> the WKT
            keys.append((crs_key, 0, 1, 32767))
    keys.sort()
    flat = [*_GEOKEY_VERSION, len(keys)] + [v for k in keys for v in k]
    geo = GeoInfo(geokeys=tuple(flat), geo_ascii=geo_ascii, **changes)
    return geo.with_nodata(nodata) if nodata is not None else geo


def geoinfo_from_profile(profile: dict) -> GeoInfo:
    """:func:`geoinfo_from_rasterio` of a rasterio profile (``crs``, ``transform``, ``nodata``)."""
    return geoinfo_from_rasterio(profile.get("crs"), profile["transform"],
                                 nodata=profile.get("nodata"))


def geoinfo_to_rasterio(geo: GeoInfo) -> tuple[Any, Affine]:
    """``(crs or None, Affine)`` as GDAL reads ``geo``'s tags (a 1 x 1 in-memory GeoTIFF).

    This is GDAL's interpretation: PixelIsPoint shifts, custom WKT CRS (``crs.to_epsg()`` where
    GDAL/PROJ recognise it) and rotated transforms included.
    """
    _require_rasterio()
    if not geo.is_georeferenced:
        raise ValueError("geo: not georeferenced (no tie points or transformation)")
    with MemoryFile() as mem:
        buf = io.BytesIO()
        tifffile.imwrite(buf, np.zeros((1, 1), np.uint8), extratags=geo.extratags(),
                         metadata=None, photometric="minisblack")
        mem.write(buf.getvalue())
        with mem.open() as ds:
            return ds.crs, ds.transform


# --------------------------------------------------------------------------------------------
# Readers


class RasterioReader:
    """Any rasterio/GDAL dataset as a window reader ``(row, col, h, w) -> [h, w(, C)]``.

    Args:
      source: a path or URL GDAL opens (GeoTIFF, VRT, ``/vsicurl/...``) or an open dataset.
      bands: 1-based band indices to read (default all).

    Attributes:
      shape: ``(H, W)`` for one band, else ``(H, W, C)``; ``dtype``; ``crs``; ``transform``;
      ``nodata``; ``geo`` (:class:`GeoInfo`: the file's own tags for a TIFF, else built from
      the CRS and transform).
    """

    def __init__(self, source, *, bands: list[int] | None = None):
        _require_rasterio()
        self._own = not hasattr(source, "read")
        try:
            self.dataset = rasterio.open(source) if self._own else source
        except rasterio.errors.RasterioIOError as err:
            raise FileNotFoundError(f"{source}: cannot open as a raster ({err})") from err
        ds = self.dataset
        self.bands = list(bands) if bands is not None else list(range(1, ds.count + 1))
        self.height, self.width = ds.height, ds.width
        n = len(self.bands)
        self.shape = (self.height, self.width) + ((n,) if n > 1 else ())
        self.dtype = np.dtype(ds.dtypes[self.bands[0] - 1])
        self.crs, self.transform, self.nodata = ds.crs, ds.transform, ds.nodata
        self.geo = self._geoinfo()

    def _geoinfo(self) -> GeoInfo:
        ds = self.dataset
        if ds.driver == "GTiff" and Path(ds.name).is_file():
            geo = read_geoinfo(ds.name)
            if geo.is_georeferenced:
                return geo
        if ds.crs is None and ds.transform == Affine.identity():
            return GeoInfo()
        return geoinfo_from_rasterio(ds.crs, ds.transform, nodata=ds.nodata)

    def __call__(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        """Rows ``row:row+height``, columns ``col:col+width``: ``[h, w]`` or ``[h, w, C]``."""
        win = Window(int(col), int(row), int(width), int(height))
        data = self.dataset.read(self.bands, window=win)
        return data[0] if len(self.bands) == 1 else np.moveaxis(data, 0, -1)

    def valid(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        """``[h, w]`` bool, False where GDAL's mask says no data (no-data tag or mask band; a
        pixel is valid when any read band is). An alpha band counts as data, not as a mask
        (4-band NAIP R, G, B, NIR is often flagged RGBA): all True unless :attr:`has_mask`."""
        if not self.has_mask:
            return np.ones((int(height), int(width)), bool)
        win = Window(int(col), int(row), int(width), int(height))
        masks = self.dataset.read_masks(self.bands, window=win)
        return np.any(masks > 0, axis=0)

    @property
    def has_mask(self) -> bool:
        """True when a read band has a no-data tag or a mask band that is not an alpha band."""
        flags = {f.name for b in self.bands for f in self.dataset.mask_flag_enums[b - 1]}
        return "nodata" in flags or ("per_dataset" in flags and "alpha" not in flags)

    def fingerprint(self) -> dict[str, Any]:
        """Cheap identity of the input: file path/size/mtime and the grid (no pixel read)."""
        return {**_file_stamp(self.dataset.name), "shape": list(self.shape),
                "dtype": str(self.dtype), "crs": self.crs.to_wkt() if self.crs else None,
                "transform": list(self.transform)[:6], "bands": self.bands}

    def close(self) -> None:
        if self._own:
            self.dataset.close()

    def __enter__(self) -> RasterioReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def apply_affine(t, cols, rows) -> tuple[Any, Any]:
    """``(x, y) = t (cols, rows)`` element-wise (arrays or scalars)."""
    return (t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f)


def _grid_points(height: int, width: int, n: int = 65) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre ``(cols, rows)`` of an ``n x n`` lattice spanning the grid, edges included."""
    rows = np.unique(np.linspace(0, height - 1, min(n, height)).round()) + 0.5
    cols = np.unique(np.linspace(0, width - 1, min(n, width)).round()) + 0.5
    cc, rr = np.meshgrid(cols, rows)
    return cc.ravel(), rr.ravel()


def coverage(src, crs, transform, height: int, width: int, *, n: int = 65) -> float:
    """Fraction of a target grid whose pixel centres fall inside ``src``'s extent, estimated
    on an ``n x n`` lattice of pixel centres (corners and edges included)."""
    cols, rows = _grid_points(height, width, n)
    xs, ys = apply_affine(Affine(*tuple(transform)[:6]), cols, rows)
    sx, sy = warp_transform(crs, src.crs, xs, ys)
    c, r = apply_affine(~src.transform, np.asarray(sx), np.asarray(sy))
    inside = (c >= 0) & (c < src.width) & (r >= 0) & (r < src.height) & np.isfinite(c)
    return float(np.mean(inside))


class AlignedReader:
    """A coarse raster on a target grid by nearest-neighbour reprojection, window by window.

    Args:
      source: the coarse raster (path/URL GDAL opens, or an open rasterio dataset); band 1.
      crs, transform, height, width: the target grid (the imagery's CRS, ``Affine`` and size).
      nodata: value for target pixels outside the coarse extent or at the coarse no-data value;
        default the coarse raster's no-data value, else 0.
      name: how errors name the coarse input (default its file name).

    Raises ``ValueError`` before any pixel is read when either grid has no CRS or the coarse
    raster does not overlap the target; warns (``UserWarning``) when it covers only part of it.

    Attributes:
      nodata: the fill value of uncovered / no-data pixels; ``covered``: estimated fraction of
      the target inside the coarse extent; ``shape``: ``(height, width)``; ``dtype``.
    """

    def __init__(self, source, *, crs, transform, height: int, width: int,
                 nodata: float | int | None = None, name: str | None = None):
        _require_rasterio()
        self._own = not hasattr(source, "read")
        try:
            self.source = rasterio.open(source) if self._own else source
        except rasterio.errors.RasterioIOError as err:
            raise FileNotFoundError(f"{source}: cannot open as a raster ({err})") from err
        src = self.source
        self.name = name or _name(src)
        try:
            if src.crs is None:
                raise ValueError(f"{self.name}: the coarse raster has no CRS (georeference it, "
                                 "e.g. gdal_edit.py -a_srs EPSG:5070)")
            if crs is None:
                raise ValueError(f"{self.name}: the target grid (imagery) has no CRS")
            self.crs = CRS.from_user_input(crs)
            self.transform = Affine(*tuple(transform)[:6])
            self.height, self.width = int(height), int(width)
            self.shape = (self.height, self.width)
            self.dtype = np.dtype(src.dtypes[0])
            self.nodata = src.nodata if nodata is None else nodata
            if self.nodata is None:
                self.nodata = 0
            self.covered = coverage(src, self.crs, self.transform, self.height, self.width)
            if self.covered == 0.0 and not self._bounds_overlap():
                raise ValueError(f"{self.name}: the coarse raster does not overlap the imagery "
                                 f"(coarse bounds {tuple(round(v) for v in src.bounds)} in "
                                 f"{src.crs.to_string()})")
            if self.covered < 1.0:
                warnings.warn(f"{self.name}: the coarse raster covers only about "
                              f"{100 * self.covered:.0f}% of the imagery; the rest is no data",
                              UserWarning, stacklevel=2)
            self._vrt = WarpedVRT(src, crs=self.crs, transform=self.transform,
                                  width=self.width, height=self.height,
                                  resampling=Resampling.nearest, nodata=self.nodata,
                                  tolerance=1e-6)
        except BaseException:
            self.close()
            raise

    def _bounds_overlap(self) -> bool:
        """Densified target bounds (in the coarse CRS) intersect the coarse bounds."""
        left, top = apply_affine(self.transform, 0, 0)
        right, bottom = apply_affine(self.transform, self.width, self.height)
        try:
            b = transform_bounds(self.crs, self.source.crs, min(left, right), min(top, bottom),
                                 max(left, right), max(top, bottom), densify_pts=21)
        except Exception:  # noqa: BLE001 - unprojectable: treat as no overlap
            return False
        s = self.source.bounds
        return all(math.isfinite(v) for v in b) and not (
            b[2] <= s.left or b[0] >= s.right or b[3] <= s.bottom or b[1] >= s.top)

    def __call__(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        """``[h, w]`` coarse values on the target grid's window (``nodata`` outside)."""
        row, col, height, width = int(row), int(col), int(height), int(width)
        if min(row, col) < 0 or row + height > self.height or col + width > self.width:
            raise ValueError(f"{self.name}: window rows {row}:{row + height}, cols "
                             f"{col}:{col + width} outside the {self.height}x{self.width} grid")
        return self._vrt.read(1, window=Window(col, row, width, height))

    def source_values(self) -> np.ndarray:
        """The distinct coarse values in the part of the coarse raster under the target (read
        at the coarse resolution: cheap), for checking codes against a table before any work."""
        left, top = apply_affine(self.transform, 0, 0)
        right, bottom = apply_affine(self.transform, self.width, self.height)
        b = transform_bounds(self.crs, self.source.crs, min(left, right), min(top, bottom),
                             max(left, right), max(top, bottom), densify_pts=21)
        win = from_bounds(*b, transform=self.source.transform)
        c0, r0 = max(0, math.floor(win.col_off) - 1), max(0, math.floor(win.row_off) - 1)
        c1 = min(self.source.width, math.ceil(win.col_off + win.width) + 1)
        r1 = min(self.source.height, math.ceil(win.row_off + win.height) + 1)
        if c1 <= c0 or r1 <= r0:
            return np.zeros(0, self.dtype)
        return np.unique(self.source.read(1, window=Window(c0, r0, c1 - c0, r1 - r0)))

    def cell_pixels(self) -> float:
        """Side of one coarse cell in target pixels: the square root of the area, on the target
        grid, of the coarse cell at the target's centre (30 for 30 m NLCD on 1 m imagery)."""
        src = self.source
        mx, my = apply_affine(self.transform, self.width / 2, self.height / 2)
        (sx,), (sy,) = warp_transform(self.crs, src.crs, [mx], [my])
        c0, r0 = apply_affine(~src.transform, sx, sy)
        cols, rows = np.floor(c0) + np.array([0.0, 1.0, 0.0]), np.floor(r0) + np.array([0, 0, 1.0])
        xs, ys = apply_affine(src.transform, cols, rows)
        tx, ty = warp_transform(src.crs, self.crs, list(xs), list(ys))
        c, r = apply_affine(~self.transform, np.asarray(tx), np.asarray(ty))
        return math.sqrt(abs((c[1] - c[0]) * (r[2] - r[0]) - (c[2] - c[0]) * (r[1] - r[0])))

    def fingerprint(self) -> dict[str, Any]:
        """Cheap identity: the coarse file (path, size, mtime), its grid, and the target grid."""
        src = self.source
        return {**_file_stamp(src.name), "source_shape": [src.height, src.width],
                "source_crs": src.crs.to_wkt(), "source_transform": list(src.transform)[:6],
                "crs": self.crs.to_wkt(), "transform": list(self.transform)[:6],
                "shape": [self.height, self.width], "nodata": self.nodata,
                "resampling": "nearest"}

    def close(self) -> None:
        vrt = getattr(self, "_vrt", None)
        if vrt is not None:
            vrt.close()
        if self._own:
            self.source.close()

    def __enter__(self) -> AlignedReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
