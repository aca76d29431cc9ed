"""log p(x|s) (Eq. 3) and tempered posteriors against float64 brute force; epitome helpers."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from epilsr import (
    Epitome,
    clamp_epitome,
    epitome_from_image,
    init_epitome,
    log_likelihood,
    log_posterior,
    log_prior,
)
from epilsr.correlate import plan_for
from tests.reference import (
    cut_patches,
    log_likelihood_bf,
    log_posterior_bf,
    log_prior_bf,
    posterior_bf,
    random_epitome_arrays,
)

ROUTES = ["direct", "dft_rows", "dft_2d", "fft"]

# Jitted once per shape (one compilation instead of one per primitive); validation is tested
# separately on the eager functions.
ll_jit = jax.jit(log_likelihood, static_argnames="route")
lp_jit = jax.jit(log_posterior, static_argnames="route")

# (L, N1, N2, K, C, B): odd and prime N, K = 1, K = N, smooth N (unpadded FFT), rectangular.
CASES = [
    (1, 7, 7, 1, 1, 3),
    (2, 13, 13, 5, 3, 4),
    (3, 11, 11, 11, 2, 2),
    (2, 17, 17, 7, 4, 5),
    (1, 16, 16, 5, 3, 4),
    (2, 9, 13, 4, 3, 3),
    (1, 29, 29, 11, 3, 2),
]


def _epitome(rng, n_layers, n1, n2, c, flat_prior=False):
    mean, log_var, prior = random_epitome_arrays(rng, n_layers, n1, n2, c, flat_prior=flat_prior)
    epi = Epitome(jnp.asarray(mean), jnp.asarray(log_var), jnp.asarray(prior))
    return epi, (mean, log_var, prior)


def _rel_err(got, want) -> float:
    """Elementwise relative error with a floor of one nat (log-likelihoods can cross zero)."""
    got = np.asarray(got, np.float64)
    return float(np.max(np.abs(got - want) / (np.abs(want) + 1.0)))


def _tv(got_log, want) -> float:
    """Largest total variation distance over the batch."""
    got = np.exp(np.asarray(got_log, np.float64))
    return float(0.5 * np.max(np.sum(np.abs(got - want), axis=(1, 2, 3))))


# ------------------------------------------------------------------ log p(x|s) and p(s|x)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "L{}-N{}x{}-K{}-C{}-B{}".format(*c))
def test_log_likelihood_and_posterior_vs_bruteforce(rng, case, route):
    """Relative error of log p(x|s) <= 1e-5; tempered posterior TV <= 1e-4."""
    n_layers, n1, n2, k, c, b = case
    epi, (mean, log_var, prior) = _epitome(rng, n_layers, n1, n2, c)
    unrelated = rng.uniform(size=(b, k, k, c)).astype(np.float32)
    matching = cut_patches(rng, mean, b, k, k)  # windows of the epitome plus small noise
    for patches in (unrelated, matching):
        got = ll_jit(epi, patches, route=route)
        assert got.shape == (b, n_layers, n1, n2) and got.dtype == jnp.float32
        want = log_likelihood_bf(mean, log_var, patches)
        assert _rel_err(got, want) <= 1e-5
    # Realistic temperatures: (K/11)^2 (training), K^2 (embedding), and 1 for small K.
    temps = [(k / 11) ** 2, float(k * k)] + ([1.0] if k <= 5 else [])
    for t in temps:
        got = lp_jit(epi, matching, temperature=t, route=route)
        assert _tv(got, posterior_bf(mean, log_var, prior, matching, t, loglik=want)) <= 1e-4, t


def test_log_likelihood_rectangular_patch(rng):
    epi, (mean, log_var, _) = _epitome(rng, 2, 11, 7, 2)
    patches = rng.uniform(size=(3, 5, 2, 2)).astype(np.float32)
    for route in ROUTES:
        got = ll_jit(epi, patches, route=route)
        assert _rel_err(got, log_likelihood_bf(mean, log_var, patches)) <= 1e-5


def test_log_likelihood_eager_auto_and_constants(rng):
    """Eager path with 'auto'; a unit-variance zero-mean epitome gives the closed form."""
    epi, (mean, log_var, _) = _epitome(rng, 2, 9, 9, 2)
    patches = rng.uniform(size=(2, 3, 3, 2)).astype(np.float32)
    assert _rel_err(log_likelihood(epi, patches), log_likelihood_bf(mean, log_var, patches)) <= 1e-5
    zero = Epitome(jnp.zeros((1, 5, 5, 2)), jnp.zeros((1, 5, 5, 2)), jnp.zeros((1, 5, 5)))
    x = np.zeros((1, 3, 3, 2), np.float32)
    np.testing.assert_allclose(
        log_likelihood(zero, x), np.full((1, 1, 5, 5), -0.5 * 18 * math.log(2 * math.pi)),
        rtol=1e-6,
    )


def test_posterior_random_patches_high_temperature(rng):
    """Unrelated patches with a broad posterior (T = K^2): still float32-accurate."""
    epi, (mean, log_var, prior) = _epitome(rng, 2, 13, 13, 3)
    patches = rng.uniform(size=(4, 5, 5, 3)).astype(np.float32)
    for route in ROUTES:
        got = lp_jit(epi, patches, temperature=25.0, route=route)
        assert _tv(got, posterior_bf(mean, log_var, prior, patches, 25.0)) <= 1e-4


def test_log_prior_vs_bruteforce(rng):
    epi, (_, _, prior) = _epitome(rng, 3, 5, 7, 1)
    np.testing.assert_allclose(log_prior(epi), log_prior_bf(prior), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("route", ROUTES)
def test_posterior_mask(rng, route):
    epi, (mean, log_var, prior) = _epitome(rng, 2, 11, 11, 2)
    patches = rng.uniform(size=(3, 4, 4, 2)).astype(np.float32)
    mask = rng.uniform(size=(2, 11, 11)) < 0.4
    t = 16.0
    got = np.asarray(lp_jit(epi, patches, temperature=t, mask=mask, route=route), np.float64)
    assert np.all(np.isneginf(got[:, ~mask]))
    assert np.all(np.isfinite(got[:, mask]))
    want = log_posterior_bf(mean, log_var, prior, patches, t, mask)
    assert _tv(got, np.exp(want)) <= 1e-4
    # The allowed entries are the unmasked posterior renormalised over the allowed set.
    full = np.asarray(lp_jit(epi, patches, temperature=t, route=route), np.float64)
    kept = np.exp(full[:, mask])
    kept /= kept.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.exp(got[:, mask]), kept, atol=1e-5)


def test_posterior_single_allowed_position(rng):
    epi, _ = _epitome(rng, 2, 9, 9, 2)
    mask = np.zeros((2, 9, 9), bool)
    mask[1, 3, 5] = True
    got = np.exp(np.asarray(log_posterior(epi, rng.uniform(size=(2, 3, 3, 2)), mask=mask)))
    want = np.zeros((2, 2, 9, 9))
    want[:, 1, 3, 5] = 1.0
    np.testing.assert_allclose(got, want, atol=1e-6)


@settings(max_examples=5, deadline=None)
@given(
    n_layers=st.integers(1, 3),
    n=st.integers(1, 12),
    k=st.integers(1, 12),
    c=st.integers(1, 3),
    b=st.integers(1, 3),
    log_t=st.floats(-3.0, 4.0),
    seed=st.integers(0, 2**31 - 1),
)
@example(n_layers=2, n=3, k=3, c=3, b=1, log_t=-3.0, seed=0)  # low T: float32 log-normaliser
def test_posterior_sums_to_one(n_layers, n, k, c, b, log_t, seed):
    k = min(k, n)
    rng = np.random.default_rng(seed)
    epi, _ = _epitome(rng, n_layers, n, n + 1, c)
    patches = rng.uniform(size=(b, k, k, c)).astype(np.float32)
    lp = np.asarray(lp_jit(epi, patches, temperature=math.exp(log_t), route="direct"))
    assert lp.shape == (b, n_layers, n, n + 1)
    assert np.all(lp <= 1e-6)
    np.testing.assert_allclose(np.exp(lp.astype(np.float64)).sum(axis=(1, 2, 3)), 1.0, atol=1e-5)


@pytest.mark.parametrize("route", ROUTES)
def test_posterior_shift_equivariance(rng, route):
    """Rolling mean/log_var/prior by (a, b) rolls the posterior by (a, b)."""
    epi, (mean, log_var, prior) = _epitome(rng, 2, 13, 11, 3)
    patches = cut_patches(rng, mean, 3, 5, 5, noise=0.1)
    a, b = int(rng.integers(1, 13)), int(rng.integers(1, 11))
    rolled = Epitome(
        jnp.roll(epi.mean, (a, b), axis=(1, 2)),
        jnp.roll(epi.log_var, (a, b), axis=(1, 2)),
        jnp.roll(epi.prior_logits, (a, b), axis=(1, 2)),
    )
    def post(e):
        return np.exp(np.asarray(lp_jit(e, patches, temperature=25.0, route=route), np.float64))

    base, shifted = post(epi), post(rolled)
    np.testing.assert_allclose(shifted, np.roll(base, (a, b), axis=(2, 3)), atol=1e-5)


def test_posterior_rectangular_epitome(rng):
    epi, (mean, log_var, prior) = _epitome(rng, 2, 7, 12, 2)
    patches = cut_patches(rng, mean, 4, 3, 5)
    for route in ROUTES:
        got = lp_jit(epi, patches, temperature=9.0, route=route)
        assert got.shape == (4, 2, 7, 12)
        assert _tv(got, posterior_bf(mean, log_var, prior, patches, 9.0)) <= 1e-4


def test_posterior_array_temperature(rng):
    epi, (mean, log_var, prior) = _epitome(rng, 2, 9, 9, 2)
    patches = rng.uniform(size=(2, 3, 3, 2)).astype(np.float32)
    got = log_posterior(epi, patches, temperature=jnp.float32(9.0))
    assert _tv(got, posterior_bf(mean, log_var, prior, patches, 9.0)) <= 1e-4


# ------------------------------------------------------------------ gradients


def _grad_total(epi, patches, route):
    def total(m, v):
        return jnp.sum(log_likelihood(Epitome(m, v, epi.prior_logits), patches, route=route))

    return jax.grad(total, argnums=(0, 1))


@pytest.mark.parametrize("route", ROUTES)
def test_log_likelihood_gradient_finite_differences(rng, route):
    """d sum(log p(x|s)) / d(mean, log_var) vs central differences of the float64 reference."""
    epi, (mean, log_var, _) = _epitome(rng, 2, 7, 9, 2)
    patches = rng.uniform(size=(3, 3, 4, 2)).astype(np.float32)
    g_mean, g_var = _grad_total(epi, patches, route)(epi.mean, epi.log_var)
    mean64, var64 = mean.astype(np.float64), log_var.astype(np.float64)
    h = 1e-4
    for _ in range(4):
        idx = tuple(int(rng.integers(s)) for s in mean.shape)
        for which, grad in ((0, g_mean), (1, g_var)):
            plus, minus = [mean64.copy(), var64.copy()], [mean64.copy(), var64.copy()]
            plus[which][idx] += h
            minus[which][idx] -= h
            fd = log_likelihood_bf(*plus, patches).sum() - log_likelihood_bf(*minus, patches).sum()
            fd /= 2 * h
            scale = np.max(np.abs(np.asarray(grad)))
            assert abs(float(grad[idx]) - fd) <= 1e-3 * abs(fd) + 1e-4 * scale, (which, idx)


@pytest.mark.parametrize("route", ROUTES)
def test_log_likelihood_gradient_under_jit(rng, route):
    """Training steps are jitted: jit(grad(...)) must work and equal the eager gradient."""
    epi, _ = _epitome(rng, 2, 7, 9, 2)
    patches = rng.uniform(size=(3, 3, 4, 2)).astype(np.float32)
    grad = _grad_total(epi, patches, route)
    eager = grad(epi.mean, epi.log_var)
    jitted = jax.jit(grad)(epi.mean, epi.log_var)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------ epitome helpers


def test_epitome_from_image_uint8(rng):
    img = rng.integers(0, 256, size=(9, 13, 4), dtype=np.uint8)
    epi = epitome_from_image(img, var=0.04)
    assert epi.mean.shape == (1, 9, 13, 4) and epi.mean.dtype == jnp.float32
    np.testing.assert_allclose(epi.mean[0], img / 255.0, rtol=1e-6)
    np.testing.assert_allclose(np.exp(epi.log_var), 0.04, rtol=1e-5)
    assert epi.log_var.shape == (1, 9, 13, 4)
    assert epi.prior_logits.shape == (1, 9, 13)
    np.testing.assert_allclose(np.exp(log_prior(epi)), 1.0 / (9 * 13), rtol=1e-5)
    assert epi.size == (9, 13) and epi.layers == 1 and epi.channels == 4


def test_epitome_from_image_uint16_and_float(rng):
    img16 = rng.integers(0, 65536, size=(5, 6, 2), dtype=np.uint16)
    np.testing.assert_allclose(epitome_from_image(img16).mean[0], img16 / 65535.0, rtol=1e-6)
    imgf = rng.normal(size=(5, 6, 2))
    np.testing.assert_allclose(epitome_from_image(imgf).mean[0], imgf, rtol=1e-6)
    np.testing.assert_allclose(np.exp(epitome_from_image(imgf).log_var), 0.01, rtol=1e-5)


def test_init_epitome_shapes_and_variance():
    key = jax.random.PRNGKey(3)
    epi = init_epitome(key, size=(11, 7), channels=3, layers=2, mean=[0.2, 0.5, 0.8],
                       mean_scale=0.05, var=0.3)
    assert epi.mean.shape == (2, 11, 7, 3) and epi.log_var.shape == (2, 11, 7, 3)
    assert epi.prior_logits.shape == (2, 11, 7)
    for leaf in (epi.mean, epi.log_var, epi.prior_logits):
        assert leaf.dtype == jnp.float32
    np.testing.assert_allclose(np.exp(epi.log_var), 0.3, rtol=1e-5)
    np.testing.assert_array_equal(epi.prior_logits, 0.0)
    centred = np.asarray(epi.mean) - np.array([0.2, 0.5, 0.8])
    assert abs(centred.mean()) < 0.02 and 0.03 < centred.std() < 0.07
    square = init_epitome(key, size=5, channels=1)
    assert square.mean.shape == (1, 5, 5, 1)
    np.testing.assert_allclose(np.exp(square.log_var), 0.1, rtol=1e-5)
    # Same key, same epitome; different key, different means.
    np.testing.assert_array_equal(init_epitome(key, size=5, channels=1).mean, square.mean)
    other = init_epitome(jax.random.PRNGKey(4), size=5, channels=1)
    assert not np.allclose(other.mean, square.mean)


def test_clamp_epitome_bounds(rng):
    mean = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
    log_var = rng.normal(scale=5.0, size=(2, 5, 6, 3)).astype(np.float32)
    logits = rng.normal(scale=6.0, size=(2, 5, 6)).astype(np.float32) + 100.0
    out = clamp_epitome(Epitome(jnp.asarray(mean), jnp.asarray(log_var), jnp.asarray(logits)))
    np.testing.assert_array_equal(out.mean, mean)
    var = np.exp(np.asarray(out.log_var, np.float64))
    assert var.min() >= 0.01 * (1 - 1e-5) and var.max() <= 1.0 + 1e-6
    np.testing.assert_allclose(out.log_var, np.clip(log_var, math.log(0.01), 0.0), rtol=1e-6)
    want = np.clip(logits - logits.mean(), -4.0, 4.0)
    np.testing.assert_allclose(out.prior_logits, want, atol=1e-4)
    assert np.abs(np.asarray(out.prior_logits)).max() <= 4.0
    # Already-valid parameters are unchanged (apart from centring the logits).
    again = clamp_epitome(out)
    np.testing.assert_allclose(again.log_var, out.log_var)
    assert dataclasses.is_dataclass(out)


def test_deprecated_method_alias_and_explicit_plan(rng):
    """``method=`` (and the old route names) still work with a DeprecationWarning; an explicit
    plan (here an accelerator's, without CPU chunking) gives the same values."""
    epi, arrays = _epitome(rng, 1, 9, 9, 2)
    patches = rng.uniform(size=(2, 3, 3, 2)).astype(np.float32)
    want = log_likelihood_bf(arrays[0], arrays[1], patches)
    ll = jax.jit(log_likelihood, static_argnames=("route", "plan", "method"))
    with pytest.warns(DeprecationWarning, match="route"):
        old = ll(epi, patches, method="hybrid")
    assert _rel_err(old, want) < 1e-5
    got = ll(epi, patches, route="dft_2d", plan=plan_for(platform="gpu"))
    assert _rel_err(got, want) < 1e-5
