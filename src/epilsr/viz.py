"""Pictures: imagery previews, label maps with a legend, side-by-side panels (PNG via Pillow)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from epilsr.io.atomic import atomic_write

__all__ = [
    "rgb_preview",
    "colorize",
    "panel",
    "save_png",
]


def rgb_preview(image: np.ndarray, *, percentiles: tuple[float, float] = (1, 99)) -> np.ndarray:
    """``[H, W, C>=3]`` imagery -> ``[H, W, 3]`` uint8 of the first three bands, stretched."""
    rgb = np.asarray(image, np.float32)[..., :3]
    lo, hi = np.percentile(rgb, percentiles)
    return (np.clip((rgb - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def colorize(labels: np.ndarray, colors: np.ndarray, *, ignore: int | None = None) -> np.ndarray:
    """``[H, W]`` integer labels -> ``[H, W, 3]`` uint8 using ``colors [n, 3]``; ignore -> black."""
    labels = np.asarray(labels)
    colors = np.asarray(colors, np.uint8)
    out = colors[np.clip(labels, 0, len(colors) - 1)]
    if ignore is not None:
        out[labels == ignore] = 0
    return out


def panel(
    tiles: list[np.ndarray],
    titles: list[str],
    *,
    legend: list[tuple[str, tuple[int, int, int]]] | None = None,
    gap: int = 6,
) -> np.ndarray:
    """Side-by-side ``[H, W, 3]`` uint8 images with titles above and an optional colour legend."""
    h = max(t.shape[0] for t in tiles)
    w = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    top, bottom = 18, (18 if legend else 0)
    canvas = Image.new("RGB", (w, h + top + bottom), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for tile, title in zip(tiles, titles, strict=True):
        canvas.paste(Image.fromarray(np.asarray(tile, np.uint8)), (x, top))
        draw.text((x + 2, 3), title, fill="black")
        x += tile.shape[1] + gap
    if legend:
        x = 2
        for name, color in legend:
            draw.rectangle(
                [x, h + top + 4, x + 10, h + top + 14], fill=tuple(int(c) for c in color)
            )
            draw.text((x + 14, h + top + 3), name, fill="black")
            x += 20 + 7 * len(name)
    return np.asarray(canvas)


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Writes ``rgb [H, W, 3]`` uint8 as a PNG with :func:`epilsr.io.atomic.atomic_write`."""
    image = Image.fromarray(np.asarray(rgb, np.uint8))
    atomic_write(path, lambda f: image.save(f, format="PNG"))
