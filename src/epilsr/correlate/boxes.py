"""Circular box sums over windows and their adjoint (the patch-independent terms of Eq. 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["box_sum", "box_spread"]


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
