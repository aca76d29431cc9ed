"""Wrap-around (circular) correlation of patch batches with epitome-sized maps, and box sums.

The patch-dependent part of ``log p(x|s)`` (paper Eq. 5) is a sum of circular correlations

    out[b, l, s1, s2] = sum_{i, j, f} maps[l, (s1 + i) % N1, (s2 + j) % N2, f] * kernels[b, i, j, f]

computed by one of two routes behind :func:`circular_correlate`:

* ``"direct"``: wrap-pad the maps by ``K - 1`` and run one ``lax.conv`` whose output channels
  are the patches (``O(B L N^2 K^2 F)``, excellent for small ``K``);
* ``"fft"``: wrap-pad the maps to ``N + K - 1``, zero-pad both sides to a smooth FFT length
  ``M >= N + K - 1`` (prime ``N`` such as 299 or 499 never hits a slow transform), multiply
  in the frequency domain, sum over the ``F`` feature channels *before* the single inverse
  transform per (patch, layer) (``O((B + L) F M^2 log M + B L F M^2)``).

``"auto"`` picks by a flop model calibrated on CPU. The adjoint (spreading values from
positions back over their windows, used by the embeddings of Eqs. 6 and 11) is obtained as the
exact VJP of the correlation, so both stay consistent by construction.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "circular_correlate",
    "circular_correlate_adjoint",
    "box_sum",
    "box_spread",
    "fft_size",
    "wrap_pad",
]

_HIGHEST = lax.Precision.HIGHEST


@functools.cache
def fft_size(n: int) -> int:
    """Smallest 7-smooth integer ``>= n`` (a fast length for any FFT library)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def wrap_pad(
    x: jax.Array, axes: tuple[int, int], lengths: tuple[int, int], starts: tuple[int, int] = (0, 0)
) -> jax.Array:
    """Circular extension: ``out[..., t1, t2, ...] = x[..., (t1 + a1) % N1, (t2 + a2) % N2, ...]``.

    Args:
      x: array with spatial axes ``axes``.
      axes: the two spatial axes.
      lengths: output lengths along ``axes``.
      starts: offsets ``(a1, a2)`` of the first output index (may be negative).
    """
    for ax, length, start in zip(axes, lengths, starts, strict=True):
        n = x.shape[ax]
        idx = (jnp.arange(length) + start) % n
        x = jnp.take(x, idx, axis=ax)
    return x


def _correlate_direct(maps: jax.Array, kernels: jax.Array) -> jax.Array:
    _, n1, n2, _ = maps.shape
    _, k1, k2, _ = kernels.shape
    padded = wrap_pad(maps, (1, 2), (n1 + k1 - 1, n2 + k2 - 1))
    rhs = jnp.transpose(kernels, (1, 2, 3, 0))  # [K1, K2, F, B]
    out = lax.conv_general_dilated(
        padded,
        rhs,
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=_HIGHEST,
    )  # [L, N1, N2, B]
    return jnp.transpose(out, (3, 0, 1, 2))


def _fft_plan(n: int, k: int) -> tuple[int, bool]:
    """FFT length along one axis and whether the maps need wrap-padding first."""
    padded = fft_size(n + k - 1)
    if fft_size(n) == n and n <= padded:
        return n, False  # n is already smooth: a plain circular transform of length n
    return padded, True


def _correlate_fft(maps: jax.Array, kernels: jax.Array) -> jax.Array:
    _, n1, n2, _ = maps.shape
    _, k1, k2, _ = kernels.shape
    m1, pad1 = _fft_plan(n1, k1)
    m2, pad2 = _fft_plan(n2, k2)
    if pad1 or pad2:
        maps = wrap_pad(maps, (1, 2), (n1 + k1 - 1 if pad1 else n1, n2 + k2 - 1 if pad2 else n2))
    # Channel-first so the transforms run over the trailing axes.
    a = jnp.fft.rfft2(jnp.moveaxis(maps, -1, 1), s=(m1, m2))  # [L, F, M1, M2r]
    p = jnp.fft.rfft2(jnp.moveaxis(kernels, -1, 1), s=(m1, m2))  # [B, F, M1, M2r]
    prod = jnp.einsum("lfxy,bfxy->blxy", a, jnp.conj(p), precision=_HIGHEST)
    out = jnp.fft.irfft2(prod, s=(m1, m2))
    return out[..., :n1, :n2]


def _prefers_fft(maps_shape, kernels_shape) -> bool:
    """Flop model: direct ``B L N^2 K^2 F`` MACs vs transforms plus frequency products.

    The direct route runs through a tuned convolution, so its flops are cheaper; the
    constant was measured on a 2-core x86 CPU (see benchmarks/correlate_crossover.py).
    """
    lyr, n1, n2, f = maps_shape
    b, k1, k2, _ = kernels_shape
    m1, _ = _fft_plan(n1, k1)
    m2, _ = _fft_plan(n2, k2)
    direct = b * lyr * n1 * n2 * k1 * k2 * f
    logm = math.log2(m1 * m2)
    fft = (b * f + lyr * f + b * lyr) * m1 * m2 * logm * 2.5 + 4 * b * lyr * f * m1 * m2 / 2
    return direct > 4.0 * fft


def circular_correlate(maps: jax.Array, kernels: jax.Array, *, method: str = "auto") -> jax.Array:
    """Circular correlation of every kernel with every map layer.

    Args:
      maps: ``[L, N1, N2, F]`` epitome-side maps.
      kernels: ``[B, K1, K2, F]`` patch-side kernels, ``K1 <= N1``, ``K2 <= N2``.
      method: ``"auto"``, ``"direct"`` or ``"fft"``.

    Returns:
      ``[B, L, N1, N2]`` with
      ``out[b, l, s] = sum_{u, f} maps[l, (s + u) % N, f] kernels[b, u, f]``.
    """
    if maps.ndim != 4 or kernels.ndim != 4 or maps.shape[-1] != kernels.shape[-1]:
        raise ValueError(
            f"circular_correlate: expected maps [L, N1, N2, F] and kernels [B, K1, K2, F], "
            f"got {maps.shape} and {kernels.shape}"
        )
    if kernels.shape[1] > maps.shape[1] or kernels.shape[2] > maps.shape[2]:
        raise ValueError(
            f"patch size {kernels.shape[1:3]} is larger than the epitome {maps.shape[1:3]}"
        )
    if method == "auto":
        method = "fft" if _prefers_fft(maps.shape, kernels.shape) else "direct"
    if method == "direct":
        return _correlate_direct(maps, kernels)
    if method == "fft":
        return _correlate_fft(maps, kernels)
    raise ValueError(f"method: expected 'auto', 'direct' or 'fft', got {method!r}")


def circular_correlate_adjoint(
    weights: jax.Array, kernels: jax.Array, *, map_size: tuple[int, int], method: str = "auto"
) -> jax.Array:
    """Adjoint of :func:`circular_correlate` in ``maps``: spreads position weights over windows.

    ``out[l, m, f] = sum_b sum_u weights[b, l, (m - u) % N] * kernels[b, u, f]``.

    Args:
      weights: ``[B, L, N1, N2]`` (e.g. posteriors).
      kernels: ``[B, K1, K2, F]`` (e.g. label blocks placed in their windows).
      map_size: ``(N1, N2)``.
      method: as for :func:`circular_correlate`.

    Returns:
      ``[L, N1, N2, F]``.
    """
    b, lyr = weights.shape[:2]
    zeros = jnp.zeros((lyr, *map_size, kernels.shape[-1]), weights.dtype)
    _, vjp = jax.vjp(lambda m: circular_correlate(m, kernels, method=method), zeros)
    return vjp(weights)[0]


def _box_1d(x: jax.Array, k: int, axis: int, reverse: bool) -> jax.Array:
    n = x.shape[axis]
    start = -(k - 1) if reverse else 0
    idx = (jnp.arange(n + k - 1) + start) % n
    padded = jnp.take(x, idx, axis=axis)
    window = [1] * x.ndim
    window[axis] = k
    return lax.reduce_window(
        padded, np.zeros((), x.dtype), lax.add, tuple(window), (1,) * x.ndim, "VALID"
    )


def box_sum(x: jax.Array, size: tuple[int, int], *, axes: tuple[int, int] = (-2, -1)) -> jax.Array:
    """Circular box sum over windows by their top-left corner.

    ``out[s1, s2] = sum_{i < K1, j < K2} x[(s1 + i) % N1, (s2 + j) % N2]`` along ``axes``.
    Separable (``O(N^2 (K1 + K2))``) and summed directly, so float32 stays accurate.
    """
    a1, a2 = (ax % x.ndim for ax in axes)
    return _box_1d(_box_1d(x, size[0], a1, False), size[1], a2, False)


def box_spread(
    x: jax.Array, size: tuple[int, int], *, axes: tuple[int, int] = (-2, -1)
) -> jax.Array:
    """Adjoint of :func:`box_sum`: every position's value spread over its window.

    ``out[m, n] = sum_{i < K1, j < K2} x[(m - i) % N1, (n - j) % N2]`` (Eq. 11's spreading).
    """
    a1, a2 = (ax % x.ndim for ax in axes)
    return _box_1d(_box_1d(x, size[0], a1, True), size[1], a2, True)
