"""Embedding labels and classes into epitome positions (paper Eqs. 6 and 11).

Both embeddings are additive over patches, so accumulating over many batches is a sum of the
per-batch results. Neither materialises a ``[B, L, N, N, n]`` tensor: the spreading of
posteriors over windows is the adjoint of the likelihood's correlation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from epilsr._validate import check_index_range, check_rank
from epilsr.correlate import box_spread, circular_correlate_adjoint, resolve_route
from epilsr.epitome import Epitome
from epilsr.likelihood import check_patches, check_posterior_args, log_posterior
from epilsr.parallel import _auto_mesh, sum_over_shards

__all__ = [
    "embed_labels",
    "embed_classes",
    "spread_class_posteriors",
    "one_hot_labels",
    "accumulate_labels",
    "accumulate_classes",
    "make_accumulate_step",
    "label_probs_from_counts",
]


def embed_labels(
    epitome: Epitome,
    patches: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: float | ArrayLike,
    mask: ArrayLike | None = None,
    route: str = "auto",
    method: str | None = None,
) -> jax.Array:
    """Label counts ``z`` of Eq. 6, with the label block centred in the patch.

    ``z[l, m, n, :] = sum_b sum_s p(s|x_b) y_b[m - s1 - o, n - s2 - o, :]`` where
    ``o = (K - Kl) // 2``: label pixel ``(i, j)`` of a patch mapped to window ``s`` lands on
    epitome pixel ``(s1 + o + i, s2 + o + j)`` (modulo ``N``).

    Args:
      epitome: :class:`Epitome` ``[L, N1, N2, C]``.
      patches: ``[B, K, K, C]``.
      labels: ``[B, Kl, Kl, n]`` soft or one-hot labels, ``Kl <= K``.
      temperature: posterior temperature ``T``.
      mask: optional ``[L, N1, N2]`` bool of allowed positions.
      route: correlation route (:func:`epilsr.correlate.circular_correlate`); ``method``:
        its deprecated alias.

    Returns:
      ``[L, N1, N2, n]`` counts; ``sum(z) == sum_b sum(labels[b])``.
    """
    route = resolve_route(route, method)
    labels = jnp.asarray(labels)
    check_rank("labels", labels, 4, "[B, Kl, Kl, n]")
    patches = jnp.asarray(patches)
    check_rank("patches", patches, 4, "[B, K, K, C]")
    b, k1, k2, _ = patches.shape
    if labels.shape[0] != b:
        raise ValueError(f"labels: expected {b} label blocks (one per patch), got {labels.shape}")
    kl1, kl2 = labels.shape[1:3]
    if kl1 > k1 or kl2 > k2:
        raise ValueError(
            f"labels: label block {labels.shape[1:3]} is larger than the patch {(k1, k2)}"
        )
    patches = check_patches(epitome, patches)
    mask = check_posterior_args(epitome, temperature, mask)
    return _embed_labels(epitome, patches, labels, temperature, mask, route=route)


@functools.partial(jax.jit, static_argnames="route")
def _embed_labels(epitome, patches, labels, temperature, mask, *, route):
    """The compiled body of :func:`embed_labels` (inputs checked)."""
    k1, k2 = patches.shape[1:3]
    kl1, kl2 = labels.shape[1:3]
    post = jnp.exp(
        log_posterior(epitome, patches, temperature=temperature, mask=mask, route=route)
    )
    z = circular_correlate_adjoint(
        post, labels.astype(jnp.float32), map_size=epitome.size, route=route
    )
    return jnp.roll(z, ((k1 - kl1) // 2, (k2 - kl2) // 2), axis=(1, 2))


def spread_class_posteriors(
    posteriors: jax.Array, classes: jax.Array, *, n_classes: int, window: tuple[int, int]
) -> jax.Array:
    """Eq. 11 from posteriors: each window's pixels receive ``p(s|x)`` for the patch's class.

    Args:
      posteriors: ``[B, L, N1, N2]`` probabilities ``p(s|x_b)``.
      classes: ``[B]`` int class of each patch.
      n_classes: number of classes ``Cc``.
      window: patch size ``(K1, K2)``.

    Returns:
      ``[L, N1, N2, Cc]`` counts.
    """
    onehot = jax.nn.one_hot(classes, n_classes, dtype=posteriors.dtype)  # [B, Cc]
    per_class = jnp.einsum("bc,blxy->lxyc", onehot, posteriors, precision="highest")
    return box_spread(per_class, window, axes=(1, 2))


def embed_classes(
    epitome: Epitome,
    patches: ArrayLike,
    classes: ArrayLike,
    *,
    n_classes: int,
    temperature: float | ArrayLike,
    mask: ArrayLike | None = None,
    route: str = "auto",
    method: str | None = None,
) -> jax.Array:
    """Class counts of Eq. 11: every pixel of window ``s`` receives ``p(s|x)`` for ``x``'s class.

    ``z[l, m, n, c] = sum_{b: c_b = c} sum_{i, j < K} p((l, m - i, n - j) | x_b)``; normalising
    over positions gives ``p(m, n | c)``.

    Args:
      epitome: :class:`Epitome` ``[L, N1, N2, C]``.
      patches: ``[B, K, K, C]``.
      classes: ``[B]`` int in ``[0, n_classes)``.
      n_classes: ``Cc``.
      temperature: posterior temperature ``T``.
      mask: optional ``[L, N1, N2]`` bool of allowed positions.
      route: correlation route (:func:`epilsr.correlate.circular_correlate`); ``method``:
        its deprecated alias.

    Returns:
      ``[L, N1, N2, Cc]`` counts; ``sum(z[..., c]) == K^2 * #{b: c_b = c}``.
    """
    route = resolve_route(route, method)
    classes = jnp.asarray(classes)
    check_rank("classes", classes, 1, "[B]")
    patches = jnp.asarray(patches)
    check_rank("patches", patches, 4, "[B, K, K, C]")
    if classes.shape[0] != patches.shape[0]:
        raise ValueError(
            f"classes: expected one class per patch ({patches.shape[0]}), got shape {classes.shape}"
        )
    check_index_range("classes", classes, n_classes, "class")
    patches = check_patches(epitome, patches)
    mask = check_posterior_args(epitome, temperature, mask)
    return _embed_classes(epitome, patches, classes, temperature, mask, n_classes=n_classes,
                          route=route)


@functools.partial(jax.jit, static_argnames=("n_classes", "route"))
def _embed_classes(epitome, patches, classes, temperature, mask, *, n_classes, route):
    """The compiled body of :func:`embed_classes` (inputs checked)."""
    post = jnp.exp(
        log_posterior(epitome, patches, temperature=temperature, mask=mask, route=route)
    )
    return spread_class_posteriors(post, classes, n_classes=n_classes, window=patches.shape[1:3])


def one_hot_labels(labels: ArrayLike, *, n_labels: int) -> jax.Array:
    """``[...]`` int -> ``[..., n]`` float32 one-hot; values outside ``[0, n)`` (no data) -> 0."""
    return jax.nn.one_hot(jnp.asarray(labels), n_labels, dtype=jnp.float32)


def accumulate_labels(
    counts: ArrayLike,
    epitome: Epitome,
    patches: ArrayLike,
    blocks: ArrayLike,
    *,
    temperature: float | ArrayLike,
    route: str = "auto",
    method: str | None = None,
) -> jax.Array:
    """``counts + z`` with ``z`` the Eq. 6 counts of one batch.

    Args:
      counts: ``[L, N1, N2, n]`` running counts.
      epitome: :class:`Epitome`.
      patches: ``[B, K, K, C]``.
      blocks: ``[B, Kl, Kl]`` int labels centred in the patches; values outside ``[0, n)``
        (no data) are skipped.
      temperature: posterior temperature (``K^2`` in the original embedding).
      route: correlation route (:func:`epilsr.correlate.circular_correlate`); ``method``:
        its deprecated alias.

    Returns:
      ``[L, N1, N2, n]``.
    """
    route = resolve_route(route, method)
    counts = jnp.asarray(counts, jnp.float32)
    y = one_hot_labels(blocks, n_labels=counts.shape[-1])
    return counts + embed_labels(epitome, patches, y, temperature=temperature, route=route)


def accumulate_classes(
    counts: ArrayLike,
    epitome: Epitome,
    patches: ArrayLike,
    classes: ArrayLike,
    *,
    temperature: float | ArrayLike,
    route: str = "auto",
    method: str | None = None,
) -> jax.Array:
    """``counts + z`` with ``z`` the Eq. 11 counts of one batch.

    Args:
      counts: ``[L, N1, N2, Cc]``.
      patches: ``[B, K, K, C]``; classes: ``[B]`` int, values outside ``[0, Cc)`` skipped.

    Returns:
      ``[L, N1, N2, Cc]``.
    """
    route = resolve_route(route, method)
    counts = jnp.asarray(counts, jnp.float32)
    patches = jnp.asarray(patches)
    post = jnp.exp(log_posterior(epitome, patches, temperature=temperature, route=route))
    z = spread_class_posteriors(
        post, jnp.asarray(classes), n_classes=counts.shape[-1], window=patches.shape[1:3]
    )
    return counts + z


def make_accumulate_step(
    fn: Callable, *, mesh: jax.sharding.Mesh | None = None, **hyper
) -> Callable:
    """Jits ``fn(counts, epitome, patches, targets, **hyper)`` (an ``accumulate_*``).

    With a ``mesh`` (axis ``"data"``, e.g. :func:`epilsr.parallel.data_mesh`) ``patches`` and
    ``targets`` are sharded over the batch and ``counts``/``epitome`` replicated: each device
    counts its own patches (``jax.shard_map``, so every correlation route stays data-parallel)
    and the counts are summed over the devices (``psum``). The result equals the single-device
    step up to float32 reduction order. The batch must be divisible by the number of devices.
    """
    part = functools.partial(fn, **hyper)
    if mesh is None:
        return jax.jit(part)
    mesh = _auto_mesh(mesh)

    batch_counts = sum_over_shards(  # each device's share of the batch, then one psum
        lambda counts, epitome, patches, targets: part(jnp.zeros_like(counts), epitome,
                                                       patches, targets), mesh, 2)

    def step(counts, epitome, patches, targets):
        return counts + batch_counts(counts, epitome, patches, targets)

    rep, bat = PartitionSpec(), PartitionSpec("data")
    return jax.jit(step, in_shardings=tuple(NamedSharding(mesh, p) for p in (rep, rep, bat, bat)),
                   out_shardings=NamedSharding(mesh, rep))


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
