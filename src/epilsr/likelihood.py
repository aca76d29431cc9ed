"""Patch likelihoods and posteriors over epitome positions (paper Eqs. 3 and 5).

``log p(x|s) = -1/2 sum_ijk [(x - mu)^2 / sigma^2 + log sigma^2 + log 2 pi]`` over the
``K x K`` window of ``s`` expands into one circular correlation of ``[x^2, -2x]`` with
``[1/sigma^2, mu/sigma^2]`` plus a patch-independent box sum of ``mu^2/sigma^2 + log sigma^2``.
Before expanding, patches and means are shifted by the epitome's per-channel mean (an exact
identity) to keep float32 cancellation small.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from epilsr._validate import check_finite, check_rank, is_concrete
from epilsr.correlate import CorrelationPlan, box_sum, circular_correlate, resolve_route
from epilsr.epitome import Epitome

__all__ = [
    "log_likelihood",
    "log_prior",
    "log_posterior",
    "LOG_2PI",
]

LOG_2PI = math.log(2.0 * math.pi)


def check_patches(epitome: Epitome, patches: ArrayLike) -> jax.Array:
    """Validates ``[B, K1, K2, C]`` patches against ``epitome``; returns them as float32."""
    epitome.check()
    patches = jnp.asarray(patches)
    check_rank("patches", patches, 4, "[B, K, K, C]")
    if patches.shape[-1] != epitome.channels:
        raise ValueError(
            f"patches: expected {epitome.channels} channels to match the epitome, "
            f"got shape {patches.shape}"
        )
    n1, n2 = epitome.size
    if patches.shape[1] > n1 or patches.shape[2] > n2:
        raise ValueError(
            f"patches: patch size {patches.shape[1:3]} is larger than the epitome ({n1}, {n2})"
        )
    if patches.shape[0] < 1:
        raise ValueError(f"patches: expected a non-empty batch, got shape {patches.shape}")
    check_finite("patches", patches)
    return patches.astype(jnp.float32)


def log_likelihood(
    epitome: Epitome,
    patches: ArrayLike,
    *,
    route: str = "auto",
    plan: CorrelationPlan | None = None,
    method: str | None = None,
) -> jax.Array:
    """Exact ``log p(x|s)`` of Eq. 3 for every patch and position, with all constants.

    Args:
      epitome: :class:`Epitome` with ``mean, log_var [L, N1, N2, C]``.
      patches: ``[B, K1, K2, C]`` float patches.
      route: correlation route, ``"auto"``, ``"direct"``, ``"dft_rows"``, ``"dft_2d"`` or
        ``"fft"`` (see :func:`epilsr.correlate.circular_correlate`).
      plan: :class:`~epilsr.correlate.CorrelationPlan`; ``None``: that of the arrays' platform.
      method: deprecated alias of ``route``.

    Returns:
      ``[B, L, N1, N2]``; entry ``[b, l, s1, s2]`` is the log-density of patch ``b`` under the
      window of layer ``l`` with top-left corner ``(s1, s2)`` (wrapping modulo ``N``).
    """
    route = resolve_route(route, method)
    patches = check_patches(epitome, patches)
    _, k1, k2, c = patches.shape
    centre = jax.lax.stop_gradient(jnp.mean(epitome.mean, axis=(0, 1, 2)))  # [C]
    x = patches - centre
    mu = epitome.mean - centre
    inv_var = jnp.exp(-epitome.log_var)
    maps = jnp.concatenate([inv_var, mu * inv_var], axis=-1)  # [L, N1, N2, 2C]
    kernels = jnp.concatenate([x * x, -2.0 * x], axis=-1)  # [B, K1, K2, 2C]
    cross = circular_correlate(maps, kernels, route=route, plan=plan)  # [B, L, N1, N2]
    window_const = box_sum(jnp.sum(mu * mu * inv_var + epitome.log_var, axis=-1), (k1, k2))
    return -0.5 * (cross + window_const[None] + (k1 * k2 * c) * LOG_2PI)


def log_prior(epitome: Epitome) -> jax.Array:
    """``log p(s)``: ``log_softmax`` of ``prior_logits`` over all ``L*N1*N2`` positions.

    Returns:
      ``[L, N1, N2]``.
    """
    logits = epitome.prior_logits
    return logits - jax.nn.logsumexp(logits)


def _check_temperature(temperature) -> None:
    if is_concrete(temperature) and not np.all(np.asarray(temperature) > 0):
        raise ValueError(f"temperature: expected a positive number, got {temperature}")


def check_mask(mask: ArrayLike, epitome: Epitome) -> jax.Array:
    """An ``[L, N1, N2]`` bool mask of allowed positions, as an array."""
    mask = jnp.asarray(mask)
    if mask.shape != epitome.prior_logits.shape:
        raise ValueError(
            f"mask: expected shape {epitome.prior_logits.shape} ([L, N1, N2]), got {mask.shape}"
        )
    if mask.dtype != jnp.bool_:
        raise ValueError(f"mask: expected a bool array, got dtype {mask.dtype}")
    return mask


def check_posterior_args(epitome: Epitome, temperature, mask) -> jax.Array | None:
    """Checks of :func:`log_posterior`'s ``temperature`` and ``mask`` (values when concrete),
    so compiled callers can run them before tracing. Returns the mask as an array (or None)."""
    _check_temperature(temperature)
    if mask is None:
        return None
    mask = check_mask(mask, epitome)
    if is_concrete(mask) and not np.any(np.asarray(mask)):
        raise ValueError("mask: every position is masked out; expected at least one True")
    return mask


def log_posterior(
    epitome: Epitome,
    patches: ArrayLike,
    *,
    temperature: float | ArrayLike = 1.0,
    mask: ArrayLike | None = None,
    route: str = "auto",
    plan: CorrelationPlan | None = None,
    method: str | None = None,
) -> jax.Array:
    """Normalised tempered posterior ``log p(s|x) = log p(x|s)/T + log p(s) - log Z``.

    Args:
      epitome: :class:`Epitome`.
      patches: ``[B, K1, K2, C]``.
      temperature: ``T > 0`` (scalar). ``T = (K/11)^2`` was used for training, ``K^2`` for
        embedding in the original implementation.
      mask: optional ``[L, N1, N2]`` bool, ``True`` = position allowed.
      route, plan, method: as in :func:`log_likelihood`.

    Returns:
      ``[B, L, N1, N2]`` log-probabilities normalised over all positions (masked ones ``-inf``).
    """
    route = resolve_route(route, method)
    mask = check_posterior_args(epitome, temperature, mask)
    logits = log_likelihood(epitome, patches, route=route, plan=plan) / temperature
    logits = logits + log_prior(epitome)
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    return jax.nn.log_softmax(logits, axis=(1, 2, 3))
