"""TIL pipeline (paper Sec. 5.2): embedding + LSR + scoring on synthetic cases, AUC per nucleus."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import epilsr
from epilsr.data import consep
from epilsr.pipelines import pathology


def _brute_auc(y, s) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_nucleus_scores_and_auc_against_brute_force(rng):
    labels, scores, all_y, all_s = [], [], [], []
    for _ in range(5):
        inst = rng.integers(0, 12, (16, 16))
        pred = rng.integers(0, 4, (16, 16)).astype(float) / 4  # coarse values: many ties
        ids = np.unique(inst[inst > 0])
        s = pathology.nucleus_scores(pred, inst, ids)
        for i, v in zip(ids, s, strict=True):
            np.testing.assert_allclose(v, pred[inst == i].mean())
        y = rng.integers(0, 2, ids.size)
        labels.append(y)
        scores.append(np.round(s, 1))  # force ties between nuclei
        all_y.append(y)
        all_s.append(np.round(s, 1))
    y, s = np.concatenate(all_y), np.concatenate(all_s)
    assert pathology.nucleus_auc(labels, scores) == pytest.approx(_brute_auc(y, s), abs=1e-12)


def test_bootstrap_interval_brackets_estimate():
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 2, 20) for _ in range(30)]
    scores = [y + rng.normal(0, 1.0, y.size) for y in labels]
    lo, hi = pathology.bootstrap_auc(labels, scores, n_boot=100, seed=1)
    auc = pathology.nucleus_auc(labels, scores)
    assert lo < auc < hi and hi - lo < 0.2
    assert (lo, hi) == pathology.bootstrap_auc(labels, scores, n_boot=100, seed=1)
    with pytest.raises(ValueError, match="no bootstrap resample"):
        pathology.bootstrap_auc([np.zeros(3)], [np.ones(3)], n_boot=5)


def test_box_smooth_is_centred_circular_mean(rng):
    q = rng.random((2, 9, 9)).astype(np.float32)
    got = np.asarray(pathology.box_smooth(q, size=3))
    want = np.zeros_like(q)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            want += np.roll(q, (dx, dy), axis=(1, 2))
    np.testing.assert_allclose(got, want / 9, rtol=1e-5)


def test_til_label_probs_known_answer():
    # Positions 0-1 see only class 2 (all TIL), 2-3 only class 0 (no TIL).
    counts = np.zeros((1, 2, 2, 3), np.float32)
    counts[0, 0, :, 2] = 1.0
    counts[0, 1, :, 0] = 1.0
    table = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    q = np.asarray(pathology.til_label_probs(counts, table))
    np.testing.assert_allclose(q, [[[1.0, 1.0], [0.0, 0.0]]], atol=1e-6)


def test_coarse_posterior_known_answers():
    table = np.array([[0.9, 0.1], [0.5, 0.5]])
    classes = np.array([[0, 1]])
    # A flat block: every pixel gets the block's composition.
    flat = np.full((2, 4), 0.3)
    out = pathology.coarse_posterior(flat, classes, table, block=2)
    np.testing.assert_allclose(out[:, :2], 0.1, atol=1e-6)
    np.testing.assert_allclose(out[:, 2:], 0.5, atol=1e-6)
    # Within a block the order of scores is kept; a block's scores all move the same way.
    scores = np.array([[0.1, 0.2, 0.1, 0.2], [0.3, 0.4, 0.3, 0.4]])
    out = pathology.coarse_posterior(scores, classes, table, block=2)
    assert np.all(np.diff(out[:, :2].ravel()[np.argsort(scores[:, :2].ravel())]) >= 0)
    assert out[:, 2:].mean() > out[:, :2].mean()
    with pytest.raises(ValueError, match="classes: expected shape"):
        pathology.coarse_posterior(scores, np.zeros((2, 2), int), table, block=2)
    with pytest.raises(ValueError, match="table: expected"):
        pathology.coarse_posterior(scores, classes, np.ones((2, 3)), block=2)


def test_stain_image_channels():
    white = np.full((1, 4, 4, 3), 255, np.uint8)
    purple = np.tile(np.array([60, 30, 120], np.uint8), (1, 4, 4, 1))
    assert pathology.stain_image(white, weight=0).shape == (1, 4, 4, 3)
    x = pathology.stain_image(np.concatenate([white, purple]))
    assert x.shape == (2, 4, 4, 4) and x.dtype == np.float32
    assert np.all(x[1, ..., 3] > x[0, ..., 3] + 0.3)  # hematoxylin: nuclei >> background
    assert x.min() >= 0 and x.max() <= 1
    with pytest.raises(ValueError, match="images: expected"):
        pathology.stain_image(np.zeros((4, 4, 4), np.uint8))


def _blob_scene(rng, n_images=4, size=48):
    """Dark small blobs ("lymphocytes", type 2) and pale big squares ("other nuclei", type 3)
    on a light background; lymphocytes only in the left half of even images."""
    images = np.full((n_images, size, size, 3), 0.85, np.float32)
    types = np.zeros((n_images, size, size), np.uint8)
    inst = np.zeros((n_images, size, size), np.int32)
    for t in range(n_images):
        nid = 0
        for r in range(2, size - 6, 8):
            for c in range(2, size - 6, 8):
                nid += 1
                if t % 2 == 0 and c < size // 2:
                    images[t, r : r + 4, c : c + 4] = 0.15
                    types[t, r : r + 4, c : c + 4] = 2
                    inst[t, r : r + 4, c : c + 4] = nid
                else:
                    images[t, r : r + 6, c : c + 6] = 0.55
                    types[t, r : r + 6, c : c + 6] = 3
                    inst[t, r : r + 6, c : c + 6] = nid
    images += rng.normal(0, 0.02, images.shape).astype(np.float32)
    return np.clip(images, 0, 1), types, inst


def test_epitomic_til_pipeline_on_blobs(rng):
    images, types, inst = _blob_scene(rng)
    block = 24
    fractions, classes = consep.coarse_classes(types, block=block, n_classes=4)
    table = consep.composition_table(fractions, classes, n_classes=4)
    # The first image itself (which holds both kinds of nuclei) serves as the epitome.
    epitome = epilsr.epitome_from_image(images[0], var=0.01)
    counts = pathology.embed_coarse(
        jax.random.key(0),
        epitome,
        images,
        pathology.pixel_classes(classes, block=block),
        n_classes=4,
        n_patches=2048,
        patch_size=5,
    )
    assert float(jnp.sum(counts)) == pytest.approx(25 * 2048, rel=1e-4)
    q = pathology.til_label_probs(counts, table)
    lp = jnp.stack([q, pathology.box_smooth(q, size=5)], -1)
    pred = pathology.predict_til(epitome, lp, images[1:], patch_size=5, stride=2)
    assert pred.shape == (3, 48, 48, 2)
    labels, scores = [], []
    for t in range(1, 4):
        ids, pos = consep.nucleus_truth(types[t], inst[t])
        labels.append(pos)
        scores.append(pathology.nucleus_scores(pred[t - 1, ..., 0], inst[t], ids))
    assert pathology.nucleus_auc(labels, scores) > 0.95


def test_self_epitomic_til_on_blobs(rng):
    images, types, inst = _blob_scene(rng, n_images=1)
    block = 24
    f, c = consep.coarse_classes(types, block=block, n_classes=4)
    table = consep.composition_table(f, c, n_classes=4)
    p = pathology.self_epitomic_til(
        jax.random.key(0),
        images[0],
        pathology.pixel_classes(c, block=block)[0],
        table,
        patch_size=5,
        sample_fraction=None,
        min_share=0.0,
        adapt_rounds=0,
    )
    ids, pos = consep.nucleus_truth(types[0], inst[0])
    scores = pathology.nucleus_scores(np.asarray(p), inst[0], ids)
    assert pathology.nucleus_auc([pos], [scores]) > 0.95


def test_train_epitome_runs_and_is_finite(rng):
    images = rng.random((2, 24, 24, 3)).astype(np.float32)
    seen = []
    epi = pathology.train_epitome(
        jax.random.key(0),
        images,
        size=12,
        steps=3,
        batch=8,
        sizes=(5,),
        progress=lambda t, info: seen.append(info["loss"]),
    )
    assert epi.mean.shape == (1, 12, 12, 3) and len(seen) == 3
    assert np.all(np.isfinite(np.asarray(epi.mean)))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: pathology.box_smooth(np.zeros((1, 4, 4)), size=5), "size: expected"),
        (lambda: pathology.box_smooth(np.zeros((4, 4)), size=3), "label_probs: expected rank 3"),
        (lambda: pathology.nucleus_scores(np.zeros((4, 4)), np.zeros((4, 5), int), [1]), "scores"),
        (lambda: pathology.pixel_classes(np.zeros(3), block=2), "classes: expected rank"),
        (
            lambda: pathology.embed_coarse(
                jax.random.key(0),
                epilsr.init_epitome(jax.random.key(1), size=4, channels=3),
                np.zeros((1, 8, 8, 3)),
                np.zeros((1, 8, 7), int),
                n_classes=2,
                n_patches=2,
                patch_size=3,
            ),
            "classes: expected shape",
        ),
        (
            lambda: pathology.train_epitome(
                jax.random.key(0), np.zeros((8, 8, 3)), size=4, steps=1
            ),
            "images: expected rank 4",
        ),
        (lambda: pathology.bootstrap_auc([], []), "labels/scores"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.slow
def test_real_data_lsr_beats_upsampled_density(consep_root):
    names = consep.find_patches(consep_root)
    dev, held = consep.split_by_tile(names)
    train = consep.load_consep(consep_root, dev[::3])
    test = consep.load_consep(consep_root, dev[1::6] + held[::3])
    x_train, x_test = pathology.stain_image(train.images), pathology.stain_image(test.images)
    f, c = consep.coarse_classes(train.types, block=64)
    table = consep.composition_table(f, c)
    epi = pathology.train_epitome(jax.random.key(0), x_train, size=48, steps=150, sizes=(11, 15))
    counts = pathology.embed_coarse(
        jax.random.key(1),
        epi,
        x_train,
        pathology.pixel_classes(c, block=64),
        n_classes=10,
        n_patches=20000,
        temperature=10.0,
    )
    q = pathology.til_label_probs(counts, table)
    pred = pathology.predict_til(epi, q[..., None], x_test, temperature=30.0, stride=11)[..., 0]
    _, c_test = consep.coarse_classes(test.types, block=64)
    combined = pathology.coarse_posterior(pred, c_test, table, block=64)
    density = consep.upsample_blocks(table[c_test, 1], block=64)
    labels, per = [], {"lsr": [], "combined": [], "density": []}
    for p in range(len(test.names)):
        ids, pos = consep.nucleus_truth(test.types[p], test.instances[p])
        labels.append(pos)
        for name, s in (("lsr", pred), ("combined", combined), ("density", density)):
            per[name].append(pathology.nucleus_scores(s[p], test.instances[p], ids))
    auc = {k: pathology.nucleus_auc(labels, v) for k, v in per.items()}
    assert auc["lsr"] > 0.75, auc
    # Full evaluation (docs/pathology.md): +0.06 to +0.17; a small model and subset here.
    assert auc["combined"] >= auc["density"] + 0.03, auc
