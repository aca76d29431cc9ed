"""GeoTIFF rasters with tifffile + imagecodecs (no GDAL): georeferencing, windowed reads, writers.

* :class:`GeoInfo` carries the GeoTIFF tags that define georeferencing (pixel scale, tie points,
  GeoKey directory and its parameter tags, model transformation, GDAL no-data) unchanged from an
  input to an output, and shifts them for sub-windows (:meth:`GeoInfo.window`).
* :class:`RasterReader` / :func:`read_window` decode only the strips or tiles that intersect a
  window (uncompressed single-strip files are memory-mapped), so a window of a 10 GB raster costs
  the window, not the file.
* :class:`RasterWriter` writes a tiled (256 x 256) compressed GeoTIFF row block by row block with
  bounded memory. Finished tile rows are encoded at once and appended to ``<path>.partial``; the
  TIFF is assembled from those encoded tiles on :meth:`RasterWriter.close` and renamed to
  ``<path>``, so no half-written file ever sits at the final path. Its state can be checkpointed
  and a writer resumed after a crash (used by :func:`epilsr.io.strips.run_strips`).
  Outputs are self-describing Cloud Optimized GeoTIFFs: internal overviews (halving until the
  raster fits one tile; nearest for labels, the mean of valid values for floats), every IFD
  before the pixel data and the smallest overview's tiles first (the COG layout), a colour table
  and label names for label rasters, band descriptions (GDAL metadata), GDAL no-data, and the
  input's georeferencing.

Arrays are channel-last: a raster is ``[H, W]`` (one sample) or ``[H, W, C]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import tifffile

from epilsr.io.atomic import commit, save_npy_atomic

__all__ = [
    "GeoInfo",
    "RasterReader",
    "RasterWriter",
    "pam_categories_xml",
    "read_geoinfo",
    "read_window",
    "raster_shape",
    "write_raster",
]

# GeoTIFF / GDAL tag codes.
PIXEL_SCALE, TIEPOINT, TRANSFORMATION = 33550, 33922, 34264
GEOKEYS, GEO_DOUBLES, GEO_ASCII, GDAL_METADATA, GDAL_NODATA = 34735, 34736, 34737, 42112, 42113
# GeoKeys used to find the EPSG code.
_MODEL_TYPE, _RASTER_TYPE, _GEOGRAPHIC_TYPE, _PROJECTED_TYPE = 1024, 1025, 2048, 3072
_USER_DEFINED = 32767
_PIXEL_IS_POINT = 2  # GTRasterTypeGeoKey value: model points refer to pixel centres

PathLike = str | os.PathLike


def _floats(v) -> tuple[float, ...] | None:
    return None if v is None else tuple(float(x) for x in np.ravel(v))


def _ints(v) -> tuple[int, ...] | None:
    return None if v is None else tuple(int(x) for x in np.ravel(v))


def _text(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("ascii", "replace")
    return str(v).rstrip("\x00")


def _nodata_text(value: float | int | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    value = float(value)
    if math.isnan(value):
        return "nan"
    return str(int(value)) if value.is_integer() else repr(value)


@dataclasses.dataclass(frozen=True)
class GeoInfo:
    """The georeferencing tags of a GeoTIFF, carried unchanged from input to output.

    Attributes:
      pixel_scale: ModelPixelScaleTag (33550) ``(sx, sy, sz)``.
      tiepoints: ModelTiepointTag (33922) ``(I, J, K, X, Y, Z) * n``: raster point ``(I, J)``
        (column, row) maps to model point ``(X, Y, Z)``.
      geokeys: GeoKeyDirectoryTag (34735), the raw SHORT directory.
      geo_doubles: GeoDoubleParamsTag (34736).
      geo_ascii: GeoAsciiParamsTag (34737).
      transformation: ModelTransformationTag (34264), 16 doubles (row-major 4 x 4).
      nodata: GDAL_NODATA (42113) as text (e.g. ``"255"``, ``"nan"``).
    """

    pixel_scale: tuple[float, ...] | None = None
    tiepoints: tuple[float, ...] | None = None
    geokeys: tuple[int, ...] | None = None
    geo_doubles: tuple[float, ...] | None = None
    geo_ascii: str | None = None
    transformation: tuple[float, ...] | None = None
    nodata: str | None = None

    @classmethod
    def from_tags(cls, tags: Any) -> GeoInfo:
        """From a ``tifffile.TiffTags`` (``page.tags``) or a ``{code: value}`` mapping."""

        def get(code):
            tag = tags.get(code)
            return getattr(tag, "value", tag)

        return cls(
            pixel_scale=_floats(get(PIXEL_SCALE)),
            tiepoints=_floats(get(TIEPOINT)),
            geokeys=_ints(get(GEOKEYS)),
            geo_doubles=_floats(get(GEO_DOUBLES)),
            geo_ascii=_text(get(GEO_ASCII)),
            transformation=_floats(get(TRANSFORMATION)),
            nodata=_text(get(GDAL_NODATA)),
        )

    @property
    def is_georeferenced(self) -> bool:
        """True when the raster -> model mapping is defined (tie points or a transformation)."""
        return self.transformation is not None or self.tiepoints is not None

    def _inline_keys(self) -> dict[int, int]:
        """GeoKeys whose values are stored inline in the directory: ``{key_id: value}``."""
        keys = self.geokeys
        if not keys or len(keys) < 4:
            return {}
        entries = {}
        for i in range(4, min(len(keys), 4 + 4 * keys[3]) - 3, 4):
            key_id, location, _count, value = keys[i : i + 4]
            if location == 0:  # value stored inline
                entries[key_id] = value
        return entries

    @property
    def epsg(self) -> int | None:
        """EPSG code from the GeoKey directory (projected CRS first, else geographic), or None.

        A user-defined CRS (e.g. a custom WKT) has no code here; GDAL may still recognise it:
        :func:`epilsr.io.align.geoinfo_to_rasterio` returns GDAL's reading of the tags.
        """
        entries = self._inline_keys()
        if not entries:
            return None
        model = entries.get(_MODEL_TYPE)
        order = (_GEOGRAPHIC_TYPE, _PROJECTED_TYPE) if model == 2 else (
            _PROJECTED_TYPE, _GEOGRAPHIC_TYPE)
        for key_id in order:
            code = entries.get(key_id)
            if code is not None and 0 < code < _USER_DEFINED:
                return int(code)
        return None

    @property
    def pixel_is_point(self) -> bool:
        """True when GTRasterTypeGeoKey says RasterPixelIsPoint (model points = pixel centres)."""
        return self._inline_keys().get(_RASTER_TYPE) == _PIXEL_IS_POINT

    @property
    def geotransform(self) -> tuple[float, float, float, float, float, float] | None:
        """GDAL-style ``(x0, dx_col, dx_row, y0, dy_col, dy_row)`` of pixel corners, or None.

        Model ``x = x0 + col * dx_col + row * dx_row`` and ``y = y0 + col * dy_col + row * dy_row``
        at pixel *corners* (GDAL's convention): for a RasterPixelIsPoint raster, whose tags
        place model points at pixel centres, the origin is moved by half a pixel (as GDAL does).
        """
        half = 0.5 if self.pixel_is_point else 0.0
        if self.transformation is not None:
            m = self.transformation
            x0 = m[3] - half * (m[0] + m[1])
            y0 = m[7] - half * (m[4] + m[5])
            return (x0, m[0], m[1], y0, m[4], m[5])
        if self.pixel_scale is not None and self.tiepoints is not None and len(self.tiepoints) == 6:
            i, j, _, x, y, _ = self.tiepoints
            sx, sy = self.pixel_scale[:2]
            return (x - (i + half) * sx, sx, 0.0, y + (j + half) * sy, 0.0, -sy)
        return None

    def window(self, row: int, col: int) -> GeoInfo:
        """The georeferencing of the sub-raster whose top-left pixel is ``(row, col)``.

        With a pixel scale and one tie point the model point moves by ``(col * sx, -row * sy)``
        and the raster point stays; with a transformation its translation moves by the
        matrix applied to ``(col, row)``; tie points without a scale (control points) have
        their raster coordinates shifted by ``(-col, -row)``. The GeoKeys are unchanged.
        """
        row, col = int(row), int(col)
        if row == 0 and col == 0:
            return self
        changes: dict[str, Any] = {}
        if self.transformation is not None:
            m = list(self.transformation)
            for r in range(3):
                m[4 * r + 3] += m[4 * r] * col + m[4 * r + 1] * row
            changes["transformation"] = tuple(m)
        if self.tiepoints is not None:
            t = list(self.tiepoints)
            if self.pixel_scale is not None and len(t) == 6:
                t[3] += col * self.pixel_scale[0]
                t[4] -= row * self.pixel_scale[1]
            else:
                for k in range(0, len(t) - 5, 6):
                    t[k] -= col
                    t[k + 1] -= row
            changes["tiepoints"] = tuple(t)
        return dataclasses.replace(self, **changes)

    def with_nodata(self, value: float | int | str | None) -> GeoInfo:
        """A copy with GDAL_NODATA set to ``value`` (``None`` removes it; NaN -> ``"nan"``)."""
        return dataclasses.replace(self, nodata=_nodata_text(value))

    def extratags(self) -> list[tuple[int, str, int, Any, bool]]:
        """The tags as ``tifffile`` ``extratags`` tuples ``(code, dtype, count, value, True)``."""
        out: list[tuple[int, str, int, Any, bool]] = []
        for code, dtype, value in (
            (PIXEL_SCALE, "d", self.pixel_scale),
            (TIEPOINT, "d", self.tiepoints),
            (TRANSFORMATION, "d", self.transformation),
            (GEOKEYS, "H", self.geokeys),
            (GEO_DOUBLES, "d", self.geo_doubles),
            (GEO_ASCII, "s", self.geo_ascii),
            (GDAL_NODATA, "s", self.nodata),
        ):
            if value is None:
                continue
            count = 0 if dtype == "s" else len(value)
            out.append((code, dtype, count, value, True))
        return out


def read_geoinfo(path: PathLike, *, page: int = 0) -> GeoInfo:
    """The :class:`GeoInfo` of ``path`` (all fields None for a plain TIFF)."""
    with tifffile.TiffFile(path) as tif:
        return GeoInfo.from_tags(tif.pages[page].tags)


# --------------------------------------------------------------------------------------------
# Reading


class RasterReader:
    """An open TIFF page read by windows: ``reader(row, col, height, width) -> [h, w(, C)]``.

    Only the strips/tiles that intersect the window are read and decoded (any compression
    tifffile + imagecodecs decode, predictors included); uncompressed contiguous pages are
    memory-mapped. A compressed file stored as one strip can only be decoded whole: prefer
    tiled or multi-strip inputs for big rasters: a window whose strips/tiles would decode to
    more than ``max_segment_bytes`` (2 GiB) is refused with a clear error before any decoding.
    Decoded strips/tiles are kept in a least-recently-used cache of at most ``cache_bytes``
    (default 32 MiB; 0 = none), so overlapping windows read in raster order (the pipelines'
    strips of windows) decode each segment once instead of once per window that touches it;
    :attr:`decoded` counts the segments decoded. Samples are returned last whatever the planar
    configuration. Use as a context manager or call :meth:`close`.

    Attributes:
      height, width: raster size; ``shape`` is ``(H, W)`` or ``(H, W, C)``.
      dtype: sample dtype (native byte order).
      geo: the page's :class:`GeoInfo`.
    """

    def __init__(self, path: PathLike, *, page: int = 0, max_segment_bytes: int = 2**31,
                 cache_bytes: int = 32 * 2**20):
        self.path = Path(path)
        self.max_segment_bytes = int(max_segment_bytes)
        if int(cache_bytes) < 0:
            raise ValueError(f"RasterReader: cache_bytes must be >= 0, got {cache_bytes}")
        self.cache_bytes = int(cache_bytes)
        self.decoded = 0  # strips/tiles decoded so far (cache misses)
        self._cache: OrderedDict[int, tuple] = OrderedDict()  # index -> (s, y0, x0, seg)
        self._cached = 0  # bytes held by _cache
        self._cache_lock = threading.Lock()
        self._tif = tifffile.TiffFile(self.path)
        try:
            self._page = self._tif.pages[page]
            p = self._page
            s, depth, length, width, contig = p.shaped
            if depth != 1:
                raise ValueError(f"{self.path}: volumetric TIFF pages (depth {depth}) unsupported")
            self._samples = s * contig
            self._separate = s > 1
            self.height, self.width = int(length), int(width)
            self.dtype = np.dtype(p.dtype).newbyteorder("=")
            self.geo = GeoInfo.from_tags(p.tags)
            self._mmap = None
            if p.is_memmappable and p.compression == 1:
                self._mmap = tifffile.memmap(self.path, page=page, mode="r")
        except Exception:
            self._tif.close()
            raise

    @property
    def shape(self) -> tuple[int, ...]:
        """``(H, W)`` or ``(H, W, C)``."""
        return (self.height, self.width) + ((self._samples,) if self._samples > 1 else ())

    @property
    def nbytes(self) -> int:
        """Bytes of the whole decoded raster (what :meth:`read` allocates)."""
        return self.height * self.width * self._samples * self.dtype.itemsize

    @property
    def segment_bytes(self) -> int:
        """Bytes of the largest strip/tile decoded at once (a window decodes whole segments,
        so a single-strip file costs its whole size even for a 1x1 window)."""
        p = self._page
        if self._mmap is not None:
            return 0
        h, w = (p.tilelength, p.tilewidth) if p.is_tiled else (p.rowsperstrip, self.width)
        return int(h) * int(w) * int(p.shaped[-1]) * self.dtype.itemsize

    def _check(self, row, col, height, width):
        row, col, height, width = (int(v) for v in (row, col, height, width))
        if (
            min(row, col) < 0 or min(height, width) < 1
            or row + height > self.height or col + width > self.width
        ):
            raise ValueError(
                f"{self.path.name}: window rows {row}:{row + height}, cols {col}:{col + width} "
                f"is empty or outside the {self.height}x{self.width} raster"
            )
        return row, col, height, width

    def __call__(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        """Rows ``row:row+height``, columns ``col:col+width`` -> ``[height, width(, C)]``."""
        row, col, height, width = self._check(row, col, height, width)
        if self._mmap is not None:
            win = self._mmap
            if self._separate:  # [S, H, W]
                win = np.moveaxis(win[:, row : row + height, col : col + width], 0, -1)
            else:
                win = win[row : row + height, col : col + width]
            return np.array(win, dtype=self.dtype)
        return self._decode_window(row, col, height, width)

    def _decode_window(self, row, col, height, width) -> np.ndarray:
        p = self._page
        if self.segment_bytes > self.max_segment_bytes:
            raise ValueError(
                f"{self.path}: every window decodes whole {'tiles' if p.is_tiled else 'strips'} "
                f"of {self.segment_bytes / 2**20:.0f} MiB, above max_segment_bytes="
                f"{self.max_segment_bytes} (re-tile the file, e.g. gdal_translate -co TILED=YES)"
            )
        s_sep = p.shaped[0]
        out = np.zeros((height, width, self._samples), self.dtype)
        if p.is_tiled:
            seg_h, seg_w = p.tilelength, p.tilewidth
            across = math.ceil(self.width / seg_w)
        else:
            seg_h, seg_w = p.rowsperstrip, self.width
            across = 1
        down = math.ceil(self.height / seg_h)
        r0, r1 = row // seg_h, (row + height - 1) // seg_h
        c0, c1 = col // seg_w, (col + width - 1) // seg_w
        indices = [
            s * down * across + r * across + c
            for s in range(s_sep)
            for r in range(r0, r1 + 1)
            for c in range(c0, c1 + 1)
        ]
        for s, y0, x0, seg in self._segments(indices):
            if seg is None:  # empty segment: stays zero
                continue
            ys, ye = max(row, y0), min(row + height, y0 + seg.shape[0], self.height)
            xs, xe = max(col, x0), min(col + width, x0 + seg.shape[1], self.width)
            if ys >= ye or xs >= xe:
                continue
            contig = seg.shape[-1]
            out[ys - row : ye - row, xs - col : xe - col, s * contig : (s + 1) * contig] = seg[
                ys - y0 : ye - y0, xs - x0 : xe - x0
            ]
        return out[..., 0] if self._samples == 1 else out

    def _segments(self, indices: list[int]) -> list[tuple]:
        """``(s, y0, x0, seg [h, w, contig] | None)`` of each segment in ``indices``: from the
        cache, else read and decoded (and cached while it fits ``cache_bytes``)."""
        with self._cache_lock:
            found = {i: self._cache[i] for i in indices if i in self._cache}
            for i in found:
                self._cache.move_to_end(i)
        missing = [i for i in indices if i not in found]
        if missing:
            p = self._page
            fh = self._tif.filehandle
            decodeargs = {}
            if p.compression in {6, 7, 34892, 33007}:  # JPEG flavours
                decodeargs = {"jpegtables": p.jpegtables,
                              "jpegheader": getattr(p, "jpegheader", None)}
            offsets = [p.dataoffsets[i] for i in missing]
            counts = [p.databytecounts[i] for i in missing]
            for data, index in fh.read_segments(offsets, counts, missing, lock=fh.lock,
                                                sort=True):
                try:
                    seg, (s, _, y0, x0, _), _ = p.decode(data, index, **decodeargs)
                except MemoryError:
                    raise MemoryError(f"{self.path}: out of memory decoding a "
                                      f"{self.segment_bytes / 2**20:.0f} MiB segment") from None
                if seg is not None:
                    seg = seg[0]
                    seg.flags.writeable = False  # shared by later windows: read only
                found[index] = (s, y0, x0, seg)
                self._store(index, found[index])
        return [found[i] for i in indices]

    def _store(self, index: int, item: tuple) -> None:
        """Counts a decode; caches ``item`` (evicting the least recently used) if it fits."""
        nbytes = 0 if item[3] is None else item[3].nbytes
        with self._cache_lock:
            self.decoded += 1
            if nbytes > self.cache_bytes:
                return
            self._cache[index] = item
            self._cached += nbytes
            while self._cached > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= 0 if old[3] is None else old[3].nbytes

    def fingerprint(self, *, samples: int = 8) -> str:
        """A cheap identity of the file's content, to refuse resuming over a changed input.

        sha256 of the resolved path, file size, ``mtime_ns``, the first 64 KiB (header and
        tags) and the raw bytes of ``samples`` strips/tiles spread evenly over the page.
        """
        stat = os.stat(self.path)
        h = hashlib.sha256(f"{self.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        offsets, counts = self._page.dataoffsets, self._page.databytecounts
        picks = np.unique(np.linspace(0, len(offsets) - 1, samples).round().astype(int))
        fh = self._tif.filehandle
        with fh.lock:
            fh.seek(0)
            h.update(fh.read(min(65536, stat.st_size)))
            for i in picks if len(offsets) else ():
                fh.seek(int(offsets[i]))
                h.update(fh.read(min(int(counts[i]), 1 << 20)))
        return h.hexdigest()[:16]

    def read(self) -> np.ndarray:
        """The whole raster ``[H, W(, C)]``."""
        return self(0, 0, self.height, self.width)

    def close(self) -> None:
        self._mmap = None
        with self._cache_lock:
            self._cache.clear()
            self._cached = 0
        self._tif.close()

    def __enter__(self) -> RasterReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_window(
    path: PathLike, row: int, col: int, height: int, width: int, *, page: int = 0
) -> np.ndarray:
    """``[height, width(, C)]`` window of a TIFF, decoding only the strips/tiles it touches."""
    with RasterReader(path, page=page) as reader:
        return reader(row, col, height, width)


def raster_shape(path: PathLike, *, page: int = 0) -> tuple[int, ...]:
    """``(H, W)`` or ``(H, W, C)`` (samples last) without reading pixel data."""
    with tifffile.TiffFile(path) as tif:
        s, _, h, w, c = tif.pages[page].shaped
    return (h, w) + ((s * c,) if s * c > 1 else ())


# --------------------------------------------------------------------------------------------
# Writing

_COMPRESSION = {None: 1, "none": 1, "lzw": 5, "deflate": 8, "zlib": 8}


_BIGTIFF_BYTES = 2**32 - 2**27  # encoded pixel data above this: BigTIFF (64-bit offsets)
# TIFF field types: (struct code, size)
_TYPES = {2: ("s", 1), 3: ("H", 2), 4: ("I", 4), 12: ("d", 8), 16: ("Q", 8)}


@dataclasses.dataclass
class _Level:
    """One resolution level of a COG: its spool of encoded tiles and their byte counts."""

    path: Path
    height: int
    width: int
    bytecounts: list[int]


class _TileEncoder:
    """Rows in, encoded ``tile x tile`` tiles out to a spool file (an overview level)."""

    def __init__(self, writer: RasterWriter, path: Path, width: int):
        self.writer, self.width, self.path = writer, width, path
        self.pending = np.zeros((writer.tile, width, writer.bands or 1), writer.dtype)
        self.n = 0
        self.bytecounts: list[int] = []
        self.file = open(path, "wb")  # closed in finish()/close()

    def write(self, rows: np.ndarray) -> None:
        t = self.writer.tile
        for r in rows:
            self.pending[self.n] = r
            self.n += 1
            if self.n == t:
                self._flush()

    def _flush(self) -> None:
        t = self.writer.tile
        self.pending[self.n :] = 0
        for c in range(0, self.width, t):
            block = self.pending[:, c : c + t]
            if block.shape[1] < t:
                block = np.pad(block, ((0, 0), (0, t - block.shape[1]), (0, 0)))
            data = self.writer._encode(block)
            self.file.write(data)
            self.bytecounts.append(len(data))
        self.n = 0

    def finish(self) -> None:
        if self.n:
            self._flush()
        self.close()

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()


def _halve(rows: np.ndarray) -> np.ndarray:
    """``[h, w, s]`` -> ``[ceil(h/2), ceil(w/2), s]``: integers (labels) by nearest neighbour
    (every second row and column), floats by the mean of the non-NaN values of each 2 x 2 block
    (NaN where all four are NaN)."""
    if rows.dtype.kind != "f":
        return rows[::2, ::2]
    h, w = rows.shape[:2]
    x = np.pad(rows.astype(np.float32), ((0, h % 2), (0, w % 2), (0, 0)),
               constant_values=np.nan)
    x = x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2, x.shape[2])
    ok = ~np.isnan(x)
    count = ok.sum(axis=(1, 3))
    total = np.where(ok, x, 0.0).sum(axis=(1, 3))
    return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(rows.dtype)


def _ifd_value_bytes(typ: int, values) -> tuple[bytes, int]:
    code, size = _TYPES[typ]
    if typ == 2:
        raw = values.encode("utf-8") + b"\0"
        return raw, len(raw)
    values = list(values)
    return struct.pack(f"<{len(values)}{code}", *values), len(values)


def _ifd_size(tags: list[tuple], big: bool) -> int:
    entry, inline = (20, 8) if big else (12, 4)
    n = (8 if big else 2) + entry * len(tags) + (8 if big else 4)
    for typ_values in tags:
        raw, _ = _ifd_value_bytes(typ_values[1], typ_values[2])
        if len(raw) > inline:
            n += len(raw) + (len(raw) & 1)
    return n


def _ifd_bytes(tags: list[tuple], at: int, next_ifd: int, big: bool) -> bytes:
    """One IFD at file offset ``at``: entries, the next-IFD offset, then out-of-line values."""
    entry, inline = (20, 8) if big else (12, 4)
    head = (8 if big else 2) + entry * len(tags) + (8 if big else 4)
    out = [struct.pack("<Q" if big else "<H", len(tags))]
    extra = bytearray()
    for code, typ, values in tags:
        raw, count = _ifd_value_bytes(typ, values)
        if len(raw) <= inline:
            field = raw.ljust(inline, b"\0")
        else:
            field = struct.pack("<Q" if big else "<I", at + head + len(extra))
            extra += raw + (b"\0" if len(raw) & 1 else b"")
        out.append(struct.pack("<HHQ" if big else "<HHI", code, typ, count) + field)
    out.append(struct.pack("<Q" if big else "<I", next_ifd))
    return b"".join(out) + bytes(extra)


@dataclasses.dataclass(frozen=True)
class _Description:
    """GDAL metadata XML, the TIFF colour map and the PAM sidecar XML (QGIS legend: category
    names and colour table, :func:`pam_categories_xml`) of an output raster."""

    xml: str | None
    colormap: list[int] | None
    pam: str | None = None

    @classmethod
    def make(cls, dtype, bands, label_names, label_colors, band_names, description):
        items: list[str] = []
        spp = bands or 1
        if label_names is not None:
            names = [str(n) for n in label_names]
            items.append(f'<Item name="LABELS">{escape("; ".join(names))}</Item>')
            items += [f'<Item name="LABEL_{i}">{escape(n)}</Item>' for i, n in enumerate(names)]
        if band_names is not None:
            if len(band_names) != spp:
                raise ValueError(f"band_names: expected {spp} names, got {len(band_names)}")
            items += [f'<Item name="DESCRIPTION" sample="{i}" role="description">'
                      f"{escape(str(n))}</Item>" for i, n in enumerate(band_names)]
        elif description is not None:
            items.append(f'<Item name="DESCRIPTION" sample="0" role="description">'
                         f"{escape(str(description))}</Item>")
        xml = None
        if items:
            xml = "<GDALMetadata>\n" + "".join(f"  {it}\n" for it in items) + "</GDALMetadata>"
        colormap = None
        if label_colors is not None and spp == 1 and np.dtype(dtype) == np.uint8:
            colors = np.asarray(label_colors, np.uint16).reshape(-1, 3)[:256]
            table = np.zeros((256, 3), np.uint16)
            table[: len(colors)] = colors
            colormap = (table.T * 257).ravel().tolist()
        pam = None
        if label_names is not None and spp == 1:
            pam = pam_categories_xml(label_names, None if colormap is None else label_colors)
        return cls(xml, colormap, pam)


def pam_categories_xml(label_names: Sequence[str], label_colors: Any = None) -> str:
    """GDAL PAM sidecar (``<raster>.aux.xml``) of a one-band label raster: band 1's
    ``CategoryNames`` (value ``i`` is ``label_names[i]``; QGIS shows them as the legend) and,
    with ``label_colors`` ``[n, 3]`` uint8, its colour table (other values transparent black)."""
    names = "".join(f"      <Category>{escape(str(n))}</Category>\n" for n in label_names)
    body = f"    <CategoryNames>\n{names}    </CategoryNames>\n"
    if label_colors is not None:
        colors = np.asarray(label_colors, np.uint8).reshape(-1, 3)[:256]
        entries = [f'      <Entry c1="{r}" c2="{g}" c3="{b}" c4="255"/>\n' for r, g, b in colors]
        entries += ['      <Entry c1="0" c2="0" c3="0" c4="0"/>\n'] * (256 - len(colors))
        body = ("    <ColorInterp>Palette</ColorInterp>\n" + body
                + f"    <ColorTable>\n{''.join(entries)}    </ColorTable>\n")
    return f'<PAMDataset>\n  <PAMRasterBand band="1">\n{body}  </PAMRasterBand>\n</PAMDataset>\n'


class RasterWriter:
    """Writes a tiled, compressed GeoTIFF row block by row block with bounded memory.

    Rows arrive in order through :meth:`write`; every complete row of tiles (``tile`` rows) is
    split into ``tile x tile`` tiles, encoded (predictor + LZW/deflate, as tifffile would) and
    appended to ``<path>.partial``. :meth:`close` assembles the TIFF from the encoded tiles into
    ``<path>.partial.tif`` and renames it to ``<path>``. Memory: one row of tiles
    (``tile * W * bands`` values). Georeferencing: ``geo`` tags are copied as extratags, with
    ``nodata`` (if given) as GDAL_NODATA.

    Args:
      path: the final ``.tif`` path.
      height, width: raster size.
      dtype: e.g. ``uint8`` labels, ``float32``/``float16`` probabilities.
      bands: ``None`` for ``[H, W]`` rasters, else ``C`` for ``[H, W, C]`` (interleaved; ``C = 1``
        is stored as a plain ``[H, W]`` page).
      geo: georeferencing to copy (e.g. the input's :class:`GeoInfo`).
      nodata: GDAL_NODATA of this output (overrides ``geo.nodata``; NaN allowed).
      compression: ``"deflate"`` (default), ``"lzw"`` or ``None``.
      predictor: ``True`` = horizontal differencing for integers, floating-point predictor for
        floats; ``False`` = none.
      tile: tile side (multiple of 16).
      label_names: names of label values ``0..n-1`` of a one-band integer raster (GDAL metadata
        items ``LABEL_<i>`` and ``LABELS``, a comma-free ``;``-separated list).
      label_colors: ``[n, 3]`` uint8 colours of those labels: a one-band uint8 raster becomes a
        palette image with a colour table (other values, e.g. 255 = no data, black).
      band_names: one description per band (e.g. probability bands named after their labels).
      description: the description of a one-band raster (e.g. ``"entropy (nats)"``).
      overviews: internal overviews, halving until the raster fits one tile (nearest for
        integer rasters, NaN-aware 2 x 2 means for floats).
    """

    def __init__(
        self,
        path: PathLike,
        *,
        height: int,
        width: int,
        dtype: Any,
        bands: int | None = None,
        geo: GeoInfo | None = None,
        nodata: float | int | str | None = None,
        compression: str | None = "deflate",
        predictor: bool = True,
        tile: int = 256,
        label_names: Sequence[str] | None = None,
        label_colors: Any = None,
        band_names: Sequence[str] | None = None,
        description: str | None = None,
        overviews: bool = True,
        _state: dict | None = None,
    ):
        self.path = Path(path)
        self.height, self.width = int(height), int(width)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"RasterWriter: expected a positive size, got {height}x{width}")
        if tile < 16 or tile % 16:
            raise ValueError(f"RasterWriter: tile must be a positive multiple of 16, got {tile}")
        key = compression.lower() if isinstance(compression, str) else compression
        if key not in _COMPRESSION:
            raise ValueError(f"RasterWriter: compression must be 'deflate', 'lzw' or None, got "
                             f"{compression!r}")
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.bands = None if bands is None else int(bands)
        self.tile = int(tile)
        self._compression = _COMPRESSION[key]
        if not predictor or self._compression == 1:
            self._predictor = 1
        else:
            self._predictor = 3 if self.dtype.kind == "f" else 2
        geo = geo if geo is not None else GeoInfo()
        self.geo = geo.with_nodata(nodata) if nodata is not None else geo
        self._describe = _Description.make(
            self.dtype, self.bands, label_names, label_colors, band_names, description)
        self._overviews = bool(overviews)
        self.partial = self.path.with_name(self.path.name + ".partial")
        spp = self.bands or 1
        self._pending = np.zeros((self.tile, self.width, spp), self.dtype)
        self._n_pending = 0  # rows in _pending
        self._rows = 0  # rows received
        self._bytecounts: list[int] = []
        self._closed = False
        if _state is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._spool = open(self.partial, "wb")  # closed in close()/abort()
        else:
            self._spool = open(self.partial, "r+b")
            self._spool.truncate(int(_state["spool_bytes"]))
            self._spool.seek(0, os.SEEK_END)
            self._bytecounts = [int(b) for b in _state["bytecounts"]]
            self._rows = int(_state["rows"])
            # A writer holding every row has flushed its last (partial) tile row.
            self._n_pending = 0 if self._rows == self.height else self._rows % self.tile
            if self._n_pending:
                pend = np.load(_state["pending"])
                self._pending[: self._n_pending] = pend.reshape(self._n_pending, self.width, spp)

    @property
    def closed(self) -> bool:
        """True after :meth:`close` or :meth:`abort`."""
        return self._closed

    @property
    def rows_written(self) -> int:
        """Rows received so far (the next :meth:`write` starts at this row)."""
        return self._rows

    def write(self, rows: np.ndarray) -> None:
        """Append the next rows: ``[r, W]`` (or ``[r, W, bands]``), cast to the writer's dtype."""
        if self._closed:
            raise ValueError(f"{self.path.name}: writer is closed")
        rows = np.asarray(rows)
        expect = (self.width,) + ((self.bands,) if self.bands is not None else ())
        if rows.ndim != len(expect) + 1 or rows.shape[1:] != expect:
            dims = ", ".join(map(str, expect))
            raise ValueError(f"{self.path.name}: expected rows of shape [r, {dims}], "
                             f"got {rows.shape}")
        if self._rows + rows.shape[0] > self.height:
            raise ValueError(f"{self.path.name}: {self._rows + rows.shape[0]} rows exceed the "
                             f"raster height {self.height}")
        rows = rows.reshape(rows.shape[0], self.width, -1)
        i = 0
        while i < rows.shape[0]:
            take = min(self.tile - self._n_pending, rows.shape[0] - i)
            self._pending[self._n_pending : self._n_pending + take] = rows[i : i + take]
            self._n_pending += take
            self._rows += take
            i += take
            if self._n_pending == self.tile or self._rows == self.height:
                self._flush_tile_row()

    def _encode(self, tile: np.ndarray) -> bytes:
        tile = np.ascontiguousarray(tile)
        if self._compression == 1:
            return tile.tobytes()
        if self._predictor > 1:
            tile = tifffile.TIFF.PREDICTORS[self._predictor](tile, axis=-2)
        return tifffile.TIFF.COMPRESSORS[self._compression](tile)

    def _flush_tile_row(self) -> None:
        t = self.tile
        if self._n_pending < t:
            self._pending[self._n_pending :] = 0  # TIFF tiles are always full size
        for c in range(0, self.width, t):
            block = self._pending[:, c : c + t]
            if block.shape[1] < t:
                block = np.pad(block, ((0, 0), (0, t - block.shape[1]), (0, 0)))
            data = self._encode(block)
            self._spool.write(data)
            self._bytecounts.append(len(data))
        self._n_pending = 0

    def checkpoint(self, pending_path: PathLike) -> dict:
        """Make the rows written so far durable; returns a JSON-able state for :meth:`resume`.

        Flushes and fsyncs ``<path>.partial`` and saves the rows of the incomplete tile row (if
        any) to ``pending_path`` (atomically).
        """
        self._spool.flush()
        os.fsync(self._spool.fileno())
        pending = None
        if self._n_pending:
            save_npy_atomic(pending_path, self._pending[: self._n_pending])
            pending = os.fspath(pending_path)
        return {
            "rows": self._rows,
            "spool_bytes": int(self._spool.tell()),
            "bytecounts": list(self._bytecounts),
            "pending": pending,
        }

    @classmethod
    def resume(cls, path: PathLike, state: dict, **kwargs) -> RasterWriter:
        """Reopen a writer from :meth:`checkpoint`'s state (same keyword arguments as before)."""
        return cls(path, _state=state, **kwargs)

    def _tiles(self):
        with open(self.partial, "rb") as f:
            for n in self._bytecounts:
                yield f.read(n)

    def close(self) -> Path:
        """Assemble the COG and rename it to ``path`` (all rows must have been written).

        Overviews are made from the encoded tiles (decoded one tile row at a time, bounded
        memory) into temporary spools next to ``path``; the TIFF is then written as header,
        every IFD, and the tiles from the smallest overview to the full resolution.
        """
        if self._closed:
            return self.path
        if self._rows != self.height:
            raise ValueError(f"{self.path.name}: only {self._rows} of {self.height} rows written")
        self._spool.close()
        main = _Level(self.partial, self.height, self.width, list(self._bytecounts))
        levels = [main] + (self._build_overviews(main) if self._overviews else [])
        tmp = self.path.with_name(self.path.name + ".partial.tif")
        try:
            self._assemble(tmp, levels)
        finally:
            for lev in levels[1:]:
                lev.path.unlink(missing_ok=True)
        commit(tmp, self.path)
        self._write_sidecar()
        self.partial.unlink(missing_ok=True)
        self._closed = True
        return self.path

    def _write_sidecar(self) -> None:
        """``<path>.aux.xml`` with the label names (:func:`pam_categories_xml`); a sidecar left
        by an earlier file of this name describes that file, so it is removed otherwise."""
        sidecar = self.path.with_name(self.path.name + ".aux.xml")
        if self._describe.pam is None:
            sidecar.unlink(missing_ok=True)
            return
        tmp = sidecar.with_name(sidecar.name + ".partial")
        tmp.write_text(self._describe.pam)
        commit(tmp, sidecar)

    # ---- overviews and the COG layout ------------------------------------------------------

    def _decode(self, data: bytes) -> np.ndarray:
        spp, t = self.bands or 1, self.tile
        if self._compression != 1:
            data = tifffile.TIFF.DECOMPRESSORS[self._compression](data)
        tile = np.frombuffer(data, self.dtype).reshape(t, t, spp)
        if self._predictor > 1:
            tile = tifffile.TIFF.UNPREDICTORS[self._predictor](tile.copy(), axis=-2)
        return tile

    def _tile_rows(self, level: _Level):
        """The rows of a spooled level, one decoded tile row ``[<=tile, w, spp]`` at a time."""
        t = self.tile
        across = math.ceil(level.width / t)
        with open(level.path, "rb") as f:
            for tr in range(math.ceil(level.height / t)):
                tiles = [self._decode(f.read(n)) for n in level.bytecounts[
                    tr * across : (tr + 1) * across]]
                rows = np.concatenate(tiles, axis=1)[:, : level.width]
                yield rows[: min(t, level.height - tr * t)]

    def _build_overviews(self, main: _Level) -> list[_Level]:
        """Halve until the raster fits one tile (:func:`_halve`: nearest for integer rasters
        such as labels, the mean of the valid values of each 2 x 2 block for floats)."""
        levels, src = [], main
        while max(src.height, src.width) > self.tile:
            h, w = math.ceil(src.height / 2), math.ceil(src.width / 2)
            path = self.path.with_name(f"{self.path.name}.ovr{len(levels) + 1}.partial")
            enc = _TileEncoder(self, path, w)
            try:
                for rows in self._tile_rows(src):  # tile is even: rows start at even indices
                    enc.write(_halve(rows))
                enc.finish()
            except BaseException:
                enc.close()
                path.unlink(missing_ok=True)
                raise
            src = _Level(path, h, w, enc.bytecounts)
            levels.append(src)
        return levels

    def _ifd_tags(self, level: _Level, index: int, offsets: list[int]) -> list[tuple]:
        """``(code, type, values)`` of one IFD (geo and metadata tags on the full resolution)."""
        spp, t = self.bands or 1, self.tile
        fmt = {"u": 1, "i": 2, "f": 3}[self.dtype.kind]
        palette = self._describe.colormap is not None
        tags: list[tuple] = [
            (254, 4, [0 if index == 0 else 1]),
            (256, 4, [level.width]), (257, 4, [level.height]),
            (258, 3, [self.dtype.itemsize * 8] * spp), (259, 3, [self._compression]),
            (262, 3, [3 if palette else 1]), (277, 3, [spp]), (284, 3, [1]),
            (322, 3, [t]), (323, 3, [t]),
            (324, 16 if self._big else 4, offsets),
            (325, 16 if self._big else 4, level.bytecounts),
            (339, 3, [fmt] * spp),
        ]
        if self._predictor > 1:
            tags.append((317, 3, [self._predictor]))
        if palette:
            tags.append((320, 3, self._describe.colormap))
        if spp > 1:
            tags.append((338, 3, [0] * (spp - 1)))
        if self.geo.nodata is not None:
            tags.append((GDAL_NODATA, 2, self.geo.nodata))
        if index == 0:
            tags.append((305, 2, "epilsr"))
            for code, dtype, _count, value, _ in self.geo.extratags():
                if code != GDAL_NODATA:
                    tags.append((code, {"d": 12, "H": 3, "s": 2}[dtype], value))
            if self._describe.xml:
                tags.append((GDAL_METADATA, 2, self._describe.xml))
        return sorted(tags, key=lambda x: x[0])

    def _assemble(self, path: Path, levels: list[_Level]) -> None:
        data_bytes = sum(sum(lev.bytecounts) for lev in levels)
        self._big = data_bytes > _BIGTIFF_BYTES
        placeholder = [[0] * len(lev.bytecounts) for lev in levels]
        sizes = [_ifd_size(self._ifd_tags(lev, i, placeholder[i]), self._big)
                 for i, lev in enumerate(levels)]
        header = 16 if self._big else 8
        ifd_at = [header + sum(sizes[:i]) for i in range(len(levels))]
        pos = header + sum(sizes)
        offsets: list[list[int]] = [[] for _ in levels]
        for i in reversed(range(len(levels))):  # smallest overview first, full resolution last
            for n in levels[i].bytecounts:
                offsets[i].append(pos if n else 0)
                pos += n
        with open(path, "wb") as f:
            f.write(b"II" + (struct.pack("<HHHQ", 43, 8, 0, 16) if self._big
                             else struct.pack("<HI", 42, 8)))
            for i, lev in enumerate(levels):
                nxt = ifd_at[i + 1] if i + 1 < len(levels) else 0
                block = _ifd_bytes(self._ifd_tags(lev, i, offsets[i]), ifd_at[i], nxt, self._big)
                assert len(block) == sizes[i]
                f.write(block)
            for lev in reversed(levels):
                with open(lev.path, "rb") as src:
                    while chunk := src.read(1 << 20):
                        f.write(chunk)

    def abort(self, *, keep_partial: bool = False) -> None:
        """Stop without producing ``path``; deletes ``<path>.partial`` unless ``keep_partial``."""
        if not self._spool.closed:
            self._spool.close()
        if not keep_partial:
            self.partial.unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> RasterWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what was written; a rerun may resume from a checkpoint
            self.abort(keep_partial=True)


def write_raster(
    path: PathLike,
    data: np.ndarray,
    *,
    geo: GeoInfo | None = None,
    nodata: float | int | str | None = None,
    compression: str | None = "deflate",
    tile: int = 256,
    block_rows: int | None = None,
    **describe: Any,
) -> Path:
    """Write an in-memory (or memory-mapped) ``[H, W(, C)]`` array with :class:`RasterWriter`
    (``describe``: its ``label_names``, ``label_colors``, ``band_names``, ``description``,
    ``overviews``)."""
    data = np.asarray(data) if not isinstance(data, np.memmap) else data
    bands = data.shape[2] if data.ndim == 3 else None
    step = block_rows or tile
    with RasterWriter(path, height=data.shape[0], width=data.shape[1], dtype=data.dtype,
                      bands=bands, geo=geo, nodata=nodata, compression=compression,
                      tile=tile, **describe) as w:
        for r in range(0, data.shape[0], step):
            w.write(data[r : r + step])
    return Path(path)
