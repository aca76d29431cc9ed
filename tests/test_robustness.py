"""Extreme but legal inputs: outputs stay finite and correctly normalised.

Each case is its own test. Tolerances that depend on float32 are stated relative to the size of
the quantities involved (a log-likelihood of magnitude ``|ll|`` carries a rounding error of a
few ``1e-7 |ll|``; the posterior inherits it).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from epilsr import (
    Epitome,
    embed_classes,
    log_likelihood,
    log_posterior,
    lsr_objective,
    predict,
    self_epitomic_lsr,
    super_resolve,
    train_init,
    train_step,
)
from epilsr.epitome import LOG_VAR_MAX, LOG_VAR_MIN, PRIOR_LOGIT_BOUND
from tests.reference import cut_patches, log_likelihood_bf, log_posterior_bf

_log_posterior = jax.jit(log_posterior)  # temperature traced: shared by the large cases
_log_likelihood = jax.jit(log_likelihood)


def _assert_normalised(log_post: np.ndarray, atol: float = 1e-5) -> None:
    log_post = np.asarray(log_post, np.float64)
    assert np.all(np.isfinite(log_post))
    np.testing.assert_allclose(np.exp(log_post).sum(axis=(1, 2, 3)), 1.0, atol=atol)


def _window(image: np.ndarray, s1: int, s2: int, k: int) -> np.ndarray:
    n1, n2 = image.shape[:2]
    return image[np.ix_((s1 + np.arange(k)) % n1, (s2 + np.arange(k)) % n2)]


# --------------------------------------------------------------------------- variance bounds


@pytest.mark.parametrize("variances", ["min", "max", "mixed"])
def test_variances_at_the_bounds(rng, variances):
    layers, n, k, c, b = 2, 7, 3, 2, 4
    mean = rng.uniform(0, 1, (layers, n, n, c)).astype(np.float32)
    log_var = {
        "min": np.full(mean.shape, LOG_VAR_MIN),
        "max": np.full(mean.shape, LOG_VAR_MAX),
        "mixed": np.where(rng.uniform(size=mean.shape) < 0.5, LOG_VAR_MIN, LOG_VAR_MAX),
    }[variances].astype(np.float32)
    logits = rng.normal(size=(layers, n, n)).astype(np.float32)
    epitome = Epitome(jnp.asarray(mean), jnp.asarray(log_var), jnp.asarray(logits))
    patches = cut_patches(rng, mean, b, k, k, noise=0.3)
    for temperature in (0.05, 1.0, 50.0):
        got = np.asarray(log_posterior(epitome, patches, temperature=temperature), np.float64)
        _assert_normalised(got)
        want = log_posterior_bf(mean, log_var, logits, patches, temperature)
        np.testing.assert_allclose(np.exp(got), np.exp(want), atol=1e-4)
    ll = np.asarray(log_likelihood(epitome, patches), np.float64)
    want_ll = log_likelihood_bf(mean, log_var, patches)
    np.testing.assert_allclose(ll, want_ll, rtol=1e-5, atol=1e-3)


# --------------------------------------------------------------------------- large epitome

BIG_N, BIG_K, BIG_C = 499, 31, 3


def _exact_loglik(mean, log_var, patch, s1, s2):
    """float64 ``log p(x|s)`` of one window."""
    k = patch.shape[0]
    mu = _window(mean[0].astype(np.float64), s1, s2, k)
    lv = _window(log_var[0].astype(np.float64), s1, s2, k)
    return -0.5 * np.sum((patch - mu) ** 2 / np.exp(lv) + lv + math.log(2 * math.pi))


def test_large_epitome_untempered_posterior(rng):
    """499x499, K=31, T=1: p(x|s) underflows everywhere but the true window."""
    mean = rng.uniform(0, 1, (1, BIG_N, BIG_N, BIG_C)).astype(np.float32)
    log_var = rng.uniform(LOG_VAR_MIN, LOG_VAR_MAX, mean.shape).astype(np.float32)
    epitome = Epitome(jnp.asarray(mean), jnp.asarray(log_var), jnp.zeros((1, BIG_N, BIG_N)))
    starts = [(3, 5), (480, 490)]  # the second window wraps around both borders
    patches = np.stack([_window(mean[0], s1, s2, BIG_K) for s1, s2 in starts])
    post = np.asarray(_log_posterior(epitome, patches, temperature=1.0), np.float64)
    assert post.shape == (2, 1, BIG_N, BIG_N)
    _assert_normalised(post)
    ll = np.asarray(_log_likelihood(epitome, patches), np.float64)
    for b, (s1, s2) in enumerate(starts):
        assert np.unravel_index(np.argmax(post[b]), post[b].shape) == (0, s1, s2)
        np.testing.assert_allclose(post[b, 0, s1, s2], 0.0, atol=1e-6)
        # The runner-up is astronomically less likely: the regime where exp(log p) vanishes.
        assert np.sort(post[b].ravel())[-2] < -100.0
        # The winning log-likelihood itself is accurate to float32 rounding of its terms.
        exact = _exact_loglik(mean, log_var, patches[b].astype(np.float64), s1, s2)
        assert abs(ll[b, 0, s1, s2] - exact) <= 1e-5 * BIG_K * BIG_K * BIG_C, (ll, exact)
        # ... and so is a wrong window (the cross term does not cancel there).
        t1, t2 = (s1 + 7) % BIG_N, (s2 + 250) % BIG_N
        exact = _exact_loglik(mean, log_var, patches[b].astype(np.float64), t1, t2)
        np.testing.assert_allclose(ll[b, 0, t1, t2], exact, rtol=1e-5)


# --------------------------------------------------------------------------- constant inputs


@pytest.mark.parametrize("n,k", [(9, 3), (64, 15), (BIG_N, BIG_K)])
def test_constant_patches_on_constant_epitome_give_uniform_posterior(n, k):
    c, b = BIG_C, 2  # (499, 31) reuses the compilation of the large-epitome test
    epitome = Epitome(
        mean=jnp.full((1, n, n, c), 0.3),
        log_var=jnp.full((1, n, n, c), LOG_VAR_MIN),
        prior_logits=jnp.zeros((1, n, n)),
    )
    patches = np.full((b, k, k, c), 0.7, np.float32)
    post = np.asarray(_log_posterior(epitome, patches, temperature=1.0), np.float64)
    _assert_normalised(post)
    # Every window is the same: uniform up to float32 rounding of |log p(x|s)| (~2e4 at 499).
    ll = -0.5 * k * k * c * (0.16 / 0.01 + LOG_VAR_MIN + math.log(2 * math.pi))
    np.testing.assert_allclose(post, -math.log(n * n), rtol=0, atol=2e-6 * abs(ll) + 1e-6)


def test_prior_logits_at_the_bounds(rng):
    layers, n, k, c, b = 2, 6, 3, 2, 3
    logits = np.where(rng.uniform(size=(layers, n, n)) < 0.5, -1.0, 1.0) * PRIOR_LOGIT_BOUND
    logits = logits.astype(np.float32)
    mean = rng.uniform(0, 1, (layers, n, n, c)).astype(np.float32)
    log_var = rng.uniform(LOG_VAR_MIN, LOG_VAR_MAX, mean.shape).astype(np.float32)
    epitome = Epitome(jnp.asarray(mean), jnp.asarray(log_var), jnp.asarray(logits))
    patches = cut_patches(rng, mean, b, k, k, noise=0.1)
    for temperature in (0.05, 1.0, 50.0):
        got = np.asarray(log_posterior(epitome, patches, temperature=temperature), np.float64)
        _assert_normalised(got)
        want = log_posterior_bf(mean, log_var, logits, patches, temperature)
        np.testing.assert_allclose(np.exp(got), np.exp(want), atol=1e-4)
    # A featureless epitome: the posterior is the prior, e^8 between the two kinds of position.
    flat = Epitome(jnp.full(mean.shape, 0.5), jnp.full(mean.shape, -1.0), jnp.asarray(logits))
    got = np.asarray(log_posterior(flat, np.full((1, k, k, c), 0.5), temperature=1.0))
    want = logits - np.log(np.exp(logits.astype(np.float64)).sum())
    np.testing.assert_allclose(got[0], want, atol=1e-5)


# --------------------------------------------------------------------------- saturated imagery

SATURATED = {
    "float-zeros": np.zeros((16, 16, 3), np.float32),
    "float-ones": np.ones((16, 16, 3), np.float32),
    "uint8-255": np.full((16, 16, 3), 255, np.uint8),
}


@pytest.mark.parametrize("name", list(SATURATED))
def test_self_epitomic_lsr_on_saturated_imagery(rng, name):
    image = SATURATED[name]
    classes = rng.integers(0, 3, image.shape[:2]).astype(np.int32)
    table = rng.dirichlet(np.ones(4), size=3).astype(np.float32)
    for kwargs in ({"patch_size": 5}, {"patch_size": 3, "downsample": 2, "sample_fraction": None}):
        out = np.asarray(
            self_epitomic_lsr(
                jax.random.key(0), image, classes, table, chunk=64, iters=5, **kwargs
            ),
            np.float64,
        )
        assert out.shape == (16, 16, 4)
        assert np.all(np.isfinite(out)) and np.all(out >= 0)
        np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", list(SATURATED))
def test_predict_on_saturated_imagery(rng, name):
    image = SATURATED[name]
    n, c = 8, 3
    epitome = Epitome(
        mean=jnp.asarray(rng.uniform(0.2, 0.8, (1, n, n, c)), jnp.float32),
        log_var=jnp.full((1, n, n, c), LOG_VAR_MIN),
        prior_logits=jnp.zeros((1, n, n)),
    )
    label_probs = rng.dirichlet(np.ones(4), size=(1, n, n)).astype(np.float32)
    out = np.asarray(
        predict(epitome, label_probs, image, patch_size=5, temperature=1.0), np.float64
    )
    assert out.shape == (16, 16, 4)
    assert np.all(np.isfinite(out)) and np.all(out >= 0)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- training


def _far_setup():
    n, c, k, b = 16, 3, 11, 8
    epitome = Epitome(
        mean=jnp.zeros((1, n, n, c)),
        log_var=jnp.full((1, n, n, c), LOG_VAR_MIN),
        prior_logits=jnp.zeros((1, n, n)),
    )
    return epitome, np.ones((b, k, k, c), np.float32)  # 10 standard deviations away


@pytest.mark.parametrize("optimizer", [optax.adam(3e-3), optax.sgd(0.1)], ids=["adam", "sgd"])
def test_train_step_far_from_the_epitome(optimizer):
    epitome, patches = _far_setup()
    state = train_init(jax.random.key(0), epitome, optimizer)
    for _ in range(3):
        state, info = train_step(state, patches, optimizer=optimizer)
        assert np.isfinite(float(info.loss))
        assert np.isfinite(float(info.log_likelihood))
        for leaf in jax.tree.leaves(state.params):
            assert np.all(np.isfinite(np.asarray(leaf)))
        assert np.all(np.isfinite(np.asarray(state.counters)))
        assert np.all(np.asarray(state.params.log_var) >= LOG_VAR_MIN - 1e-6)


def test_train_posterior_mass_is_one_far_from_the_epitome():
    """The counter increment ``mean_t p(s|x_t)`` is a distribution; coverage is in (0, 1].

    With ``|log p(x|s)| ~ 2e4`` the posterior computed as ``exp(logits - logsumexp)`` loses
    ~1e-3 relative accuracy (the logsumexp is rounded at the scale of the logits): the counters
    grow by 1.00026 per step and coverage reads 1.0012. ``jax.nn.softmax(logits, axis=(1, 2,
    3))`` in ``epilsr.train.objective`` normalises exactly.
    """
    epitome, patches = _far_setup()
    optimizer = optax.sgd(0.0)
    state = train_init(jax.random.key(0), epitome, optimizer)
    # A threshold no counter can reach: no reset, so the counters show the increment.
    new, info = train_step(
        state, patches, optimizer=optimizer, quantile=1.0, promotion_threshold=10.0
    )
    np.testing.assert_allclose(float(np.asarray(new.counters, np.float64).sum()), 1.0, rtol=1e-5)
    assert 0.0 < float(info.coverage) <= 1.0 + 1e-6, float(info.coverage)


# --------------------------------------------------------------------------- super_resolve


def _lsr_inputs(rng, shape=(2, 6, 6), n_classes=3, n=4):
    counts = rng.gamma(0.5, size=(*shape, n_classes)).astype(np.float32)
    table = rng.dirichlet(np.ones(n), size=n_classes).astype(np.float32)
    return counts, table


def _assert_rows(q: np.ndarray) -> None:
    q = np.asarray(q, np.float64)
    assert np.all(np.isfinite(q)) and np.all(q >= 0)
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-5)


def test_super_resolve_count_scales(rng):
    counts, table = _lsr_inputs(rng)
    want = np.asarray(super_resolve(counts, table, iters=20))
    for scale in (1e-30, 1e-10, 1e10, 1e30):
        got = np.asarray(super_resolve(counts * np.float32(scale), table, iters=20))
        _assert_rows(got)
        np.testing.assert_allclose(got, want, atol=1e-5)  # p(s|c) is scale-free
    # Entries spanning 60 orders of magnitude, also between classes.
    mixed = (10.0 ** rng.uniform(-30, 30, counts.shape)).astype(np.float32)
    for prior in (None, np.array([0.2, 0.3, 0.5], np.float32)):
        q = np.asarray(super_resolve(mixed, table, class_prior=prior, iters=20))
        _assert_rows(q)
        assert np.isfinite(float(lsr_objective(mixed, table, q, class_prior=prior)))
    per_class = counts * np.array([1e30, 1e-30, 1.0], np.float32)
    prior = np.array([0.2, 0.3, 0.5], np.float32)
    np.testing.assert_allclose(
        super_resolve(per_class, table, class_prior=prior, iters=20),
        super_resolve(counts, table, class_prior=prior, iters=20),
        atol=1e-5,
    )


def test_super_resolve_classes_with_zero_counts(rng):
    counts, table = _lsr_inputs(rng, n_classes=4)
    counts[..., [1, 3]] = 0.0
    table[1] = 0.0  # an all-zero row is fine for a class that never occurs
    q = np.asarray(super_resolve(counts, table, iters=20))
    _assert_rows(q)
    # Classes without mass carry no weight: same as leaving them out.
    want = np.asarray(super_resolve(counts[..., [0, 2]], table[[0, 2]], iters=20))
    np.testing.assert_allclose(q, want, atol=1e-5)
    assert np.isfinite(float(lsr_objective(counts, table, q)))


# --------------------------------------------------------------------------- embeddings


def test_embed_classes_with_one_allowed_position(rng):
    layers, n, k, c, b, n_classes = 2, 7, 3, 2, 6, 3
    mean = rng.uniform(0, 1, (layers, n, n, c)).astype(np.float32)
    epitome = Epitome(
        jnp.asarray(mean),
        jnp.asarray(rng.uniform(LOG_VAR_MIN, LOG_VAR_MAX, mean.shape), jnp.float32),
        jnp.asarray(rng.normal(size=(layers, n, n)), jnp.float32),
    )
    patches = cut_patches(rng, mean, b, k, k, noise=0.5)
    classes = np.array([0, 2, 2, 0, 2, 2], np.int32)
    mask = np.zeros((layers, n, n), bool)
    mask[1, 5, 6] = True  # the window wraps around both borders
    z = np.asarray(
        embed_classes(epitome, patches, classes, n_classes=n_classes, temperature=0.05, mask=mask),
        np.float64,
    )
    assert np.all(np.isfinite(z))
    want = np.zeros_like(z)
    rows, cols = (5 + np.arange(k)) % n, (6 + np.arange(k)) % n
    want[1][np.ix_(rows, cols)] = np.bincount(classes, minlength=n_classes)
    np.testing.assert_allclose(z, want, atol=1e-5)
