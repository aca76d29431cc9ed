"""CoNSeP H&E patches with nucleus types and instances, and coarse TIL-density supervision.

Layout of the shared folder (``$EPILSR_DATA/consep``, see its ``PROVENANCE.md``)::

    images/<name>.jpg           RGB uint8 [256, 256, 3]
    type_masks/<name>.png       uint8 [256, 256]: 0 background, 1 other, 2 inflammatory, 3, 4
    inst_masks_train.npz        one uint16 [256, 256] instance map per name, 0 = background

Coarse supervision (paper Sec. 5.2, as the TIL work made it): the inflammatory fraction ``f``
of each ``block x block`` block, binned into ``n_classes = 10`` density classes
``c = n  <=>  0.1 n <= f < 0.1 (n + 1)`` (``f = 1`` falls in the last class). The composition
table ``p(TIL | c)`` is the mean fraction of the blocks in each bin (estimated from the coarse
maps themselves). The per-pixel types and the instances are used only for evaluation.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from epilsr.data.chesapeake import data_root

__all__ = [
    "INFLAMMATORY",
    "N_DENSITY_CLASSES",
    "TIL_COLORS",
    "ConsepSet",
    "consep_root",
    "find_patches",
    "load_consep",
    "tile_of",
    "split_by_tile",
    "block_counts",
    "block_fractions",
    "density_classes",
    "coarse_classes",
    "composition_table",
    "upsample_blocks",
    "nucleus_truth",
]

#: Type code of inflammatory nuclei (lymphocytes, plasma cells, neutrophils, eosinophils).
INFLAMMATORY = 2
#: Density classes ``[0.1 n, 0.1 (n + 1))``, ``n = 0..9`` (paper Sec. 5.2).
N_DENSITY_CLASSES = 10
#: Colours of (non-TIL, TIL) for pictures.
TIL_COLORS = np.array([[235, 235, 235], [200, 30, 30]], np.uint8)

_NAME = re.compile(r"^(?P<tile>.+)_(?P<k>\d+)$")


class ConsepSet(NamedTuple):
    """A stack of patches (NumPy).

    Attributes:
      names: ``P`` patch names (``train_<tile>_<k>``).
      images: ``[P, H, W, 3]`` uint8 RGB.
      types: ``[P, H, W]`` uint8 nucleus type per pixel (2 = inflammatory).
      instances: ``[P, H, W]`` int32 nucleus instance ids, 0 = background.
    """

    names: tuple[str, ...]
    images: np.ndarray
    types: np.ndarray
    instances: np.ndarray


def consep_root() -> Path:
    """``<data_root()>/consep``: ``$EPILSR_DATA/consep`` or ``../shared/data/consep``."""
    return data_root() / "consep"


def _check_root(root: str | os.PathLike) -> Path:
    root = Path(root)
    for sub in ("images", "type_masks"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(
                f"root: no '{sub}/' folder in {root} (expected the CoNSeP layout)"
            )
    if not (root / "inst_masks_train.npz").is_file():
        raise FileNotFoundError(f"root: no 'inst_masks_train.npz' in {root}")
    return root


def find_patches(root: str | os.PathLike) -> list[str]:
    """Sorted patch names (stems of ``images/*.jpg``) under ``root``."""
    root = _check_root(root)
    names = sorted(p.stem for p in (root / "images").glob("*.jpg"))
    if not names:
        raise FileNotFoundError(f"root: no '*.jpg' patches in {root / 'images'}")
    return names


def load_consep(root: str | os.PathLike, names: list[str] | None = None) -> ConsepSet:
    """Reads images, type masks and instance maps of ``names`` (default: all) under ``root``."""
    root = _check_root(root)
    names = find_patches(root) if names is None else list(names)
    images, types, instances = [], [], []
    with np.load(root / "inst_masks_train.npz") as inst:
        for name in names:
            img_path, type_path = (
                root / "images" / f"{name}.jpg",
                root / "type_masks" / f"{name}.png",
            )
            for path in (img_path, type_path):
                if not path.is_file():
                    raise FileNotFoundError(f"names: missing file {path} for patch {name!r}")
            if name not in inst.files:
                raise FileNotFoundError(
                    f"names: no instance map for {name!r} in inst_masks_train.npz"
                )
            image = np.asarray(Image.open(img_path).convert("RGB"))
            typ = np.asarray(Image.open(type_path))
            ins = np.asarray(inst[name]).astype(np.int32)
            if typ.shape != image.shape[:2] or ins.shape != image.shape[:2]:
                raise ValueError(
                    f"names: {name!r} has image {image.shape[:2]}, types {typ.shape}, "
                    f"instances {ins.shape}; expected equal sizes"
                )
            images.append(image)
            types.append(typ)
            instances.append(ins)
    if not names:
        raise ValueError("names: expected at least one patch name")
    return ConsepSet(tuple(names), np.stack(images), np.stack(types), np.stack(instances))


def tile_of(name: str) -> str:
    """``'train_10_003' -> 'train_10'``: the source tile of a patch."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"name: expected '<tile>_<k>', got {name!r}")
    return m.group("tile")


def split_by_tile(names: list[str], *, holdout_every: int = 3) -> tuple[list[str], list[str]]:
    """``(dev, held_out)`` names: tiles whose trailing number is divisible by ``holdout_every``
    are held out (all 16 patches of a tile go to the same side). ``train_3, 6, ..., 27`` for
    CoNSeP: 9 of 27 tiles.
    """
    if holdout_every < 2:
        raise ValueError(f"holdout_every: expected an integer >= 2, got {holdout_every}")
    dev, held = [], []
    for name in names:
        tail = tile_of(name).rsplit("_", 1)[-1]
        if not tail.isdigit():
            raise ValueError(f"names: tile of {name!r} has no trailing number")
        (held if int(tail) % holdout_every == 0 else dev).append(name)
    return dev, held


def _check_block(block: int, shape: tuple[int, ...], name: str) -> None:
    if not isinstance(block, int | np.integer) or block < 1:
        raise ValueError(f"block: expected a positive integer, got {block!r}")
    h, w = shape[-2:]
    if block > h or block > w:
        raise ValueError(f"block: {block} is larger than {name} ({h}x{w})")
    if h % block or w % block:
        raise ValueError(f"block: {block} does not divide {name} ({h}x{w})")


def block_counts(mask, *, block: int) -> np.ndarray:
    """``[..., H, W]`` bool -> ``[..., H/b, W/b]`` int64 number of True pixels per block."""
    mask = np.asarray(mask)
    if mask.ndim < 2:
        raise ValueError(f"mask: expected rank >= 2 [..., H, W], got shape {mask.shape}")
    _check_block(block, mask.shape, "mask")
    h, w = mask.shape[-2:]
    m = mask.astype(bool).reshape(*mask.shape[:-2], h // block, block, w // block, block)
    return m.sum(axis=(-3, -1), dtype=np.int64)


def block_fractions(mask, *, block: int) -> np.ndarray:
    """``[..., H, W]`` bool -> ``[..., H/b, W/b]`` float64 fraction of True pixels per block."""
    return block_counts(mask, block=block) / float(block * block)


def density_classes(fractions, *, n_classes: int = N_DENSITY_CLASSES) -> np.ndarray:
    """Bins fractions in ``[0, 1]``: ``n`` with ``n / n_classes <= f < (n + 1) / n_classes``.

    ``f = 1`` goes to the last class. A relative tolerance of ``1e-9`` absorbs round-off (so
    ``0.3`` is class 3). For exact bins from pixel counts use :func:`coarse_classes`.
    """
    f = np.asarray(fractions, np.float64)
    if not np.all(np.isfinite(f)) or np.any(f < 0) or np.any(f > 1):
        raise ValueError("fractions: expected finite values in [0, 1]")
    if n_classes < 1:
        raise ValueError(f"n_classes: expected a positive integer, got {n_classes}")
    return np.minimum(np.floor(f * n_classes * (1 + 1e-9)), n_classes - 1).astype(np.int32)


def coarse_classes(
    types, *, block: int, n_classes: int = N_DENSITY_CLASSES, label: int = INFLAMMATORY
) -> tuple[np.ndarray, np.ndarray]:
    """Coarse supervision from type masks: ``(fractions, classes)`` each ``[..., H/b, W/b]``.

    Classes are exact integer bins of the count: ``c = min(count * n // b^2, n - 1)``.
    """
    counts = block_counts(np.asarray(types) == label, block=block)
    area = block * block
    classes = np.minimum(counts * n_classes // area, n_classes - 1).astype(np.int32)
    return counts / float(area), classes


def composition_table(fractions, classes, *, n_classes: int = N_DENSITY_CLASSES) -> np.ndarray:
    """``p(l | c)`` ``[n_classes, 2]`` (columns: non-TIL, TIL) from the coarse maps themselves.

    ``p(TIL | c)`` is the mean fraction over the blocks of class ``c``; a class with no block
    gets its bin centre ``(c + 0.5) / n_classes`` (it carries no weight in observed-``p(c)``
    LSR, but keeps the table a valid distribution for a uniform ``p(c)``).
    """
    f = np.asarray(fractions, np.float64)
    c = np.asarray(classes)
    if f.shape != c.shape:
        raise ValueError(f"classes: expected shape {f.shape} like fractions, got {c.shape}")
    if not np.issubdtype(c.dtype, np.integer) or (c.size and (c.min() < 0 or c.max() >= n_classes)):
        raise ValueError(f"classes: expected integers in [0, {n_classes})")
    total = np.bincount(c.ravel(), weights=f.ravel(), minlength=n_classes)
    count = np.bincount(c.ravel(), minlength=n_classes)
    centre = (np.arange(n_classes) + 0.5) / n_classes
    til = np.where(count > 0, total / np.maximum(count, 1), centre)
    return np.stack([1.0 - til, til], axis=-1).astype(np.float32)


def upsample_blocks(x, *, block: int) -> np.ndarray:
    """``[..., h, w]`` per-block values -> ``[..., h b, w b]`` (each block painted)."""
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x: expected rank >= 2 [..., h, w], got shape {x.shape}")
    if not isinstance(block, int | np.integer) or block < 1:
        raise ValueError(f"block: expected a positive integer, got {block!r}")
    return np.repeat(np.repeat(x, block, axis=-2), block, axis=-1)


def nucleus_truth(types, instances, *, label: int = INFLAMMATORY) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei of one patch and whether each is a TIL.

    A nucleus (instance id > 0) is positive when strictly more than half of its pixels have
    type ``label``.

    Args:
      types: ``[H, W]`` int types.
      instances: ``[H, W]`` int instance ids, 0 = background.

    Returns:
      ``(ids [M], positive [M] bool)``, ids ascending.
    """
    types, instances = np.asarray(types), np.asarray(instances)
    if types.ndim != 2:
        raise ValueError(f"types: expected rank 2 [H, W], got shape {types.shape}")
    if instances.shape != types.shape:
        raise ValueError(
            f"instances: expected shape {types.shape} like types, got {instances.shape}"
        )
    if not np.issubdtype(instances.dtype, np.integer) or (instances.size and instances.min() < 0):
        raise ValueError("instances: expected non-negative integer instance ids")
    flat = instances.ravel().astype(np.int64)
    area = np.bincount(flat)
    hits = np.bincount(
        flat, weights=(types.ravel() == label).astype(np.float64), minlength=area.size
    )
    ids = np.flatnonzero(area > 0)
    ids = ids[ids > 0]
    return ids, 2 * hits[ids] > area[ids]
