"""On-device patch samplers for epitome training (paper Sec. 3) and a background prefetcher.

Patches are cut with ``jax.random`` from an image ``[H, W, C]`` or a stack of tiles
``[T, H, W, C]``; windows lie inside the tile (no wrap-around in images, unlike epitomes).
Every sampler is a pure function of its ``key``: the same key gives the same patches, so a
training loop that derives each step's key with ``jax.random.fold_in(base_key, step)`` is
exactly resumable. Patch sizes are static shapes: draw the size on the host
(:func:`random_patch_size`) and let ``jit`` cache one compilation per size (bucketing).
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
    "sample_patches_with_label",
    "label_positions",
    "sample_positions",
    "extract_patches",
    "random_patch_size",
    "sample_labelled_patches",
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
    t, h, w, _ = images.shape
    _check_size(size, h, w)
    kt, ki, kj = jax.random.split(key, 3)
    tiles = jax.random.randint(kt, (batch,), 0, t)
    rows = jax.random.randint(ki, (batch,), 0, h - size + 1)
    cols = jax.random.randint(kj, (batch,), 0, w - size + 1)
    return extract_patches(images, tiles, rows, cols, size=size)


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


def sample_patches_with_label(
    key: ArrayLike,
    images: ArrayLike,
    labels: ArrayLike,
    *,
    label: int,
    size: int,
    batch: int,
    valid: ArrayLike | None = None,
) -> jax.Array:
    """Random ``K x K`` patches that contain at least one pixel of ``label``.

    Uniform over the valid windows (top-left corners from :func:`label_positions`).

    Args:
      key: PRNG key.
      images: ``[H, W, C]`` or ``[T, H, W, C]``.
      labels: ``[H, W]`` or ``[T, H, W]`` integer labels aligned with ``images``.
      label: the required label.
      size: ``K``.
      batch: ``B``.
      valid: optional precomputed ``label_positions(labels, label=label, size=size)``; pass
        it to avoid recomputing the box filter every step.

    Returns:
      ``[B, K, K, C]`` float32.

    Raises:
      ValueError: if no window contains ``label`` (checked on concrete arrays).
    """
    images = _as_tiles(images)
    labels = _as_label_tiles(labels)
    if labels.shape != images.shape[:3]:
        raise ValueError(
            f"labels: expected shape {images.shape[:3]} to match images {images.shape}, "
            f"got {labels.shape}"
        )
    if valid is None:
        valid = label_positions(labels, label=label, size=size)
    valid = jnp.asarray(valid)
    expected = (images.shape[0], images.shape[1] - size + 1, images.shape[2] - size + 1)
    if valid.shape != expected:
        raise ValueError(f"valid: expected shape {expected}, got {valid.shape}")
    if is_concrete(valid) and not bool(np.any(np.asarray(valid))):
        raise ValueError(f"label {label}: no {size}x{size} window contains this label")
    tiles, rows, cols = sample_positions(key, valid, batch=batch)
    return extract_patches(images, tiles, rows, cols, size=size)


def random_patch_size(key: ArrayLike, *, sizes: Sequence[int] = PATCH_SIZES) -> int:
    """Draws one patch width uniformly from ``sizes`` (a Python int: a static shape).

    Drawing on the host keeps the set of shapes finite, so a jitted step compiles at most
    ``len(sizes)`` times (one bucket per size). Use ``jax.random.fold_in(key, step)`` for a
    step-indexed, resumable draw.
    """
    sizes = tuple(int(s) for s in sizes)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sizes: expected positive patch widths, got {sizes}")
    return sizes[int(jax.random.randint(key, (), 0, len(sizes)))]


def sample_labelled_patches(
    key: ArrayLike,
    images: ArrayLike,
    labels: ArrayLike,
    valid: ArrayLike,
    *,
    patch_size: int,
    label_size: int,
    batch: int,
) -> tuple[jax.Array, jax.Array]:
    """Random ``K x K`` patches and their centred ``Kl x Kl`` label blocks.

    Args:
      key: PRNG key.
      images: ``[T, H, W, C]``; labels: ``[T, H, W]`` int.
      valid: ``[T, H-K+1, W-K+1]`` bool allowed top-left corners (e.g. :func:`centre_valid`).
      patch_size: ``K``; label_size: ``Kl`` (``K - Kl`` even); batch: ``B``.

    Returns:
      ``(patches [B, K, K, C] float32, blocks [B, Kl, Kl] int)``.
    """
    tiles, rows, cols = sample_positions(key, valid, batch=batch)
    patches = extract_patches(images, tiles, rows, cols, size=patch_size)
    o = (patch_size - label_size) // 2
    blocks = extract_patches(
        jnp.asarray(labels)[..., None].astype(jnp.float32), tiles, rows + o, cols + o,
        size=label_size,
    )[..., 0]
    return patches, blocks.astype(jnp.int32)
