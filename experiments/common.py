"""Shared driver plumbing: one-line errors, data loading from configs, result tables."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from epilsr.io.atomic import atomic_write_path

log = logging.getLogger("epilsr")
logging.getLogger("jax").setLevel(logging.WARNING)  # no "Unable to initialize backend" noise


class LabelledTile(NamedTuple):
    name: str
    image: np.ndarray  # [H, W, C] uint8 or float
    classes: np.ndarray  # [H, W] int32 rows of table
    labels: np.ndarray | None  # [H, W] ground truth or None
    table: np.ndarray  # [Cc, n] p(label | class)
    label_names: tuple[str, ...]
    label_colors: np.ndarray
    geo: object = None  # epilsr.io.geotiff.GeoInfo of the imagery, when read from a GeoTIFF


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
        from epilsr.data import chesapeake, synthetic

        scene = synthetic.make_scene(int(data.seed), size=int(data.size), block=int(data.block))
        colors = chesapeake.LABEL_COLORS  # the same four labels as Chesapeake
        yield LabelledTile(
            f"synthetic_seed{data.seed}_{data.size}",
            scene.image,
            scene.classes,
            scene.labels,
            scene.label_given_class,
            scene.label_names,
            colors,
        )
    elif data.kind in ("chesapeake", "chesapeake_lila"):
        from epilsr.data import chesapeake
        from epilsr.io.geotiff import read_geoinfo

        root = Path(data.root)
        csv = root / "nlcd_label_priors.csv"
        table = chesapeake.load_nlcd_table(csv if csv.exists() else None)
        if data.kind == "chesapeake":
            stems = chesapeake.find_tiles(root)
        else:  # LILA region: whole tiles of the chosen states/split, at most max_tiles
            stems = chesapeake.find_lila_tiles(root, states=list(data.states), split=data.split)
            stems = stems[: int(data.max_tiles)]
        for stem in stems:
            tile = chesapeake.load_tile(stem)
            yield LabelledTile(
                tile.name,
                tile.image,
                table.index(tile.nlcd),
                tile.labels,
                table.mean,
                chesapeake.LABEL_NAMES,
                chesapeake.LABEL_COLORS,
                read_geoinfo(f"{stem}_naip-new.tif"),
            )
    else:
        raise ValueError(
            f"data.kind: expected 'synthetic', 'chesapeake' or 'chesapeake_lila', got {data.kind!r}"
        )


def atomic_write(path: Path, write) -> None:
    """Calls ``write(tmp_path)`` then renames onto ``path``: never a half-written output."""
    atomic_write_path(path, write)


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain fixed-width text table."""
    cells = [header] + [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def load_training_images(data) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Imagery ``[T, H, W, C]`` float32 in [0, 1], labels ``[T, H, W]`` (or None), n_labels."""
    import jax

    from epilsr.epitome import as_float_image

    if data.kind == "chesapeake_lila":
        from epilsr.data import chesapeake

        stems = chesapeake.find_lila_tiles(data.root, states=list(data.states), split=data.split)
        stems = stems[jax.process_index() :: jax.process_count()][: int(data.max_tiles)]
        images, labels = [], []
        for stem in stems:
            tile = chesapeake.load_tile(stem)
            h, w = tile.image.shape[:2]
            c = min(int(data.crop), h, w)
            r0, c0 = (h - c) // 2, (w - c) // 2
            images.append(np.asarray(as_float_image(tile.image[r0 : r0 + c, c0 : c0 + c])))
            labels.append(None if tile.labels is None else tile.labels[r0 : r0 + c, c0 : c0 + c])
        image = np.stack(images)
        label = None if any(lab is None for lab in labels) else np.stack(labels)
        return image, label, 4
    tiles = list(iter_tiles(data))
    image = np.stack([np.asarray(as_float_image(t.image)) for t in tiles])
    labels = None if any(t.labels is None for t in tiles) else np.stack([t.labels for t in tiles])
    return image, labels, tiles[0].table.shape[1]
