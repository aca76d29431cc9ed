"""Dense prediction (Eq. 2) against the every-window brute force."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epilsr import Epitome, predict
from epilsr.predict import (
    _centre_label_predictions,
    _centre_label_windows,
    patch_label_predictions,
)
from tests.reference import predict_bf, random_epitome_arrays

pred_jit = jax.jit(predict, static_argnames=("patch_size", "stride", "chunk", "route"))


def _setup(rng, n_layers, n1, n2, c, n, h, w, from_epitome=True):
    mean, log_var, prior = random_epitome_arrays(rng, n_layers, n1, n2, c)
    epi = Epitome(jnp.asarray(mean), jnp.asarray(log_var), jnp.asarray(prior))
    label_probs = rng.dirichlet(np.full(n, 0.5), size=(n_layers, n1, n2)).astype(np.float32)
    if from_epitome:  # an image stitched from epitome content plus noise (realistic posteriors)
        l = rng.integers(n_layers)
        rows = (rng.integers(n1) + np.arange(h)) % n1
        cols = (rng.integers(n2) + np.arange(w)) % n2
        image = mean[l][np.ix_(rows, cols)] + 0.05 * rng.normal(size=(h, w, c))
    else:
        image = rng.uniform(size=(h, w, c))
    return epi, (mean, log_var, prior), label_probs, image.astype(np.float32)


@pytest.mark.parametrize("route", ["direct", "fft"])
@pytest.mark.parametrize(
    "case",
    [
        # (L, N1, N2, C, n, H, W, K, T)
        (1, 7, 7, 2, 3, 9, 11, 3, 9.0),
        (2, 9, 11, 3, 4, 8, 7, 4, 16.0),
        (3, 5, 5, 1, 2, 6, 6, 1, 1.0),
        (1, 11, 11, 2, 3, 7, 9, 5, (5 / 11) ** 2),
    ],
    ids=["K3", "K4-rect", "K1", "K5-lowT"],
)
def test_predict_vs_bruteforce(rng, case, route):
    n_layers, n1, n2, c, n, h, w, k, t = case
    epi, (mean, log_var, prior), label_probs, image = _setup(rng, n_layers, n1, n2, c, n, h, w)
    got = pred_jit(epi, label_probs, image, patch_size=k, temperature=t, chunk=16, route=route)
    assert got.shape == (h, w, n)
    want = predict_bf(mean, log_var, prior, label_probs, image, k, t)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_predict_with_mask_and_uint8(rng):
    epi, (mean, log_var, prior), label_probs, _ = _setup(rng, 2, 7, 7, 3, 3, 8, 9)
    image = rng.integers(0, 256, size=(8, 9, 3), dtype=np.uint8)
    mask = rng.uniform(size=(2, 7, 7)) < 0.5
    got = pred_jit(epi, label_probs, image, patch_size=3, temperature=9.0, mask=mask)
    want = predict_bf(mean, log_var, prior, label_probs, image / 255.0, 3, 9.0, mask)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_predict_eager_default_chunk(rng):
    """Eager call with the default chunk (larger than the number of windows)."""
    epi, (mean, log_var, prior), label_probs, image = _setup(rng, 1, 7, 7, 2, 3, 7, 8)
    got = predict(epi, label_probs, image, patch_size=3, temperature=9.0)
    np.testing.assert_allclose(got, predict_bf(mean, log_var, prior, label_probs, image, 3, 9.0),
                               atol=1e-4)


@pytest.mark.parametrize("devices,kw", [
    (2, dict(patch_size=3, stride=1)),  # whole windows, 63 of them: odd share per device
    (3, dict(patch_size=5, label_size=3, stride=2, chunk=4)),  # centre blocks, several chunks
    (4, dict(patch_size=5, label_size=1, stride=1, route="dft_2d")),
])
def test_predict_with_a_mesh_matches_brute_force(rng, devices, kw):
    """The windows divided among the devices, their sums added: Eq. 2 as on one device."""
    from epilsr.parallel import data_mesh

    epi, (mean, log_var, prior), label_probs, image = _setup(rng, 2, 7, 7, 2, 3, 7, 9)
    mask = rng.uniform(size=(2, 7, 7)) < 0.7
    mesh = data_mesh(jax.devices()[:devices])
    got = predict(epi, label_probs, image, temperature=9.0, mask=mask, mesh=mesh, **kw)
    one = predict(epi, label_probs, image, temperature=9.0, mask=mask, **kw)
    np.testing.assert_allclose(got, one, atol=1e-5)
    if "label_size" not in kw:
        want = predict_bf(mean, log_var, prior, label_probs, image, kw["patch_size"], 9.0, mask)
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_predict_mesh_needs_a_data_axis(rng):
    from jax.sharding import Mesh

    epi, _, label_probs, image = _setup(rng, 1, 7, 7, 2, 3, 7, 8)
    mesh = Mesh(np.asarray(jax.devices()[:2]), ("batch",))
    with pytest.raises(ValueError, match="mesh: expected an axis named 'data'"):
        predict(epi, label_probs, image, patch_size=3, temperature=9.0, mesh=mesh)


@pytest.mark.parametrize("stride", [2, 3, 4])
def test_predict_stride(rng, stride):
    epi, _, label_probs, image = _setup(rng, 2, 9, 9, 2, 4, 13, 11)
    got = np.asarray(pred_jit(epi, label_probs, image, patch_size=4, temperature=16.0,
                              stride=stride, chunk=8), np.float64)
    assert got.shape == (13, 11, 4)
    assert np.all(np.isfinite(got)) and np.all(got >= 0)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_predict_stride_larger_than_patch(rng):
    """stride > K: either rejected (ValueError naming stride) or every pixel still covered.

    The docstring promises every pixel is covered; a 0/0 average must not produce NaN.
    """
    epi, _, label_probs, image = _setup(rng, 1, 7, 7, 2, 3, 12, 12)
    try:
        got = predict(epi, label_probs, image, patch_size=3, temperature=9.0, stride=5)
    except ValueError as err:
        assert "stride" in str(err)
        return
    got = np.asarray(got, np.float64)
    assert np.all(np.isfinite(got)), f"{np.isnan(got[..., 0]).sum()} pixels are NaN"
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_predict_constant_label_map(rng):
    """If every epitome pixel has the same label distribution, so does every image pixel."""
    epi, _, _, image = _setup(rng, 2, 7, 9, 2, 3, 8, 8, from_epitome=False)
    dist = np.array([0.2, 0.5, 0.3], np.float32)
    label_probs = np.broadcast_to(dist, (2, 7, 9, 3)).copy()
    got = pred_jit(epi, label_probs, image, patch_size=3, temperature=1.0, stride=2, chunk=8)
    np.testing.assert_allclose(got, np.broadcast_to(dist, (8, 8, 3)), atol=1e-5)


@settings(max_examples=4, deadline=None)
@given(
    h=st.integers(3, 9),
    w=st.integers(3, 9),
    k=st.integers(1, 3),
    stride=st.integers(1, 3),
    log_t=st.floats(-2.0, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_predict_outputs_distributions(h, w, k, stride, log_t, seed):
    stride = min(stride, k)  # stride > K is covered by test_predict_stride_larger_than_patch
    rng = np.random.default_rng(seed)
    epi, _, label_probs, image = _setup(rng, 2, 5, 6, 2, 3, h, w, from_epitome=False)
    t = float(np.exp(log_t))
    got = np.asarray(pred_jit(epi, label_probs, image, patch_size=k, temperature=t,
                              stride=stride, chunk=8), np.float64)
    assert got.shape == (h, w, 3)
    assert np.all(np.isfinite(got)) and np.all(got >= -1e-7)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("k, kl, layers, n1, n2",
                         [(7, 3, 1, 9, 8), (5, 1, 2, 6, 7), (9, 5, 1, 9, 10)])
def test_centre_block_product_matches_brute_force(rng, k, kl, layers, n1, n2):
    """The centre-block matrix product (prediction with ``label_size < K``) equals the float64
    sum ``y[b, i, j] = sum_s p(s|x_b) label_probs[s + o + (i, j)]`` (wrapping), and the centre
    of the ``K x K`` adjoint route."""
    n, b, o = 3, 4, (k - kl) // 2
    label_probs = rng.dirichlet(np.ones(n), size=(layers, n1, n2)).astype(np.float32)
    post = rng.dirichlet(np.ones(layers * n1 * n2), size=b).reshape(b, layers, n1, n2)
    post = post.astype(np.float32)
    got = np.asarray(_centre_label_predictions(
        _centre_label_windows(jnp.asarray(label_probs), k, kl), jnp.asarray(post), kl))
    want = np.zeros((b, kl, kl, n))
    for i in range(kl):
        for j in range(kl):
            shifted = np.roll(label_probs, (-(o + i), -(o + j)), axis=(1, 2)).astype(np.float64)
            want[:, i, j] = np.einsum("blxy,lxyn->bn", post.astype(np.float64), shifted)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    adjoint = patch_label_predictions(jnp.asarray(label_probs), jnp.asarray(post),
                                      patch_size=(k, k), method="direct")
    np.testing.assert_allclose(got, np.asarray(adjoint)[:, o : o + kl, o : o + kl], rtol=1e-5,
                               atol=1e-6)
