"""Public API: exports, jit-compatibility, pytree behaviour, signatures, input validation."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import epilsr
from epilsr import (
    Epitome,
    embed_classes,
    embed_labels,
    epitome_from_image,
    init_epitome,
    log_likelihood,
    log_posterior,
    predict,
    self_epitomic_lsr,
    super_resolve,
)

L, N1, N2, C, K, B, NL, CC = 2, 7, 8, 2, 3, 3, 3, 4


@pytest.fixture
def setup(rng):
    epi = Epitome(
        mean=jnp.asarray(rng.uniform(size=(L, N1, N2, C)), jnp.float32),
        log_var=jnp.asarray(rng.uniform(np.log(0.01), 0.0, size=(L, N1, N2, C)), jnp.float32),
        prior_logits=jnp.asarray(rng.normal(size=(L, N1, N2)), jnp.float32),
    )
    patches = rng.uniform(size=(B, K, K, C)).astype(np.float32)
    labels = rng.dirichlet(np.ones(NL), size=(B, K - 2, K - 2)).astype(np.float32)
    classes = rng.integers(0, CC, size=B)
    table = rng.dirichlet(np.ones(NL), size=CC).astype(np.float32)
    counts = rng.gamma(0.5, size=(L, N1, N2, CC)).astype(np.float32)
    label_probs = rng.dirichlet(np.ones(NL), size=(L, N1, N2)).astype(np.float32)
    image = rng.uniform(size=(6, 7, C)).astype(np.float32)
    return dict(epi=epi, patches=patches, labels=labels, classes=classes, table=table,
                counts=counts, label_probs=label_probs, image=image)


# ------------------------------------------------------------------ exports


def test_all_names_exist():
    assert len(epilsr.__all__) == len(set(epilsr.__all__))
    for name in epilsr.__all__:
        assert hasattr(epilsr, name), name


def test_documented_entry_points_exported():
    for name in ("Epitome", "init_epitome", "epitome_from_image", "log_likelihood",
                 "log_posterior", "embed_labels", "embed_classes", "super_resolve", "predict",
                 "self_epitomic_lsr"):
        assert name in epilsr.__all__, name


# ------------------------------------------------------------------ jit


def _check_jit(fn, *args, static_argnames=(), **kwargs):
    eager = fn(*args, **kwargs)
    jitted = jax.jit(fn, static_argnames=static_argnames)(*args, **kwargs)
    chex.assert_trees_all_equal_shapes_and_dtypes(eager, jitted)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-5)
    return eager


def test_jit_log_likelihood(setup):
    out = _check_jit(functools.partial(log_likelihood, route="fft"), setup["epi"],
                     setup["patches"])
    chex.assert_shape(out, (B, L, N1, N2))


def test_jit_log_posterior(setup):
    mask = np.ones((L, N1, N2), bool)
    mask[0] = False
    fn = functools.partial(log_posterior, temperature=4.0, route="direct")
    out = _check_jit(fn, setup["epi"], setup["patches"], mask=mask)
    chex.assert_shape(out, (B, L, N1, N2))
    # Temperature as a traced argument too.
    t = jax.jit(lambda e, x, t: log_posterior(e, x, temperature=t))(setup["epi"],
                                                                    setup["patches"], 4.0)
    chex.assert_trees_all_close(t, log_posterior(setup["epi"], setup["patches"], temperature=4.0),
                                rtol=1e-5, atol=1e-5)


def test_jit_embed_labels(setup):
    fn = functools.partial(embed_labels, temperature=9.0)
    out = _check_jit(fn, setup["epi"], setup["patches"], setup["labels"])
    chex.assert_shape(out, (L, N1, N2, NL))


def test_jit_embed_classes(setup):
    out = _check_jit(embed_classes, setup["epi"], setup["patches"], setup["classes"],
                     n_classes=CC, temperature=9.0, static_argnames="n_classes")
    chex.assert_shape(out, (L, N1, N2, CC))


def test_jit_super_resolve(setup):
    out = _check_jit(functools.partial(super_resolve, iters=7), setup["counts"], setup["table"])
    chex.assert_shape(out, (L, N1, N2, NL))
    prior = np.full(CC, 1.0 / CC, np.float32)
    _check_jit(super_resolve, setup["counts"], setup["table"], class_prior=prior, iters=3,
               static_argnames="iters")


def test_jit_predict(setup):
    fn = functools.partial(predict, patch_size=K, temperature=9.0, stride=2, chunk=4)
    out = _check_jit(fn, setup["epi"], setup["label_probs"], setup["image"])
    chex.assert_shape(out, (6, 7, NL))


def test_jit_init_epitome():
    fn = functools.partial(init_epitome, size=(5, 6), channels=3, layers=2, var=0.2)
    out = _check_jit(fn, jax.random.PRNGKey(0))
    chex.assert_shape([out.mean, out.log_var, out.prior_logits],
                      [(2, 5, 6, 3), (2, 5, 6, 3), (2, 5, 6)])


def test_jit_epitome_from_image(setup):
    out = _check_jit(functools.partial(epitome_from_image, var=0.05), setup["image"])
    chex.assert_shape(out.mean, (1, 6, 7, C))
    u8 = (setup["image"] * 255).astype(np.uint8)
    _check_jit(epitome_from_image, u8)


def test_vmap_over_patch_batches(setup):
    """Functions compose with vmap (a leading axis of patch batches)."""
    batches = np.stack([setup["patches"], setup["patches"][::-1]])
    out = jax.vmap(lambda x: log_likelihood(setup["epi"], x))(batches)
    chex.assert_shape(out, (2, B, L, N1, N2))
    chex.assert_trees_all_close(out[1], log_likelihood(setup["epi"], batches[1]), rtol=1e-5)


# ------------------------------------------------------------------ Epitome pytree


def test_epitome_is_a_frozen_pytree(setup):
    epi = setup["epi"]
    leaves = jax.tree_util.tree_leaves(epi)
    assert len(leaves) == 3
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, epi)
    assert isinstance(doubled, Epitome)
    chex.assert_trees_all_close(doubled.mean, 2 * epi.mean)
    chex.assert_trees_all_close(doubled.prior_logits, 2 * epi.prior_logits)
    with pytest.raises(dataclasses.FrozenInstanceError):
        epi.mean = epi.mean + 1  # type: ignore[misc]
    flat, treedef = jax.tree_util.tree_flatten(epi)
    again = jax.tree_util.tree_unflatten(treedef, flat)
    chex.assert_trees_all_equal(again, epi)
    assert epi.layers == L and epi.size == (N1, N2) and epi.channels == C
    # Gradients w.r.t. the whole pytree.
    grads = jax.grad(lambda e: jnp.sum(log_likelihood(e, setup["patches"])))(epi)
    assert isinstance(grads, Epitome)
    chex.assert_trees_all_equal_shapes(grads, epi)


# ------------------------------------------------------------------ signatures


def test_key_first_and_keyword_only_hyperparameters():
    for fn, positional in [
        (init_epitome, ["key"]),
        (self_epitomic_lsr, ["key", "image", "classes", "label_given_class"]),
        (epitome_from_image, ["image"]),
        (log_likelihood, ["epitome", "patches"]),
        (log_posterior, ["epitome", "patches"]),
        (embed_labels, ["epitome", "patches", "labels"]),
        (embed_classes, ["epitome", "patches", "classes"]),
        (super_resolve, ["class_counts", "label_given_class"]),
        (predict, ["epitome", "label_probs", "image"]),
    ]:
        params = list(inspect.signature(fn).parameters.values())
        names = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
        assert names == positional, (fn.__name__, names)
        for p in params[len(positional):]:
            assert p.kind == p.KEYWORD_ONLY, (fn.__name__, p.name)
    assert next(iter(inspect.signature(init_epitome).parameters)) == "key"
    assert next(iter(inspect.signature(self_epitomic_lsr).parameters)) == "key"


# ------------------------------------------------------------------ bad input


def _bad_cases():
    rng = np.random.default_rng(0)
    epi = Epitome(
        mean=jnp.asarray(rng.uniform(size=(L, N1, N2, C)), jnp.float32),
        log_var=jnp.full((L, N1, N2, C), -2.0, jnp.float32),
        prior_logits=jnp.zeros((L, N1, N2), jnp.float32),
    )
    x = rng.uniform(size=(B, K, K, C)).astype(np.float32)
    x_nan = x.copy()
    x_nan[1, 0, 2, 1] = np.nan
    table = rng.dirichlet(np.ones(NL), size=CC).astype(np.float32)
    table_neg = table.copy()
    table_neg[2, 1] = -0.1
    table_zero = table.copy()
    table_zero[1] = 0.0
    counts = rng.gamma(0.5, size=(L, N1, N2, CC)).astype(np.float32) + 0.01
    img = rng.uniform(size=(9, 10, C)).astype(np.float32)
    img_nan = img.copy()
    img_nan[4, 4, 0] = np.nan
    cls_img = rng.integers(0, CC, size=(9, 10))
    cls_bad = cls_img.copy()
    cls_bad[0, 0] = CC
    key = jax.random.PRNGKey(0)
    lp = rng.dirichlet(np.ones(NL), size=(L, N1, N2)).astype(np.float32)
    self_kw = dict(patch_size=3, downsample=1)
    return {
        "patches rank 3": (lambda: log_likelihood(epi, x[0]), "patches"),
        "patches rank 5": (lambda: log_posterior(epi, x[None]), "patches"),
        "channel mismatch": (lambda: log_likelihood(epi, x[..., :1]), "patches"),
        "patch larger than epitome": (
            lambda: log_likelihood(epi, np.zeros((1, N1 + 1, 3, C), np.float32)), "patches"),
        "NaN patch": (lambda: log_likelihood(epi, x_nan), "patches"),
        "NaN patch in posterior": (lambda: log_posterior(epi, x_nan), "patches"),
        "mask wrong shape": (
            lambda: log_posterior(epi, x, mask=np.ones((L, N1, N2 + 1), bool)), "mask"),
        "mask all False": (
            lambda: log_posterior(epi, x, mask=np.zeros((L, N1, N2), bool)), "mask"),
        "mask not bool": (lambda: log_posterior(epi, x, mask=np.ones((L, N1, N2))), "mask"),
        "temperature zero": (lambda: log_posterior(epi, x, temperature=0.0), "temperature"),
        "temperature negative": (
            lambda: embed_labels(epi, x, np.ones((B, 1, 1, NL)), temperature=-1.0),
            "temperature"),
        "classes out of range (embed)": (
            lambda: embed_classes(epi, x, np.array([0, CC, 1]), n_classes=CC, temperature=9.0),
            "classes"),
        "classes negative (embed)": (
            lambda: embed_classes(epi, x, np.array([0, -1, 1]), n_classes=CC, temperature=9.0),
            "classes"),
        "classes float (embed)": (
            lambda: embed_classes(epi, x, np.array([0.0, 1.0, 1.0]), n_classes=CC,
                                  temperature=9.0), "classes"),
        "classes count != patches": (
            lambda: embed_classes(epi, x, np.array([0, 1]), n_classes=CC, temperature=9.0),
            "classes"),
        "labels block bigger than patch": (
            lambda: embed_labels(epi, x, np.ones((B, K + 1, K + 1, NL), np.float32),
                                 temperature=9.0), "labels"),
        "labels count != patches": (
            lambda: embed_labels(epi, x, np.ones((B + 1, 1, 1, NL), np.float32),
                                 temperature=9.0), "labels"),
        "label_given_class negative": (
            lambda: super_resolve(counts, table_neg), "label_given_class"),
        "label_given_class zero row of an occurring class": (
            lambda: super_resolve(counts, table_zero), "label_given_class"),
        "label_given_class wrong rows": (
            lambda: super_resolve(counts, table[:-1]), "label_given_class"),
        "class_prior wrong shape": (
            lambda: super_resolve(counts, table, class_prior=np.ones(CC + 1)), "class_prior"),
        "class_counts negative": (lambda: super_resolve(-counts, table), "class_counts"),
        "self-LSR classes out of range": (
            lambda: self_epitomic_lsr(key, img, cls_bad, table, **self_kw), "classes"),
        "self-LSR NaN image": (
            lambda: self_epitomic_lsr(key, img_nan, cls_img, table, **self_kw), "image"),
        "self-LSR classes shape != image": (
            lambda: self_epitomic_lsr(key, img, cls_img[:, :-1], table, **self_kw), "classes"),
        "self-LSR negative table": (
            lambda: self_epitomic_lsr(key, img, cls_img, table_neg, **self_kw),
            "label_given_class"),
        "self-LSR patch too large": (
            lambda: self_epitomic_lsr(key, img, cls_img, table, patch_size=11, downsample=1),
            "patch_size"),
        "self-LSR downsample 0": (
            lambda: self_epitomic_lsr(key, img, cls_img, table, patch_size=3, downsample=0),
            "downsample"),
        "epitome_from_image NaN": (lambda: epitome_from_image(img_nan), "image"),
        "epitome_from_image rank 2": (lambda: epitome_from_image(img[..., 0]), "image"),
        "init_epitome var out of range": (
            lambda: init_epitome(key, size=5, channels=1, var=2.0), "var"),
        "epitome log_var shape": (
            lambda: log_likelihood(Epitome(epi.mean, epi.log_var[..., :1], epi.prior_logits), x),
            "log_var"),
        "predict label_probs shape": (
            lambda: predict(epi, lp[:, :-1], img, patch_size=3, temperature=9.0), "label_probs"),
        "predict patch_size too large": (
            lambda: predict(epi, lp, img, patch_size=10, temperature=9.0), "patch_size"),
        "predict NaN image": (
            lambda: predict(epi, lp, img_nan, patch_size=3, temperature=9.0), "image"),
        "correlation route": (lambda: log_likelihood(epi, x, route="fast"), "route"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_value_error_naming_argument(name):
    call, argument = BAD[name]
    with pytest.raises(ValueError, match=argument):
        call()


def test_conftest_exposes_four_cpu_devices():
    """conftest sets --xla_force_host_platform_device_count=4 before jax is imported."""
    if jax.default_backend() != "cpu":
        pytest.skip("multi-device emulation only applies to the CPU backend")
    assert "xla_force_host_platform_device_count" in os.environ["XLA_FLAGS"]
    assert jax.device_count() >= 4
