"""Wrap-around (circular) correlation of patch batches with epitome-sized maps, and box sums.

The patch-dependent part of ``log p(x|s)`` (paper Eq. 5) is a sum of circular correlations

    out[b, l, s1, s2] = sum_{i, j, f} maps[l, (s1 + i) % N1, (s2 + j) % N2, f] * kernels[b, i, j, f]

computed by one of four routes (:mod:`epilsr.correlate.routes`), named by what they do:
``"direct"`` (one convolution), ``"dft_rows"`` (block DFTs along one axis, direct sums over the
row offsets), ``"dft_2d"`` (block DFTs along both axes) and ``"fft"`` (padded FFTs). All are
exact; they differ in speed. ``route="auto"`` picks one with the cost model of a
:class:`CorrelationPlan` (:func:`choose_route`); the plan (fitted constants and byte budgets,
package data) defaults to that of the platform the arrays live on (:func:`plan_for`). The
adjoint (spreading values from positions back over their windows, used by the embeddings of
Eqs. 6 and 11) is the exact VJP of the correlation, so both stay consistent by construction.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from epilsr.correlate.boxes import box_spread, box_sum
from epilsr.correlate.plan import CorrelationPlan, default_plan, plan_for
from epilsr.correlate.routes import (
    ROUTES,
    correlate_dft_2d,
    correlate_dft_rows,
    correlate_direct,
    correlate_fft,
    dft_2d_cost,
    fft_size,
    route_flops,
    wrap_pad,
)

__all__ = [
    "ROUTES",
    "CorrelationPlan",
    "box_spread",
    "box_sum",
    "choose_route",
    "circular_correlate",
    "circular_correlate_adjoint",
    "default_plan",
    "fft_size",
    "plan_for",
    "resolve_route",
    "route_flops",
    "wrap_pad",
]

# Earlier names of the routes (``method=``): accepted with a DeprecationWarning.
_RENAMED = {"hybrid": "dft_rows", "dft": "dft_2d"}


def resolve_route(route: str = "auto", method: str | None = None) -> str:
    """The route a caller asked for: ``route``, or the deprecated ``method=`` alias (and the
    old names ``"hybrid"``/``"dft"``), each with a :class:`DeprecationWarning`."""
    if method is not None:
        warnings.warn("method= is deprecated; use route=", DeprecationWarning, stacklevel=3)
        route = method
    if route in _RENAMED:
        warnings.warn(f"route {route!r} is now called {_RENAMED[route]!r}", DeprecationWarning,
                      stacklevel=3)
        route = _RENAMED[route]
    if route != "auto" and route not in ROUTES:
        raise ValueError(f"route: expected 'auto' or one of {ROUTES}, got {route!r}")
    return route


def choose_route(maps_shape, kernels_shape, plan: CorrelationPlan) -> str:
    """The route ``"auto"`` takes for ``maps [L, N1, N2, F]`` and ``kernels [B, K1, K2, F]``:
    ``"direct"`` while it does at most ``plan.direct_ratio`` times ``"dft_rows"``'s flops,
    else ``"dft_2d"`` where its modelled cost (:func:`~epilsr.correlate.routes.dft_2d_cost`) is
    below ``plan.dft_rows_cost`` (``dft_rows_cost_large`` for maps of at least
    ``plan.large_maps`` positions) times ``"dft_rows"``'s flops, else ``"dft_rows"``."""
    direct = route_flops("direct", maps_shape, kernels_shape)
    rows = route_flops("dft_rows", maps_shape, kernels_shape)
    if direct <= plan.direct_ratio * rows:
        return "direct"
    n_maps = maps_shape[1] * maps_shape[2]
    ratio = plan.dft_rows_cost_large if n_maps >= plan.large_maps else plan.dft_rows_cost
    return "dft_2d" if dft_2d_cost(maps_shape, kernels_shape, plan) < ratio * rows else "dft_rows"


def _correlate(maps: jax.Array, kernels: jax.Array, route: str, plan: CorrelationPlan):
    if route == "auto":
        route = choose_route(maps.shape, kernels.shape, plan)
    if route == "direct":
        return correlate_direct(maps, kernels)
    if route == "dft_rows":
        return correlate_dft_rows(maps, kernels, plan)
    if route == "dft_2d":
        return correlate_dft_2d(maps, kernels, plan)
    return correlate_fft(maps, kernels)


def circular_correlate(
    maps: jax.Array,
    kernels: jax.Array,
    *,
    route: str = "auto",
    plan: CorrelationPlan | None = None,
    method: str | None = None,
) -> jax.Array:
    """Circular correlation of every kernel with every map layer.

    Args:
      maps: ``[L, N1, N2, F]`` epitome-side maps.
      kernels: ``[B, K1, K2, F]`` patch-side kernels, ``K1 <= N1``, ``K2 <= N2``.
      route: ``"auto"``, ``"direct"``, ``"dft_rows"``, ``"dft_2d"`` or ``"fft"`` (module doc).
      plan: cost model and memory budgets; ``None``: :func:`plan_for` the arrays.
      method: deprecated alias of ``route``.

    Returns:
      ``[B, L, N1, N2]`` with
      ``out[b, l, s] = sum_{u, f} maps[l, (s + u) % N, f] kernels[b, u, f]``.
    """
    route = resolve_route(route, method)
    maps, kernels = jnp.asarray(maps), jnp.asarray(kernels)
    if maps.ndim != 4 or kernels.ndim != 4 or maps.shape[-1] != kernels.shape[-1]:
        raise ValueError(
            f"circular_correlate: expected maps [L, N1, N2, F] and kernels [B, K1, K2, F], "
            f"got {maps.shape} and {kernels.shape}"
        )
    if kernels.shape[1] > maps.shape[1] or kernels.shape[2] > maps.shape[2]:
        raise ValueError(
            f"patch size {kernels.shape[1:3]} is larger than the epitome {maps.shape[1:3]}"
        )
    plan = plan_for(maps, kernels) if plan is None else plan
    return _correlate(maps, kernels, route, plan)


def circular_correlate_adjoint(
    weights: jax.Array,
    kernels: jax.Array,
    *,
    map_size: tuple[int, int],
    route: str = "auto",
    plan: CorrelationPlan | None = None,
    method: str | None = None,
) -> jax.Array:
    """Adjoint of :func:`circular_correlate` in ``maps``: spreads position weights over windows.

    ``out[l, m, f] = sum_b sum_u weights[b, l, (m - u) % N] * kernels[b, u, f]``.

    Args:
      weights: ``[B, L, N1, N2]`` (e.g. posteriors).
      kernels: ``[B, K1, K2, F]`` (e.g. label blocks placed in their windows).
      map_size: ``(N1, N2)``.
      route, plan, method: as for :func:`circular_correlate`.

    Returns:
      ``[L, N1, N2, F]``.
    """
    route = resolve_route(route, method)
    plan = plan_for(weights, kernels) if plan is None else plan
    lyr = weights.shape[1]
    zeros = jnp.zeros((lyr, *map_size, kernels.shape[-1]), weights.dtype)
    _, vjp = jax.vjp(lambda m: circular_correlate(m, kernels, route=route, plan=plan), zeros)
    return vjp(weights)[0]
