"""Chesapeake Land Cover tiles: NAIP imagery, 1 m land cover, NLCD, and the NLCD composition table.

Reads the LILA ``cvpr_chesapeake_landcover`` file naming (``<tile>_naip-new.tif``,
``<tile>_lc.tif``, ``<tile>_nlcd.tif``) from a flat folder such as ``shared/data/chesapeake_wv``.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tifffile

from epilsr.metrics import NODATA_LABEL

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
    "data_root",
]

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
    """Reads ``nlcd_label_priors.csv`` (the copy shipped with the package when ``path`` is None)."""
    if path is None:
        text = (
            importlib.resources.files("epilsr.data").joinpath("nlcd_label_priors.csv").read_text()
        )
    else:
        text = Path(path).read_text()
    rows = list(csv.DictReader(text.splitlines()))
    labels = ("water", "tree_canopy", "low_vegetation", "impervious")
    try:
        codes = np.array([int(r["nlcd_code"]) for r in rows])
        mean = np.array([[float(r[f"p_{c}"]) for c in labels] for r in rows])
        sd = np.array([[float(r[f"sd_{c}"]) for c in labels] for r in rows])
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path or 'nlcd_label_priors.csv'}: malformed table ({err})") from err
    if np.any(mean < 0):
        raise ValueError(f"{path}: negative probabilities in the NLCD table")
    return NlcdTable(codes, tuple(r["nlcd_name"] for r in rows), mean, sd)


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


def load_tile(stem: str) -> Tile:
    """Reads ``<stem>_naip-new.tif``, ``<stem>_nlcd.tif`` and (if present) ``<stem>_lc.tif``."""
    naip, nlcd, lc = (Path(f"{stem}_{s}.tif") for s in ("naip-new", "nlcd", "lc"))
    for p in (naip, nlcd):
        if not p.exists():
            raise FileNotFoundError(f"missing companion file {p}")
    image = tifffile.imread(naip)
    if image.ndim != 3 or image.shape[-1] != 4:
        raise ValueError(f"{naip}: expected [H, W, 4] NAIP imagery, got shape {image.shape}")
    codes = tifffile.imread(nlcd)
    labels = lc_to_labels(tifffile.imread(lc)) if lc.exists() else None
    for name, arr in (("nlcd", codes), ("lc", labels)):
        if arr is not None and arr.shape != image.shape[:2]:
            raise ValueError(f"{stem}: {name} shape {arr.shape} != imagery {image.shape[:2]}")
    return Tile(Path(stem).name, image, labels, codes)
