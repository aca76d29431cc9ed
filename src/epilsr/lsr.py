"""Label super-resolution: the EM of Eqs. 7-9 over epitome positions, and self-epitomic LSR.

With ``P[s, c] = p(s|c)`` (class counts normalised over positions), ``Q[s, l] = p(l|s)``,
``A[c, l] = p(l|c)`` and ``pi[c] = p(c)``, one EM iteration (Eqs. 8-9) is two matrix products:

    Z = P^T Q                      # [Cc, n]  Z[c, l] = sum_s p(l|s) p(s|c)
    Q <- normalise_l(Q * (P @ (pi[:, None] * A / Z)))

and the objective of Eq. 7 is ``sum_c pi[c] sum_l A[c, l] log Z[c, l]``; no ``[S, Cc, n]`` tensor
is ever formed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from epilsr._validate import (
    check_class_prior,
    check_distribution_table,
    check_finite,
    check_index_range,
    check_rank,
    is_concrete,
)

__all__ = [
    "super_resolve",
    "adapt_compositions",
    "dirichlet_concentration",
    "lsr_objective",
    "paint_classes",
]

_TINY = 1e-30


def _normalise(x: jax.Array, axis: int) -> jax.Array:
    total = jnp.sum(x, axis=axis, keepdims=True)
    return jnp.where(total > 0, x / jnp.where(total > 0, total, 1.0), 1.0 / x.shape[axis])


def _as_float32(x):
    """NumPy stays on the host (checked there, moved once by the jitted call); others as JAX."""
    if isinstance(x, np.ndarray | np.generic | list | tuple | float | int):
        return np.asarray(x, np.float32)
    return jnp.asarray(x, jnp.float32)


def _check_em_inputs(class_counts, label_given_class, class_prior):
    """Shape and (on concrete inputs) value checks of the EM's inputs; returns them as float32
    arrays ``(counts [..., Cc], table [Cc, n], prior [Cc] or None)``, unnormalised."""
    counts = _as_float32(class_counts)
    if counts.ndim < 2:
        raise ValueError(f"class_counts: expected [..., Cc] with position axes, got {counts.shape}")
    table = _as_float32(label_given_class)
    check_rank("label_given_class", table, 2, "[Cc, n]")
    n_classes = counts.shape[-1]
    if table.shape[0] != n_classes:
        raise ValueError(
            f"label_given_class: expected {n_classes} rows (one per class of class_counts), "
            f"got shape {table.shape}"
        )
    used = None
    if is_concrete(counts):
        # Flat min and max (fast contiguous passes): NaN propagates into both, +-inf shows in one.
        arr = np.asarray(counts).reshape(-1, n_classes)
        lo, hi = (arr.min(), arr.max()) if arr.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            check_finite("class_counts", arr)
        if lo < 0:
            raise ValueError("class_counts: expected non-negative counts, found negative entries")
        # Classes with mass (a sum of non-negative floats is > 0 iff one entry is; a product
        # with ones is a fast column sum).
        used = np.flatnonzero(np.ones(arr.shape[0], arr.dtype) @ arr > 0)
    if class_prior is None:
        check_distribution_table("label_given_class", table, used)
        return counts, table, None
    prior = jnp.asarray(class_prior, jnp.float32)
    if prior.shape != (n_classes,):
        raise ValueError(f"class_prior: expected shape ({n_classes},), got {prior.shape}")
    check_class_prior("class_prior", prior, table)
    return counts, table, prior


def _em_prep(counts, table, prior):
    """Checked inputs -> ``(position shape, p(s|c) [S, Cc], p(l|c) [Cc, n], p(c) [Cc])``."""
    n_classes = counts.shape[-1]
    flat = counts.reshape(-1, n_classes)  # [S, Cc]
    if prior is None:
        mass = jnp.sum(flat, axis=0)  # [Cc]
        prior = mass / jnp.sum(mass)
    else:
        prior = prior / jnp.sum(prior)
    # p(s|c); a class never observed gets uniform p(s|c) (it only matters if given weight).
    p_s_given_c = _normalise(flat, axis=0)
    return counts.shape[:-1], p_s_given_c, _normalise(table, axis=1), prior


#: Positions per block of the EM's pass over ``S``: each iteration updates ``q`` and
#: accumulates the next ``z`` block by block in a ``[Cc, blk]`` / ``[n, blk]`` layout, one pass
#: over ``p(s|c)`` and ``q`` that stays in cache (instead of two matrix products over the
#: whole ``[S, Cc]`` and ``[S, n]``): 1.6x faster at ``S = 256^2``, 3.7x at ``128^2`` (CPU).
_EM_BLOCK = 4096


def _em(p_sc: jax.Array, table: jax.Array, prior: jax.Array, iters) -> jax.Array:
    """Eqs. 8-9 from a uniform start: ``[S, Cc], [Cc, n], [Cc] -> [S, n]`` (one compiled loop;
    ``iters`` may be traced). Iteration ``t``: ``z = p(s|c)^T q_t`` ``[Cc, n]``, then
    ``q_{t+1}(s, l) ∝ q_t(s, l) * sum_c p(s|c) p(c) p(l|c) / z[c, l]`` where ``s`` has class mass;
    ``z`` of ``q_{t+1}`` is summed in the same blocked pass (``_EM_BLOCK``)."""
    s, n_classes = p_sc.shape
    n = table.shape[1]
    blk = min(_EM_BLOCK, s)
    nb = -(-s // blk)
    p = jnp.pad(p_sc, ((0, nb * blk - s), (0, 0)))  # padded positions: no mass, no effect
    p = p.reshape(nb, blk, n_classes).transpose(0, 2, 1)  # [nb, Cc, blk]
    weight = prior[:, None] * table  # [Cc, n]
    seen = jnp.sum(p, axis=1, keepdims=True) > 0  # [nb, 1, blk]

    def step(_, carry):
        q, z = carry  # [nb, n, blk], [Cc, n]
        ratio = jnp.where(weight > 0, weight / jnp.maximum(z, _TINY), 0.0)

        def block(z_next, xs):
            pb, qb, sb = xs
            qn = qb * jnp.matmul(ratio.T, pb, precision="highest")  # [n, blk]
            qn = jnp.where(sb, _normalise(qn, axis=0), qb)
            return z_next + jnp.matmul(pb, qn.T, precision="highest"), qn

        z_next, q = jax.lax.scan(block, jnp.zeros_like(z), (p, q, seen))
        return q, z_next

    q0 = jnp.full((nb, n, blk), 1.0 / n, jnp.float32)
    z0 = jnp.einsum("bcs,bns->cn", p, q0, precision="highest")
    q, _ = jax.lax.fori_loop(0, iters, step, (q0, z0))
    return q.transpose(0, 2, 1).reshape(nb * blk, n)[:s]


def _adapt(p_sc, table, prior, evidence, alpha, rounds, iters):
    """:func:`adapt_compositions` on prepared inputs (``table`` normalised): ``rounds`` EMs
    each followed by the MAP composition update, then the final EM, as one compiled loop.
    Returns ``(q [S, n], pi [Cc, n])``."""

    def one_round(_, pi):
        q = _em(p_sc, _normalise(pi, axis=1), prior, iters)
        r = jnp.matmul(p_sc.T, q, precision="highest")  # [Cc, n]
        return _normalise(evidence[:, None] * r * (table > 0) + alpha[:, None] * table, axis=1)

    pi = jax.lax.fori_loop(0, rounds, one_round, table)
    return _em(p_sc, _normalise(pi, axis=1), prior, iters), pi


@jax.jit
def _objective(counts, table, prior, label_probs):
    _, p_sc, table, prior = _em_prep(counts, table, prior)
    q = jnp.asarray(label_probs, jnp.float32).reshape(p_sc.shape[0], -1)
    z = jnp.matmul(p_sc.T, q, precision="highest")
    weight = prior[:, None] * table
    return jnp.sum(jnp.where(weight > 0, weight * jnp.log(jnp.maximum(z, _TINY)), 0.0))


@jax.jit
def _super_resolve(counts, table, prior, iters):
    shape, p_sc, table, prior = _em_prep(counts, table, prior)
    return _em(p_sc, table, prior, iters).reshape(*shape, table.shape[1])


@jax.jit
def _adapt_compositions(counts, table, prior, evidence, concentration, rounds, iters):
    shape, p_sc, table, prior = _em_prep(counts, table, prior)
    evidence = jnp.asarray(evidence, jnp.float32)
    alpha = jnp.broadcast_to(jnp.asarray(concentration, jnp.float32), evidence.shape)
    q, pi = _adapt(p_sc, table, prior, evidence, alpha, rounds, iters)
    return q.reshape(*shape, table.shape[1]), pi


def lsr_objective(
    class_counts: ArrayLike,
    label_given_class: ArrayLike,
    label_probs: ArrayLike,
    *,
    class_prior: ArrayLike | None = None,
) -> jax.Array:
    """Eq. 7: ``sum_c p(c) sum_l p(l|c) log sum_s p(l|s) p(s|c)`` (to be maximised).

    Args:
      class_counts: ``[..., Cc]`` counts per position (e.g. ``[L, N, N, Cc]`` from Eq. 11).
      label_given_class: ``[Cc, n]``.
      label_probs: ``[..., n]`` ``p(l|s)`` on the same positions.
      class_prior: optional ``[Cc]``; ``None`` = observed proportions.
    """
    counts, table, prior = _check_em_inputs(class_counts, label_given_class, class_prior)
    return _objective(counts, table, prior, label_probs)


def super_resolve(
    class_counts: ArrayLike,
    label_given_class: ArrayLike,
    *,
    class_prior: ArrayLike | None = None,
    iters: int = 20,
) -> jax.Array:
    """High-resolution label probabilities ``p(l | m, n)`` by the EM of Eqs. 8-9.

    Args:
      class_counts: ``[L, N1, N2, Cc]`` (any leading position axes) non-negative counts, e.g.
        from :func:`epilsr.embed_classes`; normalised over positions into ``p(m, n | c)``.
      label_given_class: ``[Cc, n]`` compositions ``p(l | c)``; rows are normalised, so rounded
        published tables are fine. Rows of classes that occur must not be all zero.
      class_prior: ``[Cc]`` ``p(c)``; ``None`` = observed proportions ``sum counts[..., c]``
        (Eq. 7), so classes that never occur carry no weight.
      iters: number of EM iterations (a loop bound; may be traced).

    Returns:
      ``[L, N1, N2, n]`` label distributions (uniform where no class mass landed).
    """
    counts, table, prior = _check_em_inputs(class_counts, label_given_class, class_prior)
    return _super_resolve(counts, table, prior, iters)


def dirichlet_concentration(mean: ArrayLike, sd: ArrayLike) -> np.ndarray:
    """Per-class Dirichlet concentration ``alpha_c`` matching a composition table's spread.

    For ``Dir(alpha m)`` the variance of label ``l`` is ``m_l (1 - m_l) / (alpha + 1)``; we take
    the median over labels of the moment estimate ``m (1 - m) / sd^2 - 1`` (labels with
    ``0 < m < 1`` and ``sd > 0``), floored at 0.5; classes without such labels get 10.

    Args:
      mean: ``[Cc, n]`` mean compositions (e.g. NLCD ``p_*`` columns).
      sd: ``[Cc, n]`` their standard deviations across cells (``sd_*`` columns).

    Returns:
      ``[Cc]`` float32 concentrations.
    """
    mean = np.asarray(mean, np.float64)
    check_rank("mean", mean, 2, "[Cc, n]")
    mean = mean / np.maximum(mean.sum(-1, keepdims=True), 1e-12)
    sd = np.asarray(sd, np.float64)
    if sd.shape != mean.shape:
        raise ValueError(f"sd: expected shape {mean.shape} like mean, got {sd.shape}")
    ok = (mean > 0) & (mean < 1) & (sd > 0)
    est = np.where(ok, mean * (1 - mean) / np.where(ok, sd, 1.0) ** 2 - 1, np.nan)
    # Rows without a usable label (all-NaN) get the default; median only over the others.
    alpha = np.full(mean.shape[0], 10.0)
    rows = ok.any(-1)
    alpha[rows] = np.nanmedian(est[rows], axis=-1)
    return np.maximum(np.nan_to_num(alpha, nan=10.0), 0.5).astype(np.float32)


def adapt_compositions(
    class_counts: ArrayLike,
    label_given_class: ArrayLike,
    *,
    evidence: ArrayLike,
    concentration: float | ArrayLike = 1.0,
    rounds: int = 3,
    iters: int = 20,
    class_prior: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
    """LSR with the class compositions of *this* data re-estimated around the published table.

    Published ``p(l | c)`` are national means; one tile's cells of class ``c`` can differ a lot
    (the NLCD table's s.d. is ~0.2). Treating the data's composition ``pi_c`` as Dirichlet with
    mean ``p(l | c)`` and concentration ``alpha_c``, we alternate the EM (Eqs. 8-9) with a MAP
    update from the model's own composition ``r_c = sum_s p(l|s) p(s|c)`` seen as
    ``evidence_c`` pseudo-observations::

        pi_c <- normalise(evidence_c * r_c + alpha_c * p(l | c))

    ``rounds=0`` is plain :func:`super_resolve`. Labels with zero table mass stay at zero.

    Args:
      class_counts: ``[..., Cc]`` as for :func:`super_resolve`.
      label_given_class: ``[Cc, n]`` prior mean compositions.
      evidence: ``[Cc]`` weight of the data's composition (e.g. ``0.1 x`` number of coarse cells).
      concentration: scalar or ``[Cc]`` ``alpha_c`` (see :func:`dirichlet_concentration`).
      rounds: composition updates (a loop bound; may be traced).
      iters: EM iterations per round.
      class_prior: as for :func:`super_resolve`.

    Returns:
      ``(label_probs [..., n], compositions [Cc, n])``.
    """
    counts, table, prior = _check_em_inputs(class_counts, label_given_class, class_prior)
    return _adapt_compositions(counts, table, prior, evidence, concentration, rounds, iters)


def paint_classes(classes: ArrayLike, label_given_class: ArrayLike) -> jax.Array:
    """Baseline: every pixel gets its coarse class's composition ``p(l | c)``. ``[H, W, n]``."""
    table = _normalise(jnp.asarray(label_given_class, jnp.float32), axis=1)
    classes = jnp.asarray(classes)
    check_index_range("classes", classes, table.shape[0], "class")
    return table[classes]


# --------------------------------------------------------------------------------------------
# Self-epitomic LSR (Sec. 5.1): the tile is its own epitome.


