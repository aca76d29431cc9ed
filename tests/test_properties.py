"""Hypothesis property tests of the public API (invariants that hold for any legal input).

Shapes are drawn from small ranges (``L`` 1..2, ``N`` 3..9, ``K`` 1..N, ``C`` 1..3, ``B``
1..4; ``B`` in {4, 8} for the sharded step), variances from ``[0.01, 1]`` and temperatures
from ``[0.05, 50]``. Values come from ``hypothesis.extra.numpy`` arrays (property (a): means
and patches anywhere in ``[-100, 100]``, far outside imagery yet far from float32 overflow of
``x^2 / sigma^2``) or from seeds for ``np.random``. Every property calls a jitted wrapper
(module level, so repeated shapes hit the compilation cache across examples and tests); (d)
and (g) trace ``iters`` (``fori_loop`` takes a traced trip count), so one compilation serves
every iteration count.

==========================================================  ========
property                                                    examples
==========================================================  ========
(a) ``log_posterior`` finite, normalised (with/without mask)      20
(b) circular-shift equivariance of the posterior                  20
(c) mass conservation of ``embed_labels``/``embed_classes``       20
(d) EM monotonicity of ``lsr_objective`` over ``iters`` 0..15     20
(e) ``predict`` gives a distribution per pixel                    20
(f) sharded train step == unsharded train step (3 steps each)      5
(g) ``super_resolve`` rows are distributions                      30
(h) ``self_epitomic_lsr`` gives a distribution per pixel           5
==========================================================  ========
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from epilsr import (
    Epitome,
    embed_classes,
    embed_labels,
    log_posterior,
    lsr_objective,
    predict,
    self_epitomic_lsr,
    super_resolve,
)
from epilsr.parallel import data_mesh, make_sharded_train_step
from epilsr.train import make_train_step, train_init

LOG_VAR_LO = math.log(0.01)
SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]

# --------------------------------------------------------------------------- strategies

seeds = st.integers(0, 2**32 - 1)
temperatures = st.floats(0.05, 50.0, allow_nan=False)
# float32 log(0.01) rounds below the bound; hypothesis needs exactly representable limits.
log_vars = st.floats(float(np.nextafter(np.float32(LOG_VAR_LO), np.float32(0))), 0.0, width=32)
batches = st.integers(1, 4)


@st.composite
def dims(draw, *, batch=batches):
    """``(L, N, K, C, B)`` in the ranges of the module docstring."""
    n = draw(st.integers(3, 9))
    return (
        draw(st.integers(1, 2)),
        n,
        draw(st.integers(1, n)),
        draw(st.integers(1, 3)),
        draw(batch),
    )


def _epitome(rng: np.random.Generator, layers: int, n: int, c: int) -> Epitome:
    """Means U[0, 1], variances log-uniform in [0.01, 1], prior logits U[-4, 4]."""
    return Epitome(
        mean=jnp.asarray(rng.uniform(0, 1, (layers, n, n, c)), jnp.float32),
        log_var=jnp.asarray(rng.uniform(LOG_VAR_LO, 0.0, (layers, n, n, c)), jnp.float32),
        prior_logits=jnp.asarray(rng.uniform(-4, 4, (layers, n, n)), jnp.float32),
    )


def _patches(rng: np.random.Generator, mean: jax.Array, b: int, k: int) -> np.ndarray:
    """Wrap-around windows of the epitome plus noise (so posteriors are not all flat)."""
    mean = np.asarray(mean)
    layers, n, _, _ = mean.shape
    out = []
    for _ in range(b):
        l, s1, s2 = rng.integers(layers), rng.integers(n), rng.integers(n)
        rows, cols = (s1 + np.arange(k)) % n, (s2 + np.arange(k)) % n
        out.append(mean[l][np.ix_(rows, cols)])
    return (np.stack(out) + 0.1 * rng.normal(size=(b, k, k, mean.shape[-1]))).astype(np.float32)


def _table(rng: np.random.Generator, n_classes: int, n: int) -> np.ndarray:
    """``[Cc, n]`` rows on the simplex with some exact zeros (never an all-zero row)."""
    table = rng.dirichlet(np.full(n, 0.7), size=n_classes)
    table[rng.uniform(size=table.shape) < 0.3] = 0.0
    table[np.arange(n_classes), rng.integers(n, size=n_classes)] += 0.1
    return (table / table.sum(1, keepdims=True)).astype(np.float32)


def _counts(rng: np.random.Generator, shape, n_classes: int) -> np.ndarray:
    """Sparse non-negative counts with empty positions and possibly empty classes."""
    counts = rng.gamma(0.4, size=(*shape, n_classes))
    counts[rng.uniform(size=shape) < 0.25] = 0.0
    counts[..., rng.uniform(size=n_classes) < 0.2] = 0.0
    if counts.sum() == 0:
        counts.reshape(-1)[0] = 1.0
    return counts.astype(np.float32)


# --------------------------------------------------------------------------- jitted wrappers


@jax.jit
def _posteriors(epitome, patches, temperature, mask):
    return (
        log_posterior(epitome, patches, temperature=temperature),
        log_posterior(epitome, patches, temperature=temperature, mask=mask),
    )


@jax.jit
def _embeddings(epitome, patches, labels, classes, temperature, mask, n_classes_probe):
    n_classes = n_classes_probe.shape[0]
    return (
        embed_labels(epitome, patches, labels, temperature=temperature, mask=mask),
        embed_classes(
            epitome, patches, classes, n_classes=n_classes, temperature=temperature, mask=mask
        ),
    )


@jax.jit
def _em_objectives(counts, table, prior):
    """``lsr_objective`` after ``super_resolve(iters=t)`` for t = 0..15 (``iters`` traced)."""

    def at(t):
        q = super_resolve(counts, table, class_prior=prior, iters=t)
        return lsr_objective(counts, table, q, class_prior=prior)

    return jax.vmap(at)(jnp.arange(16))


@jax.jit
def _em_objectives_observed(counts, table):
    def at(t):
        return lsr_objective(counts, table, super_resolve(counts, table, iters=t))

    return jax.vmap(at)(jnp.arange(16))


_sr = jax.jit(super_resolve)  # iters traced: one compilation per shape
_predict = jax.jit(predict, static_argnames=("patch_size", "stride", "chunk", "route"))

# --------------------------------------------------------------------------- (a)


@st.composite
def posterior_inputs(draw):
    layers, n, k, c, b = draw(dims())
    big = st.floats(-100.0, 100.0, allow_nan=False, width=32)
    mean = draw(hnp.arrays(np.float32, (layers, n, n, c), elements=big))
    log_var = draw(hnp.arrays(np.float32, (layers, n, n, c), elements=log_vars))
    logits = draw(hnp.arrays(np.float32, (layers, n, n), elements=st.floats(-4, 4, width=32)))
    patches = draw(hnp.arrays(np.float32, (b, k, k, c), elements=big))
    mask = draw(hnp.arrays(np.bool_, (layers, n, n)))
    mask[
        draw(st.integers(0, layers - 1)), draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
    ] = True
    return Epitome(jnp.asarray(mean), jnp.asarray(log_var), jnp.asarray(logits)), patches, mask


@settings(max_examples=12, suppress_health_check=SLOW)
@given(inputs=posterior_inputs(), temperature=temperatures)
def test_log_posterior_finite_and_normalised(inputs, temperature):
    epitome, patches, mask = inputs
    plain, masked = (
        np.asarray(a, np.float64) for a in _posteriors(epitome, patches, temperature, mask)
    )
    assert plain.shape == (patches.shape[0], *mask.shape)
    assert np.all(np.isfinite(plain))
    np.testing.assert_allclose(np.exp(plain).sum(axis=(1, 2, 3)), 1.0, atol=1e-5)
    assert np.all(np.isfinite(masked[:, mask]))
    assert np.all(masked[:, ~mask] == -np.inf)
    np.testing.assert_allclose(np.exp(masked).sum(axis=(1, 2, 3)), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- (b)


@settings(max_examples=12, suppress_health_check=SLOW)
@given(shape=dims(), temperature=temperatures, seed=seeds, data=st.data())
def test_posterior_is_shift_equivariant(shape, temperature, seed, data):
    layers, n, k, c, b = shape
    shift = (data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1)))
    rng = np.random.default_rng(seed)
    epitome = _epitome(rng, layers, n, c)
    patches = _patches(rng, epitome.mean, b, k)
    rolled = jax.tree.map(lambda x: np.roll(np.asarray(x), shift, axis=(1, 2)), epitome)
    everywhere = np.ones((layers, n, n), bool)
    got = np.exp(np.asarray(_posteriors(rolled, patches, temperature, everywhere)[0]))
    want = np.roll(
        np.exp(np.asarray(_posteriors(epitome, patches, temperature, everywhere)[0])),
        shift,
        axis=(2, 3),
    )
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-3)


# --------------------------------------------------------------------------- (c)


@settings(max_examples=12, suppress_health_check=SLOW)
@given(shape=dims(), temperature=temperatures, seed=seeds, data=st.data())
def test_embeddings_conserve_mass(shape, temperature, seed, data):
    layers, n, k, c, b = shape
    kl = data.draw(st.integers(1, k), label="label block")
    n_labels = data.draw(st.integers(1, 3), label="labels")
    n_classes = data.draw(st.integers(1, 3), label="classes")
    use_mask = data.draw(st.booleans(), label="mask")
    rng = np.random.default_rng(seed)
    epitome = _epitome(rng, layers, n, c)
    patches = _patches(rng, epitome.mean, b, k)
    labels = rng.gamma(0.5, size=(b, kl, kl, n_labels)).astype(np.float32)
    classes = rng.integers(0, n_classes, size=b).astype(np.int32)
    mask = rng.uniform(size=(layers, n, n)) < 0.5 if use_mask else np.ones((layers, n, n), bool)
    mask.reshape(-1)[rng.integers(mask.size)] = True
    z_lab, z_cls = (
        np.asarray(a, np.float64)
        for a in _embeddings(
            epitome, patches, labels, classes, temperature, mask, np.zeros(n_classes)
        )
    )
    assert z_lab.shape == (layers, n, n, n_labels) and z_cls.shape == (layers, n, n, n_classes)
    assert np.all(np.isfinite(z_lab)) and np.all(z_lab >= -1e-6)
    assert np.all(np.isfinite(z_cls)) and np.all(z_cls >= -1e-6)
    np.testing.assert_allclose(z_lab.sum(), labels.astype(np.float64).sum(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        z_lab.sum(axis=(0, 1, 2)),
        labels.astype(np.float64).sum(axis=(0, 1, 2)),
        rtol=1e-5,
        atol=1e-5,
    )
    want = k * k * np.bincount(classes, minlength=n_classes)
    np.testing.assert_allclose(z_cls.sum(axis=(0, 1, 2)), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- (d)


@settings(max_examples=12, suppress_health_check=SLOW)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 6), st.integers(1, 6)),
    n_classes=st.integers(1, 4),
    n_labels=st.integers(1, 4),
    explicit_prior=st.booleans(),
    seed=seeds,
)
def test_em_objective_is_monotone(shape, n_classes, n_labels, explicit_prior, seed):
    rng = np.random.default_rng(seed)
    counts = _counts(rng, shape, n_classes)
    table = _table(rng, n_classes, n_labels)
    if explicit_prior:
        prior = rng.dirichlet(np.ones(n_classes)).astype(np.float32)
        objective = np.asarray(_em_objectives(counts, table, prior), np.float64)
    else:
        objective = np.asarray(_em_objectives_observed(counts, table), np.float64)
    assert np.all(np.isfinite(objective)), objective
    steps = np.diff(objective)
    tol = 1e-5 * np.maximum(1.0, np.abs(objective[:-1]))
    assert np.all(steps >= -tol), (steps.min(), objective)


# --------------------------------------------------------------------------- (e)


@settings(max_examples=12, suppress_health_check=SLOW)
@given(shape=dims(), temperature=temperatures, seed=seeds, data=st.data())
def test_predict_gives_distributions(shape, temperature, seed, data):
    layers, n, k, c, _ = shape
    h = data.draw(st.integers(k, k + 4), label="H")
    w = data.draw(st.integers(k, k + 4), label="W")
    stride = data.draw(st.integers(1, k), label="stride")
    n_labels = data.draw(st.integers(1, 3), label="labels")
    rng = np.random.default_rng(seed)
    epitome = _epitome(rng, layers, n, c)
    label_probs = rng.dirichlet(np.full(n_labels, 0.5), size=(layers, n, n)).astype(np.float32)
    image = rng.uniform(0, 1, (h, w, c)).astype(np.float32)
    out = np.asarray(
        _predict(
            epitome,
            label_probs,
            image,
            patch_size=k,
            temperature=temperature,
            stride=stride,
            chunk=8,
        ),
        np.float64,
    )
    assert out.shape == (h, w, n_labels)
    assert np.all(np.isfinite(out))
    assert np.all(out >= 0)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- (f)

_SGD = optax.sgd(0.1)  # one object: part of the jit cache key
_STEPS: dict = {}


def _train_steps(quantile: float, promotion: bool):
    """``(sharded, plain)`` jitted steps, cached per static hyperparameters."""
    key = (quantile, promotion)
    if key not in _STEPS:
        mesh = data_mesh(jax.devices()[:4])
        hyper = dict(quantile=quantile, promotion=promotion, temperature=1.0)  # see (f)
        _STEPS[key] = (
            make_sharded_train_step(mesh, optimizer=_SGD, **hyper),
            make_train_step(optimizer=_SGD, **hyper),
        )
    return _STEPS[key]


@settings(max_examples=5, suppress_health_check=SLOW)
@given(
    shape=dims(batch=st.sampled_from([4, 8])),
    quantile=st.sampled_from([0.25, 0.5, 1.0]),
    promotion=st.booleans(),
    seed=seeds,
)
def test_sharded_step_equals_unsharded(shape, quantile, promotion, seed):
    """Three steps, each from the same state for both routes, at ``T = 1``.

    Conditioning, not sharding, sets these choices: with ``sigma^2 = 0.01``, ``sgd(0.1)`` and the
    default ``T = (K/11)^2`` (1/121 at K = 1) the float32 gradient is itself ~3e-4 (relative)
    off the float64 one, the means run off to ~1e2 and chained steps amplify reduction-order
    noise chaotically; a real sharding error (per-shard quantile, missing all-reduce) is O(1).
    """
    if len(jax.devices()) < 4:
        pytest.skip(f"needs 4 devices, got {len(jax.devices())} (XLA_FLAGS set too late?)")
    layers, n, k, c, b = shape
    rng = np.random.default_rng(seed)
    epitome = _epitome(rng, layers, n, c)
    sharded, plain = _train_steps(quantile, promotion)
    state = train_init(jax.random.key(0), epitome, _SGD)
    for _ in range(3):  # later steps see non-zero promotion counters
        batch = _patches(rng, epitome.mean, b, k)
        got, got_info = sharded(state, batch)
        new, info = plain(state, batch)
        np.testing.assert_allclose(got_info.loss, info.loss, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_info.masked_fraction, info.masked_fraction, atol=1e-6)
        leaves = zip(
            jax.tree.leaves(got.params),
            jax.tree.leaves(new.params),
            jax.tree.leaves(state.params),
            strict=True,
        )
        for x, y, before in leaves:
            x, y = np.asarray(x), np.asarray(y)
            assert np.all(np.isfinite(x))
            # float32 tolerance at the scale of the update (SGD moves means by up to ~10 here).
            update = np.abs(y - np.asarray(before)).max()
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=2e-4 * update + 1e-6)
        np.testing.assert_allclose(got.counters, new.counters, rtol=1e-5, atol=1e-6)
        assert int(got.step) == int(new.step)
        state = new


# --------------------------------------------------------------------------- (g)


@settings(max_examples=15, suppress_health_check=SLOW)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 6), st.integers(1, 6)),
    n_classes=st.integers(1, 4),
    n_labels=st.integers(1, 4),
    iters=st.integers(0, 25),
    seed=seeds,
)
def test_super_resolve_rows_are_distributions(shape, n_classes, n_labels, iters, seed):
    rng = np.random.default_rng(seed)
    counts = _counts(rng, shape, n_classes)
    table = _table(rng, n_classes, n_labels)
    q = np.asarray(_sr(counts, table, iters=iters), np.float64)
    assert q.shape == (*shape, n_labels)
    assert np.all(np.isfinite(q)) and np.all(q >= 0)
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-5)
    empty = counts.sum(-1) == 0  # positions that received no class mass stay uniform
    np.testing.assert_allclose(q[empty], 1.0 / n_labels, atol=1e-6)


# --------------------------------------------------------------------------- (h)

_SELF: dict = {}


def _self_lsr(**static):
    key = tuple(sorted(static.items()))
    if key not in _SELF:
        _SELF[key] = jax.jit(lambda k, img, cls, tab: self_epitomic_lsr(k, img, cls, tab, **static))
    return _SELF[key]


@settings(max_examples=5, suppress_health_check=SLOW)
@given(
    h=st.integers(6, 12),
    w=st.integers(6, 12),
    c=st.integers(1, 3),
    n_classes=st.integers(1, 3),
    n_labels=st.integers(1, 3),
    downsample=st.integers(1, 2),
    dense=st.booleans(),
    spread=st.sampled_from(["window", "pixel"]),
    seed=seeds,
    data=st.data(),
)
def test_self_epitomic_lsr_gives_distributions(
    h, w, c, n_classes, n_labels, downsample, dense, spread, seed, data
):
    small = -(-min(h, w) // downsample)
    k = data.draw(st.sampled_from([x for x in (1, 3, 5) if x <= small]), label="patch size")
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 1, (h, w, c)).astype(np.float32)
    classes = rng.integers(0, n_classes, (h, w)).astype(np.int32)
    table = _table(rng, n_classes, n_labels)
    fn = _self_lsr(
        patch_size=k,
        downsample=downsample,
        sample_fraction=None if dense else 0.3,
        class_spread=spread,
        iters=5,
        chunk=16,
    )
    out = np.asarray(fn(jax.random.key(seed % 1000), image, classes, table), np.float64)
    assert out.shape == (h, w, n_labels)
    assert np.all(np.isfinite(out)) and np.all(out >= 0)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
