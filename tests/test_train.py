"""Epitome training (paper Sec. 3): objective vs float64 brute force, location promotion,
diversification, constraints, validation, patch-size bucketing and cascade helpers."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from epilsr import Epitome, init_epitome, log_posterior, log_prior
from epilsr.epitome import LOG_VAR_MAX, LOG_VAR_MIN, PRIOR_LOGIT_BOUND
from epilsr.samplers import patch_sizes, sample_patches
from epilsr.train import (
    DEFAULT_PROMOTION_C,
    TrainState,
    default_promotion_threshold,
    default_temperature,
    make_train_step,
    mixture,
    objective,
    step_key,
    train_init,
    train_step,
    worst_quantile,
)

LOG_2PI = math.log(2.0 * math.pi)

# ----------------------------------------------------------------------------- brute force


def _lse(x: np.ndarray) -> float:
    m = np.max(x)
    return float(m + np.log(np.sum(np.exp(x - m))))


def log_likelihood_loops(mean, log_var, patches) -> np.ndarray:
    """``[B, L, N1, N2]`` float64 ``log p(x|s)`` by explicit loops over positions and pixels."""
    mean, log_var, x = (np.asarray(a, np.float64) for a in (mean, log_var, patches))
    n_layers, n1, n2, _ = mean.shape
    b, k1, k2, _ = x.shape
    out = np.zeros((b, n_layers, n1, n2))
    for l in range(n_layers):
        for s1 in range(n1):
            for s2 in range(n2):
                rows = (s1 + np.arange(k1)) % n1
                cols = (s2 + np.arange(k2)) % n2
                mu = mean[l][np.ix_(rows, cols)]
                lv = log_var[l][np.ix_(rows, cols)]
                out[:, l, s1, s2] = np.sum(
                    -0.5 * ((x - mu) ** 2 / np.exp(lv) + lv + LOG_2PI), axis=(1, 2, 3)
                )
    return out


def tempered_marginals_bf(mean, log_var, logits, patches, temperature, mask=None) -> np.ndarray:
    """``[B]`` ``log sum_{s in M} p(x|s)^(1/T) p(s)``, ``p(s)`` normalised over all positions."""
    logits = np.asarray(logits, np.float64)
    lp = logits - _lse(logits.ravel())
    z = log_likelihood_loops(mean, log_var, patches) / temperature + lp[None]
    out = []
    for b in range(z.shape[0]):
        vals = z[b].ravel() if mask is None else z[b][np.asarray(mask)]
        out.append(_lse(vals))
    return np.array(out)


def objective_bf(params, patches, temperature, mask=None, quantile=1.0, reference=None):
    """float64 twin of :func:`epilsr.train.objective`."""
    v = tempered_marginals_bf(*params, patches, temperature, mask)
    scores = v if reference is None else tempered_marginals_bf(*reference, patches, temperature)
    k = math.ceil(quantile * len(v) - 1e-9)
    worst = np.argsort(scores, kind="stable")[:k]
    return -float(np.mean(v[worst])), worst


def posterior_mean_bf(params, patches, temperature, mask=None) -> np.ndarray:
    mean, log_var, logits = (np.asarray(a, np.float64) for a in params)
    lp = logits - _lse(logits.ravel())
    z = log_likelihood_loops(mean, log_var, patches) / temperature + lp[None]
    if mask is not None:
        z = np.where(np.asarray(mask)[None], z, -np.inf)
    z = z - np.array([_lse(zb.ravel()) for zb in z])[:, None, None, None]
    return np.exp(z).mean(axis=0)


# ----------------------------------------------------------------------------- fixtures


def _random_params(rng, n_layers=2, n=5, c=2):
    mean = rng.uniform(0, 1, (n_layers, n, n, c))
    log_var = rng.uniform(math.log(0.02), math.log(0.5), (n_layers, n, n, c))
    logits = rng.normal(size=(n_layers, n, n))
    return mean, log_var, logits


def _patches_from(rng, mean, b, k, noise=0.1):
    n_layers, n, _, _ = mean.shape
    out = []
    for _ in range(b):
        l, s1, s2 = rng.integers(n_layers), rng.integers(n), rng.integers(n)
        out.append(mean[l][np.ix_((s1 + np.arange(k)) % n, (s2 + np.arange(k)) % n)])
    return np.stack(out) + noise * rng.normal(size=(b, k, k, mean.shape[-1]))


def _epitome(params) -> Epitome:
    return Epitome(*(jnp.asarray(a, jnp.float32) for a in params))


def _smooth_image(seed: int, size=64, c=3, width=3) -> np.ndarray:
    """``[size, size, c]`` uniform noise box-filtered (wrap-around) by ``width x width``."""
    img = np.random.default_rng(seed).uniform(size=(size, size, c))
    out = sum(np.roll(img, (i, j), axis=(0, 1)) for i in range(width) for j in range(width))
    return (out / width**2).astype(np.float32)


sample_jit = jax.jit(sample_patches, static_argnames=("size", "batch"))
obj_jit = jax.jit(objective, static_argnames=("quantile", "route"))


# ----------------------------------------------------------------------------- objective


@pytest.mark.parametrize(("masked", "quantile"), [(False, 1.0), (True, 0.5)])
def test_objective_value_and_gradient_vs_brute_force(rng, masked, quantile):
    params = _random_params(rng)
    patches = _patches_from(rng, params[0], b=6, k=3)
    temperature = 0.7
    mask = rng.uniform(size=params[2].shape) < 0.5 if masked else None
    want, _ = objective_bf(params, patches, temperature, mask, quantile)

    def f(p):
        return obj_jit(
            p,
            jnp.asarray(patches, jnp.float32),
            temperature=temperature,
            mask=mask,
            quantile=quantile,
        )[0]

    got, grads = jax.value_and_grad(f)(_epitome(params))
    np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=2e-5)

    # Central finite differences of the float64 brute force, every parameter.
    eps = 1e-5
    for field, idx in (("mean", 0), ("log_var", 1), ("prior_logits", 2)):
        arr = params[idx]
        fd = np.zeros_like(arr)
        for j in np.ndindex(arr.shape):
            plus = [np.array(a, copy=True) for a in params]
            minus = [np.array(a, copy=True) for a in params]
            plus[idx][j] += eps
            minus[idx][j] -= eps
            fd[j] = (
                objective_bf(plus, patches, temperature, mask, quantile)[0]
                - objective_bf(minus, patches, temperature, mask, quantile)[0]
            ) / (2 * eps)
        g = np.asarray(getattr(grads, field), np.float64)
        scale = np.max(np.abs(fd))
        assert scale > 1e-3, field  # the check is not vacuous
        np.testing.assert_allclose(g, fd, rtol=2e-3, atol=2e-3 * scale, err_msg=field)


def test_objective_with_reference_selects_under_reference(rng):
    params = _random_params(rng)
    reference = _random_params(rng)
    patches = _patches_from(rng, params[0], b=8, k=3)
    want, worst_ref = objective_bf(params, patches, 1.3, None, 0.25, reference)
    _, worst_self = objective_bf(params, patches, 1.3, None, 0.25)
    assert set(worst_ref) != set(worst_self)  # the reference changes the selection
    got, aux = obj_jit(
        _epitome(params),
        jnp.asarray(patches, jnp.float32),
        temperature=1.3,
        quantile=0.25,
        reference=_epitome(reference),
    )
    np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=2e-5)
    assert set(np.flatnonzero(np.asarray(aux.selected))) == set(worst_ref)
    # No gradient flows into the frozen reference.
    g = jax.jit(
        jax.grad(
            lambda r: objective(
                _epitome(params), patches, temperature=1.3, quantile=0.25, reference=r
            )[0]
        )
    )(_epitome(reference))
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g))


def test_objective_aux(rng):
    params = _random_params(rng, n_layers=1)
    patches = _patches_from(rng, params[0], b=5, k=3)
    mask = rng.uniform(size=params[2].shape) < 0.6
    _, aux = obj_jit(
        _epitome(params),
        jnp.asarray(patches, jnp.float32),
        temperature=0.9,
        mask=mask,
        quantile=0.5,
    )
    np.testing.assert_allclose(
        aux.log_marginal, tempered_marginals_bf(*params, patches, 0.9, mask), rtol=1e-5, atol=1e-4
    )
    np.testing.assert_allclose(
        aux.log_likelihood, tempered_marginals_bf(*params, patches, 1.0), rtol=1e-5, atol=1e-4
    )
    np.testing.assert_allclose(
        aux.posterior_mean, posterior_mean_bf(params, patches, 0.9, mask), atol=1e-5
    )
    assert int(np.sum(aux.selected)) == 3  # ceil(0.5 * 5)


def test_masked_logsumexp_all_but_one_no_nan(rng):
    params = _random_params(rng)
    # Make the single allowed position a terrible fit: logits far below the others.
    patches = _patches_from(rng, params[0], b=4, k=3, noise=2.0)
    mask = np.zeros(params[2].shape, bool)
    mask[1, 3, 0] = True
    ep = _epitome(params)

    def f(p):
        return objective(p, patches, temperature=0.05, mask=mask, quantile=1.0)[0]

    value, grads = jax.jit(jax.value_and_grad(f))(ep)
    ll = log_likelihood_loops(*params[:2], patches)[:, 1, 3, 0]
    lp = params[2] - _lse(params[2].ravel())
    want = -np.mean(ll / 0.05 + lp[1, 3, 0])
    assert np.isfinite(float(value))
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(leaf)))
    # Only the pixels of the allowed window get mean/variance gradient.
    g = np.asarray(grads.mean)
    window = np.zeros(g.shape, bool)
    window[1][np.ix_((3 + np.arange(3)) % 5, np.arange(3) % 5)] = True
    assert np.all(g[~window] == 0) and np.any(g[window] != 0)


def test_all_masked_is_guarded(rng):
    params = _random_params(rng)
    patches = _patches_from(rng, params[0], b=4, k=3)
    none_allowed = np.zeros(params[2].shape, bool)
    ep = _epitome(params)
    value, grads = jax.jit(
        jax.value_and_grad(lambda p: objective(p, patches, temperature=1.0, mask=none_allowed)[0])
    )(ep)
    unmasked, _ = objective_bf(params, patches, 1.0)
    np.testing.assert_allclose(float(value), unmasked, rtol=1e-5)
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_objective_validation(rng):
    params = _random_params(rng)
    ep = _epitome(params)
    patches = _patches_from(rng, params[0], b=4, k=3)
    for q in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="quantile"):
            objective(ep, patches, temperature=1.0, quantile=q)
    with pytest.raises(ValueError, match="mask"):
        objective(ep, patches, temperature=1.0, mask=np.ones((2, 5, 4), bool))
    with pytest.raises(ValueError, match="bool"):
        objective(ep, patches, temperature=1.0, mask=np.ones((2, 5, 5), np.float32))


# ----------------------------------------------------------------------------- train_step

# One optimizer object and one jitted step per hyperparameter set, shared by the tests below:
# compilations, not steps, dominate the runtime on a small CPU.
OPT = optax.adam(1e-2)


@functools.cache
def _jit_step(**hyper):
    return make_train_step(optimizer=OPT, **hyper)


def _small_state(seed=0, n=8, c=2, layers=1, opt=OPT):
    ep = init_epitome(jax.random.key(seed), size=n, channels=c, layers=layers)
    return train_init(jax.random.key(seed + 1), ep, opt)


def _params_np(state):
    return tuple(
        np.asarray(a) for a in (state.params.mean, state.params.log_var, state.params.prior_logits)
    )


def test_train_init_state():
    state = _small_state(layers=2)
    assert isinstance(state, TrainState)
    assert state.counters.shape == (2, 8, 8) and state.counters.dtype == jnp.float32
    assert np.all(np.asarray(state.counters) == 0)
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    np.testing.assert_array_equal(
        jax.random.key_data(step_key(state)),
        jax.random.key_data(jax.random.fold_in(state.key, 0)),
    )


def test_counters_increase_by_batch_posterior_mean(rng):
    state = _small_state()
    patches = jnp.asarray(
        _patches_from(rng, np.asarray(state.params.mean), b=8, k=3, noise=0.05), jnp.float32
    )
    step = _jit_step(temperature=0.5, quantile=0.5, promotion_threshold=0.5)
    new, info = step(state, patches)  # counters start at 0: nothing is masked
    want = posterior_mean_bf(_params_np(state), patches, 0.5)
    np.testing.assert_allclose(new.counters, want, atol=1e-5)
    np.testing.assert_allclose(float(jnp.sum(new.counters)), 1.0, rtol=1e-5)
    assert not bool(info.reset) and float(info.masked_fraction) == 0.0
    assert int(new.step) == 1

    # A partial mask: masked positions receive nothing, the mass goes to the allowed ones.
    counters = np.zeros((1, 8, 8), np.float32)
    counters[0, :4] = 1.0  # the top half is masked (counters >= threshold 0.5)
    new2, info2 = step(state._replace(counters=jnp.asarray(counters)), patches)
    np.testing.assert_allclose(float(info2.masked_fraction), 0.5)
    want = counters + posterior_mean_bf(_params_np(state), patches, 0.5, counters < 0.5)
    np.testing.assert_allclose(new2.counters, want, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(new2.counters)[0, :4], 1.0)


def test_counters_reset_when_mostly_masked(rng):
    state = _small_state()
    patches = jnp.asarray(rng.uniform(size=(8, 3, 3, 2)), jnp.float32)
    # Threshold 2.5, delta 0.05: reset when more than 95 % of the 64 positions are masked.
    step = _jit_step(temperature=1.0, promotion_threshold=2.5, delta=0.05)

    counters = np.full((1, 8, 8), 3.0, np.float32)
    counters[0, 5, 6] = counters[0, 1, 1] = 0.0  # 62/64 = 96.9 % masked
    new, info = step(state._replace(counters=jnp.asarray(counters)), patches)
    assert bool(info.reset)
    np.testing.assert_allclose(float(info.masked_fraction), 62 / 64)
    np.testing.assert_array_equal(np.asarray(new.counters), 0.0)

    # 60/64 = 93.75 % masked: the 4 allowed positions share the whole posterior mass (1.0 in
    # total, < 2.5 each), so they stay allowed and there is no reset.
    counters = np.full((1, 8, 8), 3.0, np.float32)
    allowed = np.zeros((1, 8, 8), bool)
    allowed[0, [0, 2, 5, 7], [3, 7, 0, 4]] = True
    counters[allowed] = 0.0
    new, info = step(state._replace(counters=jnp.asarray(counters)), patches)
    assert not bool(info.reset)
    np.testing.assert_allclose(float(info.masked_fraction), 60 / 64)
    got = np.asarray(new.counters)
    np.testing.assert_array_equal(got[~allowed], 3.0)
    np.testing.assert_allclose(got[allowed].sum(), 1.0, rtol=1e-5)
    want = posterior_mean_bf(_params_np(state), patches, 1.0, allowed)
    np.testing.assert_allclose(got[allowed], want[allowed], atol=1e-5)


def test_constraints_are_applied_after_the_step(rng):
    state = _small_state()
    mean = np.asarray(state.params.mean)
    logits = np.linspace(-4, 4, 64, dtype=np.float32).reshape(1, 8, 8)
    params = Epitome(
        mean=state.params.mean,
        log_var=jnp.full(mean.shape, LOG_VAR_MIN, jnp.float32),  # at the lower bound
        prior_logits=jnp.asarray(logits),
    )
    state = state._replace(params=params)
    patches = jnp.asarray(_patches_from(rng, mean, b=8, k=3, noise=0.0), jnp.float32)
    new, _ = _jit_step(temperature=0.5, quantile=0.5, promotion_threshold=0.5)(state, patches)
    lv = np.asarray(new.params.log_var)
    # The exact fits push variances further down: the clamp holds them at 0.01.
    assert lv.min() == np.float32(LOG_VAR_MIN) and lv.max() <= LOG_VAR_MAX
    new_logits = np.asarray(new.params.prior_logits)
    assert np.abs(new_logits).max() <= PRIOR_LOGIT_BOUND
    assert np.abs(new_logits).max() == np.float32(PRIOR_LOGIT_BOUND)  # the clip is active
    assert abs(float(np.mean(new_logits))) < 0.05  # centred before clipping


def test_defaults_temperature_threshold_and_buckets():
    assert default_temperature(11) == 1.0
    assert default_temperature(22) == 4.0
    assert default_temperature((7, 11)) == 77 / 121
    ep = init_epitome(jax.random.key(0), size=10, channels=1, layers=2)
    assert default_promotion_threshold(ep) == DEFAULT_PROMOTION_C / 200

    state = _small_state()
    image = _smooth_image(1, size=32, c=2)
    step = _jit_step()  # all defaults: T = (K/11)^2, quantile 0.25, promotion on
    sizes = patch_sizes(jax.random.key(2), num_steps=8, sizes=(3, 5))
    assert sizes.shape == (8,) and set(sizes.tolist()) == {3, 5}
    np.testing.assert_array_equal(sizes, patch_sizes(jax.random.key(2), num_steps=8, sizes=(3, 5)))
    threshold = DEFAULT_PROMOTION_C / 64
    for k in sizes:
        k = int(k)
        patches = sample_jit(step_key(state), image, size=k, batch=8)
        allowed = np.asarray(state.counters) < threshold
        if not allowed.any():
            allowed[:] = True
        loss, _ = objective_bf(_params_np(state), patches, (k / 11) ** 2, allowed, 0.25)
        state, info = step(state, patches)
        # The default temperature (K/11)^2 and threshold c/(L N^2) are what the step used.
        np.testing.assert_allclose(float(info.loss), loss, rtol=1e-4)
        np.testing.assert_allclose(float(info.masked_fraction), 1 - allowed.mean())
    # Bucketing: one compilation per patch size, none per step.
    assert step._cache_size() == 2


def _spy_optimizer():
    calls = []
    base = optax.adam(1e-2)

    def update(grads, opt_state, params=None):
        calls.append(1)
        return base.update(grads, opt_state, params)

    return optax.GradientTransformation(base.init, update), calls


def test_train_step_validation(rng):
    opt, calls = _spy_optimizer()
    ep = init_epitome(jax.random.key(0), size=6, channels=2)
    state = train_init(jax.random.key(1), ep, opt)
    good = rng.uniform(size=(4, 3, 3, 2)).astype(np.float32)

    bad = good.copy()
    bad[2, 1, 1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        train_step(state, bad, optimizer=opt)
    assert not calls  # rejected before the optimizer was touched
    with pytest.raises(ValueError, match="larger than the epitome"):
        train_step(state, rng.uniform(size=(2, 7, 7, 2)), optimizer=opt)
    with pytest.raises(ValueError, match="channels"):
        train_step(state, rng.uniform(size=(2, 3, 3, 3)), optimizer=opt)
    for q in (0.0, 1.01, -1.0):
        with pytest.raises(ValueError, match="quantile"):
            train_step(state, good, optimizer=opt, quantile=q)
    with pytest.raises(ValueError, match="temperature"):
        train_step(state, good, optimizer=opt, temperature=-1.0)
    with pytest.raises(ValueError, match="counters"):
        train_step(state._replace(counters=jnp.zeros((1, 5, 5))), good, optimizer=opt)
    assert not calls
    # A valid call does reach the optimizer (traced only, nothing compiled).
    jax.eval_shape(functools.partial(train_step, optimizer=opt), state, good)
    assert calls == [1]


@pytest.fixture(scope="module")
def runs():
    """40 steps with and without location promotion from the same start (shared by tests)."""
    image = _smooth_image(10, size=96)
    held_out = sample_jit(jax.random.key(99), image, size=5, batch=512)
    opt = optax.adam(3e-2)
    ep = init_epitome(jax.random.key(0), size=16, channels=3)
    out = {"held_out": held_out}
    for promotion in (True, False):
        state = train_init(jax.random.key(1), ep, opt)
        step = make_train_step(optimizer=opt, temperature=1.0, quantile=1.0, promotion=promotion)
        infos, states = [], []
        for _ in range(40):
            state, info = step(state, sample_jit(step_key(state), image, size=5, batch=16))
            infos.append(info)
            states.append(state)
        out[promotion] = (states, infos)
    return out


def _usage_coverage(epitome, patches) -> float:
    """``exp(H(mean_t p(s|x_t))) / S`` on held-out patches (1 = every position used equally)."""
    usage = jnp.mean(jnp.exp(log_posterior(epitome, patches, temperature=1.0)), axis=0)
    entropy = -jnp.sum(usage * jnp.log(usage + 1e-30))
    return float(jnp.exp(entropy) / usage.size)


def test_loss_decreases_and_constraints_hold(runs):
    for promotion in (True, False):
        states, infos = runs[promotion]
        for state in states:
            lv = np.asarray(state.params.log_var)
            assert lv.min() >= LOG_VAR_MIN and lv.max() <= LOG_VAR_MAX
            assert np.abs(np.asarray(state.params.prior_logits)).max() <= PRIOR_LOGIT_BOUND
        assert int(states[-1].step) == 40
        loglik = [float(i.log_likelihood) for i in infos]
        assert np.all(np.isfinite(loglik))
        assert np.mean(loglik[-5:]) > np.mean(loglik[:5]) + 0.5, loglik
    losses = [float(i.loss) for i in runs[False][1]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 10.0, losses
    # Without promotion the counters are untouched and nothing is ever masked.
    states, infos = runs[False]
    assert np.all(np.asarray(states[-1].counters) == 0)
    assert all(float(i.masked_fraction) == 0 and not bool(i.reset) for i in infos)


def test_location_promotion_improves_coverage(runs):
    coverage = {p: _usage_coverage(runs[p][0][-1].params, runs["held_out"]) for p in (True, False)}
    infos = runs[True][1]
    assert max(float(i.masked_fraction) for i in infos) > 0.5  # the mechanism engaged
    assert sum(bool(i.reset) for i in infos) >= 1
    # Observed ~0.8 with promotion vs ~0.25 without; require a factor of 1.5.
    assert coverage[True] > 1.5 * coverage[False], coverage


def test_self_and_reference_diversification():
    state = _small_state()
    image = _smooth_image(5, size=32, c=2)
    patches = sample_jit(jax.random.key(6), image, size=3, batch=8)
    step = _jit_step(temperature=1.0)  # quantile 0.25: the worst 2 of 8
    _, info = step(state, patches)
    want, _ = objective_bf(_params_np(state), patches, 1.0, None, 0.25)
    np.testing.assert_allclose(float(info.loss), want, rtol=1e-5)

    reference = init_epitome(jax.random.key(42), size=9, channels=2)  # any size >= K
    ref_np = tuple(
        np.asarray(a) for a in (reference.mean, reference.log_var, reference.prior_logits)
    )
    _, info_ref = step(state, patches, reference)
    want_ref, _ = objective_bf(_params_np(state), patches, 1.0, None, 0.25, ref_np)
    np.testing.assert_allclose(float(info_ref.loss), want_ref, rtol=1e-5)
    with pytest.raises(ValueError, match="reference"):
        make_train_step(optimizer=OPT, reference=reference)


def test_worst_quantile_matches_brute_force(rng):
    params = _random_params(rng)
    patches = _patches_from(rng, params[0], b=10, k=3, noise=0.3)
    idx = worst_quantile(_epitome(params), patches, quantile=0.3, temperature=0.8)
    scores = tempered_marginals_bf(*params, patches, 0.8)
    assert idx.shape == (3,) and idx.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(idx), np.argsort(scores)[:3])
    assert worst_quantile(_epitome(params), patches, quantile=1.0, temperature=1.0).shape == (10,)
    with pytest.raises(ValueError, match="quantile"):
        worst_quantile(_epitome(params), patches, quantile=0.0, temperature=1.0)


def test_mixture_gives_each_component_equal_mass(rng):
    a = _epitome(_random_params(rng, n_layers=1, n=5))
    b = _epitome(_random_params(rng, n_layers=3, n=5))
    mix = mixture(a, b)
    assert mix.mean.shape == (4, 5, 5, 2) and mix.prior_logits.shape == (4, 5, 5)
    np.testing.assert_array_equal(mix.mean[:1], a.mean)
    np.testing.assert_array_equal(mix.log_var[1:], b.log_var)
    p = np.exp(np.asarray(log_prior(mix), np.float64))
    np.testing.assert_allclose([p[:1].sum(), p[1:].sum()], [0.5, 0.5], rtol=1e-5)
    # Within each component the prior is the component's own.
    np.testing.assert_allclose(p[1:] / p[1:].sum(), np.exp(log_prior(b)), rtol=1e-4)
    np.testing.assert_allclose(float(jnp.mean(mix.prior_logits)), 0.0, atol=1e-5)
    np.testing.assert_array_equal(mixture(a).mean, a.mean)
    with pytest.raises(ValueError, match="shape"):
        mixture(a, _epitome(_random_params(rng, n_layers=1, n=6)))
    with pytest.raises(ValueError):
        mixture()
