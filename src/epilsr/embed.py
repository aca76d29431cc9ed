"""Embedding labels and classes into epitome positions (paper Eqs. 6 and 11).

Both embeddings are additive over patches, so accumulating over many batches is a sum of the
per-batch results. Neither materialises a ``[B, L, N, N, n]`` tensor: the spreading of
posteriors over windows is the adjoint of the likelihood's correlation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from epilsr._validate import check_index_range, check_rank
from epilsr.correlate import box_spread, circular_correlate_adjoint
from epilsr.epitome import Epitome
from epilsr.likelihood import log_posterior

__all__ = ["embed_labels", "embed_classes", "spread_class_posteriors"]


def embed_labels(
    epitome: Epitome,
    patches: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: float | ArrayLike,
    mask: ArrayLike | None = None,
    method: str = "auto",
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
      method: correlation route.

    Returns:
      ``[L, N1, N2, n]`` counts; ``sum(z) == sum_b sum(labels[b])``.
    """
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
    post = jnp.exp(
        log_posterior(epitome, patches, temperature=temperature, mask=mask, method=method)
    )
    z = circular_correlate_adjoint(
        post, labels.astype(jnp.float32), map_size=epitome.size, method=method
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
    method: str = "auto",
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
      method: correlation route.

    Returns:
      ``[L, N1, N2, Cc]`` counts; ``sum(z[..., c]) == K^2 * #{b: c_b = c}``.
    """
    classes = jnp.asarray(classes)
    check_rank("classes", classes, 1, "[B]")
    patches = jnp.asarray(patches)
    check_rank("patches", patches, 4, "[B, K, K, C]")
    if classes.shape[0] != patches.shape[0]:
        raise ValueError(
            f"classes: expected one class per patch ({patches.shape[0]}), got shape {classes.shape}"
        )
    check_index_range("classes", classes, n_classes, "class")
    post = jnp.exp(
        log_posterior(epitome, patches, temperature=temperature, mask=mask, method=method)
    )
    return spread_class_posteriors(post, classes, n_classes=n_classes, window=patches.shape[1:3])
