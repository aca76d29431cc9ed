"""Large-scale epitome training: SGD, location promotion and diversification (paper Sec. 3).

An init/update pair in the style of optax and blackjax:

* :func:`train_init` builds a :class:`TrainState` (parameters, optax state, location-promotion
  counters, step, base key);
* :func:`train_step` ``(state, patches, *, optimizer, ...) -> (state, info)`` takes one
  gradient step on the tempered, masked, worst-quantile objective :func:`objective`, applies
  the constraints of :func:`epilsr.clamp_epitome` and updates the counters.

The objective for a batch ``{x_t}`` is

    loss = -1/|Q| sum_{t in Q} log sum_{s in M} p(x_t|s)^(1/T) p(s)

where ``M`` are the positions allowed by location promotion and ``Q`` the worst-modelled
``ceil(q B)`` patches (self-diversification, or diversification against a frozen reference).

**Location promotion** (Sec. 3). ``counters [L, N, N]`` accumulate the batch-mean tempered
posterior ``p(s|x)`` over the allowed positions (the same posterior that weights the gradient);
``M = {counters < threshold}``; when more than ``1 - delta`` of the positions are masked all
counters are reset to 0. The paper writes ``M = {R < c/N^2}`` with ``c < 1``; with ``L`` layers
the default threshold is ``c / (L N1 N2)`` with ``c = DEFAULT_PROMOTION_C = 0.5``: a position
is masked once it has received half of its uniform share of one step's posterior mass. A batch
whose posteriors are peaked masks about ``B`` windows per step and sweeps the epitome; flat
posteriors (early training) reset every step, i.e. no promotion until the model specialises.

**Patch sizes** (bucketing). Patch widths are static shapes. Drawing them from a finite set
(odd 11..31 by default, :data:`epilsr.samplers.PATCH_SIZES`) on the host and calling one
jitted step means ``jit`` caches one executable per size: at most 11 compilations, after which
no step recompiles. :func:`make_train_step` returns such a step;
:func:`epilsr.samplers.patch_sizes` draws a whole schedule of sizes at once.

**Data parallelism.** :func:`make_sharded_train_step` jits the same step with the batch sharded
over the mesh axis ``"data"`` and everything else replicated; the compiler (GSPMD) inserts the
all-reduces of the gradient and of the counter increments, and the quantile is selected over
the *global* batch. Several processes join through :func:`initialize_distributed`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from epilsr._validate import is_concrete
from epilsr.correlate import resolve_route
from epilsr.epitome import Epitome, clamp_epitome
from epilsr.likelihood import check_mask, check_patches, log_likelihood, log_prior

__all__ = [
    "TrainState",
    "TrainInfo",
    "ObjectiveAux",
    "DEFAULT_PROMOTION_C",
    "train_init",
    "objective",
    "train_step",
    "default_temperature",
    "default_promotion_threshold",
    "step_key",
    "make_train_step",
    "worst_quantile",
    "mixture",
]

#: ``c`` of the paper's mask ``M = {R < c / N^2}``; the threshold is ``c / (L N1 N2)``.
DEFAULT_PROMOTION_C = 0.5

# Finite fill for masked logits: exp(fill - max) underflows to exactly 0 and, unlike -inf,
# never produces inf - inf = NaN in a value or a gradient.
_MASK_FILL = -1e30


class TrainState(NamedTuple):
    """Training state (a pytree).

    Attributes:
      params: the :class:`Epitome` being trained.
      opt_state: the optax optimizer state.
      counters: ``[L, N1, N2]`` float32 location-promotion counters ``R``.
      step: ``[]`` int32 number of steps taken.
      key: the base PRNG key; step ``t`` uses ``step_key(state) = fold_in(key, t)``.
    """

    params: Epitome
    opt_state: Any
    counters: jax.Array
    step: jax.Array
    key: jax.Array


class TrainInfo(NamedTuple):
    """Per-step diagnostics (all arrays).

    Attributes:
      loss: ``[]`` the objective minimised (Sec. 3).
      log_likelihood: ``[]`` batch-mean ``log p(x)`` per pixel (untempered, unmasked, channels
        summed): ``mean_t log sum_s p(x_t|s) p(s) / K^2`` before the update.
      masked_fraction: ``[]`` fraction of positions masked out of this step's objective.
      reset: ``[]`` bool, whether the counters were reset after this step.
      coverage: ``[]`` effective fraction of positions used by the batch,
        ``exp(H(mean_t p(s|x_t))) / (L N1 N2)`` in ``(0, 1]``.
    """

    loss: jax.Array
    log_likelihood: jax.Array
    masked_fraction: jax.Array
    reset: jax.Array
    coverage: jax.Array


class ObjectiveAux(NamedTuple):
    """Auxiliary outputs of :func:`objective` (no gradient flows through them).

    Attributes:
      log_marginal: ``[B]`` ``log sum_{s in M} p(x_t|s)^(1/T) p(s)``.
      log_likelihood: ``[B]`` untempered, unmasked ``log p(x_t) = log sum_s p(x_t|s) p(s)``.
      selected: ``[B]`` bool, the patches in the worst quantile.
      posterior_mean: ``[L, N1, N2]`` batch mean of the masked tempered posterior ``p(s|x_t)``.
    """

    log_marginal: jax.Array
    log_likelihood: jax.Array
    selected: jax.Array
    posterior_mean: jax.Array


# --------------------------------------------------------------------------- validation


def _check_quantile(quantile) -> float:
    try:
        q = float(quantile)
    except (TypeError, jax.errors.ConcretizationTypeError) as err:
        raise ValueError(f"quantile: expected a Python float in (0, 1], got {quantile!r}") from err
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile: expected a value in (0, 1], got {quantile}")
    return q


def _quantile_count(quantile: float, batch: int) -> int:
    """``ceil(q B)``, robust to float round-off (``0.7 * 10`` is 7, not 8)."""
    return max(1, min(batch, math.ceil(round(quantile * batch, 6))))


def default_temperature(patch_size: int | Sequence[int]) -> float:
    """Training temperature of the original implementation, ``T = (K / 11)^2`` (DESIGN Sec. 5).

    For rectangular ``K1 x K2`` patches, ``K1 K2 / 121``.
    """
    k1, k2 = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    return float(k1 * k2) / 121.0


def default_promotion_threshold(epitome: Epitome, *, c: float = DEFAULT_PROMOTION_C) -> float:
    """``c / (L N1 N2)``: the paper's ``M = {R < c / N^2}`` for an ``L``-layer epitome."""
    n1, n2 = epitome.size
    return float(c) / float(epitome.layers * n1 * n2)


# --------------------------------------------------------------------------- objective


def _masked_logsumexp(logits: jax.Array, allowed: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``log sum_{s in M} exp(logits)`` over the last three axes; NaN-free value and gradient.

    Masked entries are replaced by a finite ``_MASK_FILL`` with ``jnp.where`` (zero gradient to
    them, ``exp`` underflows to 0). ``allowed`` must have at least one ``True`` (callers guard).
    Returns ``(filled_logits, lse [B])``.
    """
    if allowed is not None:
        logits = jnp.where(allowed, logits, _MASK_FILL)
    return logits, jax.nn.logsumexp(logits, axis=(-3, -2, -1))


def _guard_mask(mask: jax.Array) -> jax.Array:
    """An all-``False`` mask means "no masking" (the objective would otherwise be empty)."""
    return jnp.logical_or(mask, jnp.logical_not(jnp.any(mask)))


def _worst(scores: jax.Array, quantile: float) -> jax.Array:
    """``[B]`` bool: the ``ceil(q B)`` entries of ``scores`` with the lowest values."""
    b = scores.shape[0]
    k = _quantile_count(quantile, b)
    if k == b:
        return jnp.ones((b,), bool)
    _, idx = jax.lax.top_k(-scores, k)
    return jnp.zeros((b,), bool).at[idx].set(True)


def _tempered_log_marginal(
    epitome: Epitome, patches: jax.Array, temperature, route: str, loglik=log_likelihood
):
    logits = loglik(epitome, patches, route=route) / temperature + log_prior(epitome)
    return jax.nn.logsumexp(logits, axis=(1, 2, 3))


def objective(
    params: Epitome,
    patches: ArrayLike,
    *,
    temperature: float | ArrayLike,
    mask: ArrayLike | None = None,
    quantile: float = 1.0,
    reference: Epitome | None = None,
    route: str = "auto",
    method: str | None = None,
    loglik: Callable = log_likelihood,
) -> tuple[jax.Array, ObjectiveAux]:
    """Masked, tempered, worst-quantile negative log-likelihood (paper Sec. 3).

    ``loss = -mean_{t in Q} log sum_{s in M} p(x_t|s)^(1/T) p(s)`` where ``log p(s)`` is the
    prior normalised over *all* positions (not renormalised over ``M``) and ``Q`` holds the
    ``ceil(quantile * B)`` patches with the lowest ``log sum_{s in M} p(x_t|s)^(1/T) p(s)``
    (self-diversification), or, if ``reference`` is given, the lowest
    ``log sum_s p(x_t|s)^(1/T) p(s)`` under the frozen ``reference`` (diversification against a
    previous model). The selection is made under ``stop_gradient``.

    Args:
      params: :class:`Epitome` ``[L, N1, N2, C]``.
      patches: ``[B, K1, K2, C]``.
      temperature: ``T > 0``.
      mask: optional ``[L, N1, N2]`` bool, ``True`` = allowed. An all-``False`` mask is treated
        as no mask (guard), so the value and gradient are always finite.
      quantile: ``q`` in ``(0, 1]`` (a static Python float).
      reference: optional frozen :class:`Epitome` with the same channels and ``N >= K``.
      route: correlation route of :func:`epilsr.log_likelihood`; ``method``: its deprecated
        alias.
      loglik: ``(epitome, patches, *, route) -> [B, L, N1, N2]``, :func:`epilsr.log_likelihood`
        (the sharded step injects a ``shard_map``'d one).

    Returns:
      ``(loss [], aux)`` with ``aux`` an :class:`ObjectiveAux`.
    """
    route = resolve_route(route, method)
    quantile = _check_quantile(quantile)
    patches = check_patches(params, patches)
    ll = loglik(params, patches, route=route)  # [B, L, N1, N2]
    lp = log_prior(params)
    allowed = None if mask is None else _guard_mask(check_mask(mask, params))
    logits, log_marginal = _masked_logsumexp(ll / temperature + lp, allowed)
    if reference is None:
        scores = log_marginal
    else:
        reference = jax.tree.map(jax.lax.stop_gradient, reference)
        scores = _tempered_log_marginal(reference, patches, temperature, route, loglik)
    selected = _worst(jax.lax.stop_gradient(scores), quantile)
    count = _quantile_count(quantile, patches.shape[0])
    loss = -jnp.sum(jnp.where(selected, log_marginal, 0.0)) / count
    posterior = jax.nn.softmax(logits, axis=(1, 2, 3))
    aux = ObjectiveAux(
        log_marginal=jax.lax.stop_gradient(log_marginal),
        log_likelihood=jax.lax.stop_gradient(jax.nn.logsumexp(ll + lp, axis=(1, 2, 3))),
        selected=selected,
        posterior_mean=jax.lax.stop_gradient(jnp.mean(posterior, axis=0)),
    )
    return loss, aux


# --------------------------------------------------------------------------- init / step


def train_init(
    key: ArrayLike, epitome: Epitome, optimizer: optax.GradientTransformation
) -> TrainState:
    """Initial :class:`TrainState`: optimizer state, zero counters ``[L, N1, N2]``, step 0.

    Args:
      key: base PRNG key (typed or raw); kept in the state for step-indexed sampling.
      epitome: initial :class:`Epitome` (e.g. from :func:`epilsr.init_epitome`).
      optimizer: an optax ``GradientTransformation`` (the drivers use ``optax.adam(3e-3)``).
    """
    epitome = epitome.check()
    return TrainState(
        params=epitome,
        opt_state=optimizer.init(epitome),
        counters=jnp.zeros(epitome.prior_logits.shape, jnp.float32),
        step=jnp.zeros((), jnp.int32),
        key=jnp.asarray(key) if not isinstance(key, jax.Array) else key,
    )


def step_key(state: TrainState) -> jax.Array:
    """``fold_in(state.key, state.step)``: the key for this step's sampling (exact resume)."""
    return jax.random.fold_in(state.key, state.step)


def train_step(
    state: TrainState,
    patches: ArrayLike,
    *,
    optimizer: optax.GradientTransformation,
    temperature: float | ArrayLike | None = None,
    quantile: float = 0.25,
    promotion: bool = True,
    promotion_threshold: float | None = None,
    delta: float = 0.05,
    reference: Epitome | None = None,
    route: str = "auto",
    method: str | None = None,
    loglik: Callable = log_likelihood,
) -> tuple[TrainState, TrainInfo]:
    """One SGD step with location promotion and diversification (paper Sec. 3).

    1. ``M = {counters < threshold}`` (all positions if ``promotion=False`` or none allowed);
    2. gradient of :func:`objective` on ``patches`` with ``M`` and the worst ``quantile``;
    3. optax update, then :func:`epilsr.clamp_epitome` (variance in ``[0.01, 1]``, prior
       logits centred and clamped to ``[-4, 4]``);
    4. ``counters += mean_t p(s|x_t)`` (masked tempered posterior, no gradient), reset to 0
       when more than ``1 - delta`` of the positions are then masked.

    Args:
      state: :class:`TrainState`.
      patches: ``[B, K, K, C]`` (``K <= N``); NaN/inf raise ``ValueError`` on concrete arrays.
      optimizer: the optax transformation used in :func:`train_init`.
      temperature: ``T``; ``None`` means ``(K / 11)^2`` from the static patch size.
      quantile: diversification quantile ``q`` in ``(0, 1]``; 0.25 in the paper, 1.0 = off.
      promotion: whether to apply location promotion.
      promotion_threshold: counter threshold; ``None`` = ``c / (L N1 N2)``, ``c = 0.5``.
      delta: reset the counters when more than ``1 - delta`` of the positions are masked.
      reference: optional frozen :class:`Epitome` for diversification against a prior model.
      route: correlation route of :func:`epilsr.log_likelihood`; ``method``: its deprecated
        alias.
      loglik: the likelihood function of :func:`objective`.

    Returns:
      ``(new_state, info)`` with ``info`` a :class:`TrainInfo`.
    """
    route = resolve_route(route, method)
    params = state.params
    quantile = _check_quantile(quantile)
    patches = check_patches(params, patches)
    if state.counters.shape != params.prior_logits.shape:
        raise ValueError(
            f"state.counters: expected shape {params.prior_logits.shape}, "
            f"got {state.counters.shape}"
        )
    k1, k2 = patches.shape[1:3]
    if temperature is None:
        temperature = default_temperature((k1, k2))
    if is_concrete(temperature) and not np.all(np.asarray(temperature) > 0):
        raise ValueError(f"temperature: expected a positive number, got {temperature}")
    if promotion_threshold is None:
        promotion_threshold = default_promotion_threshold(params)
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta: expected a value in [0, 1], got {delta}")

    counters = state.counters
    allowed = _guard_mask(counters < promotion_threshold) if promotion else None

    grad_fn = jax.value_and_grad(functools.partial(objective, loglik=loglik), has_aux=True)
    (loss, aux), grads = grad_fn(
        params,
        patches,
        temperature=temperature,
        mask=allowed,
        quantile=quantile,
        reference=reference,
        route=route,
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    new_params = clamp_epitome(optax.apply_updates(params, updates))

    if promotion:
        counters = counters + aux.posterior_mean
        reset = jnp.mean(counters >= promotion_threshold) > 1.0 - delta
        counters = jnp.where(reset, jnp.zeros_like(counters), counters)
        masked_fraction = 1.0 - jnp.mean(allowed.astype(jnp.float32))
    else:
        reset = jnp.zeros((), bool)
        masked_fraction = jnp.zeros((), jnp.float32)

    usage = aux.posterior_mean
    entropy = -jnp.sum(jnp.where(usage > 0, usage * jnp.log(jnp.where(usage > 0, usage, 1.0)), 0))
    info = TrainInfo(
        loss=loss,
        log_likelihood=jnp.mean(aux.log_likelihood) / (k1 * k2),
        masked_fraction=masked_fraction,
        reset=reset,
        coverage=jnp.exp(entropy) / usage.size,
    )
    new_state = TrainState(
        params=new_params,
        opt_state=opt_state,
        counters=counters,
        step=state.step + 1,
        key=state.key,
    )
    return new_state, info


def make_train_step(*, optimizer: optax.GradientTransformation, **hyper):
    """A jitted ``step(state, patches, reference=None) -> (state, info)`` (documented entry).

    ``hyper`` are the keyword arguments of :func:`train_step` (static). ``jit`` caches one
    executable per patch size, so with patch widths drawn from
    :data:`epilsr.samplers.PATCH_SIZES` the loop compiles at most 11 times. Create the
    optimizer once: it is part of the cache key.
    """
    if "reference" in hyper:
        raise ValueError("reference: pass it to the returned step, not as a static hyperparameter")
    return jax.jit(functools.partial(_step_with_reference, optimizer=optimizer, **hyper))


def _step_with_reference(state, patches, reference=None, **kwargs):
    return train_step(state, patches, reference=reference, **kwargs)


# --------------------------------------------------------------------------- data parallel


# --------------------------------------------------------------------------- cascades


def worst_quantile(
    epitome: Epitome,
    patches: ArrayLike,
    *,
    quantile: float,
    temperature: float | ArrayLike,
    route: str = "auto",
    method: str | None = None,
) -> jax.Array:
    """Indices of the worst-modelled patches under a frozen epitome (cascade ``E0 -> E1``).

    Args:
      epitome: frozen :class:`Epitome`.
      patches: ``[B, K, K, C]``.
      quantile: ``q`` in ``(0, 1]``.
      temperature: ``T`` of ``log sum_s p(x|s)^(1/T) p(s)``.
      route: correlation route; ``method``: its deprecated alias.

    Returns:
      ``[ceil(q B)]`` int32 indices, the lowest-likelihood patch first. Use
      ``patches[idx]`` to collect the training set of the next epitome.
    """
    quantile = _check_quantile(quantile)
    patches = check_patches(epitome, patches)
    scores = _tempered_log_marginal(epitome, patches, temperature, resolve_route(route, method))
    k = _quantile_count(quantile, patches.shape[0])
    _, idx = jax.lax.top_k(-scores, k)
    return idx.astype(jnp.int32)


def mixture(*epitomes: Epitome) -> Epitome:
    """Uniform mixture of epitomes as one epitome with ``sum_i L_i`` layers.

    Layers are concatenated; the prior logits of component ``i`` become its normalised
    log-prior minus ``log M`` (then centred), so each of the ``M`` components carries total
    prior mass ``1/M`` and keeps its internal prior.

    Args:
      *epitomes: :class:`Epitome` s with the same ``N1, N2`` and ``C``.

    Returns:
      An :class:`Epitome` ``[sum L_i, N1, N2, C]``.
    """
    if not epitomes:
        raise ValueError("mixture: expected at least one epitome")
    shape = epitomes[0].mean.shape[1:]
    for i, e in enumerate(epitomes):
        e.check()
        if e.mean.shape[1:] != shape:
            raise ValueError(
                f"mixture: epitome {i} has shape {e.mean.shape[1:]} ([N1, N2, C]), "
                f"expected {shape} like epitome 0"
            )
    log_m = math.log(len(epitomes))
    logits = jnp.concatenate([log_prior(e) - log_m for e in epitomes], axis=0)
    return Epitome(
        mean=jnp.concatenate([e.mean for e in epitomes], axis=0),
        log_var=jnp.concatenate([e.log_var for e in epitomes], axis=0),
        prior_logits=logits - jnp.mean(logits),
    )
