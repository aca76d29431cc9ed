"""On-device patch samplers for epitome training (paper Sec. 3) and a background prefetcher.

Patches are cut with ``jax.random`` from an image ``[H, W, C]`` or a stack of tiles
``[T, H, W, C]``; windows lie inside the tile (no wrap-around in images, unlike epitomes).
Every sampler is a pure function of its ``key``: the same key gives the same patches, so a
training loop that derives each step's key with ``jax.random.fold_in(base_key, step)`` is
exactly resumable. Patch sizes are static shapes: draw them on the host (:func:`patch_sizes`)
and let ``jit`` cache one compilation per size (bucketing). Two samplers: :func:`sample_patches`
(patches only, every window equally likely) and :func:`sample_labelled_patches` (patches and
their centred label blocks, optionally restricted to windows holding a label or to a mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from epilsr._validate import check_rank, is_concrete

__all__ = [
    "sample_patches",
    "sample_labelled_patches",
    "label_positions",
    "sample_positions",
    "extract_patches",
    "patch_sizes",
]

#: Odd patch widths used by the paper (Sec. 5.2: 11 x 11 to 31 x 31): 11 sizes.
PATCH_SIZES: tuple[int, ...] = tuple(range(11, 32, 2))


def _as_tiles(images: ArrayLike) -> jax.Array:
    """``[H, W, C]`` or ``[T, H, W, C]`` -> ``[T, H, W, C]`` (dtype unchanged)."""
    images = jnp.asarray(images)
    if images.ndim == 3:
        return images[None]
    if images.ndim != 4:
        raise ValueError(
            f"images: expected rank 3 [H, W, C] or rank 4 [T, H, W, C], got shape {images.shape}"
        )
    return images


def _as_label_tiles(labels: ArrayLike) -> jax.Array:
    labels = jnp.asarray(labels)
    if labels.ndim == 2:
        return labels[None]
    if labels.ndim != 3:
        raise ValueError(
            f"labels: expected rank 2 [H, W] or rank 3 [T, H, W], got shape {labels.shape}"
        )
    return labels


def _to_float(patches: jax.Array) -> jax.Array:
    """uint8 / uint16 scaled to ``[0, 1]`` (DESIGN.md Sec. 1); floats cast to float32."""
    if patches.dtype == jnp.uint8:
        return patches.astype(jnp.float32) / 255.0
    if patches.dtype == jnp.uint16:
        return patches.astype(jnp.float32) / 65535.0
    if not jnp.issubdtype(patches.dtype, jnp.floating):
        raise ValueError(f"images: expected uint8, uint16 or float imagery, got {patches.dtype}")
    return patches.astype(jnp.float32)


def _check_size(size: int, height: int, width: int) -> None:
    if not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size: expected a positive integer patch width, got {size!r}")
    if size > height or size > width:
        raise ValueError(f"size: patch width {size} is larger than the tile ({height}, {width})")


def extract_patches(
    images: ArrayLike, tiles: ArrayLike, rows: ArrayLike, cols: ArrayLike, *, size: int
) -> jax.Array:
    """Cuts ``K x K`` windows by their top-left corners.

    Args:
      images: ``[H, W, C]`` or ``[T, H, W, C]``.
      tiles, rows, cols: ``[B]`` int tile index and top-left corner of each window.
      size: ``K``.

    Returns:
      ``[B, K, K, C]`` float32 (uint8/uint16 scaled to ``[0, 1]``).
    """
    images = _as_tiles(images)
    _check_size(size, images.shape[1], images.shape[2])
    c = images.shape[-1]

    def cut(t, i, j):
        return jax.lax.dynamic_slice(images, (t, i, j, 0), (1, size, size, c))[0]

    patches = jax.vmap(cut)(jnp.asarray(tiles), jnp.asarray(rows), jnp.asarray(cols))
    return _to_float(patches)


def sample_patches(key: ArrayLike, images: ArrayLike, *, size: int, batch: int) -> jax.Array:
    """Uniformly random ``K x K`` patches (every window inside a tile equally likely).

    Args:
      key: PRNG key.
      images: ``[H, W, C]`` or ``[T, H, W, C]`` (uint8/uint16 scaled to ``[0, 1]``).
      size: patch width ``K`` (static).
      batch: ``B`` (static).

    Returns:
      ``[B, K, K, C]`` float32.
    """
    images = _as_tiles(images)
    _check_size(size, images.shape[1], images.shape[2])
    tiles, rows, cols = _uniform_positions(key, images.shape[:3], size, batch)
    return extract_patches(images, tiles, rows, cols, size=size)


def _uniform_positions(key, shape: tuple[int, int, int], size: int, batch: int):
    """``[B]`` tiles, rows and columns of windows drawn uniformly inside ``[T, H, W]`` tiles."""
    t, h, w = shape
    kt, ki, kj = jax.random.split(key, 3)
    tiles = jax.random.randint(kt, (batch,), 0, t)
    rows = jax.random.randint(ki, (batch,), 0, h - size + 1)
    cols = jax.random.randint(kj, (batch,), 0, w - size + 1)
    return tiles, rows, cols


def label_positions(labels: ArrayLike, *, label: int, size: int) -> jax.Array:
    """Top-left corners whose ``K x K`` window contains at least one pixel of ``label``.

    A box filter of the indicator ``labels == label`` computed exactly with an integer
    summed-area table.

    Args:
      labels: ``[H, W]`` or ``[T, H, W]`` integer label maps.
      label: the label ``l``.
      size: ``K``.

    Returns:
      ``[T, H - K + 1, W - K + 1]`` bool.
    """
    labels = _as_label_tiles(labels)
    _, h, w = labels.shape
    _check_size(size, h, w)
    ind = (labels == label).astype(jnp.int32)
    sat = jnp.pad(jnp.cumsum(jnp.cumsum(ind, axis=1), axis=2), ((0, 0), (1, 0), (1, 0)))
    k = size
    counts = sat[:, k:, k:] - sat[:, :-k, k:] - sat[:, k:, :-k] + sat[:, :-k, :-k]
    return counts > 0


def sample_positions(key: ArrayLike, valid: ArrayLike, *, batch: int):
    """Uniform draws among the ``True`` entries of ``valid`` (inverse CDF, ``O(T H W + B log)``).

    Args:
      key: PRNG key.
      valid: ``[T, H', W']`` bool, e.g. from :func:`label_positions`.
      batch: ``B``.

    Returns:
      ``(tiles, rows, cols)``, each ``[B]`` int32. If ``valid`` has no ``True`` entry the draws
      are meaningless; callers on concrete arrays get a ``ValueError`` from
      :func:`sample_patches_with_label`.
    """
    valid = jnp.asarray(valid)
    check_rank("valid", valid, 3, "[T, H', W']")
    cdf = jnp.cumsum(valid.reshape(-1).astype(jnp.int32))
    total = cdf[-1]
    r = jax.random.randint(key, (batch,), 0, jnp.maximum(total, 1))
    flat = jnp.searchsorted(cdf, r, side="right").astype(jnp.int32)
    flat = jnp.minimum(flat, cdf.shape[0] - 1)
    tiles, rem = jnp.divmod(flat, valid.shape[1] * valid.shape[2])
    rows, cols = jnp.divmod(rem, valid.shape[2])
    return tiles, rows, cols


def patch_sizes(
    key: ArrayLike, *, num_steps: int, sizes: Sequence[int] = PATCH_SIZES
) -> np.ndarray:
    """A schedule of patch widths, one per step, drawn uniformly from ``sizes``.

    Returns a host ``[num_steps]`` int array (one device round trip for the whole run): each
    entry is a static shape, so a jitted step compiles at most ``len(sizes)`` times (one
    bucket per size). ``int(patch_sizes(key, num_steps=1)[0])`` draws a single width.
    """
    sizes = np.asarray(tuple(int(s) for s in sizes), np.int64)
    if sizes.size == 0 or sizes.min() < 1:
        raise ValueError(f"sizes: expected positive patch widths, got {sizes.tolist()}")
    if num_steps < 0:
        raise ValueError(f"num_steps: expected a count >= 0, got {num_steps}")
    idx = np.asarray(jax.random.randint(key, (num_steps,), 0, sizes.size))
    return sizes[idx]


def sample_labelled_patches(
    key: ArrayLike,
    images: ArrayLike,
    labels: ArrayLike,
    valid: ArrayLike | None = None,
    *,
    patch_size: int,
    batch: int,
    label_size: int = 1,
    label: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Random ``K x K`` patches and their centred ``Kl x Kl`` label blocks.

    Windows are drawn uniformly among the allowed top-left corners: ``valid`` when given (e.g.
    :func:`epilsr.pipelines.embedding.centre_valid`), else those whose window contains a pixel
    of ``label`` (:func:`label_positions`) when ``label`` is given, else every window inside a
    tile. Label block ``(i, j)`` is label pixel ``(r + o + i, c + o + j)`` of a window with
    corner ``(r, c)``, ``o = (K - Kl) // 2``: ``Kl = 1`` gives the class under the centre.

    Args:
      key: PRNG key.
      images: ``[H, W, C]`` or ``[T, H, W, C]``; labels: ``[H, W]`` or ``[T, H, W]`` int.
      valid: optional ``[T, H-K+1, W-K+1]`` bool allowed top-left corners.
      patch_size: ``K``; batch: ``B``; label_size: ``Kl <= K``.
      label: optional label every window must contain (ignored when ``valid`` is given).

    Returns:
      ``(patches [B, K, K, C] float32, blocks [B, Kl, Kl] int32)``.

    Raises:
      ValueError: if shapes disagree or no window is allowed (checked on concrete arrays).
    """
    images, labels = _as_tiles(images), _as_label_tiles(labels)
    if labels.shape != images.shape[:3]:
        raise ValueError(
            f"labels: expected shape {images.shape[:3]} to match images {images.shape}, "
            f"got {labels.shape}"
        )
    _check_size(patch_size, images.shape[1], images.shape[2])
    if not 1 <= label_size <= patch_size:
        raise ValueError(f"label_size: expected 1 <= Kl <= K={patch_size}, got {label_size}")
    if valid is None and label is None:
        tiles, rows, cols = _uniform_positions(key, images.shape[:3], patch_size, batch)
    else:
        if valid is None:
            valid = label_positions(labels, label=label, size=patch_size)
        valid = jnp.asarray(valid)
        t, h, w = images.shape[:3]
        expected = (t, h - patch_size + 1, w - patch_size + 1)
        if valid.shape != expected:
            raise ValueError(f"valid: expected shape {expected}, got {valid.shape}")
        if is_concrete(valid) and not bool(np.any(np.asarray(valid))):
            what = f"contains label {label}" if label is not None else "is allowed by valid"
            raise ValueError(f"no {patch_size}x{patch_size} window {what}")
        tiles, rows, cols = sample_positions(key, valid, batch=batch)
    patches = extract_patches(images, tiles, rows, cols, size=patch_size)
    o = (patch_size - label_size) // 2
    blocks = extract_patches(
        labels[..., None].astype(jnp.float32), tiles, rows + o, cols + o, size=label_size
    )[..., 0]
    return patches, blocks.astype(jnp.int32)
