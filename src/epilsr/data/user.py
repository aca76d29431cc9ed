"""Your own rasters: imagery GeoTIFFs, a coarse map on any grid, and a ``p(label | class)`` table.

* :func:`find_images`: a GeoTIFF path or a glob of them.
* :func:`load_label_table`: ``"nlcd"`` (the shipped ``nlcd_label_priors.csv``) or a CSV with the
  same columns: one row per coarse code (``code`` or ``nlcd_code``; optional name column), one
  ``p_<label>`` column per high-resolution label; optional rows whose code is ``name`` (display
  names) and ``color`` (``#rrggbb``) per label. Rows summing to zero (NLCD 0) are no-data codes.
* :func:`imagery_scaling`: the documented per-raster scaling of imagery to ``[0, 1]``.
* :func:`open_scene`: imagery reader, aligned class reader, validity and checks, before any work.

Imagery scaling (one factor per raster, all bands alike, so band ratios are kept):

* ``uint8``: ``/ 255`` (as everywhere in epilsr).
* ``uint16``: ``/ (2**bits - 1)`` with ``bits`` the raster's real bit depth: ``bit_depth`` if given,
  else GDAL's ``NBITS`` when the file declares it, else the smallest of 8, 10, 11, 12, 14, 16 that
  holds the maximum of a decimated read (~1024^2 samples). The same scene stored at 8 bits or
  12 bits (``x12 = round(x8 * 4095 / 255)``) then differs by at most ``1 / 8190`` after scaling.
* ``float``: reflectance in ``[0, 1]`` is used as is; data whose 99.9th percentile exceeds 1.5
  (e.g. reflectance x 10 000) is divided by that percentile.
* anything else (signed integers, ``uint32``, complex): a clear error.
"""

from __future__ import annotations

import csv
import glob
import importlib.resources
import math
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from epilsr.data.chesapeake import LABEL_COLORS, LABEL_NAMES, lc_to_labels
from epilsr.io.align import AlignedReader, RasterioReader

__all__ = [
    "LabelTable",
    "Scene",
    "find_images",
    "imagery_scaling",
    "load_label_table",
    "open_scene",
    "truth_mapping",
]

_PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40],
                     [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127],
                     [188, 189, 34], [23, 190, 207]], np.uint8)
_BIT_DEPTHS = (8, 10, 11, 12, 14, 16)
_SAMPLE_SIDE = 1024


class LabelTable(NamedTuple):
    """``p(label | coarse code)`` with its legend."""

    codes: np.ndarray  # [Cc] int coarse codes
    table: np.ndarray  # [Cc, n] float32 p(l | c) (rows summing to zero: no-data codes)
    label_names: tuple[str, ...]
    label_colors: np.ndarray  # [n, 3] uint8
    source: str  # "nlcd" or the CSV path

    @property
    def nodata_codes(self) -> np.ndarray:
        """Codes whose row sums to zero (e.g. NLCD 0): no-data, not an error."""
        return self.codes[self.table.sum(axis=1) <= 0]

    def lut(self, extra_nodata: list[float] = ()) -> tuple[np.ndarray, int]:
        """``(lut, offset)``: ``lut[code - offset]`` is the row of ``code`` (-1 = no data or
        unknown). Covers the table's codes and the integer ``extra_nodata`` values (-1 even
        when they are table codes)."""
        vals = [int(v) for v in extra_nodata if float(v).is_integer()]
        lo = min([0, *self.codes.tolist(), *vals])
        hi = max([*self.codes.tolist(), *vals])
        lut = np.full(hi - lo + 1, -1, np.int32)
        valid = self.table.sum(axis=1) > 0
        lut[self.codes[valid] - lo] = np.flatnonzero(valid)
        lut[np.asarray(vals, np.int64) - lo] = -1  # a no-data value wins over a table code
        return lut, lo


def _label_key(column: str) -> str:
    return column[2:]


def _parse_color(text: str, where: str) -> list[int]:
    t = text.strip().lstrip("#")
    if len(t) != 6:
        raise ValueError(f"{where}: expected a colour '#rrggbb', got {text!r}")
    return [int(t[i : i + 2], 16) for i in (0, 2, 4)]


def load_label_table(spec: str | os.PathLike) -> LabelTable:
    """``"nlcd"`` (shipped table) or a CSV path; see the module doc for the columns."""
    if str(spec).lower() == "nlcd":
        text = importlib.resources.files("epilsr.data").joinpath("nlcd_label_priors.csv")
        text, where = text.read_text(), "nlcd"
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"data.table: {path} is not a file (give 'nlcd' or a CSV)")
        text, where = path.read_text(), str(path)
    rows = list(csv.DictReader(text.splitlines()))
    fields = list(rows[0].keys()) if rows else []
    code_col = next((c for c in ("code", "nlcd_code", "class", "value") if c in fields), None)
    p_cols = [c for c in fields if c.startswith("p_")]
    if code_col is None or not p_cols:
        raise ValueError(f"{where}: expected a 'code' (or 'nlcd_code') column and p_<label> "
                         f"columns, got columns {fields}")
    codes, probs, names, colors = [], [], None, None
    for k, r in enumerate(rows, start=2):
        key = (r[code_col] or "").strip().lower()
        if key == "name":
            names = [r[c].strip() for c in p_cols]
            continue
        if key in ("color", "colour"):
            colors = [_parse_color(r[c], f"{where} line {k}") for c in p_cols]
            continue
        try:
            codes.append(int(float(key)))
            probs.append([float(r[c]) for c in p_cols])
        except ValueError as err:
            raise ValueError(f"{where} line {k}: expected an integer code and numbers in "
                             f"{p_cols} ({err})") from err
    table = np.asarray(probs, np.float32)
    if not codes:
        raise ValueError(f"{where}: no class rows")
    if np.any(~np.isfinite(table)) or np.any(table < 0):
        raise ValueError(f"{where}: p_<label> values must be finite and non-negative")
    if len(set(codes)) != len(codes):
        raise ValueError(f"{where}: duplicate codes in {codes}")
    keys = [_label_key(c) for c in p_cols]
    if names is None:
        chesapeake = [n.replace(" ", "_") for n in LABEL_NAMES]
        names = list(LABEL_NAMES) if keys == chesapeake else [k.replace("_", " ") for k in keys]
    if colors is None:
        n = len(keys)
        colors = LABEL_COLORS if n == 4 else _PALETTE[np.arange(n) % len(_PALETTE)]
    return LabelTable(np.asarray(codes, np.int64), table, tuple(names),
                      np.asarray(colors, np.uint8), where)


def find_images(pattern: str | os.PathLike) -> list[Path]:
    """A GeoTIFF path, or a glob (``*``, ``?``, ``[``) of them, sorted."""
    text = os.fspath(pattern)
    if any(ch in text for ch in "*?["):
        paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        if not paths:
            raise FileNotFoundError(f"data.image: no file matches {text!r}")
        return paths
    path = Path(os.path.expanduser(text))
    if not path.exists():
        raise FileNotFoundError(f"data.image: {path} does not exist")
    return [path]


def _decimated(reader: RasterioReader) -> np.ndarray:
    """``[C, h, w]`` nearest-neighbour read of the whole raster at most ~1024 px a side."""
    ds = reader.dataset
    step = max(1, math.ceil(max(ds.height, ds.width) / _SAMPLE_SIDE))
    shape = (len(reader.bands), math.ceil(ds.height / step), math.ceil(ds.width / step))
    return ds.read(reader.bands, out_shape=shape, masked=True)


def imagery_scaling(reader: RasterioReader, *, bit_depth: int | None = None) -> float:
    """The factor mapping the raster's values to ``[0, 1]`` (module doc); errors name the file."""
    dt, name = reader.dtype, Path(reader.dataset.name).name
    if dt == np.uint8:
        return 1.0 / 255.0
    if dt == np.uint16:
        if bit_depth is None:
            nbits = reader.dataset.tags(1, ns="IMAGE_STRUCTURE").get("NBITS")
            if nbits is not None:
                bit_depth = int(nbits)
            else:
                top = float(np.ma.max(_decimated(reader)))
                bit_depth = next((b for b in _BIT_DEPTHS if top < 2**b), 16)
        if not 1 <= int(bit_depth) <= 16:
            raise ValueError(f"data.bit_depth: expected 1..16 for uint16 imagery, got {bit_depth}")
        return 1.0 / (2 ** int(bit_depth) - 1)
    if dt.kind == "f":
        sample = np.ma.filled(_decimated(reader).astype(np.float64), np.nan)
        top = float(np.nanpercentile(sample, 99.9)) if np.isfinite(sample).any() else 1.0
        return 1.0 if top <= 1.5 else 1.0 / top
    raise ValueError(f"{name}: unsupported imagery dtype {dt} (expected uint8, uint16 with its "
                     "bit depth, or float reflectance)")


class _ScaledImage:
    """Window reader of imagery as float32 ``[h, w, C]`` in ``[0, 1]`` (NaN -> 0)."""

    def __init__(self, reader: RasterioReader, scale: float):
        self.reader, self.scale = reader, float(scale)
        self.shape = reader.shape
        self.geo = reader.geo

    def __call__(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        x = np.asarray(self.reader(row, col, height, width), np.float32) * self.scale
        return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)

    def fingerprint(self) -> dict[str, Any]:
        return {**self.reader.fingerprint(), "scale": self.scale}


class Scene(NamedTuple):
    """One imagery raster made ready for :func:`epilsr.pipelines.raster_lsr.lsr_raster`."""

    name: str
    image: Any  # float32 window reader, .shape, .geo
    classes: Any  # int32 window reader of table rows, -1 = no data
    valid: Any  # bool window reader or None
    geo: Any  # GeoInfo for the outputs
    height: int
    width: int
    cell_size: int  # coarse cell side in imagery pixels
    scale: float
    readers: tuple  # to close

    def close(self) -> None:
        for r in self.readers:
            r.close()


def _free_fill(table: LabelTable, dtype: np.dtype) -> float:
    """The fill value outside a coarse raster without a no-data tag: 0 unless 0 is a class of
    the table, else the largest value of ``dtype`` (or -1) that is not a table code."""
    valid = set(table.codes[table.table.sum(axis=1) > 0].tolist())
    if 0 not in valid:
        return 0
    top = int(np.iinfo(dtype).max) if dtype.kind in "ui" else 2**31 - 1
    for v in range(top, top - 1024, -1):
        if v not in valid:
            return v
    return -1


def _auto_cell_size(aligned: AlignedReader, table: LabelTable, img: RasterioReader) -> int:
    """Coarse cell side in imagery pixels from the two grids. A coarse map already resampled to
    the imagery's resolution (cells of ~1 pixel) says nothing about its true cells: with the
    NLCD table and metric imagery they are NLCD's 30 m, otherwise ``data.cell_size`` is needed."""
    cells = aligned.cell_pixels()
    if cells >= 2:
        return round(cells)
    units = img.crs.linear_units if img.crs.is_projected else ""
    if table.source == "nlcd" and units in ("metre", "meter", "m"):
        side = round(30.0 / abs(img.transform.a))
        warnings.warn(f"{aligned.name}: the coarse map is at the imagery's resolution; taking "
                      f"NLCD's 30 m cells ({side} px). Set data.cell_size otherwise", UserWarning,
                      stacklevel=2)
        return max(1, side)
    raise ValueError(f"{aligned.name}: the coarse map is at the imagery's resolution, so its "
                     "cell size is unknown; set data.cell_size (coarse cell side in pixels)")


def open_scene(image_path: str | os.PathLike, coarse_path: str | os.PathLike,
               table: LabelTable, *, bands: list[int] | None = None,
               bit_depth: int | None = None, cell_size: int | None = None,
               coarse_nodata: float | None = None) -> Scene:
    """Open and check one imagery raster against the coarse map and the table (no pixel work).

    Raises ``ValueError`` for imagery with fewer than 3 bands, an unsupported dtype, a missing
    CRS, rasters that do not overlap, or coarse codes (under the imagery) missing from the table.
    """
    img = RasterioReader(image_path, bands=bands)
    readers: list[Any] = [img]
    try:
        name = Path(image_path).name
        n_bands = len(img.bands)
        if n_bands < 3:
            raise ValueError(f"{name}: expected imagery with 3 or more bands, got {n_bands}")
        if img.crs is None:
            raise ValueError(f"{name}: the imagery has no CRS (georeference it first)")
        scale = imagery_scaling(img, bit_depth=bit_depth)
        if coarse_nodata is None:  # no tag: 0, unless 0 is a class of the table
            with RasterioReader(coarse_path, bands=[1]) as peek:
                if peek.nodata is None:
                    coarse_nodata = _free_fill(table, peek.dtype)
        aligned = AlignedReader(coarse_path, crs=img.crs, transform=img.transform,
                                height=img.height, width=img.width, nodata=coarse_nodata,
                                name=Path(coarse_path).name)
        readers.append(aligned)
        nodata_vals = [aligned.nodata] + (
            [] if aligned.source.nodata is None else [aligned.source.nodata])
        present = aligned.source_values()
        known = set(table.codes.tolist()) | {float(v) for v in nodata_vals}
        missing = sorted(v for v in present.tolist() if v not in known)
        if missing:
            raise ValueError(
                f"{aligned.name}: coarse codes {missing[:10]} under {name} are not in the table "
                f"{table.source} (codes {table.codes.tolist()}); add rows for them, or name a "
                "no-data code with data.coarse_nodata=<code>")
        lut, lo = table.lut(nodata_vals)
        nodata_set = np.asarray(nodata_vals, np.float64)

        def classes(row, col, height, width):
            v = np.asarray(aligned(row, col, height, width))
            if v.dtype.kind == "f":
                bad = ~np.isfinite(v) | np.isin(v, nodata_set) | (v != np.round(v))
                v = np.where(bad, lo - 1, v)
            idx = v.astype(np.int64) - lo
            inside = (idx >= 0) & (idx < lut.size)
            out = np.full(v.shape, -1, np.int32)
            out[inside] = lut[idx[inside]]
            return out

        classes.fingerprint = lambda: {  # type: ignore[attr-defined]
            **aligned.fingerprint(), "table": table.source, "codes": table.codes.tolist(),
            "lut_offset": lo}
        valid = None
        if img.has_mask or img.dtype.kind == "f":
            def valid(row, col, height, width):
                ok = img.valid(row, col, height, width)
                if img.dtype.kind == "f":
                    x = np.asarray(img(row, col, height, width))
                    ok &= np.all(np.isfinite(x), axis=-1) if x.ndim == 3 else np.isfinite(x)
                return ok

            valid.fingerprint = img.fingerprint  # type: ignore[attr-defined]
        cells = cell_size if cell_size is not None else _auto_cell_size(aligned, table, img)
        geo = img.geo
        return Scene(Path(image_path).stem, _ScaledImage(img, scale), classes, valid, geo,
                     img.height, img.width, int(cells), scale, tuple(readers))
    except BaseException:
        for r in readers:
            r.close()
        raise


def truth_mapping(path: str | os.PathLike, table: LabelTable, how: str = "auto"):
    """How truth values become labels ``0..n-1``: ``"labels"`` (as they are; others ignored)
    or ``"chesapeake"`` (Chesapeake Conservancy land-cover codes 1..6 -> the 4 labels,
    :func:`epilsr.data.chesapeake.lc_to_labels`). ``"auto"``: Chesapeake when the table's labels
    are its 4 classes and the file is a ``*_lc.tif`` or holds codes 4, 5, 6 or 15 (a decimated
    read). Returns ``(name, fn)`` with ``fn(values) -> int64 labels`` (255 = ignore)."""
    if how not in ("auto", "labels", "chesapeake"):
        raise ValueError(f"data.truth_codes: expected auto, labels or chesapeake, got {how!r}")
    if how == "auto":
        how = "labels"
        if len(table.label_names) == 4:
            with RasterioReader(path, bands=[1]) as rd:
                values = np.unique(np.ma.compressed(_decimated(rd)))
            if str(path).endswith("_lc.tif") or np.isin(values, [4, 5, 6, 15]).any():
                how = "chesapeake"
    if how == "chesapeake":
        return how, lambda v: lc_to_labels(np.clip(v, 0, 255)).astype(np.int64)
    return how, lambda v: np.asarray(v, np.int64)
