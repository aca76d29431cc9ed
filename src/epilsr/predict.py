"""Dense segmentation with an epitome (paper Eq. 2).

For a patch ``x`` at image position ``(r, c)`` the label distribution it predicts for its pixel
``u = (i, j)`` is ``y[u] = sum_s p(s|x) p(l | s + u)``: the adjoint (in the kernel) of the
likelihood's correlation, so no per-patch loop and no ``[B, L, N, N, n]`` tensor. Each pixel's
prediction is the mean of ``y`` over the patches that cover it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.typing import ArrayLike

from epilsr._validate import check_rank
from epilsr.correlate import circular_correlate, resolve_route, wrap_pad
from epilsr.epitome import Epitome, as_float_image, check_image
from epilsr.likelihood import check_posterior_args, log_posterior
from epilsr.parallel import _auto_mesh, sum_over_shards
from epilsr.windows import grid_starts

__all__ = [
    "predict",
    "patch_label_predictions",
    "patch_grid",
    "grid_starts",
    "window_sums",
    "check_predict_inputs",
]


def patch_label_predictions(
    label_probs: jax.Array,
    posteriors: jax.Array,
    *,
    patch_size: tuple[int, int],
    route: str = "auto",
    method: str | None = None,
) -> jax.Array:
    """Eq. 2 for whole patches: ``y[b, u, :] = sum_{l, s} p(s|x_b) label_probs[l, s + u, :]``.

    Args:
      label_probs: ``[L, N1, N2, n]`` ``p(l | m, n)``.
      posteriors: ``[B, L, N1, N2]`` ``p(s | x_b)``.
      patch_size: ``(K1, K2)``.
      route: correlation route (:func:`epilsr.correlate.circular_correlate`); ``method``:
        its deprecated alias.

    Returns:
      ``[B, K1, K2, n]``.
    """
    route = resolve_route(route, method)
    b = posteriors.shape[0]
    zeros = jnp.zeros((b, *patch_size, label_probs.shape[-1]), posteriors.dtype)
    _, vjp = jax.vjp(lambda k: circular_correlate(label_probs, k, route=route), zeros)
    return vjp(posteriors)[0]


_CENTRE_BUDGET = 1 << 26  # bytes of unfolded centre-block label windows (else the adjoint route)


def _centre_label_windows(label_probs: jax.Array, patch_size: int, label_size: int) -> jax.Array:
    """``[L, N1, N2, n] -> [L*N1*N2, Kl*Kl*n]``: row ``s`` holds ``label_probs[s + o + (i, j)]``
    (wrapping, ``o = (K - Kl) // 2``) for the ``Kl x Kl`` centre offsets ``(i, j)``, features
    ``(i, j, l)`` like ``block.reshape(-1)``."""
    o = (patch_size - label_size) // 2
    lyr, n1, n2, n = label_probs.shape
    padded = wrap_pad(label_probs, axes=(1, 2), lengths=(n1 + label_size - 1,
                                                         n2 + label_size - 1), starts=(o, o))
    shifted = [padded[:, i : i + n1, j : j + n2]
               for i in range(label_size) for j in range(label_size)]
    return jnp.stack(shifted, axis=3).reshape(lyr * n1 * n2, label_size * label_size * n)


def _centre_label_predictions(windows: jax.Array, posteriors: jax.Array, label_size: int
                             ) -> jax.Array:
    """Eq. 2 for the centre ``Kl x Kl`` block only, one matrix product:
    ``y[b, i, j, :] = sum_s p(s|x_b) label_probs[s + o + (i, j)]``, i.e.
    ``patch_label_predictions(...)[:, o:o+Kl, o:o+Kl]`` at ``Kl^2 / K^2`` of its work.

    Args:
      windows: ``[S, Kl*Kl*n]`` from :func:`_centre_label_windows`.
      posteriors: ``[B, L, N1, N2]`` ``p(s | x_b)``.

    Returns:
      ``[B, Kl, Kl, n]``.
    """
    b = posteriors.shape[0]
    y = jnp.matmul(posteriors.reshape(b, -1), windows, precision="highest")
    return y.reshape(b, label_size, label_size, -1)


def _use_centre_windows(label_probs_shape, k: int, kl: int) -> bool:
    """The centre-block product when a window predicts a strict centre block whose unfolded
    label windows fit ``_CENTRE_BUDGET`` (always fewer flops than the ``K x K`` adjoint)."""
    return kl < k and 4 * math.prod(label_probs_shape) * kl * kl <= _CENTRE_BUDGET


def patch_grid(size: int, k: int, stride: int) -> jax.Array:
    """Top-left window coordinates along one axis: ``0, stride, ...`` and always ``size - k``."""
    return jnp.asarray(grid_starts(size, k, stride), jnp.int32)


def check_predict_inputs(
    epitome: Epitome,
    label_probs: ArrayLike,
    *,
    image_shape: tuple[int, ...],
    patch_size: int,
    label_size: int | None,
    stride: int,
) -> tuple[jax.Array, int, int]:
    """Shape checks shared by :func:`predict` and tiled prediction.

    Returns ``(label_probs float32, Kl, o)`` with ``Kl = label_size or K`` and
    ``o = (K - Kl) // 2``.
    """
    epitome.check()
    label_probs = jnp.asarray(label_probs, jnp.float32)
    check_rank("label_probs", label_probs, 4, "[L, N1, N2, n]")
    if label_probs.shape[:3] != epitome.prior_logits.shape:
        raise ValueError(
            f"label_probs: expected leading shape {epitome.prior_logits.shape} ([L, N1, N2]), "
            f"got {label_probs.shape}"
        )
    if len(image_shape) != 3:
        raise ValueError(f"image: expected rank 3 [H, W, C], got shape {tuple(image_shape)}")
    h, w, c = image_shape
    if c != epitome.channels:
        raise ValueError(
            f"image: expected {epitome.channels} channels to match the epitome, got {c} "
            f"(image shape {tuple(image_shape)})"
        )
    k = patch_size
    if int(k) != k or not 1 <= k <= min(epitome.size):
        raise ValueError(f"patch_size: expected 1 <= K <= {min(epitome.size)} (the epitome "
                         f"size), got {k}")
    kl = k if label_size is None else label_size
    if int(kl) != kl or not 1 <= kl <= k or (k - kl) % 2:
        raise ValueError(
            f"label_size: expected 1 <= Kl <= patch_size ({k}) with K - Kl even (a centred "
            f"block), got {label_size}"
        )
    o = (k - kl) // 2
    if not kl <= min(h, w) or (o and o >= min(h, w)):
        what = "patch_size" if label_size is None else "label_size"
        raise ValueError(
            f"{what}: expected {'K' if label_size is None else 'Kl'} <= {min(h, w)} "
            f"(image {h}x{w}) and a margin (K - Kl) / 2 < {min(h, w)}, got K={k}, Kl={kl}"
        )
    if not 1 <= stride <= kl:
        bound = "patch_size" if label_size is None else "label_size"
        raise ValueError(
            f"stride: expected 1 <= stride <= {bound} ({kl}) so every pixel is covered, "
            f"got {stride}"
        )
    return label_probs, kl, o


def window_sums(
    epitome: Epitome,
    label_probs: jax.Array,
    image: jax.Array,
    starts: jax.Array,
    weights: jax.Array,
    *,
    patch_size: int,
    label_size: int | None = None,
    temperature: float | ArrayLike,
    mask: ArrayLike | None = None,
    chunk: int = 256,
    route: str = "auto",
    method: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Unnormalised Eq. 2 sums of the windows ``starts`` of one image (or raster tile).

    Window ``b`` (top-left ``starts[b]``, ``K x K``) adds ``weights[b] * y_b[u]`` for the pixels
    ``u`` of its centre ``Kl x Kl`` block (the whole window when ``label_size`` is None), with
    ``y_b[u] = sum_s p(s|x_b) label_probs[s + u]``. Summing these over a partition of the
    windows of a raster gives the same result as one call on the whole raster, which is what
    tiled prediction relies on.

    Args:
      epitome: :class:`Epitome` ``[L, N1, N2, C]``.
      label_probs: ``[L, N1, N2, n]``.
      image: ``[H, W, C]`` float32.
      starts: ``[P, 2]`` int window corners, ``P`` a multiple of ``chunk`` (pad with weight 0).
      weights: ``[P]`` float (0 = padding).
      patch_size: ``K``; label_size: ``Kl`` (centre block) or None.
      temperature, mask, route, method: as in :func:`predict`.
      chunk: windows per posterior batch.

    Returns:
      ``(acc [H, W, n], count [H, W])``.
    """
    route = resolve_route(route, method)
    h, w, c = image.shape
    k = patch_size
    kl = k if label_size is None else label_size
    o = (k - kl) // 2
    n = label_probs.shape[-1]
    p = starts.shape[0]
    starts = starts.reshape(p // chunk, chunk, 2)
    weights = weights.reshape(p // chunk, chunk).astype(jnp.float32)
    offs = jnp.arange(kl)
    centre = _use_centre_windows(label_probs.shape, k, kl)
    windows = _centre_label_windows(label_probs, k, kl) if centre else None

    def body(carry, xs):
        acc, count = carry
        st, wt = xs
        patches = jax.vmap(lambda s: jax.lax.dynamic_slice(image, (s[0], s[1], 0), (k, k, c)))(st)
        post = jnp.exp(
            log_posterior(epitome, patches, temperature=temperature, mask=mask, route=route)
        )
        if centre:
            y = _centre_label_predictions(windows, post, kl)
        else:
            y = patch_label_predictions(label_probs, post, patch_size=(k, k), route=route)
            y = y[:, o : o + kl, o : o + kl]
        y = y * wt[:, None, None, None]
        r = st[:, 0, None, None] + o + offs[None, :, None]  # [B, Kl, 1]
        q = st[:, 1, None, None] + o + offs[None, None, :]  # [B, 1, Kl]
        acc = acc.at[r, q].add(y)
        count = count.at[r, q].add(jnp.broadcast_to(wt[:, None, None], (st.shape[0], kl, kl)))
        return (acc, count), None

    init = (jnp.zeros((h, w, n), jnp.float32), jnp.zeros((h, w), jnp.float32))
    (acc, count), _ = jax.lax.scan(body, init, (starts, weights))
    return acc, count


def predict(
    epitome: Epitome,
    label_probs: ArrayLike,
    image: ArrayLike,
    *,
    patch_size: int,
    temperature: float | ArrayLike,
    stride: int = 1,
    label_size: int | None = None,
    mask: ArrayLike | None = None,
    chunk: int = 256,
    route: str = "auto",
    method: str | None = None,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Dense label probabilities of an image (Eq. 2).

    Every ``K x K`` window of the image on a ``stride`` grid (the last row/column of windows is
    always included, so every pixel is covered) predicts labels for all its pixels; a pixel's
    output is the mean over the windows covering it. ``stride=1`` is exact Eq. 2 over all
    covering patches; larger strides trade accuracy for ``stride^2`` less work.

    With ``label_size=Kl`` each window predicts only its centre ``Kl x Kl`` block (the paper's
    scheme, matching a label embedding of centre blocks, Sec. 5.1): the image is reflect-padded
    by ``(K - Kl) / 2`` so that border pixels are centre pixels of some window, and the blocks
    lie on a ``stride`` grid (``stride <= Kl``; ``stride = Kl`` tiles the image with blocks).

    Args:
      epitome: :class:`Epitome` ``[L, N1, N2, C]``.
      label_probs: ``[L, N1, N2, n]`` label embedding ``p(l | m, n)``.
      image: ``[H, W, C]`` (uint8/uint16 scaled to ``[0, 1]``), ``H, W >= K`` (``>= Kl`` with
        ``label_size``).
      patch_size: ``K``.
      temperature: posterior temperature ``T``.
      stride: window spacing, ``1 <= stride <= K`` (``<= Kl``).
      label_size: ``Kl``: predict the centre block only (``K - Kl`` even); None = whole window.
      mask: optional ``[L, N1, N2]`` allowed positions.
      chunk: patches per posterior batch (bounds memory to ``chunk * L * N1 * N2`` floats).
      route: correlation route (:func:`epilsr.correlate.circular_correlate`); ``method``:
        its deprecated alias.
      mesh: optional 1-D mesh with axis ``"data"`` (:func:`epilsr.parallel.data_mesh`): the
        windows are divided among its devices, each sums its own (``jax.shard_map``) and one
        ``psum`` adds them; equal to one device up to float32 summation order. A CPU split
        into devices (:func:`epilsr.parallel.use_cpu_devices`; one CPU device runs the
        posterior's block DFTs on about one core): 1.2x on 2 cores for a 256^2 image at
        ``K = 31 -> 11``, stride 11 (``benchmarks/RESULTS.md``).

    Returns:
      ``[H, W, n]`` per-pixel label distributions.
    """
    route = resolve_route(route, method)
    image = check_image(image)
    h, w, _ = image.shape
    k = patch_size
    if label_size is None and (int(k) != k or not 1 <= k <= min(h, w)):
        raise ValueError(f"patch_size: expected 1 <= K <= {min(h, w)} (image {h}x{w}), got {k}")
    label_probs, _, _ = check_predict_inputs(
        epitome, label_probs, image_shape=image.shape, patch_size=k, label_size=label_size,
        stride=stride,
    )
    mask = check_posterior_args(epitome, temperature, mask)
    mesh = None if mesh is None else _auto_mesh(mesh)
    return _predict(epitome, label_probs, image, temperature, mask, patch_size=k, stride=stride,
                    label_size=label_size, chunk=chunk, route=route, mesh=mesh)


@functools.partial(
    jax.jit, static_argnames=("patch_size", "stride", "label_size", "chunk", "route", "mesh")
)
def _predict(epitome, label_probs, image, temperature, mask, *, patch_size, stride, label_size,
             chunk, route, mesh=None):
    """The compiled body of :func:`predict` (inputs checked)."""
    image = as_float_image(image)
    h, w, _ = image.shape
    k = patch_size
    kl = k if label_size is None else label_size
    o = (k - kl) // 2
    if o:
        image = jnp.pad(image, ((o, o), (o, o), (0, 0)), mode="reflect")
    # block corners on the (unpadded) grid == window corners in padded coordinates
    rows, cols = patch_grid(h, kl, stride), patch_grid(w, kl, stride)
    rr, cc = jnp.meshgrid(rows, cols, indexing="ij")
    starts = jnp.stack([rr.ravel(), cc.ravel()], axis=1)  # [P, 2]
    p = starts.shape[0]
    devices = 1 if mesh is None else mesh.devices.size
    per = -(-p // devices)  # windows per device
    chunk = -(-per // -(-per // min(chunk, per)))  # as many batches as needed, less padding
    pad = devices * -(-per // chunk) * chunk - p
    weights = jnp.pad(jnp.ones((p,), jnp.float32), (0, pad))
    starts = jnp.pad(starts, ((0, pad), (0, 0)))
    sums = functools.partial(window_sums, patch_size=k, label_size=label_size, chunk=chunk,
                             route=route)
    if mesh is None:
        acc, count = sums(epitome, label_probs, image, starts, weights, temperature=temperature,
                          mask=mask)
    else:  # the windows divided among the devices, their sums added
        acc, count = sum_over_shards(
            lambda e, lp, im, t, m, st, wt: sums(e, lp, im, st, wt, temperature=t, mask=m),
            mesh, 5)(epitome, label_probs, image, temperature, mask, starts, weights)
    acc, count = acc[o : o + h, o : o + w], count[o : o + h, o : o + w]
    return acc / count[..., None]
