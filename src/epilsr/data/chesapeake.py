"""Chesapeake Land Cover tiles: NAIP imagery, 1 m land cover, NLCD, and the NLCD composition table.

Reads the LILA ``cvpr_chesapeake_landcover`` file naming (``<tile>_naip-new.tif``,
``<tile>_lc.tif``, ``<tile>_nlcd.tif``) from a flat folder such as ``shared/data/chesapeake_wv``.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import logging
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from epilsr.io.geotiff import RasterReader
from epilsr.metrics import NODATA_LABEL

log = logging.getLogger("epilsr.data")

__all__ = [
    "LABEL_NAMES",
    "LABEL_COLORS",
    "NlcdTable",
    "Tile",
    "load_nlcd_table",
    "lc_to_labels",
    "nlcd_to_index",
    "find_tiles",
    "find_lila_tiles",
    "load_tile",
    "read_raster",
    "check_imagery",
    "check_class_raster",
    "data_root",
    "MAX_PIXELS",
    "MAX_BYTES",
    "WARN_MPX",
]

#: Default read limits of :func:`read_raster` / :func:`load_tile` (config keys
#: ``data.max_pixels``, ``data.max_bytes``, ``data.warn_mpx``). A LILA tile is about
#: 6000 x 7500 x 4 bands = 45 Mpx, 180 MB.
MAX_PIXELS = 250_000_000
MAX_BYTES = 2 * 2**30
WARN_MPX = 100.0
#: Published tables are rounded to 0.01 per entry: a used row sums to 1 within this.
ROW_SUM_TOLERANCE = 0.05

#: The paper's 4 high-resolution classes.
LABEL_NAMES = ("water", "tree canopy", "low vegetation", "impervious")
LABEL_COLORS = np.array([[0, 92, 230], [38, 115, 0], [163, 255, 115], [156, 156, 156]], np.uint8)
#: Value of no-data pixels in label maps.

# Chesapeake Conservancy codes: 1 water, 2 tree canopy, 3 low vegetation, 4 barren,
# 5 impervious (other), 6 impervious (road); 0 and 15 no data.
_LC_LUT = np.full(256, NODATA_LABEL, np.uint8)
_LC_LUT[[1, 2, 3, 4, 5, 6]] = [0, 1, 2, 3, 3, 3]


def data_root() -> Path:
    """Folder with the shared real data: ``$EPILSR_DATA`` or ``../shared/data`` of the repo."""
    env = os.environ.get("EPILSR_DATA")
    if env:
        return Path(env)
    beside_repo = Path(__file__).resolve().parents[3].parent / "shared" / "data"
    beside_cwd = Path.cwd().parent / "shared" / "data"
    return beside_repo if beside_repo.is_dir() or not beside_cwd.is_dir() else beside_cwd


@dataclasses.dataclass(frozen=True)
class NlcdTable:
    """The published ``p(label | NLCD class)`` table (mean and s.d. per class)."""

    codes: np.ndarray  # [Cc] int NLCD codes
    names: tuple[str, ...]
    mean: np.ndarray  # [Cc, 4]
    sd: np.ndarray  # [Cc, 4]

    def index(self, codes: np.ndarray) -> np.ndarray:
        return nlcd_to_index(codes, self)


def load_nlcd_table(path: str | os.PathLike | None = None) -> NlcdTable:
    """Reads ``nlcd_label_priors.csv`` (the copy shipped with the package when ``path`` is None).

    Columns ``nlcd_code, nlcd_name, p_<label>, sd_<label>`` for the four labels. Refused, with
    the file, row (line number) and column named: a header-only file, missing columns,
    non-numeric or NaN/inf entries, codes outside 0..255 or repeated, probabilities or s.d.
    outside [0, 1] (e.g. 92 for 0.92), and rows whose probabilities are neither all zero nor
    sum to 1 within :data:`ROW_SUM_TOLERANCE` (published tables are rounded to 0.01).
    """
    if path is None:
        name = "nlcd_label_priors.csv (shipped)"
        text = (
            importlib.resources.files("epilsr.data").joinpath("nlcd_label_priors.csv").read_text()
        )
    else:
        name = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such NLCD table")
        text = Path(path).read_text()
    labels = ("water", "tree_canopy", "low_vegetation", "impervious")
    p_cols, sd_cols = [f"p_{c}" for c in labels], [f"sd_{c}" for c in labels]
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in ("nlcd_code", "nlcd_name", *p_cols, *sd_cols)
               if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{name}: missing columns {missing} (header {reader.fieldnames})")
    codes, names, mean, sd, line_of = [], [], [], [], {}
    for r in reader:
        where = f"{name}, line {reader.line_num}"

        def number(col, r=r, where=where):
            raw = (r.get(col) or "").strip()
            try:
                v = float(raw)
            except ValueError:
                raise ValueError(f"{where}, column {col}: expected a number, got {raw!r}") from None
            if not math.isfinite(v):
                raise ValueError(f"{where}, column {col}: expected a finite number, got {raw!r}")
            if col != "nlcd_code" and not 0.0 <= v <= 1.0:
                raise ValueError(f"{where}, column {col}: expected a value in [0, 1], got {raw}"
                                 + (" (a percentage? write 0.92, not 92)" if v > 1 else ""))
            return v

        code = number("nlcd_code")
        if code != int(code) or not 0 <= code <= 255:
            raise ValueError(f"{where}, column nlcd_code: expected an integer code in 0..255, "
                             f"got {r['nlcd_code']!r}")
        code = int(code)
        if code in line_of:
            raise ValueError(f"{where}: NLCD code {code} repeats line {line_of[code]}; "
                             "expected one row per code")
        line_of[code] = reader.line_num
        p = [number(c) for c in p_cols]
        total = sum(p)
        if total > 0 and abs(total - 1.0) > ROW_SUM_TOLERANCE:
            raise ValueError(f"{where} (code {code}): probabilities {p_cols} sum to {total:.3f}; "
                             f"expected 1 (within {ROW_SUM_TOLERANCE}) or all zero")
        codes.append(code)
        names.append(r["nlcd_name"])
        mean.append(p)
        sd.append([number(c) for c in sd_cols])
    if not codes:
        raise ValueError(f"{name}: no rows (header only); expected one row per NLCD code")
    return NlcdTable(np.array(codes), tuple(names), np.array(mean), np.array(sd))


def nlcd_to_index(codes: np.ndarray, table: NlcdTable) -> np.ndarray:
    """NLCD codes ``[H, W]`` -> row indices of ``table`` (int32); unknown codes raise."""
    codes = np.asarray(codes)
    lut = np.full(256, -1, np.int32)
    lut[table.codes] = np.arange(len(table.codes))
    if codes.dtype != np.uint8:
        if codes.size and (codes.min() < 0 or codes.max() > 255):
            raise ValueError(f"nlcd: codes outside 0..255 (found {codes.min()}..{codes.max()})")
        codes = codes.astype(np.uint8)
    idx = lut[codes]
    if np.any(idx < 0):
        bad = np.unique(codes[idx < 0])[:10].tolist()
        raise ValueError(f"nlcd: codes {bad} are not in the NLCD legend {table.codes.tolist()}")
    return idx


def lc_to_labels(lc: np.ndarray) -> np.ndarray:
    """Chesapeake land cover codes -> 4 classes (0..3), no data -> ``NODATA_LABEL``."""
    return _LC_LUT[np.asarray(lc, np.uint8)]


class Tile(NamedTuple):
    name: str
    image: np.ndarray  # [H, W, 4] uint8 R, G, B, NIR
    labels: np.ndarray | None  # [H, W] uint8 in 0..3 or NODATA_LABEL
    nlcd: np.ndarray  # [H, W] uint8 NLCD codes


def find_tiles(root: str | os.PathLike) -> list[str]:
    """Tile stems (``<root>/<stem>_naip-new.tif``) in a flat folder, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} is not a folder")
    stems = sorted(p.name[: -len("_naip-new.tif")] for p in root.glob("*_naip-new.tif"))
    if not stems:
        raise FileNotFoundError(f"no '*_naip-new.tif' tiles in {root}")
    return [str(root / s) for s in stems]


def find_lila_tiles(
    root: str | os.PathLike, *, states: tuple[str, ...] | list[str], split: str = "train"
) -> list[str]:
    """Tile stems of a LILA ``cvpr_chesapeake_landcover`` region, sorted.

    Folders ``<root>/{state}_1m_{year}_extended-debuffered-{split}_tiles/`` hold
    ``m_<quad>_<..>_1_{naip-new,lc,nlcd,...}.tif``; South = md, va, wv, de; North = ny, pa.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} is not a folder")
    stems = []
    for state in states:
        for folder in sorted(root.glob(f"{state}_1m_*_extended-debuffered-{split}_tiles")):
            stems += [str(folder / p.name[: -len("_naip-new.tif")])
                      for p in sorted(folder.glob("*_naip-new.tif"))]
    if not stems:
        raise FileNotFoundError(
            f"no '{{state}}_1m_*_extended-debuffered-{split}_tiles/*_naip-new.tif' under {root} "
            f"for states {list(states)}"
        )
    return stems


def read_raster(
    path: str | os.PathLike,
    *,
    max_pixels: int | None = MAX_PIXELS,
    max_bytes: int | None = MAX_BYTES,
    warn_mpx: float | None = WARN_MPX,
) -> np.ndarray:
    """A whole raster ``[H, W(, C)]`` through :class:`epilsr.io.geotiff.RasterReader`, its size
    checked against the limits *before* any pixel is allocated or decoded.

    Raises ``ValueError`` naming the file (and the config key to raise) when the raster, or
    one of its strips/tiles, is larger than ``max_pixels`` pixels or ``max_bytes`` bytes, and
    when the file cannot be parsed or decoded (e.g. a corrupted DEFLATE/LZW strip). Logs a
    warning above ``warn_mpx`` megapixels. ``None`` disables a limit.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such raster")
    try:
        reader = RasterReader(path)
    except ValueError as err:
        raise ValueError(f"{path}: {err}" if str(path) not in str(err) else str(err)) from err
    except Exception as err:  # tifffile parse errors of every kind
        raise ValueError(f"{path}: not a readable TIFF ({type(err).__name__}: {err})") from err
    with reader:
        h, w = reader.height, reader.width
        size = f"{h}x{w}" + (f"x{reader.shape[2]}" if len(reader.shape) == 3 else "")
        if max_pixels is not None and h * w > max_pixels:
            raise ValueError(f"{path}: {size} raster ({h * w / 1e6:.1f} Mpx) exceeds "
                             f"data.max_pixels={max_pixels}; raise the limit if this is intended")
        need = max(reader.nbytes, reader.segment_bytes)
        if max_bytes is not None and need > max_bytes:
            raise ValueError(f"{path}: {size} {reader.dtype} raster needs {need / 2**20:.0f} MiB "
                             f"to decode, more than data.max_bytes={max_bytes}; raise the limit "
                             "if this is intended")
        if warn_mpx is not None and h * w / 1e6 > warn_mpx:
            log.warning("%s: a large raster (%s, %.0f Mpx) is read whole into memory", path,
                        size, h * w / 1e6)
        try:
            return reader.read()
        except MemoryError as err:
            raise ValueError(f"{path}: out of memory decoding the {size} raster; lower "
                             "data.max_bytes or use the windowed pipelines") from err
        except Exception as err:  # imagecodecs/zlib errors of a corrupted strip or tile
            raise ValueError(f"{path}: cannot decode the pixel data ({type(err).__name__}: "
                             f"{err or 'no detail'}); the file is corrupted") from err


def check_imagery(path: str | os.PathLike, image: np.ndarray) -> np.ndarray:
    """Imagery as read, checked where it enters: uint8/uint16 pass; float must be finite and is
    documented as reflectance in [0, 1]. Float values in (1, 255] look like 0-255 counts: they
    are rescaled by 1/255 with a warning. Negative or larger values are refused."""
    if np.issubdtype(image.dtype, np.integer):
        if image.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"{path}: expected uint8, uint16 or float imagery, got {image.dtype}")
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"{path}: expected uint8, uint16 or float imagery, got {image.dtype}")
    finite = np.isfinite(image)
    if not finite.all():
        r, c = np.argwhere(~finite.all(axis=-1) if image.ndim == 3 else ~finite)[0][:2]
        raise ValueError(f"{path}: {int(image.size - finite.sum())} NaN/inf pixel values (first "
                         f"at row {r}, col {c}); expected finite imagery")
    lo, hi = float(image.min()), float(image.max())
    if lo < 0 or hi > 255:
        raise ValueError(f"{path}: float imagery in [{lo:g}, {hi:g}]; expected reflectance in "
                         "[0, 1] (or 0-255 counts)")
    if hi > 1:
        log.warning("%s: float imagery in [%g, %g] looks like 0-255 counts; rescaled by 1/255 "
                    "(float imagery is read as reflectance in [0, 1])", path, lo, hi)
        return (image.astype(np.float32) / np.float32(255.0)).astype(np.float32)
    return image.astype(np.float32, copy=False)


def check_class_raster(path: str | os.PathLike, codes: np.ndarray) -> np.ndarray:
    """Class codes ``[H, W]`` as uint8: float rasters must hold integral values, every raster
    values in 0..255 (refused otherwise, naming the file), never silently truncated."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"{path}: expected a single-band [H, W] class raster, got {codes.shape}")
    if np.issubdtype(codes.dtype, np.floating):
        bad = ~np.isfinite(codes) | (codes != np.round(codes))
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(f"{path}: float class raster with {int(bad.sum())} non-integer "
                             f"values (first {float(codes[r, c]):g} at row {r}, col {c}); expected "
                             "integer class codes")
    elif not np.issubdtype(codes.dtype, np.integer) and codes.dtype != bool:
        raise ValueError(f"{path}: expected integer class codes, got dtype {codes.dtype}")
    if codes.size and codes.dtype != np.uint8 and (codes.min() < 0 or codes.max() > 255):
        raise ValueError(f"{path}: class codes in [{codes.min()}, {codes.max()}]; expected 0..255")
    return codes.astype(np.uint8)


def load_tile(
    stem: str,
    *,
    max_pixels: int | None = MAX_PIXELS,
    max_bytes: int | None = MAX_BYTES,
    warn_mpx: float | None = WARN_MPX,
) -> Tile:
    """Reads ``<stem>_naip-new.tif``, ``<stem>_nlcd.tif`` and (if present) ``<stem>_lc.tif``.

    Every file goes through :func:`read_raster` (limits checked before allocation), imagery
    through :func:`check_imagery` (finite; float 0-255 rescaled), NLCD and land cover through
    :func:`check_class_raster`; every raster must have the imagery's size.
    """
    naip, nlcd, lc = (Path(f"{stem}_{s}.tif") for s in ("naip-new", "nlcd", "lc"))
    for p in (naip, nlcd):
        if not p.exists():
            raise FileNotFoundError(f"missing companion file {p}")
    limits = dict(max_pixels=max_pixels, max_bytes=max_bytes, warn_mpx=warn_mpx)
    image = read_raster(naip, **limits)
    if image.ndim != 3 or image.shape[-1] != 4:
        raise ValueError(f"{naip}: expected [H, W, 4] NAIP imagery, got shape {image.shape}")
    image = check_imagery(naip, image)
    codes = check_class_raster(nlcd, read_raster(nlcd, **limits))
    labels = None
    if lc.exists():
        labels = lc_to_labels(check_class_raster(lc, read_raster(lc, **limits)))
    for kind, path, arr in (("nlcd", nlcd, codes), ("lc", lc, labels)):
        if arr is not None and arr.shape != image.shape[:2]:
            raise ValueError(f"{path}: {kind} shape {arr.shape} != imagery {image.shape[:2]} of "
                             f"{naip.name}; expected rasters of the same size (never cropped)")
    return Tile(Path(stem).name, image, labels, codes)
