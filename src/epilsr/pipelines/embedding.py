"""Dataset embedding: Eqs. 6 and 11 accumulated over many labelled tiles, sharded over devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from tqdm.auto import tqdm

from epilsr.correlate import resolve_route
from epilsr.embed import (
    accumulate_classes,
    accumulate_labels,
    make_accumulate_step,
)
from epilsr.epitome import Epitome
from epilsr.lsr import super_resolve
from epilsr.metrics import NODATA_LABEL
from epilsr.parallel import replicate, shard_batch
from epilsr.samplers import sample_labelled_patches

__all__ = [
    "check_label_maps",
    "centre_valid",
    "embed_label_maps",
    "embed_class_maps",
    "all_tile_lsr",
]


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
    ignore: int | None = NODATA_LABEL,
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


def centre_valid(
    labels: ArrayLike, *, patch_size: int, ignore: int | None = NODATA_LABEL
) -> np.ndarray:
    """``[T, H-K+1, W-K+1]`` bool: windows whose centre pixel is not no-data."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels[None]
    k = patch_size
    c = k // 2
    centre = labels[:, c : labels.shape[1] - k + 1 + c, c : labels.shape[2] - k + 1 + c]
    return np.ones(centre.shape, bool) if ignore is None else centre != ignore


def _shard(x: jax.Array, mesh) -> jax.Array:
    if mesh is None:
        return x
    return shard_batch(np.asarray(x), mesh)


def _embed_loop(
    key, epitome, draw, fn, n_out, *, num_batches, batch, mesh, temperature, route, progress,
    desc,
):
    if mesh is not None and batch % mesh.devices.size:
        raise ValueError(f"batch: {batch} is not divisible by the {mesh.devices.size} devices")
    if num_batches < 1 or batch < 1:
        raise ValueError(f"num_batches, batch: expected positive, got {num_batches}, {batch}")
    step = make_accumulate_step(fn, mesh=mesh, temperature=temperature, route=route)
    counts = jnp.zeros((*epitome.prior_logits.shape, n_out), jnp.float32)
    if mesh is not None:
        counts, epitome = replicate(counts, mesh), replicate(epitome, mesh)
    draw = jax.jit(draw)
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
    ignore: int | None = NODATA_LABEL,
    mesh: jax.sharding.Mesh | None = None,
    route: str = "auto",
    method: str | None = None,
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
      route: correlation route (any, sharded or not); ``method``: its deprecated alias.
      progress: tqdm bar.

    Returns:
      ``[L, N1, N2, n]`` counts ``z``; :func:`label_probs_from_counts` normalises them.
    """
    route = resolve_route(route, method)
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
                       batch=batch, mesh=mesh, temperature=t, route=route, progress=progress,
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
    ignore: int | None = NODATA_LABEL,
    mesh: jax.sharding.Mesh | None = None,
    route: str = "auto",
    method: str | None = None,
    progress: bool = False,
) -> jax.Array:
    """Low-resolution class embedding over a dataset (Eq. 11, Sec. 5.1).

    Patches ``K x K`` (11 in the paper) are drawn uniformly among windows whose centre pixel has
    a class; the centre pixel's class is embedded over the whole window of every position,
    weighted by the posterior. Arguments as :func:`embed_label_maps`.

    Returns:
      ``[L, N1, N2, Cc]`` counts (``p(m, n | c)`` after normalising over positions).
    """
    route = resolve_route(route, method)
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
                       route=route, progress=progress, desc="embed classes")


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
