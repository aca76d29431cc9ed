"""Shared driver plumbing: one-line errors, data loading from configs, result tables."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

log = logging.getLogger("epilsr")


class LabelledTile(NamedTuple):
    name: str
    image: np.ndarray  # [H, W, C] uint8 or float
    classes: np.ndarray  # [H, W] int32 rows of table
    labels: np.ndarray | None  # [H, W] ground truth or None
    table: np.ndarray  # [Cc, n] p(label | class)
    label_names: tuple[str, ...]
    label_colors: np.ndarray


def one_line_errors(main: Callable) -> Callable:
    """Drivers print ``error: ...`` and exit 2 on bad input, unless ``debug=true`` is given."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (ValueError, FileNotFoundError, KeyError) as err:
            if any(a in ("debug=true", "debug=True") for a in sys.argv):
                raise
            print(f"error: {err} (rerun with debug=true for a traceback)", file=sys.stderr)
            sys.exit(2)

    return wrapper


def iter_tiles(data) -> Iterator[LabelledTile]:
    """Tiles described by a ``data`` config group (``kind: synthetic`` or ``chesapeake``)."""
    if data.kind == "synthetic":
        from epilsr.data import synthetic

        scene = synthetic.make_scene(int(data.seed), size=int(data.size), block=int(data.block))
        colors = np.array([[0, 92, 230], [38, 115, 0], [163, 255, 115], [156, 156, 156]], np.uint8)
        yield LabelledTile(
            f"synthetic_seed{data.seed}_{data.size}",
            scene.image,
            scene.classes,
            scene.labels,
            scene.label_given_class,
            scene.label_names,
            colors,
        )
    elif data.kind == "chesapeake":
        from epilsr.data import chesapeake

        root = Path(data.root)
        csv = root / "nlcd_label_priors.csv"
        table = chesapeake.load_nlcd_table(csv if csv.exists() else None)
        for stem in chesapeake.find_tiles(root):
            tile = chesapeake.load_tile(stem)
            yield LabelledTile(
                tile.name,
                tile.image,
                table.index(tile.nlcd),
                tile.labels,
                table.mean,
                chesapeake.LABEL_NAMES,
                chesapeake.LABEL_COLORS,
            )
    else:
        raise ValueError(f"data.kind: expected 'synthetic' or 'chesapeake', got {data.kind!r}")


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain fixed-width text table."""
    cells = [header] + [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
