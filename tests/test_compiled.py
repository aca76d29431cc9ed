"""Every documented entry point runs one compiled body: a direct call equals the same call under
an outer ``jax.jit``, and repeated direct calls reuse one compilation (no per-call retrace)."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import epilsr
from epilsr import embed, lsr, self_epitomic

predict_module = importlib.import_module("epilsr.predict")  # ``epilsr.predict`` is the function


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    key = jax.random.PRNGKey(1)
    epi = epilsr.init_epitome(key, size=9, channels=3)
    img = rng.uniform(size=(14, 13, 3)).astype(np.float32)
    classes = rng.choice([1, 5, 17], size=(14, 13)).astype(np.int32)  # 3 of 22 classes
    table = rng.uniform(size=(22, 4)).astype(np.float32)
    return dict(
        rng=rng,
        key=key,
        epi=epi,
        img=img,
        img_u8=(img * 255).astype(np.uint8),
        classes=classes,
        table=table,
        patches=rng.uniform(size=(6, 5, 5, 3)).astype(np.float32),
        labels=rng.uniform(size=(6, 3, 3, 4)).astype(np.float32),
        patch_classes=rng.integers(0, 3, size=6).astype(np.int32),
        label_probs=rng.dirichlet(np.ones(4), size=(1, 9, 9)).astype(np.float32),
        counts=rng.uniform(size=(1, 6, 7, 3)).astype(np.float32),
        small_table=rng.uniform(size=(3, 4)).astype(np.float32),
    )


def _both(fn, *args):
    """``fn(*args)`` directly and under an outer ``jax.jit`` (all arguments traced)."""
    direct = jax.tree.map(np.asarray, fn(*args))
    traced = jax.tree.map(np.asarray, jax.jit(fn)(*args))
    return direct, traced


SELF_ARGS = dict(patch_size=3, downsample=2, sample_fraction=0.5, iters=5, adapt_rounds=2)


@pytest.mark.parametrize(
    "case",
    ["self_epitomic_lsr", "self_epitomic_lsr_u8", "self_epitomic_counts", "predict",
     "predict_label_size", "embed_labels", "embed_classes", "super_resolve",
     "adapt_compositions", "lsr_objective"],
)
def test_direct_equals_outer_jit(setup, case):
    s = setup
    fns = {
        "self_epitomic_lsr": (
            lambda k, x, c, t: epilsr.self_epitomic_lsr(k, x, c, t, **SELF_ARGS),
            (s["key"], s["img"], s["classes"], s["table"]),
        ),
        "self_epitomic_lsr_u8": (
            lambda k, x, c, t: epilsr.self_epitomic_lsr(k, x, c, t, class_prior="uniform",
                                                        **SELF_ARGS),
            (s["key"], s["img_u8"], s["classes"], s["table"]),
        ),
        "self_epitomic_counts": (
            lambda k, x, c: epilsr.self_epitomic_counts(k, x, c, 22, patch_size=3,
                                                        sample_fraction=0.3),
            (s["key"], s["img"], s["classes"]),
        ),
        "predict": (
            lambda e, q, x: epilsr.predict(e, q, x, patch_size=5, temperature=2.0, stride=2,
                                           chunk=8),
            (s["epi"], s["label_probs"], s["img"]),
        ),
        "predict_label_size": (
            lambda e, q, x: epilsr.predict(e, q, x, patch_size=5, label_size=3, stride=3,
                                           temperature=2.0),
            (s["epi"], s["label_probs"], s["img_u8"]),
        ),
        "embed_labels": (
            lambda e, x, y: epilsr.embed_labels(e, x, y, temperature=3.0),
            (s["epi"], s["patches"], s["labels"]),
        ),
        "embed_classes": (
            lambda e, x, c: epilsr.embed_classes(e, x, c, n_classes=3, temperature=3.0),
            (s["epi"], s["patches"], s["patch_classes"]),
        ),
        "super_resolve": (
            lambda z, t: epilsr.super_resolve(z, t, iters=7), (s["counts"], s["small_table"])
        ),
        "adapt_compositions": (
            lambda z, t: epilsr.adapt_compositions(z, t, evidence=jnp.full(3, 0.5), rounds=2,
                                                   iters=4),
            (s["counts"], s["small_table"]),
        ),
        "lsr_objective": (
            lambda z, t: epilsr.lsr_objective(
                z, t, epilsr.super_resolve(z, t, iters=3)), (s["counts"], s["small_table"])
        ),
    }
    fn, args = fns[case]
    direct, traced = _both(fn, *args)
    for d, t in zip(jax.tree.leaves(direct), jax.tree.leaves(traced), strict=True):
        assert d.shape == t.shape and d.dtype == t.dtype
        assert np.all(np.isfinite(d))
        # Direct self-epitomic calls compact the 3 present classes (traced ones cannot), so the
        # class products differ in shape: equal up to float32 rounding; the rest run the same ops.
        np.testing.assert_allclose(d, t, rtol=2e-5, atol=2e-6)


def test_adapt_loop_matches_plain_rounds(setup):
    """The compiled adaptation loop is the documented recursion: ``rounds`` plain EMs, each
    followed by ``pi <- normalise(evidence r + alpha table)``, then a final EM."""
    counts, table = setup["counts"], setup["small_table"]
    evidence, alpha = np.array([0.5, 2.0, 0.1], np.float32), 1.5
    got_q, got_pi = epilsr.adapt_compositions(counts, table, evidence=evidence,
                                              concentration=alpha, rounds=3, iters=6)
    tab = table / table.sum(1, keepdims=True)
    pi = tab
    flat = counts.reshape(-1, 3).astype(np.float64)
    p_sc = flat / flat.sum(0)
    for _ in range(3):
        q = np.asarray(epilsr.super_resolve(counts, pi, iters=6), np.float64).reshape(-1, 4)
        r = p_sc.T @ q
        pi = evidence[:, None] * r * (tab > 0) + alpha * tab
        pi = (pi / pi.sum(1, keepdims=True)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(got_pi), pi, rtol=1e-5, atol=1e-6)
    want_q = epilsr.super_resolve(counts, pi, iters=6)
    np.testing.assert_allclose(np.asarray(got_q), np.asarray(want_q), rtol=1e-5, atol=1e-6)


def test_repeated_calls_reuse_one_compilation(setup):
    """Second calls with new values (same shapes and settings) hit the jit caches: no
    per-call retrace of any entry point's body (the cost the issue measured)."""
    s = setup
    bodies = [self_epitomic._self_lsr, self_epitomic._full_counts, predict_module._predict,
              embed._embed_labels, embed._embed_classes, lsr._super_resolve,
              lsr._adapt_compositions]

    def calls(scale, var, temp, iters):
        img = s["img"] * scale
        epilsr.self_epitomic_lsr(s["key"], img, s["classes"], s["table"], var=var,
                                 min_share=0.01 * scale, **{**SELF_ARGS, "iters": iters})
        epilsr.self_epitomic_counts(s["key"], img, s["classes"], 22, patch_size=3, var=var)
        epilsr.predict(s["epi"], s["label_probs"], img, patch_size=5, temperature=temp)
        epilsr.embed_labels(s["epi"], s["patches"] * scale, s["labels"], temperature=temp)
        epilsr.embed_classes(s["epi"], s["patches"], s["patch_classes"], n_classes=3,
                             temperature=temp)
        epilsr.super_resolve(s["counts"] * scale, s["small_table"], iters=iters)
        epilsr.adapt_compositions(s["counts"], s["small_table"], evidence=np.ones(3, np.float32),
                                  rounds=iters % 3, iters=iters)

    calls(1.0, 0.01, 2.0, 5)
    sizes = [f._cache_size() for f in bodies]
    calls(0.5, 0.02, 3.0, 7)
    assert [f._cache_size() for f in bodies] == sizes
