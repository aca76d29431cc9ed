"""Label super-resolution EM (Eqs. 7-9) against the explicit-q brute force; self-epitomic LSR."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import jax
import numpy as np
import pytest

from epilsr import (
    adapt_compositions,
    dirichlet_concentration,
    embed_classes,
    embed_labels,
    epitome_from_image,
    lsr_objective,
    paint_classes,
    self_epitomic,
    self_epitomic_counts,
    self_epitomic_lsr,
    super_resolve,
)
from epilsr.correlate import plan_for
from tests.reference import lsr_objective_bf, super_resolve_bf

# iters traced (not static): one compilation serves every iteration count.
sr_jit = jax.jit(super_resolve)
sr_static = jax.jit(super_resolve, static_argnames="iters")
emb_classes = jax.jit(embed_classes, static_argnames="n_classes")
emb_labels = jax.jit(embed_labels)

# Extras of self_epitomic_lsr beyond the paper's plain EM, switched off where they exist.
_SELF_PARAMS = inspect.signature(self_epitomic_lsr).parameters
PLAIN = {k: v for k, v in {"min_share": 0.0, "adapt_rounds": 0}.items() if k in _SELF_PARAMS}
# Small posterior batches: the default chunk pads tiny test tiles to 2048 patches.
FAST = {"chunk": 64, **PLAIN}


def _table(rng, n_classes, n):
    return rng.dirichlet(np.full(n, 0.7), size=n_classes).astype(np.float32)


def _counts(rng, shape, n_classes, zero_frac=0.2):
    """Sparse non-negative counts: some positions get nothing at all."""
    counts = rng.gamma(0.4, size=(*shape, n_classes))
    counts[rng.uniform(size=shape) < zero_frac] = 0.0
    return counts.astype(np.float32)


# ------------------------------------------------------------------ super_resolve


@pytest.mark.parametrize(
    "shape,n_classes,n", [((1, 5, 7), 3, 4), ((2, 7, 7), 4, 3), ((3, 3, 5), 2, 5), ((9,), 3, 2),
                          ((1, 97, 91), 4, 3)]  # S = 8827: three EM blocks, the last padded
)
@pytest.mark.parametrize("explicit_prior", [False, True])
def test_super_resolve_vs_bruteforce(rng, shape, n_classes, n, explicit_prior):
    counts = _counts(rng, shape, n_classes)
    table = _table(rng, n_classes, n)
    prior = rng.dirichlet(np.ones(n_classes)).astype(np.float32) if explicit_prior else None
    for iters in (1, 7, 20):
        got = sr_jit(counts, table, class_prior=prior, iters=iters)
        assert got.shape == (*shape, n)
        want = super_resolve_bf(counts, table, prior, iters)
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_super_resolve_unobserved_class_with_explicit_prior(rng):
    """A class with no counts but positive prior weight uses uniform p(s|c)."""
    counts = _counts(rng, (2, 5, 5), 3, zero_frac=0.0)
    counts[..., 1] = 0.0
    table = _table(rng, 3, 4)
    prior = np.array([0.3, 0.5, 0.2], np.float32)
    got = super_resolve(counts, table, class_prior=prior, iters=10)
    np.testing.assert_allclose(got, super_resolve_bf(counts, table, prior, 10), atol=2e-5)
    # With class_prior=None the unobserved class carries no weight, so its row may be all zero.
    table0 = table.copy()
    table0[1] = 0.0
    got = super_resolve(counts, table0, iters=10)
    np.testing.assert_allclose(got, super_resolve_bf(counts, table0, None, 10), atol=2e-5)


def test_super_resolve_unnormalised_table(rng):
    """Rows of label_given_class are normalised (rounded published tables are fine)."""
    counts = _counts(rng, (1, 6, 6), 3)
    table = _table(rng, 3, 4)
    scaled = table * np.array([[0.97], [3.0], [1.02]], np.float32)
    np.testing.assert_allclose(super_resolve(counts, scaled, iters=5),
                               super_resolve(counts, table, iters=5), atol=1e-6)


def test_lsr_objective_vs_bruteforce(rng):
    counts = _counts(rng, (2, 5, 6), 3)
    table = _table(rng, 3, 4)
    q = rng.dirichlet(np.ones(4), size=(2, 5, 6)).astype(np.float32)
    prior = np.array([0.2, 0.0, 0.8], np.float32)
    np.testing.assert_allclose(lsr_objective(counts, table, q),
                               lsr_objective_bf(counts, table, q), rtol=1e-5)
    np.testing.assert_allclose(lsr_objective(counts, table, q, class_prior=prior),
                               lsr_objective_bf(counts, table, q, prior), rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_em_objective_never_decreases(seed):
    rng = np.random.default_rng(seed)
    shape, n_classes, n = [((2, 5, 5), 3, 4), ((1, 7, 6), 4, 3)][seed % 2]
    counts = _counts(rng, shape, n_classes)
    table = _table(rng, n_classes, n)
    prior = rng.dirichlet(np.ones(n_classes)).astype(np.float32) if seed >= 2 else None
    objective = [
        lsr_objective_bf(counts, table, np.asarray(sr_jit(counts, table, class_prior=prior,
                                                          iters=t)), prior)
        for t in range(31)
    ]
    steps = np.diff(objective)
    assert np.all(steps >= -1e-6 * abs(objective[0])), steps.min()
    assert objective[-1] > objective[0]  # EM does move away from the uniform start
    # The library's objective agrees with the brute force.
    q = sr_jit(counts, table, class_prior=prior, iters=30)
    np.testing.assert_allclose(lsr_objective(counts, table, q, class_prior=prior), objective[-1],
                               rtol=1e-5)


def test_output_rows_sum_to_one_and_uniform_where_empty(rng):
    counts = _counts(rng, (2, 7, 9), 3, zero_frac=0.3)
    empty = counts.sum(-1) == 0
    assert empty.any() and (~empty).any()
    q = np.asarray(super_resolve(counts, _table(rng, 3, 5), iters=15), np.float64)
    assert q.shape == (2, 7, 9, 5)
    assert np.all(q >= 0)
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(q[empty], 0.2, atol=1e-7)


@pytest.mark.parametrize("c", [0, 2])
def test_single_class_gives_its_majority_label(rng, c):
    counts = np.zeros((2, 5, 6, 3), np.float32)
    counts[..., c] = rng.uniform(0.1, 2.0, size=(2, 5, 6))
    table = _table(rng, 3, 4)
    q = np.asarray(super_resolve(counts, table, iters=20))
    assert np.all(q.argmax(-1) == table[c].argmax())
    np.testing.assert_allclose(q, np.broadcast_to(table[c] / table[c].sum(), q.shape), atol=1e-5)


def test_paint_classes(rng):
    table = rng.uniform(size=(4, 3)).astype(np.float32)
    classes = rng.integers(0, 4, size=(7, 9))
    got = np.asarray(paint_classes(classes, table))
    assert got.shape == (7, 9, 3)
    want = (table / table.sum(1, keepdims=True))[classes]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)


# ------------------------------------------------------------------ self-epitomic LSR


def test_self_lsr_single_class_majority_label(rng):
    """Default EM settings (composition adaptation included where present)."""
    img = rng.uniform(size=(11, 13, 3)).astype(np.float32)
    table = _table(rng, 3, 4)
    table[1] = [0.1, 0.2, 0.6, 0.1]
    classes = np.full((11, 13), 1)
    out = np.asarray(self_epitomic_lsr(jax.random.PRNGKey(0), img, classes, table,
                                       patch_size=3, downsample=1, sample_fraction=0.3, chunk=64))
    assert out.shape == (11, 13, 4)
    assert np.all(out.argmax(-1) == 2)


@pytest.mark.parametrize("kwargs", [
    {"downsample": 2, "patch_size": 5},  # every default, including chunk
    {"downsample": 1, "patch_size": 3, "sample_fraction": None, **FAST},
    {"downsample": 3, "patch_size": 3, "wrap": True, "class_spread": "pixel", **FAST},
], ids=["ds2", "dense", "ds3-wrap-pixel"])
def test_self_lsr_shapes_odd_sizes(rng, kwargs):
    h, w = 37, 41
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    classes = rng.integers(0, 3, size=(h, w))
    out = np.asarray(self_epitomic_lsr(jax.random.PRNGKey(1), img, classes, _table(rng, 3, 4),
                                       **kwargs), np.float64)
    assert out.shape == (h, w, 4)
    assert np.all(np.isfinite(out)) and np.all(out >= 0)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


def test_self_lsr_deterministic(rng):
    img = rng.uniform(size=(11, 13, 3)).astype(np.float32)
    classes = rng.integers(0, 3, size=(11, 13))
    table = _table(rng, 3, 4)
    args = dict(patch_size=3, downsample=1, sample_fraction=0.3, **FAST)
    a = self_epitomic_lsr(jax.random.PRNGKey(5), img, classes, table, **args)
    b = self_epitomic_lsr(jax.random.PRNGKey(5), img, classes, table, **args)
    np.testing.assert_array_equal(a, b)
    c = self_epitomic_lsr(jax.random.PRNGKey(6), img, classes, table, **args)
    assert not np.array_equal(a, c)  # a different key samples different patches


@pytest.mark.parametrize("chunks", [(5, 7), (1, None)], ids=["5-7", "1-default"])
def test_self_lsr_chunking_does_not_change_the_result(rng, chunks):
    """Patches are batched in balanced chunks (zero-weight padding); the sum is the same."""
    img = rng.uniform(size=(13, 11, 3)).astype(np.float32)
    classes = rng.integers(0, 3, size=(13, 11))
    table = _table(rng, 3, 4)
    args = dict(patch_size=3, downsample=1, sample_fraction=0.37, **PLAIN)
    a, b = (np.asarray(self_epitomic_lsr(jax.random.PRNGKey(2), img, classes, table,
                                         chunk=c, **args)) for c in chunks)
    np.testing.assert_allclose(a, b, atol=2e-4)  # float32 sums in another order, 20 EM steps


def test_self_lsr_rejects_bad_chunk(rng):
    img = rng.uniform(size=(9, 9, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="chunk"):
        self_epitomic_lsr(jax.random.PRNGKey(0), img, np.zeros((9, 9), int), _table(rng, 1, 2),
                          patch_size=3, chunk=0)


def _general_counts(img, classes, n_classes, k, wrap, spread="window"):
    """epitome_from_image + embed_classes/embed_labels, written out: ``[1, h, w, Cc]`` counts.

    Patches: every ``K x K`` window lying inside the tile, once. Positions they may map to: all
    toroidal windows of the tile when ``wrap``, else only the windows inside the tile (mask).
    """
    h, w, _ = img.shape
    epi = epitome_from_image(img, var=0.01)
    starts = [(r, c) for r in range(h - k + 1) for c in range(w - k + 1)]
    rows = [r + np.arange(k) for r, _ in starts]
    cols = [c + np.arange(k) for _, c in starts]
    patches = np.stack([img[np.ix_(r, c)] for r, c in zip(rows, cols, strict=True)])
    mask = None
    if not wrap:
        mask = np.zeros((1, h, w), bool)
        mask[0, : h - k + 1, : w - k + 1] = True
    if spread == "window":  # the class of each window's centre pixel
        centre = np.array([classes[r + k // 2, c + k // 2] for r, c in starts])
        return emb_classes(epi, patches, centre, n_classes=n_classes,
                           temperature=float(k * k), mask=mask)
    # each pixel's own class, embedded as a one-hot label block (Eq. 6)
    blocks = np.stack([np.eye(n_classes, dtype=np.float32)[classes[np.ix_(r, c)]]
                       for r, c in zip(rows, cols, strict=True)])
    return emb_labels(epi, patches, blocks, temperature=float(k * k), mask=mask)


def _general_route(img, classes, table, k, wrap, iters, spread="window"):
    """:func:`_general_counts` + super_resolve."""
    counts = _general_counts(img, classes, table.shape[0], k, wrap, spread)
    return np.asarray(sr_static(counts, table, iters=iters))[0]


@pytest.mark.parametrize("wrap", [True, False], ids=["wrap", "inside"])
def test_self_lsr_shortcut_matches_general_route(rng, wrap):
    """Equal-variance shortcut == the general likelihood route (downsample=1, dense)."""
    h, w, k = 11, 13, 3
    img = rng.uniform(size=(h, w, 3)).astype(np.float32)
    classes = rng.integers(0, 3, size=(h, w))
    table = _table(rng, 3, 4)
    got = self_epitomic_lsr(jax.random.PRNGKey(0), img, classes, table, patch_size=k,
                            downsample=1, sample_fraction=None, wrap=wrap, iters=10,
                            class_spread="window", **FAST)
    want = _general_route(img, classes, table, k, wrap, iters=10)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_self_lsr_pixel_spread_matches_general_route(rng):
    """class_spread="pixel" (Eq. 6 on one-hot classes), toroidal positions."""
    h, w, k = 11, 13, 3
    img = rng.uniform(size=(h, w, 3)).astype(np.float32)
    classes = rng.integers(0, 3, size=(h, w))
    table = _table(rng, 3, 4)
    got = self_epitomic_lsr(jax.random.PRNGKey(0), img, classes, table, patch_size=k,
                            downsample=1, sample_fraction=None, wrap=True, iters=10,
                            class_spread="pixel", **FAST)
    want = _general_route(img, classes, table, k, True, iters=10, spread="pixel")
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("wrap", [True, False], ids=["wrap", "inside"])
def test_self_lsr_unfolded_route_matches_correlation_route(rng, wrap):
    """The unfolded-window matrix-product route == the correlation route it replaces (sampled
    patches, downsampling, odd sizes): forcing the memory fallback must not change the answer."""

    img = rng.uniform(size=(23, 17, 4)).astype(np.float32)
    classes = rng.integers(0, 4, size=(23, 17))
    table = _table(rng, 4, 3)
    args = dict(patch_size=3, downsample=2, sample_fraction=0.4, wrap=wrap, iters=7, chunk=16)
    fast = self_epitomic_lsr(jax.random.PRNGKey(3), img, classes, table, **args)
    no_unfolding = dataclasses.replace(plan_for(img), unfold_bytes=1)
    slow = self_epitomic_lsr(jax.random.PRNGKey(3), img, classes, table, plan=no_unfolding,
                             **args)
    np.testing.assert_allclose(fast, slow, atol=2e-5)


@pytest.mark.parametrize("downsample,fraction", [(1, None), (2, 0.45)], ids=["dense", "ds2"])
def test_self_epitomic_counts_mass_and_lsr(rng, downsample, fraction):
    """Counts: one unit per patch spread over its K x K window (K^2 per patch, dense: every
    window once); the class of each patch is its centre's; self_epitomic_lsr is these counts +
    adapt_compositions with the documented table preprocessing."""

    h, w, k, n_rows = 23, 19, 3, 5
    img = rng.uniform(size=(h, w, 3)).astype(np.float32)
    classes = rng.integers(0, 3, size=(h, w))  # rows 3, 4 never occur
    key = jax.random.PRNGKey(4)
    args = dict(patch_size=k, downsample=downsample, sample_fraction=fraction, chunk=16)
    counts = np.asarray(self_epitomic_counts(key, img, classes, n_rows, **args), np.float64)
    h1, w1 = -(-h // downsample), -(-w // downsample)
    assert counts.shape == (h1, w1, n_rows) and np.all(counts >= 0)
    n_patches = (h1 - k + 1) * (w1 - k + 1) if fraction is None else round(fraction * h * w)
    np.testing.assert_allclose(counts.sum(), k * k * n_patches, rtol=1e-5)
    np.testing.assert_array_equal(counts[..., 3:], 0.0)
    if fraction is None:  # every inside window once == the general embedding route
        want = np.asarray(_general_counts(img, classes, n_rows, k, wrap=False))[0]
        np.testing.assert_allclose(counts, want, rtol=1e-4, atol=1e-4)
    table = np.concatenate([_table(rng, 3, 4), _table(rng, 2, 4)])
    got = self_epitomic_lsr(key, img, classes, table, adapt_rounds=2, min_share=0.0, iters=6,
                            **args)
    pixels = np.bincount(classes.ravel(), minlength=n_rows).astype(np.float32)
    want, _ = adapt_compositions(counts.astype(np.float32), table, evidence=0.1 * pixels / 900,
                                 rounds=2, iters=6)
    np.testing.assert_allclose(got, self_epitomic._upsample(want, downsample, (h, w)), atol=1e-5)
    with pytest.raises(ValueError, match="class"):
        self_epitomic_counts(key, img, classes, 2, **args)  # class 2 >= n_classes


def test_self_lsr_class_prior_options(rng):
    """class_prior: None (observed), "uniform" (the notebook's variant) or an explicit array;
    a uniform prior over a table with an absent class differs from the observed prior."""
    img = rng.uniform(size=(15, 15, 3)).astype(np.float32)
    classes = rng.integers(0, 2, size=(15, 15))
    table = _table(rng, 3, 4)  # class 2 never occurs
    args = dict(patch_size=3, sample_fraction=0.5, iters=5, **FAST)
    key = jax.random.PRNGKey(0)
    observed = self_epitomic_lsr(key, img, classes, table, **args)
    uniform = self_epitomic_lsr(key, img, classes, table, class_prior="uniform", **args)
    explicit = self_epitomic_lsr(key, img, classes, table, class_prior=np.full(3, 0.2), **args)
    np.testing.assert_allclose(uniform, explicit, atol=1e-5)
    np.testing.assert_allclose(np.sum(uniform, -1), 1.0, atol=1e-5)
    assert np.abs(np.asarray(uniform) - np.asarray(observed)).max() > 1e-3
    with pytest.raises(ValueError, match="class_prior"):
        self_epitomic_lsr(key, img, classes, table, class_prior="flat", **args)


# ------------------------------------------------------------------ Dirichlet concentration


def test_dirichlet_concentration_recovers_alpha(rng):
    """Moments of Dir(alpha m): sd_l = sqrt(m_l (1 - m_l) / (alpha + 1)); rows with no usable
    label get 10, estimates are floored at 0.5, and nothing warns."""
    alpha = np.array([0.7, 3.0, 12.0, 0.1, 5.0])
    mean = rng.dirichlet(np.ones(4), size=5)
    sd = np.sqrt(mean * (1 - mean) / (alpha[:, None] + 1))
    mean[4], sd[4] = [0.0, 1.0, 0.0, 0.0], 0.0  # a pure class: no label with 0 < m < 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = dirichlet_concentration(mean, sd)
    np.testing.assert_allclose(got, [0.7, 3.0, 12.0, 0.5, 10.0], rtol=1e-5)
    with pytest.raises(ValueError, match="sd"):
        dirichlet_concentration(mean, sd[:, :3])
    with pytest.raises(ValueError, match="mean"):
        dirichlet_concentration(mean[0], sd[0])


@pytest.mark.parametrize("used", [
    [1, 5, 17],
    pytest.param([0, 2, 3, 4, 6, 7, 8, 9, 20], marks=pytest.mark.slow),  # same check, 9 rows
], ids=["3-of-22", "9-of-22"])
def test_self_lsr_absent_table_rows_change_nothing(rng, used):
    """A tile with a few of many classes (NLCD: ~5 of 22) gives the same labels as the same tile
    against the table cut to its own rows (classes renumbered)."""
    img = rng.uniform(size=(15, 17, 3)).astype(np.float32)
    small = rng.integers(0, len(used), size=(15, 17))
    small[0, :len(used)] = np.arange(len(used))  # every used class occurs
    full_table = _table(rng, 22, 4)
    args = dict(patch_size=3, downsample=1, sample_fraction=0.4, chunk=16)
    got = self_epitomic_lsr(jax.random.PRNGKey(3), img, np.asarray(used)[small], full_table, **args)
    want = self_epitomic_lsr(jax.random.PRNGKey(3), img, small, full_table[used], **args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    traced = jax.jit(lambda c: self_epitomic_lsr(jax.random.PRNGKey(3), img, c, full_table, **args))
    np.testing.assert_allclose(np.asarray(traced(np.asarray(used)[small])), np.asarray(want),
                               atol=2e-5)
