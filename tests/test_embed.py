"""Label and class embeddings (Eqs. 6 and 11) against float64 brute force; mass and additivity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epilsr import Epitome, embed_classes, embed_labels, spread_class_posteriors
from tests.reference import (
    cut_patches,
    embed_classes_bf,
    embed_labels_bf,
    posterior_bf,
    random_epitome_arrays,
)

ROUTES = ["direct", "fft"]
emb_labels = jax.jit(embed_labels, static_argnames="route")
emb_classes = jax.jit(embed_classes, static_argnames=("n_classes", "route"))


def _epitome(rng, n_layers, n1, n2, c):
    mean, log_var, prior = random_epitome_arrays(rng, n_layers, n1, n2, c)
    epi = Epitome(jnp.asarray(mean), jnp.asarray(log_var), jnp.asarray(prior))
    return epi, (mean, log_var, prior)


def _soft_labels(rng, b, kl1, kl2, n):
    y = rng.gamma(0.5, size=(b, kl1, kl2, n))
    return (y / y.sum(axis=-1, keepdims=True)).astype(np.float32)


def _close(got, want, rel=1e-4):
    """Agreement relative to the total mass (posteriors differ at float32 precision)."""
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= rel * max(np.max(np.abs(want)), 1.0)


# (L, N1, N2, K, Kl, C, n, B): odd/prime N, Kl = K, Kl = 1, even offsets, rectangular epitome.
LABEL_CASES = [
    (1, 7, 7, 3, 3, 2, 2, 4),
    (2, 11, 11, 5, 3, 3, 4, 5),
    (3, 9, 13, 6, 1, 1, 3, 3),
    (2, 13, 13, 7, 4, 2, 5, 4),
    (1, 8, 8, 8, 5, 3, 3, 2),
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "case", LABEL_CASES, ids=lambda c: "L{}-N{}x{}-K{}-Kl{}-C{}-n{}-B{}".format(*c)
)
def test_embed_labels_vs_bruteforce(rng, case, route):
    n_layers, n1, n2, k, kl, c, n, b = case
    epi, (mean, log_var, prior) = _epitome(rng, n_layers, n1, n2, c)
    patches = cut_patches(rng, mean, b, k, k, noise=0.1)
    labels = _soft_labels(rng, b, kl, kl, n)
    t = float(k * k)
    got = emb_labels(epi, patches, labels, temperature=t, route=route)
    assert got.shape == (n_layers, n1, n2, n) and got.dtype == jnp.float32
    _close(got, embed_labels_bf(mean, log_var, prior, patches, labels, t))


def test_embed_labels_rectangular_blocks_and_mask(rng):
    """K1 != K2 patches, Kl1 != Kl2 label blocks (separate offsets per axis) and a mask."""
    epi, (mean, log_var, prior) = _epitome(rng, 2, 9, 11, 2)
    patches = cut_patches(rng, mean, 3, 5, 4, noise=0.1)
    labels = _soft_labels(rng, 3, 2, 3, 3)
    mask = rng.uniform(size=(2, 9, 11)) < 0.5
    for route in ROUTES:
        got = emb_labels(epi, patches, labels, temperature=9.0, mask=mask, route=route)
        _close(got, embed_labels_bf(mean, log_var, prior, patches, labels, 9.0, mask))


def test_embed_labels_one_hot_known_position():
    """A patch that fits exactly one window puts its centred label block exactly there."""
    n, k, kl = 9, 5, 3
    mean = np.zeros((1, n, n, 1), np.float32)
    mean[0, 2:7, 6:9, 0] = 1.0  # a bright block straddling the right edge (wraps)
    mean[0, 2:7, 0:2, 0] = 1.0
    epi = Epitome(jnp.asarray(mean), jnp.full(mean.shape, np.log(0.01)), jnp.zeros((1, n, n)))
    patch = np.roll(np.roll(mean[0], -2, axis=0), -6, axis=1)[:k, :k][None]  # window (2, 6)
    labels = np.zeros((1, kl, kl, 2), np.float32)
    labels[..., 1] = 1.0
    labels[0, 0, 0] = [1.0, 0.0]
    z = np.asarray(emb_labels(epi, patch, labels, temperature=0.1, route="fft"))
    o = (k - kl) // 2
    want = np.zeros((1, n, n, 2))
    for i in range(kl):
        for j in range(kl):
            want[0, (2 + o + i) % n, (6 + o + j) % n] = labels[0, i, j]
    np.testing.assert_allclose(z, want, atol=1e-4)


# (L, N1, N2, K, C, Cc, B)
CLASS_CASES = [
    (1, 7, 7, 3, 2, 2, 6),
    (2, 11, 11, 5, 3, 4, 7),
    (3, 9, 13, 1, 1, 3, 5),
    (2, 13, 13, 13, 2, 3, 3),
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "case", CLASS_CASES, ids=lambda c: "L{}-N{}x{}-K{}-C{}-Cc{}-B{}".format(*c)
)
def test_embed_classes_vs_bruteforce(rng, case, route):
    n_layers, n1, n2, k, c, n_classes, b = case
    epi, (mean, log_var, prior) = _epitome(rng, n_layers, n1, n2, c)
    patches = cut_patches(rng, mean, b, k, k, noise=0.1)
    classes = rng.integers(0, n_classes, size=b)
    t = float(k * k)
    got = emb_classes(epi, patches, classes, n_classes=n_classes, temperature=t, route=route)
    assert got.shape == (n_layers, n1, n2, n_classes) and got.dtype == jnp.float32
    _close(got, embed_classes_bf(mean, log_var, prior, patches, classes, n_classes, t))


def test_spread_class_posteriors_vs_bruteforce(rng):
    """Arbitrary (unnormalised) weights: the spreading itself, independent of the posterior."""
    post = rng.uniform(size=(4, 2, 7, 9)).astype(np.float32)
    classes = np.array([2, 0, 2, 1])
    got = spread_class_posteriors(jnp.asarray(post), jnp.asarray(classes), n_classes=3,
                                  window=(3, 4))
    want = np.zeros((2, 7, 9, 3))
    for b in range(4):
        for l in range(2):
            for s1 in range(7):
                for s2 in range(9):
                    for i in range(3):
                        for j in range(4):
                            want[l, (s1 + i) % 7, (s2 + j) % 9, classes[b]] += post[b, l, s1, s2]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ conservation and additivity


@pytest.mark.parametrize("use_mask,route", [(False, "fft"), (True, "direct")])
def test_mass_conservation(rng, use_mask, route):
    n_layers, n, k, kl, c, n_lab, n_classes, b = 2, 11, 5, 3, 3, 4, 3, 8
    epi, (mean, _, _) = _epitome(rng, n_layers, n, n, c)
    patches = rng.uniform(size=(b, k, k, c)).astype(np.float32)
    labels = _soft_labels(rng, b, kl, kl, n_lab) * rng.uniform(0.5, 2.0, size=(b, 1, 1, 1))
    classes = rng.integers(0, n_classes, size=b)
    mask = (rng.uniform(size=(n_layers, n, n)) < 0.3) if use_mask else None
    z = emb_labels(epi, patches, labels.astype(np.float32), temperature=4.0, mask=mask,
                   route=route)
    np.testing.assert_allclose(np.sum(np.asarray(z, np.float64)), labels.sum(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(z, np.float64).sum(axis=(0, 1, 2)),
                               labels.sum(axis=(0, 1, 2)), rtol=1e-5)
    zc = np.asarray(emb_classes(epi, patches, classes, n_classes=n_classes, temperature=4.0,
                                mask=mask, route=route), np.float64)
    counts = np.bincount(classes, minlength=n_classes)
    np.testing.assert_allclose(zc.sum(axis=(0, 1, 2)), k * k * counts, rtol=1e-5, atol=1e-4)
    if use_mask:
        # Only pixels covered by an allowed window can receive mass.
        covered = np.zeros((n_layers, n, n), bool)
        for l, s1, s2 in zip(*np.nonzero(mask), strict=True):
            covered[l, (s1 + np.arange(k))[:, None] % n, (s2 + np.arange(k))[None] % n] = True
        assert np.all(zc[~covered] == 0.0)


def test_accumulation_over_batches(rng):
    """Embeddings are additive: two batches summed equal the concatenated batch."""
    epi, _ = _epitome(rng, 2, 9, 9, 2)
    p1, p2 = (rng.uniform(size=(b, 3, 3, 2)).astype(np.float32) for b in (3, 5))
    y1, y2 = (_soft_labels(rng, b, 3, 3, 3) for b in (3, 5))
    c1, c2 = rng.integers(0, 4, size=3), rng.integers(0, 4, size=5)
    both = np.concatenate([p1, p2])
    route = "direct"
    z = emb_labels(epi, p1, y1, temperature=9.0, route=route) + emb_labels(
        epi, p2, y2, temperature=9.0, route=route)
    zz = emb_labels(epi, both, np.concatenate([y1, y2]), temperature=9.0, route=route)
    np.testing.assert_allclose(z, zz, rtol=1e-5, atol=1e-6)
    z = emb_classes(epi, p1, c1, n_classes=4, temperature=9.0, route=route) + emb_classes(
        epi, p2, c2, n_classes=4, temperature=9.0, route=route)
    zz = emb_classes(epi, both, np.concatenate([c1, c2]), n_classes=4, temperature=9.0,
                     route=route)
    np.testing.assert_allclose(z, zz, rtol=1e-5, atol=1e-6)


def test_embed_labels_uses_posterior(rng):
    """Kl = K, one label channel of ones: z is the posterior spread over windows (box spread)."""
    epi, (mean, log_var, prior) = _epitome(rng, 1, 7, 7, 1)
    patches = rng.uniform(size=(2, 3, 3, 1)).astype(np.float32)
    ones = np.ones((2, 3, 3, 1), np.float32)
    post = posterior_bf(mean, log_var, prior, patches, 9.0).sum(axis=0)  # [L, N, N]
    want = np.zeros((1, 7, 7, 1))
    for s1 in range(7):
        for s2 in range(7):
            for i in range(3):
                for j in range(3):
                    want[0, (s1 + i) % 7, (s2 + j) % 7, 0] += post[0, s1, s2]
    _close(emb_labels(epi, patches, ones, temperature=9.0, route="direct"), want)
