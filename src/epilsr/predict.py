"""Dense segmentation with an epitome (paper Eq. 2).

For a patch ``x`` at image position ``(r, c)`` the label distribution it predicts for its pixel
``u = (i, j)`` is ``y[u] = sum_s p(s|x) p(l | s + u)``: the adjoint (in the kernel) of the
likelihood's correlation, so no per-patch loop and no ``[B, L, N, N, n]`` tensor. Each pixel's
prediction is the mean of ``y`` over the patches that cover it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from epilsr._validate import check_finite, check_rank
from epilsr.correlate import circular_correlate
from epilsr.epitome import Epitome, as_float_image
from epilsr.likelihood import log_posterior

__all__ = ["predict", "patch_label_predictions", "patch_grid"]


def patch_label_predictions(
    label_probs: jax.Array,
    posteriors: jax.Array,
    *,
    patch_size: tuple[int, int],
    method: str = "auto",
) -> jax.Array:
    """Eq. 2 for whole patches: ``y[b, u, :] = sum_{l, s} p(s|x_b) label_probs[l, s + u, :]``.

    Args:
      label_probs: ``[L, N1, N2, n]`` ``p(l | m, n)``.
      posteriors: ``[B, L, N1, N2]`` ``p(s | x_b)``.
      patch_size: ``(K1, K2)``.
      method: correlation route.

    Returns:
      ``[B, K1, K2, n]``.
    """
    b = posteriors.shape[0]
    zeros = jnp.zeros((b, *patch_size, label_probs.shape[-1]), posteriors.dtype)
    _, vjp = jax.vjp(lambda k: circular_correlate(label_probs, k, method=method), zeros)
    return vjp(posteriors)[0]


def patch_grid(size: int, k: int, stride: int) -> jax.Array:
    """Top-left window coordinates along one axis: ``0, stride, ...`` and always ``size - k``."""
    starts = list(range(0, size - k + 1, stride))
    if starts[-1] != size - k:
        starts.append(size - k)
    return jnp.asarray(starts, jnp.int32)


def predict(
    epitome: Epitome,
    label_probs: ArrayLike,
    image: ArrayLike,
    *,
    patch_size: int,
    temperature: float | ArrayLike,
    stride: int = 1,
    mask: ArrayLike | None = None,
    chunk: int = 256,
    method: str = "auto",
) -> jax.Array:
    """Dense label probabilities of an image (Eq. 2).

    Every ``K x K`` window of the image on a ``stride`` grid (the last row/column of windows is
    always included, so every pixel is covered) predicts labels for all its pixels; a pixel's
    output is the mean over the windows covering it. ``stride=1`` is exact Eq. 2 over all
    covering patches; larger strides trade accuracy for ``stride^2`` less work.

    Args:
      epitome: :class:`Epitome` ``[L, N1, N2, C]``.
      label_probs: ``[L, N1, N2, n]`` label embedding ``p(l | m, n)``.
      image: ``[H, W, C]`` (uint8/uint16 scaled to ``[0, 1]``), ``H, W >= K``.
      patch_size: ``K``.
      temperature: posterior temperature ``T``.
      stride: window spacing, ``1 <= stride <= K``.
      mask: optional ``[L, N1, N2]`` allowed positions.
      chunk: patches per posterior batch (bounds memory to ``chunk * L * N1 * N2`` floats).
      method: correlation route.

    Returns:
      ``[H, W, n]`` per-pixel label distributions.
    """
    image = as_float_image(image)
    check_finite("image", image)
    label_probs = jnp.asarray(label_probs, jnp.float32)
    check_rank("label_probs", label_probs, 4, "[L, N1, N2, n]")
    if label_probs.shape[:3] != epitome.prior_logits.shape:
        raise ValueError(
            f"label_probs: expected leading shape {epitome.prior_logits.shape} ([L, N1, N2]), "
            f"got {label_probs.shape}"
        )
    h, w, c = image.shape
    k = patch_size
    if not 1 <= k <= min(h, w):
        raise ValueError(f"patch_size: expected 1 <= K <= {min(h, w)} (image {h}x{w}), got {k}")
    if not 1 <= stride <= k:
        raise ValueError(
            f"stride: expected 1 <= stride <= patch_size ({k}) so every pixel is covered, "
            f"got {stride}"
        )
    rows, cols = patch_grid(h, k, stride), patch_grid(w, k, stride)
    rr, cc = jnp.meshgrid(rows, cols, indexing="ij")
    starts = jnp.stack([rr.ravel(), cc.ravel()], axis=1)  # [P, 2]
    p = starts.shape[0]
    chunk = min(chunk, p)
    n_chunks = -(-p // chunk)
    pad = n_chunks * chunk - p
    valid = jnp.pad(jnp.ones((p,), jnp.float32), (0, pad)).reshape(n_chunks, chunk)
    starts = jnp.pad(starts, ((0, pad), (0, 0))).reshape(n_chunks, chunk, 2)
    n = label_probs.shape[-1]
    offs = jnp.arange(k)

    def body(carry, xs):
        acc, count = carry
        st, wt = xs
        patches = jax.vmap(lambda s: jax.lax.dynamic_slice(image, (s[0], s[1], 0), (k, k, c)))(st)
        post = jnp.exp(
            log_posterior(epitome, patches, temperature=temperature, mask=mask, method=method)
        )
        y = patch_label_predictions(label_probs, post, patch_size=(k, k), method=method)
        y = y * wt[:, None, None, None]
        r = st[:, 0, None, None] + offs[None, :, None]  # [B, K, 1]
        q = st[:, 1, None, None] + offs[None, None, :]  # [B, 1, K]
        acc = acc.at[r, q].add(y)
        count = count.at[r, q].add(jnp.broadcast_to(wt[:, None, None], (st.shape[0], k, k)))
        return (acc, count), None

    init = (jnp.zeros((h, w, n), jnp.float32), jnp.zeros((h, w), jnp.float32))
    (acc, count), _ = jax.lax.scan(body, init, (starts, valid))
    return acc / count[..., None]
