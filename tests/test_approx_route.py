"""The approximate self-epitomic posterior (``rank=``, ``position_stride=``) against a float64
NumPy brute force of the Eq. 11 counts; its error bound, mass, value checks and compilation."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from epilsr import self_epitomic, self_epitomic_counts, self_epitomic_lsr
from epilsr.correlate import plan_for


def _windows(img: np.ndarray, k: int, wrap: bool, stride: int = 1):
    """``[S, K*K*C]`` float64 windows by top-left corner (row-major, features ``(i, j, c)``) on
    the stride grid: the inside windows, or every corner of the torus with ``wrap``. Also the
    corners' grid ``(m1, m2)`` and the sampled corners ``[S, 2]``."""
    n1, n2, _ = img.shape
    m1, m2 = (n1, n2) if wrap else (n1 - k + 1, n2 - k + 1)
    corners = [(a, b) for a in range(0, m1, stride) for b in range(0, m2, stride)]
    rows = [(a + np.arange(k)) % n1 for a, _ in corners]
    cols = [(b + np.arange(k)) % n2 for _, b in corners]
    win = np.stack([img[np.ix_(r, c)].reshape(-1) for r, c in zip(rows, cols, strict=True)])
    return win.astype(np.float64), (m1, m2), np.array(corners)


def counts_bf(img, classes, n_classes, k, *, var=0.01, temperature=None, wrap=False, stride=1):
    """Dense Eq. 11 counts in float64 (``downsample=1``, every inside window a patch once): the
    tempered posterior ``softmax_s(-|x_p - y_s|^2 / (2 var T))`` over the positions on the
    stride-``g`` grid, each position's mass shared evenly over the ``g x g`` corners it starts
    (clipped at the border), then spread with the patch's centre class over its window."""
    img = np.asarray(img, np.float64)
    n1, n2, _ = img.shape
    t = float(k * k) if temperature is None else temperature
    x, _, patches = _windows(img, k, False)
    y, (m1, m2), grid = _windows(img, k, wrap, stride)
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    logits = -d2 / (2.0 * var * t)
    logits -= logits.max(1, keepdims=True)
    post = np.exp(logits)
    post /= post.sum(1, keepdims=True)  # [P, S']
    cls = classes[patches[:, 0] + k // 2, patches[:, 1] + k // 2]
    corner_mass = np.zeros((n1, n2, n_classes))
    for s, (a, b) in enumerate(grid):
        block = corner_mass[a : min(a + stride, m1), b : min(b + stride, m2)]
        block += np.bincount(cls, post[:, s], n_classes) / block[..., 0].size
    out = np.zeros_like(corner_mass)
    for i in range(k):
        for j in range(k):
            out += np.roll(corner_mass, (i, j), axis=(0, 1))
    return out


def _scene(rng, h, w, c, smooth=True):
    """Imagery with spatial structure (a blurred random field), so that its patches have a
    decaying spectrum like real tiles; classes from its first channel."""
    img = rng.uniform(size=(h, w, c))
    if smooth:
        for axis in (0, 1):
            img = (img + np.roll(img, 1, axis) + np.roll(img, -1, axis)) / 3.0
    classes = np.digitize(img[..., 0], np.quantile(img[..., 0], [0.33, 0.66]))
    return img.astype(np.float32), classes


KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize(
    "h,w,c,k,wrap,stride",
    [(13, 11, 3, 3, False, 1), (12, 15, 2, 3, True, 1), (13, 12, 4, 3, False, 2),
     (11, 14, 3, 3, True, 3)],
)
def test_full_rank_equals_bruteforce(rng, h, w, c, k, wrap, stride):
    """rank = K*K*C (or None) is the exact posterior over the stride grid: == float64 NumPy."""
    img, classes = _scene(rng, h, w, c, smooth=False)
    want = counts_bf(img, classes, 3, k, wrap=wrap, stride=stride)
    for rank in (k * k * c, None) if stride == 3 else (k * k * c,):
        got = self_epitomic_counts(KEY, img, classes, 3, patch_size=k, sample_fraction=None,
                                   wrap=wrap, rank=rank, position_stride=stride, chunk=16)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-4, atol=2e-4)


def test_stride_one_full_rank_equals_exact_route(rng):
    """Sampled patches, downsampling: rank = d reproduces the exact route to float32 rounding."""
    img, classes = _scene(rng, 23, 19, 3)
    args = dict(patch_size=3, downsample=2, sample_fraction=0.3, chunk=16)
    exact = self_epitomic_counts(KEY, img, classes, 3, **args)
    full = self_epitomic_counts(KEY, img, classes, 3, rank=27, **args)
    np.testing.assert_allclose(full, exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("wrap", [False, True], ids=["inside", "wrap"])
def test_projection_in_blocks_of_rows_changes_nothing(rng, wrap):
    """A tiny ``plan.unfold_bytes`` projects the windows one grid row at a time (the memory
    bound of large tiles): the same counts as one block."""
    img, classes = _scene(rng, 17, 14, 3)
    args = dict(patch_size=3, sample_fraction=0.3, rank=6, position_stride=2, wrap=wrap,
                chunk=32)
    one = self_epitomic_counts(KEY, img, classes, 3, **args)
    rows = self_epitomic_counts(KEY, img, classes, 3, **args,
                                plan=dataclasses.replace(plan_for(img), unfold_bytes=1))
    np.testing.assert_allclose(rows, one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank,stride", [(1, 1), (4, 2), (None, 3), (10, 1)])
def test_each_patch_spreads_one_unit(rng, rank, stride):
    """Posteriors sum to 1 per patch: the counts hold K^2 per sampled patch, all >= 0."""
    img, classes = _scene(rng, 21, 18, 2)
    counts = np.asarray(self_epitomic_counts(
        KEY, img, classes, 3, patch_size=3, sample_fraction=0.2, rank=rank,
        position_stride=stride, chunk=32), np.float64)
    assert np.all(counts >= 0)
    np.testing.assert_allclose(counts.sum(), 9 * round(0.2 * 21 * 18), rtol=1e-5)


def test_error_shrinks_as_rank_grows(rng):
    """On structured imagery the counts approach the exact ones as r grows (r = d: exact)."""
    img, classes = _scene(rng, 24, 22, 3)
    want = counts_bf(img, classes, 3, 3)
    errs = []
    for rank in (1, 3, 9, 27):
        got = self_epitomic_counts(KEY, img, classes, 3, patch_size=3, sample_fraction=None,
                                   rank=rank, chunk=64)
        errs.append(np.abs(np.asarray(got, np.float64) - want).max())
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 1e-3 * want.max(), errs


def test_cross_term_error_bound(rng):
    """The stated bound: |x'.y' - (U^T x').(U^T y')| <= |r_x| |r_y| with the basis of
    ``_pca_basis`` (orthonormal columns; r the residual off its span)."""
    vectors = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12))
    mean, basis = self_epitomic._pca_basis(jax.numpy.asarray(vectors, jax.numpy.float32), 4)
    u = np.asarray(basis, np.float64)
    np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-5)
    x = vectors - np.asarray(mean, np.float64)
    res = x - x @ u @ u.T
    err = np.abs(x @ x.T - (x @ u) @ (x @ u).T)
    bound = np.linalg.norm(res, axis=1)[:, None] * np.linalg.norm(res, axis=1)[None, :]
    assert np.all(err <= bound * (1 + 1e-4) + 1e-4)  # float32 basis: orthonormal to ~1e-6
    # the top directions: the residual energy is the smallest of any rank-4 projection
    evals = np.linalg.eigvalsh(np.cov(x.T, bias=True))
    np.testing.assert_allclose((res**2).sum() / len(x), evals[:-4].sum(), rtol=1e-3)


def test_underflowing_rows_fall_back_to_the_maximum(rng):
    """A tiny variance puts every logit of some rows below -147 (the constant shift's range):
    those chunks are redone with the rows' maxima, still == the float64 brute force."""
    img, classes = _scene(rng, 13, 12, 2, smooth=False)
    var = 1e-4
    want = counts_bf(img, classes, 3, 3, var=var, stride=2)
    got = self_epitomic_counts(KEY, img, classes, 3, patch_size=3, sample_fraction=None, var=var,
                               rank=18, position_stride=2, chunk=8)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(rank=0), "rank"), (dict(rank=28), "rank"), (dict(rank=True), "rank"),
     (dict(rank=2.5), "rank"), (dict(position_stride=0), "position_stride"),
     (dict(rank=4, class_spread="pixel"), "class_spread")],
)
def test_bad_values_raise(rng, kwargs, match):
    img, classes = _scene(rng, 12, 12, 3)
    with pytest.raises(ValueError, match=match):
        self_epitomic_counts(KEY, img, classes, 3, patch_size=3, **kwargs)
    with pytest.raises(ValueError, match=match):
        self_epitomic_lsr(KEY, img, classes, np.full((3, 2), 0.5), patch_size=3, **kwargs)


def test_compiled_once_and_under_a_callers_jit(rng):
    """Rank and stride are static, data traced: new images of the same shape reuse the
    compilation, and the call composes with the caller's jax.jit (as lsr_raster runs it)."""
    table = np.full((3, 2), 0.5, np.float32)
    kw = dict(patch_size=3, sample_fraction=0.2, rank=5, position_stride=2, iters=3)
    img, classes = _scene(rng, 16, 16, 3)
    direct = self_epitomic_lsr(KEY, img, classes, table, **kw)
    before = self_epitomic._self_lsr._cache_size()
    img2, classes2 = _scene(rng, 16, 16, 3)
    self_epitomic_lsr(KEY, img2, classes2, table, **kw)
    assert self_epitomic._self_lsr._cache_size() == before
    jitted = jax.jit(lambda i, c: self_epitomic_lsr(KEY, i, c, table, **kw))
    np.testing.assert_allclose(jitted(img, classes), direct, atol=1e-5)
