"""Epitomes as segmentation models over datasets and rasters (paper Secs. 2 and 5.1).

* **High-resolution label embedding** (Eq. 6): :func:`embed_label_maps` samples ``K x K``
  patches (31 in the paper) of a stack of tiles with their label maps and adds the centre
  ``Kl x Kl`` (11) label block of every patch, weighted by the posterior, into counts
  ``z [L, N1, N2, n]``; :func:`label_probs_from_counts` turns counts into ``p(l | m, n)``.
* **Low-resolution embedding** (Eq. 11): :func:`embed_class_maps` does the same with the class
  of each patch's centre pixel; ``super_resolve`` (Eqs. 8-9) then gives ``p(l | m, n)`` without
  any high-resolution label (:func:`all_tile_lsr`, "all-tile epitomic LSR").
* **Dense prediction over rasters** (Eq. 2): :func:`predict_raster` runs
  :func:`epilsr.predict`'s window sums tile by tile and writes finished rows as it goes.

Both embeddings are sums over patches, so a dataset is embedded batch by batch
(:func:`accumulate_labels`, :func:`accumulate_classes`: ``counts + embedding(batch)``); with a
``mesh`` the batch is sharded over the mesh axis ``"data"`` and the compiler inserts the
all-reduce (GSPMD, as for :func:`epilsr.make_sharded_train_step`). Batch ``i`` is drawn with
``jax.random.fold_in(key, i)``, so the counts do not depend on how many batches are run per
call. No-data labels/classes (``ignore``) contribute nothing: their one-hot rows are zero.

**Exact tiling.** Tiled prediction partitions the *windows* of the raster's stride grid
(not its pixels) among tiles: each window is evaluated once, in the tile that owns its
top-left corner, and its contributions (sums and counts) are added into a strip buffer. The
result equals :func:`epilsr.predict` on the whole raster up to float32 summation order, for
every stride; memory is one strip of ``tile + K`` rows plus one posterior chunk.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from epilsr._validate import check_finite
from epilsr.data.samplers import extract_patches, sample_positions
from epilsr.embed import embed_labels, spread_class_posteriors
from epilsr.epitome import Epitome, as_float_image
from epilsr.likelihood import log_posterior
from epilsr.lsr import super_resolve
from epilsr.predict import check_predict_inputs, grid_starts, window_sums
from epilsr.tiling import NODATA_LABEL, tile_grid

__all__ = [
    "IGNORE",
    "check_label_maps",
    "centre_valid",
    "sample_labelled_patches",
    "one_hot_labels",
    "accumulate_labels",
    "accumulate_classes",
    "make_accumulate_step",
    "embed_label_maps",
    "embed_class_maps",
    "label_probs_from_counts",
    "all_tile_lsr",
    "predict_raster",
    "RasterPrediction",
    "predict_raster_files",
    "RasterFiles",
    "raster_row_writer",
]

#: Label / class value of no-data pixels (skipped, never embedded).
IGNORE = 255


# --------------------------------------------------------------------------- inputs


def _as_stack(images: ArrayLike, maps: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    maps = np.asarray(maps)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"images: expected [H, W, C] or [T, H, W, C], got shape {images.shape}")
    if maps.ndim == 2:
        maps = maps[None]
    if maps.shape != images.shape[:3]:
        raise ValueError(
            f"{name}: expected shape {images.shape[:3]} ([T, H, W]) to match the imagery "
            f"{images.shape}, got {maps.shape}"
        )
    return images, maps


def check_label_maps(
    images: ArrayLike,
    labels: ArrayLike,
    *,
    n_labels: int,
    ignore: int | None = IGNORE,
    epitome: Epitome | None = None,
    name: str = "labels",
) -> tuple[np.ndarray, np.ndarray]:
    """Validates imagery ``[T, H, W, C]`` (or ``[H, W, C]``) and label maps ``[T, H, W]``.

    Labels must be integers in ``[0, n_labels)`` or equal to ``ignore``; the imagery must have
    the epitome's channel count. Returns ``(images, labels)`` as NumPy stacks (rank 4 / 3).

    Raises:
      ValueError: naming ``images``, ``labels`` (``name``) or ``epitome``.
    """
    images, labels = _as_stack(images, labels, name)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}: expected integer label maps, got dtype {labels.dtype}")
    bad = (labels < 0) | (labels >= n_labels)
    if ignore is not None:
        bad &= labels != ignore
    if bad.any():
        vals = np.unique(labels[bad])[:8].tolist()
        raise ValueError(
            f"{name}: values {vals} are outside the class set [0, {n_labels})"
            + (f" and are not the no-data value {ignore}" if ignore is not None else "")
        )
    if epitome is not None and images.shape[-1] != epitome.channels:
        raise ValueError(
            f"images: expected {epitome.channels} channels to match the epitome, got "
            f"{images.shape[-1]} (shape {images.shape})"
        )
    if not (np.issubdtype(images.dtype, np.floating) or images.dtype in (np.uint8, np.uint16)):
        raise ValueError(f"images: expected uint8, uint16 or float imagery, got {images.dtype}")
    return images, labels


def centre_valid(labels: ArrayLike, *, patch_size: int, ignore: int | None = IGNORE) -> np.ndarray:
    """``[T, H-K+1, W-K+1]`` bool: windows whose centre pixel is not no-data."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels[None]
    k = patch_size
    c = k // 2
    centre = labels[:, c : labels.shape[1] - k + 1 + c, c : labels.shape[2] - k + 1 + c]
    return np.ones(centre.shape, bool) if ignore is None else centre != ignore


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


def one_hot_labels(labels: ArrayLike, *, n_labels: int) -> jax.Array:
    """``[...]`` int -> ``[..., n]`` float32 one-hot; values outside ``[0, n)`` (no data) -> 0."""
    return jax.nn.one_hot(jnp.asarray(labels), n_labels, dtype=jnp.float32)


# --------------------------------------------------------------------------- accumulation


def accumulate_labels(
    counts: ArrayLike,
    epitome: Epitome,
    patches: ArrayLike,
    blocks: ArrayLike,
    *,
    temperature: float | ArrayLike,
    method: str = "auto",
) -> jax.Array:
    """``counts + z`` with ``z`` the Eq. 6 counts of one batch.

    Args:
      counts: ``[L, N1, N2, n]`` running counts.
      epitome: :class:`Epitome`.
      patches: ``[B, K, K, C]``.
      blocks: ``[B, Kl, Kl]`` int labels centred in the patches; values outside ``[0, n)``
        (no data) are skipped.
      temperature: posterior temperature (``K^2`` in the original embedding).
      method: correlation route.

    Returns:
      ``[L, N1, N2, n]``.
    """
    counts = jnp.asarray(counts, jnp.float32)
    y = one_hot_labels(blocks, n_labels=counts.shape[-1])
    return counts + embed_labels(epitome, patches, y, temperature=temperature, method=method)


def accumulate_classes(
    counts: ArrayLike,
    epitome: Epitome,
    patches: ArrayLike,
    classes: ArrayLike,
    *,
    temperature: float | ArrayLike,
    method: str = "auto",
) -> jax.Array:
    """``counts + z`` with ``z`` the Eq. 11 counts of one batch.

    Args:
      counts: ``[L, N1, N2, Cc]``.
      patches: ``[B, K, K, C]``; classes: ``[B]`` int, values outside ``[0, Cc)`` skipped.

    Returns:
      ``[L, N1, N2, Cc]``.
    """
    counts = jnp.asarray(counts, jnp.float32)
    patches = jnp.asarray(patches)
    post = jnp.exp(log_posterior(epitome, patches, temperature=temperature, method=method))
    z = spread_class_posteriors(
        post, jnp.asarray(classes), n_classes=counts.shape[-1], window=patches.shape[1:3]
    )
    return counts + z


def make_accumulate_step(
    fn: Callable, *, mesh: jax.sharding.Mesh | None = None, **hyper
) -> Callable:
    """Jits ``fn(counts, epitome, patches, targets, **hyper)`` (an ``accumulate_*``).

    With a ``mesh`` (axis ``"data"``, e.g. :func:`epilsr.train.data_mesh`) ``patches`` and
    ``targets`` are sharded over the batch and ``counts``/``epitome`` replicated; the result
    equals the single-device step up to float32 reduction order. The batch must be divisible
    by the number of devices.
    """
    part = functools.partial(fn, **hyper)
    if mesh is None:
        return jax.jit(part)
    from epilsr.train import _auto_mesh

    mesh = _auto_mesh(mesh)
    rep = NamedSharding(mesh, PartitionSpec())
    bat = NamedSharding(mesh, PartitionSpec("data"))
    return jax.jit(part, in_shardings=(rep, rep, bat, bat), out_shardings=rep)


def _shard(x: jax.Array, mesh) -> jax.Array:
    if mesh is None:
        return x
    from epilsr.train import shard_batch

    return shard_batch(np.asarray(x), mesh)


def _embed_loop(
    key, epitome, draw, fn, n_out, *, num_batches, batch, mesh, temperature, method, progress,
    desc,
):
    if mesh is not None and batch % mesh.devices.size:
        raise ValueError(f"batch: {batch} is not divisible by the {mesh.devices.size} devices")
    if num_batches < 1 or batch < 1:
        raise ValueError(f"num_batches, batch: expected positive, got {num_batches}, {batch}")
    step = make_accumulate_step(fn, mesh=mesh, temperature=temperature, method=method)
    counts = jnp.zeros((*epitome.prior_logits.shape, n_out), jnp.float32)
    if mesh is not None:
        from epilsr.train import replicate

        counts, epitome = replicate(counts, mesh), replicate(epitome, mesh)
    draw = jax.jit(draw)
    from tqdm.auto import tqdm

    for i in tqdm(range(num_batches), disable=not progress, desc=desc, unit="batch"):
        patches, targets = draw(jax.random.fold_in(key, i))
        counts = step(counts, epitome, _shard(patches, mesh), _shard(targets, mesh))
    return counts


def embed_label_maps(
    key: ArrayLike,
    epitome: Epitome,
    images: ArrayLike,
    labels: ArrayLike,
    *,
    n_labels: int,
    patch_size: int = 31,
    label_size: int = 11,
    batch: int = 256,
    num_batches: int = 100,
    temperature: float | ArrayLike,
    ignore: int | None = IGNORE,
    mesh: jax.sharding.Mesh | None = None,
    method: str = "auto",
    progress: bool = False,
) -> jax.Array:
    """High-resolution label embedding over a dataset (Eq. 6, Sec. 5.1).

    ``num_batches`` batches of ``batch`` patches ``K x K`` are drawn uniformly among the windows
    whose centre pixel has a label (batch ``i`` with ``fold_in(key, i)``); the centre
    ``Kl x Kl`` label block of each, weighted by the tempered posterior, is added to the
    counts. No-data pixels inside a block are skipped.

    Args:
      key: PRNG key.
      epitome: :class:`Epitome` ``[L, N1, N2, C]``.
      images: ``[T, H, W, C]`` (or ``[H, W, C]``) imagery, uint8/uint16/float.
      labels: ``[T, H, W]`` int labels in ``[0, n_labels)`` or ``ignore``.
      n_labels: ``n``.
      patch_size: ``K`` (31 in the paper); label_size: ``Kl`` (11).
      batch, num_batches: patches per step and steps.
      temperature: ``T``. The original implementation embedded with ``K^2`` (per-pixel
        likelihood); with trained epitomes that posterior is nearly flat (on the West-Virginia
        tiles a 128^2 epitome spreads a 31x31 patch over ~12 600 of 16 384 positions at
        ``T = K^2`` versus ~10 at the training temperature ``(K/11)^2``).
      ignore: no-data label value (None: none).
      mesh: optional 1-D ``"data"`` mesh to shard each batch over.
      method: correlation route (prefer ``"direct"`` when sharded: GSPMD gathers FFT batches).
      progress: tqdm bar.

    Returns:
      ``[L, N1, N2, n]`` counts ``z``; :func:`label_probs_from_counts` normalises them.
    """
    images, labels = check_label_maps(images, labels, n_labels=n_labels, ignore=ignore,
                                      epitome=epitome)
    k, kl = int(patch_size), int(label_size)
    if not 1 <= kl <= k or (k - kl) % 2:
        raise ValueError(f"label_size: expected 1 <= Kl <= K={k} with K - Kl even, got {kl}")
    if k > min(images.shape[1:3]):
        raise ValueError(f"patch_size: {k} is larger than the tiles {images.shape[1:3]}")
    valid = centre_valid(labels, patch_size=k, ignore=ignore)
    if not valid.any():
        raise ValueError("labels: every label is no data; nothing to embed")
    t = temperature
    imgs, labs, val = jnp.asarray(images), jnp.asarray(labels.astype(np.int32)), jnp.asarray(valid)

    def draw(kk):
        return sample_labelled_patches(kk, imgs, labs, val, patch_size=k, label_size=kl,
                                       batch=batch)

    return _embed_loop(key, epitome, draw, accumulate_labels, n_labels, num_batches=num_batches,
                       batch=batch, mesh=mesh, temperature=t, method=method, progress=progress,
                       desc="embed labels")


def embed_class_maps(
    key: ArrayLike,
    epitome: Epitome,
    images: ArrayLike,
    classes: ArrayLike,
    *,
    n_classes: int,
    patch_size: int = 11,
    batch: int = 256,
    num_batches: int = 100,
    temperature: float | ArrayLike,
    ignore: int | None = IGNORE,
    mesh: jax.sharding.Mesh | None = None,
    method: str = "auto",
    progress: bool = False,
) -> jax.Array:
    """Low-resolution class embedding over a dataset (Eq. 11, Sec. 5.1).

    Patches ``K x K`` (11 in the paper) are drawn uniformly among windows whose centre pixel has
    a class; the centre pixel's class is embedded over the whole window of every position,
    weighted by the posterior. Arguments as :func:`embed_label_maps`.

    Returns:
      ``[L, N1, N2, Cc]`` counts (``p(m, n | c)`` after normalising over positions).
    """
    images, classes = check_label_maps(images, classes, n_labels=n_classes, ignore=ignore,
                                       epitome=epitome, name="classes")
    k = int(patch_size)
    if k > min(images.shape[1:3]):
        raise ValueError(f"patch_size: {k} is larger than the tiles {images.shape[1:3]}")
    valid = centre_valid(classes, patch_size=k, ignore=ignore)
    if not valid.any():
        raise ValueError("classes: every class is no data; nothing to embed")
    t = temperature
    imgs, cls, val = jnp.asarray(images), jnp.asarray(classes.astype(np.int32)), jnp.asarray(valid)

    def draw(kk):
        patches, blocks = sample_labelled_patches(kk, imgs, cls, val, patch_size=k,
                                                  label_size=1, batch=batch)
        return patches, blocks[:, 0, 0]

    return _embed_loop(key, epitome, draw, accumulate_classes, n_classes,
                       num_batches=num_batches, batch=batch, mesh=mesh, temperature=t,
                       method=method, progress=progress, desc="embed classes")


def label_probs_from_counts(
    counts: ArrayLike, *, pseudo_count: float = 0.0, prior: ArrayLike | None = None
) -> jax.Array:
    """``p(l | m, n) ∝ z + pseudo_count * prior`` (Eq. 6's normalisation).

    Args:
      counts: ``[L, N1, N2, n]`` label counts.
      pseudo_count: Dirichlet smoothing mass per position (0 = plain normalisation).
      prior: ``[n]`` label distribution of the smoothing; None = the overall label
        frequencies ``sum z / sum z``. Positions with no mass at all get ``prior``.

    Returns:
      ``[L, N1, N2, n]`` distributions.
    """
    counts = jnp.asarray(counts, jnp.float32)
    if prior is None:
        total = jnp.sum(counts, axis=(0, 1, 2))
        prior = jnp.where(jnp.sum(total) > 0, total / jnp.maximum(jnp.sum(total), 1e-30),
                          1.0 / counts.shape[-1])
    prior = jnp.asarray(prior, jnp.float32)
    z = counts + pseudo_count * prior
    s = jnp.sum(z, axis=-1, keepdims=True)
    return jnp.where(s > 0, z / jnp.where(s > 0, s, 1.0), prior)


def all_tile_lsr(
    class_counts: ArrayLike,
    label_given_class: ArrayLike,
    *,
    min_share: float = 0.0,
    iters: int = 20,
    class_prior: ArrayLike | None = None,
) -> jax.Array:
    """All-tile epitomic LSR: ``super_resolve`` (Eqs. 8-9) of dataset-level class counts.

    Args:
      class_counts: ``[L, N1, N2, Cc]`` from :func:`embed_class_maps` (one epitome, many tiles).
      label_given_class: ``[Cc, n]`` ``p(l | c)``.
      min_share: table entries below this share are zeroed before normalising (see
        :func:`epilsr.self_epitomic_lsr`).
      iters: EM iterations; class_prior: ``p(c)`` (None = observed proportions).

    Returns:
      ``[L, N1, N2, n]`` ``p(l | m, n)``.
    """
    table = np.asarray(label_given_class, np.float64)
    if min_share > 0:
        rows = table / np.maximum(table.sum(1, keepdims=True), 1e-30)
        table = np.where(rows < min_share, 0.0, table)
    return super_resolve(class_counts, table.astype(np.float32), class_prior=class_prior,
                         iters=iters)


# --------------------------------------------------------------------------- rasters


class RasterPrediction(NamedTuple):
    """What :func:`predict_raster` did."""

    probs: np.ndarray | None  # [H, W, n] when no ``on_rows`` was given
    tiles: int  # tiles evaluated
    windows: int  # K x K windows evaluated (each once)


@functools.lru_cache(maxsize=16)
def _jitted_sums(static: tuple) -> Callable:
    return jax.jit(functools.partial(window_sums, **dict(static)))


def _reflect_read(reader, height, width, margin, row, col, h, w) -> np.ndarray:
    """Rows ``row..row+h`` / cols of the raster reflect-padded by ``margin`` (padded coords)."""
    r0, c0 = row - margin, col - margin  # raster coordinates
    a0, a1 = max(r0, 0), min(r0 + h, height)
    b0, b1 = max(c0, 0), min(c0 + w, width)
    block = np.asarray(reader(a0, b0, a1 - a0, b1 - b0))
    pad = ((a0 - r0, r0 + h - a1), (b0 - c0, c0 + w - b1), (0, 0))
    return np.pad(block, pad, mode="reflect") if any(sum(p) for p in pad) else block


class _Strip(NamedTuple):
    """One finished strip of :func:`_PredictPlan.strips`: rows ``row0 ..`` are final."""

    row0: int
    probs: np.ndarray  # [r, W, n]
    next_strip: int
    acc: np.ndarray  # [keep, W, n] carry: sums already added to the rows below
    cnt: np.ndarray  # [keep, W]
    windows: int  # windows evaluated in this strip


class _PredictPlan(NamedTuple):
    height: int
    width: int
    n_labels: int
    n_strips: int
    n_tiles: int
    strips: Callable[..., Any]  # (first_strip, carry, bar) -> iterator of _Strip


def _predict_plan(epitome, label_probs, image_reader, *, patch_size, temperature, stride,
                  label_size, tile, height, width, mask, chunk, method) -> _PredictPlan:
    """Validated inputs, the tile grid and a generator over finished strips (Eq. 2, exact)."""
    if not callable(image_reader):
        from epilsr.tiling import array_reader

        image_reader = array_reader(image_reader)
    if height is None or width is None:
        shape = getattr(image_reader, "shape", None)
        if shape is None:
            raise ValueError("predict_raster: pass height= and width= (reader has no .shape)")
        height, width = int(shape[0]), int(shape[1])
    shape = tuple(getattr(image_reader, "shape", ()) or ())
    channels = shape[2] if len(shape) == 3 else (1 if len(shape) == 2 else epitome.channels)
    k = int(patch_size)
    label_probs, kl, o = check_predict_inputs(
        epitome, label_probs, image_shape=(height, width, channels), patch_size=k,
        label_size=label_size, stride=stride,
    )
    if int(tile) != tile or tile < 1:
        raise ValueError(f"tile: expected a positive integer, got {tile}")
    n = label_probs.shape[-1]
    rows_g = np.asarray(grid_starts(height, kl, stride))
    cols_g = np.asarray(grid_starts(width, kl, stride))
    # tiles of the corner space [0, H - Kl] x [0, W - Kl]
    wins = tile_grid(height - kl + 1, width - kl + 1, tile=int(tile), overlap=0)
    th, tw = wins[0].height, wins[0].width
    strip_rows = sorted({w.row for w in wins})
    col_starts = sorted({w.col for w in wins})

    def owned(grid, starts, i):
        lo = starts[i]
        hi = starts[i + 1] if i + 1 < len(starts) else grid[-1] + 1
        return grid[(grid >= lo) & (grid < hi)] - lo

    p_max = max(len(owned(rows_g, strip_rows, i)) for i in range(len(strip_rows))) * max(
        len(owned(cols_g, col_starts, j)) for j in range(len(col_starts)))
    n_chunks = -(-p_max // max(1, int(chunk)))
    chunk = -(-p_max // n_chunks)  # equal chunks: at most n_chunks - 1 padded windows
    p_pad = n_chunks * chunk
    static = (("patch_size", k), ("label_size", label_size), ("chunk", chunk),
              ("method", method))
    fn = _jitted_sums(static)
    img_h, img_w = th + k - 1, tw + k - 1  # tile image window (padded coordinates)
    out_h = th + kl - 1  # raster rows touched by one strip

    def strips(first_strip: int = 0, carry=None, bar=None):
        acc = np.zeros((out_h, width, n), np.float32)
        cnt = np.zeros((out_h, width), np.float32)
        if carry is not None:
            kc = carry[0].shape[0]
            acc[:kc], cnt[:kc] = carry
        for si in range(first_strip, len(strip_rows)):
            r0 = strip_rows[si]
            rs = owned(rows_g, strip_rows, si)
            n_windows = 0
            for cj, c0 in enumerate(col_starts):
                cs = owned(cols_g, col_starts, cj)
                rr, cc = np.meshgrid(rs, cs, indexing="ij")
                st = np.zeros((p_pad, 2), np.int32)
                wt = np.zeros((p_pad,), np.float32)
                m = rr.size
                st[:m, 0], st[:m, 1], wt[:m] = rr.ravel(), cc.ravel(), 1.0
                block = _reflect_read(image_reader, height, width, o, r0, c0, img_h, img_w)
                if block.ndim != 3 or block.shape[:2] != (img_h, img_w):
                    raise ValueError(f"image_reader: window ({r0}, {c0}) gave shape "
                                     f"{block.shape}, expected ({img_h}, {img_w}, C)")
                if block.shape[-1] != epitome.channels:
                    raise ValueError(f"image: expected {epitome.channels} channels to match "
                                     f"the epitome, got {block.shape[-1]}")
                image = as_float_image(block)
                check_finite("image", image)
                a, c = fn(epitome, label_probs, image, jnp.asarray(st),
                          jnp.asarray(wt), temperature=temperature, mask=mask)
                a = np.asarray(a)[o : o + out_h, o : o + tw + kl - 1]
                c = np.asarray(c)[o : o + out_h, o : o + tw + kl - 1]
                acc[:, c0 : c0 + tw + kl - 1] += a
                cnt[:, c0 : c0 + tw + kl - 1] += c
                n_windows += m
                if bar is not None:
                    bar.update(1)
            end = strip_rows[si + 1] if si + 1 < len(strip_rows) else height
            n_out = end - r0
            done = acc[:n_out] / np.maximum(cnt[:n_out], 1e-30)[..., None]
            keep = out_h - n_out if si + 1 < len(strip_rows) else 0
            acc[: out_h - n_out], cnt[: out_h - n_out] = acc[n_out:], cnt[n_out:]
            acc[out_h - n_out :], cnt[out_h - n_out :] = 0.0, 0.0
            yield _Strip(r0, done, si + 1, acc[:keep].copy(), cnt[:keep].copy(), n_windows)

    return _PredictPlan(height, width, n, len(strip_rows), len(wins), strips)


def predict_raster(
    epitome: Epitome,
    label_probs: ArrayLike,
    image_reader: Callable[[int, int, int, int], ArrayLike] | ArrayLike,
    *,
    patch_size: int,
    temperature: float,
    stride: int = 1,
    label_size: int | None = None,
    tile: int = 256,
    height: int | None = None,
    width: int | None = None,
    on_rows: Callable[[int, np.ndarray], None] | None = None,
    mask: ArrayLike | None = None,
    chunk: int = 64,
    method: str = "auto",
    progress: bool = False,
) -> RasterPrediction:
    """Dense Eq. 2 over a raster of any size, tile by tile (exact; see module doc).

    Equals :func:`epilsr.predict` with the same ``patch_size``, ``stride``, ``label_size`` on
    the whole raster. Window corners (block corners with ``label_size``) lie on the global grid
    :func:`epilsr.predict.grid_starts`; :func:`epilsr.tiling.tile_grid` splits that grid into
    ``tile x tile`` pieces and each piece's windows are evaluated on an image window of
    ``tile + K - 1`` pixels. Finished rows are passed to ``on_rows(row0, probs [r, W, n])`` in
    order (e.g. :func:`raster_row_writer`), else collected and returned.

    Args:
      epitome: :class:`Epitome`; label_probs: ``[L, N1, N2, n]``.
      image_reader: ``(row, col, h, w) -> [h, w, C]`` (e.g. a
        :class:`~epilsr.data.rasters.RasterReader`) or an ``[H, W, C]`` array.
      patch_size, temperature, stride, label_size, mask, chunk, method: as in
        :func:`epilsr.predict` (``chunk`` bounds memory to ``chunk * L * N1 * N2`` floats).
      tile: side of a tile of window corners (one jit compilation for all tiles).
      height, width: raster size (default ``image_reader.shape``).
      on_rows: row sink; None = return the ``[H, W, n]`` array.
      progress: tqdm bar over tiles.

    Returns:
      :class:`RasterPrediction`.
    """
    plan = _predict_plan(epitome, label_probs, image_reader, patch_size=patch_size,
                         temperature=temperature, stride=stride, label_size=label_size,
                         tile=tile, height=height, width=width, mask=mask, chunk=chunk,
                         method=method)
    full = None
    if on_rows is None:
        full = np.zeros((plan.height, plan.width, plan.n_labels), np.float32)
    from tqdm.auto import tqdm

    n_windows = 0
    with tqdm(total=plan.n_tiles, disable=not progress, unit="tile",
              desc="predict_raster") as bar:
        for strip in plan.strips(bar=bar):
            if full is not None:
                full[strip.row0 : strip.row0 + len(strip.probs)] = strip.probs
            else:
                on_rows(strip.row0, strip.probs)
            n_windows += strip.windows
    return RasterPrediction(full, plan.n_tiles, n_windows)


class RasterFiles(NamedTuple):
    """What :func:`predict_raster_files` wrote and did."""

    labels: Path  # [H, W] uint8 argmax, NODATA_LABEL where ``valid`` is False
    probs: Path | None  # [H, W, n] float32 (NaN where no data)
    entropy: Path | None  # [H, W] float32 nats (NaN where no data)
    tiles: int  # tiles in the grid
    windows: int  # K x K windows evaluated in this call
    resumed_from: int  # strips already done when this call started


def _digest(*arrays) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def predict_raster_files(
    epitome: Epitome,
    label_probs: ArrayLike,
    image_reader: Callable[[int, int, int, int], ArrayLike] | ArrayLike,
    *,
    out_dir: str | os.PathLike,
    patch_size: int,
    temperature: float,
    stride: int = 1,
    label_size: int | None = None,
    tile: int = 256,
    height: int | None = None,
    width: int | None = None,
    geo: Any = None,
    prefix: str = "",
    probs: bool = False,
    entropy: bool = True,
    valid: Callable[[int, int, int, int], ArrayLike] | None = None,
    mask: ArrayLike | None = None,
    chunk: int = 64,
    method: str = "auto",
    resume: bool = True,
    progress: bool = False,
) -> RasterFiles:
    """:func:`predict_raster` into GeoTIFFs, checkpointed after every strip and resumable.

    Writes ``<prefix>labels.tif`` (and ``probs.tif`` / ``entropy.tif``) like
    :func:`raster_row_writer`. After each strip of tiles the writers are made durable and the
    strip buffer's carry rows and ``progress.json`` (next strip, writer states, a fingerprint of
    the epitome, label embedding and settings) are saved atomically in
    ``<out_dir>/.<prefix>predict_state/`` (the scheme of :func:`epilsr.tiling.lsr_raster`). A
    rerun with ``resume=True`` continues from the last finished strip, and its output equals an
    uninterrupted run's; at most one strip of work is lost. The reader is not fingerprinted:
    the imagery must not change between the crash and the rerun.

    Args:
      out_dir: output folder; geo: :class:`~epilsr.data.rasters.GeoInfo` copied to the outputs
        (the fingerprint covers the model, every setting and an array image, not a reader's
        data nor what ``valid`` returns);
        prefix, probs, entropy, valid: as for :func:`raster_row_writer`; resume: continue an
        interrupted run with the same settings (a different one raises ``ValueError``);
        ``False`` starts over. Other arguments as for :func:`predict_raster`.
    """
    from tqdm.auto import tqdm

    from epilsr.data.rasters import RasterWriter
    from epilsr.tiling import (
        _fingerprint,
        _Outputs,
        _resume_writers,
        _save_npz_atomic,
        _write_json_atomic,
    )

    plan = _predict_plan(epitome, label_probs, image_reader, patch_size=patch_size,
                         temperature=temperature, stride=stride, label_size=label_size,
                         tile=tile, height=height, width=width, mask=mask, chunk=chunk,
                         method=method)
    h, w, n = plan.height, plan.width, plan.n_labels
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir = out_dir / f".{prefix}predict_state"
    state_path = state_dir / "progress.json"
    specs: dict[str, dict[str, Any]] = {"labels": dict(dtype=np.uint8, bands=None,
                                                       nodata=NODATA_LABEL)}
    if probs:
        specs["probs"] = dict(dtype=np.float32, bands=n, nodata=float("nan"))
    if entropy:
        specs["entropy"] = dict(dtype=np.float32, bands=None, nodata=float("nan"))
    paths = {name: out_dir / f"{prefix}{name}.tif" for name in specs}
    fingerprint = _fingerprint(
        version=1, height=h, width=w, patch_size=int(patch_size),
        temperature=float(temperature), stride=int(stride), label_size=label_size,
        tile=int(tile), chunk=int(chunk), method=method, outputs=sorted(specs),
        valid=valid is not None,
        model=_digest(epitome.mean, epitome.log_var, epitome.prior_logits, label_probs,
                      np.zeros(0) if mask is None else mask),
        image=None if callable(image_reader) else _digest(image_reader),
    )

    def writer_kwargs(name):
        sp = specs[name]
        return dict(height=h, width=w, dtype=sp["dtype"], bands=sp["bands"], geo=geo,
                    nodata=sp["nodata"])

    def result(windows, resumed):
        return RasterFiles(paths["labels"], paths.get("probs"), paths.get("entropy"),
                           plan.n_tiles, windows, resumed)

    state = None
    if resume and state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("fingerprint") != fingerprint:
            raise ValueError(f"predict_raster_files: {state_dir} holds a run with different "
                             "settings; pass resume=False to start over (or another prefix)")
        if state.get("complete") and all(p.exists() for p in paths.values()):
            return result(0, state["next_strip"])
    first, carry, writers = 0, None, {}
    if state is not None and not state.get("complete"):
        first = state["next_strip"]
        writers = _resume_writers(state, state_dir, paths, writer_kwargs,
                                  finished=first == plan.n_strips, who="predict_raster_files")
        if state.get("carry"):
            with np.load(state_dir / state["carry"]) as z:
                carry = (z["acc"], z["cnt"])
    else:
        if state_dir.exists():
            for f in state_dir.iterdir():
                f.unlink()
        state_dir.mkdir(exist_ok=True)
        writers = {name: RasterWriter(paths[name], **writer_kwargs(name)) for name in specs}
    outputs = _Outputs(writers)
    tiles_per_strip = plan.n_tiles // plan.n_strips
    n_windows = 0
    try:
        with tqdm(total=plan.n_tiles, initial=first * tiles_per_strip, disable=not progress,
                  unit="tile", desc="predict_raster") as bar:
            for strip in plan.strips(first, carry, bar):
                r = len(strip.probs)
                nodata = np.zeros((r, w), bool)
                if valid is not None:
                    nodata = ~np.asarray(valid(strip.row0, 0, r, w), bool)
                outputs.write(strip.probs, nodata)
                n_windows += strip.windows
                step = strip.next_strip
                states = {}
                for name, wr in writers.items():
                    st = wr.checkpoint(state_dir / f"{name}.pending.{step}.npy")
                    st["pending"] = Path(st["pending"]).name if st["pending"] else None
                    states[name] = st
                carry_name = None
                if len(strip.acc):
                    carry_name = f"carry.{step}.npz"
                    _save_npz_atomic(state_dir / carry_name, acc=strip.acc, cnt=strip.cnt)
                _write_json_atomic(state_path, dict(
                    fingerprint=fingerprint, next_strip=step, writers=states,
                    carry=carry_name, complete=False))
                keep = {state_path.name, carry_name} | {
                    st["pending"] for st in states.values() if st["pending"]}
                for f in state_dir.iterdir():
                    if f.name not in keep:
                        f.unlink(missing_ok=True)
        for wr in writers.values():
            wr.close()
    except BaseException:
        outputs.abort()
        raise
    _write_json_atomic(state_path, dict(fingerprint=fingerprint, next_strip=plan.n_strips,
                                        complete=True))
    for f in state_dir.iterdir():
        if f.name != state_path.name:
            f.unlink(missing_ok=True)
    return result(n_windows, first)


def raster_row_writer(
    out_dir: str | os.PathLike,
    *,
    height: int,
    width: int,
    n_labels: int,
    geo: Any = None,
    prefix: str = "",
    probs: bool = False,
    entropy: bool = True,
    valid: Callable[[int, int, int, int], ArrayLike] | None = None,
) -> tuple[Callable[[int, np.ndarray], None], Callable[[], dict[str, Path]]]:
    """An ``on_rows`` sink writing GeoTIFFs with :class:`~epilsr.data.rasters.RasterWriter`.

    Writes ``<prefix>labels.tif`` (uint8 argmax, :data:`epilsr.tiling.NODATA_LABEL` where
    ``valid`` is False), optionally ``<prefix>probs.tif`` (float32 ``[H, W, n]``) and
    ``<prefix>entropy.tif`` (nats). Returns ``(on_rows, close)``; ``close()`` finalises the
    files and returns their paths.
    """
    from epilsr.data.rasters import RasterWriter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = dict(height=height, width=width, geo=geo)
    writers = {"labels": RasterWriter(out_dir / f"{prefix}labels.tif", dtype=np.uint8,
                                      nodata=NODATA_LABEL, **common)}
    if probs:
        writers["probs"] = RasterWriter(out_dir / f"{prefix}probs.tif", dtype=np.float32,
                                        bands=n_labels, nodata=float("nan"), **common)
    if entropy:
        writers["entropy"] = RasterWriter(out_dir / f"{prefix}entropy.tif", dtype=np.float32,
                                          nodata=float("nan"), **common)

    def on_rows(row0: int, p: np.ndarray) -> None:
        nodata = np.zeros(p.shape[:2], bool)
        if valid is not None:
            nodata = ~np.asarray(valid(row0, 0, p.shape[0], width), bool)
        lab = np.argmax(p, axis=-1).astype(np.uint8)
        lab[nodata] = NODATA_LABEL
        writers["labels"].write(lab)
        if "probs" in writers:
            writers["probs"].write(np.where(nodata[..., None], np.nan, p))
        if "entropy" in writers:
            with np.errstate(divide="ignore", invalid="ignore"):
                ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)
            writers["entropy"].write(np.where(nodata, np.nan, ent).astype(np.float32))

    def close() -> dict[str, Path]:
        for w in writers.values():
            w.close()
        return {name: w.path for name, w in writers.items()}

    return on_rows, close
