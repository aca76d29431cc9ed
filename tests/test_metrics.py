"""Tests for epilsr.metrics against brute-force reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epilsr import metrics
from epilsr.metrics import (
    accuracy,
    accuracy_from_confusion,
    confusion_matrix,
    iou,
    iou_from_confusion,
    roc_auc,
)

SEEDS = [0, 1, 2, 3]
SHAPES = [(1,), (37,), (13, 17), (3, 5, 7)]
IGNORES = [None, 255, [0, 255], ()]
N_CLASSES = 5


# ----------------------------------------------------------------------------- references


def _ignored(ignore) -> set[int]:
    if ignore is None:
        return set()
    if isinstance(ignore, int):
        return {ignore}
    return set(ignore)


def _kept_pairs(t, p, ignore):
    ign = _ignored(ignore)
    return [(int(a), b) for a, b in zip(np.ravel(t), np.ravel(p), strict=True) if a not in ign]


def brute_confusion(t, p, n, ignore):
    cm = np.zeros((n, n), np.int64)
    for a, b in _kept_pairs(t, p, ignore):
        cm[a, int(b)] += 1
    return cm


def brute_accuracy(t, p, ignore):
    pairs = _kept_pairs(t, p, ignore)
    return sum(a == b for a, b in pairs) / len(pairs)


def brute_iou(t, p, n, ignore):
    pairs = _kept_pairs(t, p, ignore)
    out = []
    for c in range(n):
        tp = sum(a == c and b == c for a, b in pairs)
        fp = sum(a != c and b == c for a, b in pairs)
        fn = sum(a == c and b != c for a, b in pairs)
        out.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
    present = [v for v in out if not math.isnan(v)]
    return np.array(out), sum(present) / len(present)


def brute_auc(y, s, ignore=None):
    pairs = _kept_pairs(y, s, ignore)
    pos = [b for a, b in pairs if a == 1]
    neg = [b for a, b in pairs if a == 0]
    twice = sum(2 * (sp > sn) + (sp == sn) for sp in pos for sn in neg)
    return twice / (2 * len(pos) * len(neg))


def random_labels(rng, shape, ignore, n=N_CLASSES):
    """Labels in [0, n) with ignored values sprinkled into y_true."""
    t = rng.integers(0, n, size=shape)
    p = rng.integers(0, n, size=shape)
    ign = sorted(_ignored(ignore) - set(range(n)))
    if ign:
        mask = rng.random(shape) < 0.3
        mask.flat[0] = False  # keep at least one pixel
        t = np.where(mask, rng.choice(ign, size=shape), t)
    return t, p


# ------------------------------------------------------------------ confusion / accuracy / IoU


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ignore", IGNORES)
def test_confusion_accuracy_iou_match_brute_force(seed, shape, ignore):
    rng = np.random.default_rng(seed)
    t, p = random_labels(rng, shape, ignore)
    cm = confusion_matrix(t, p, n_classes=N_CLASSES, ignore=ignore)
    assert cm.dtype == np.int64 and cm.shape == (N_CLASSES, N_CLASSES)
    np.testing.assert_array_equal(cm, brute_confusion(t, p, N_CLASSES, ignore))

    acc = accuracy(t, p, ignore=ignore)
    assert acc == pytest.approx(brute_accuracy(t, p, ignore), abs=1e-15)
    assert accuracy_from_confusion(cm) == pytest.approx(acc, abs=1e-15)

    per_class, mean = iou(t, p, n_classes=N_CLASSES, ignore=ignore)
    ref_per_class, ref_mean = brute_iou(t, p, N_CLASSES, ignore)
    assert per_class.dtype == np.float64 and per_class.shape == (N_CLASSES,)
    np.testing.assert_allclose(per_class, ref_per_class, rtol=0, atol=1e-15)
    assert mean == pytest.approx(ref_mean, abs=1e-15)


@pytest.mark.parametrize("seed", SEEDS)
def test_chunked_bincount_matches_brute_force(seed, monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK", 7)  # force many passes, with a ragged last one
    rng = np.random.default_rng(seed)
    t, p = random_labels(rng, (101,), [254, 255])
    cm = confusion_matrix(t, p, n_classes=N_CLASSES, ignore=[254, 255])
    np.testing.assert_array_equal(cm, brute_confusion(t, p, N_CLASSES, [254, 255]))


@pytest.mark.parametrize("seed", SEEDS)
def test_pooled_confusion_equals_confusion_of_concatenation(seed):
    rng = np.random.default_rng(seed)
    tiles = [random_labels(rng, (int(rng.integers(1, 40)),), 255) for _ in range(5)]
    pooled = sum(confusion_matrix(t, p, n_classes=N_CLASSES, ignore=255) for t, p in tiles)
    t_all = np.concatenate([t for t, _ in tiles])
    p_all = np.concatenate([p for _, p in tiles])
    whole = confusion_matrix(t_all, p_all, n_classes=N_CLASSES, ignore=255)
    np.testing.assert_array_equal(pooled, whole)
    np.testing.assert_array_equal(
        iou_from_confusion(pooled)[0], iou(t_all, p_all, n_classes=N_CLASSES, ignore=255)[0]
    )
    assert accuracy_from_confusion(pooled) == accuracy(t_all, p_all, ignore=255)


def test_iou_class_absent_from_both_is_nan_and_excluded_from_mean():
    t = np.array([0, 0, 1, 1, 3])
    p = np.array([0, 1, 1, 1, 3])  # class 2 in neither
    per_class, mean = iou(t, p, n_classes=4)
    np.testing.assert_allclose(per_class, [1 / 2, 2 / 3, np.nan, 1.0])
    assert mean == pytest.approx((1 / 2 + 2 / 3 + 1.0) / 3)


def test_iou_class_only_predicted_is_zero_not_nan():
    per_class, mean = iou([0, 0], [0, 1], n_classes=2)
    np.testing.assert_allclose(per_class, [0.5, 0.0])
    assert mean == pytest.approx(0.25)


def test_iou_from_empty_confusion_is_all_nan():
    per_class, mean = iou_from_confusion(np.zeros((3, 3), np.int64))
    assert np.isnan(per_class).all() and math.isnan(mean)


def test_accepts_jax_bool_and_integral_float_inputs():
    jnp = pytest.importorskip("jax.numpy")
    t = jnp.array([[0, 1], [2, 1]], dtype=jnp.int32)
    p = jnp.array([[0, 2], [2, 1]], dtype=jnp.int32)
    np.testing.assert_array_equal(
        confusion_matrix(t, p, n_classes=3), [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    )
    assert accuracy(t, p) == 0.75
    np.testing.assert_array_equal(
        confusion_matrix(np.array([True, False]), np.array([True, True]), n_classes=2),
        [[0, 1], [0, 1]],
    )
    np.testing.assert_array_equal(
        confusion_matrix([0.0, 1.0], [1.0, 1.0], n_classes=2), [[0, 1], [0, 1]]
    )
    assert roc_auc(jnp.array([0, 1, 1]), jnp.array([0.1, 0.2, 0.05])) == 0.5


def test_uint8_labels_with_ignore_255():
    t = np.array([0, 255, 1, 255], np.uint8)
    p = np.array([0, 1, 0, 2], np.uint8)
    np.testing.assert_array_equal(confusion_matrix(t, p, n_classes=2, ignore=255), [[1, 0], [1, 0]])
    assert accuracy(t, p, ignore=255) == 0.5


def test_ignored_pixels_are_dropped_before_range_checks():
    # The prediction at an ignored pixel is never looked at, even if out of range.
    cm = confusion_matrix([255, 0], [9, 0], n_classes=2, ignore=255)
    np.testing.assert_array_equal(cm, [[1, 0], [0, 0]])
    assert roc_auc([0, 1, 2], [0.1, 0.2, 0.3], ignore=2) == 1.0


# --------------------------------------------------------------------------------- ROC AUC


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [2, 9, 50, 333])
@pytest.mark.parametrize("ignore", [None, -1, [-1, 7]])
@pytest.mark.parametrize("kind", ["int_ties", "float"])
def test_roc_auc_matches_pairwise_brute_force(seed, n, ignore, kind):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    y[:2] = [0, 1]  # both classes present
    if ignore is not None:
        mask = rng.random(n) < 0.2
        mask[:2] = False
        y = np.where(mask, rng.choice(sorted(_ignored(ignore))), y)
    if kind == "int_ties":
        s = rng.integers(-3, 4, size=n)  # 7 distinct values: heavy ties
    else:
        s = rng.normal(size=n) + 0.5 * (y == 1)
    assert roc_auc(y, s, ignore=ignore) == brute_auc(y, s, ignore)


def test_roc_auc_perfect_inverted_and_constant():
    y = np.array([0, 0, 1, 0, 1, 1, 0])
    s = np.where(y == 1, 0.9, 0.1) + np.arange(7) * 1e-3
    assert roc_auc(y, s) == 1.0
    assert roc_auc(y, -s) == 0.0
    assert roc_auc(y, np.full(7, 3.25)) == 0.5
    assert roc_auc(y.astype(bool), s) == 1.0


def test_roc_auc_2d_input_and_ignore_255():
    y = np.array([[0, 1, 255], [1, 0, 255]], np.uint8)
    s = np.array([[0.2, 0.8, 0.0], [0.1, 0.3, 1.0]])
    assert roc_auc(y, s, ignore=255) == brute_auc(y, s, 255) == 0.5


@st.composite
def binary_with_int_scores(draw):
    n = draw(st.integers(2, 60))
    y = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda v: 0 < sum(v) < n))
    s = draw(st.lists(st.integers(-20, 20), min_size=n, max_size=n))
    return np.array(y), np.array(s, np.int64)


@settings(max_examples=200, deadline=None)
@given(binary_with_int_scores())
def test_roc_auc_properties(data):
    y, s = data
    auc = roc_auc(y, s)
    assert auc == brute_auc(y, s)
    # Strictly increasing transforms leave the ranks, hence the AUC, unchanged.
    assert roc_auc(y, 2 * s**3 + s + 7) == auc
    assert roc_auc(y, np.exp(s / 4.0)) == auc
    # Swapping the classes complements the AUC; so does negating the scores.
    assert roc_auc(1 - y, s) == pytest.approx(1 - auc, abs=1e-12)
    assert roc_auc(y, -s) == pytest.approx(1 - auc, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=80),
    st.integers(1, 5),
)
def test_confusion_pooling_property(pairs, n_splits):
    t, p = (np.array(v) for v in zip(*pairs, strict=True))
    cuts = np.linspace(0, len(t), n_splits + 1).astype(int)
    pooled = sum(
        confusion_matrix(t[a:b], p[a:b], n_classes=4, ignore=3)
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    )
    np.testing.assert_array_equal(pooled, brute_confusion(t, p, 4, 3))


# --------------------------------------------------------------------------------- errors

_CM = dict(n_classes=3)

ERROR_CASES = [
    # (function, args, kwargs, substrings that must appear in the message)
    (confusion_matrix, ([0, 1], [0, 1, 2]), _CM, ["y_true", "y_pred", "(2,)", "(3,)"]),
    (confusion_matrix, ([0, 3], [0, 1]), _CM, ["y_true", "[0, 3)", "3"]),
    (confusion_matrix, ([0, -1], [0, 1]), _CM, ["y_true", "[0, 3)", "-1"]),
    (confusion_matrix, ([0, 1], [0, 7]), _CM, ["y_pred", "[0, 3)", "7"]),
    (confusion_matrix, ([255, 0], [0, 9]), dict(n_classes=3, ignore=255), ["y_pred", "9"]),
    (confusion_matrix, ([0, 1], [0, 1]), dict(n_classes=0), ["n_classes"]),
    (confusion_matrix, ([0, 1], [0, 1]), dict(n_classes=2.0), ["n_classes"]),
    (confusion_matrix, ([0.5, 1], [0, 1]), _CM, ["y_true", "integer"]),
    (confusion_matrix, ([0, 1], [0, np.nan]), _CM, ["y_pred", "integer"]),
    (confusion_matrix, ([0, 1], [0, 1]), dict(n_classes=3, ignore=[1.5]), ["ignore"]),
    (iou, ([0, 1], [0, 5]), _CM, ["y_pred", "[0, 3)", "5"]),
    (iou_from_confusion, (np.zeros((2, 3)),), {}, ["cm", "(2, 3)"]),
    (accuracy_from_confusion, (np.zeros((2, 2)),), {}, ["cm"]),
    (accuracy, ([[0, 1]], [0, 1]), {}, ["y_true", "y_pred", "(1, 2)", "(2,)"]),
    (accuracy, ([255, 255], [0, 1]), dict(ignore=255), ["y_true", "ignor"]),
    (accuracy, ([], []), {}, ["y_true"]),
    (roc_auc, ([0, 1], [0.1]), {}, ["y_true", "scores", "(2,)", "(1,)"]),
    (roc_auc, ([1, 1, 1], [0.1, 0.2, 0.3]), {}, ["y_true", "both classes"]),
    (roc_auc, ([0, 1, 255], [0.1, 0.2, 0.3]), dict(ignore=[0]), ["y_true", "255"]),
    (roc_auc, ([0, 1, 2], [0.1, 0.2, 0.3]), {}, ["y_true", "binary", "2"]),
    (roc_auc, ([0, 1], [0.1, np.nan]), {}, ["scores", "NaN"]),
    (roc_auc, ([0, 1], [np.inf, 0.2]), {}, ["scores", "inf"]),
    (roc_auc, ([0, 1, 1], [0.1, 0.5, 0.3]), dict(ignore=[0]), ["y_true", "both classes"]),
]


@pytest.mark.parametrize(
    ("fn", "args", "kwargs", "needles"),
    ERROR_CASES,
    ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(ERROR_CASES)],
)
def test_bad_inputs_raise_value_error_naming_argument(fn, args, kwargs, needles):
    with pytest.raises(ValueError) as exc:
        fn(*args, **kwargs)
    for needle in needles:
        assert needle in str(exc.value)


@pytest.mark.parametrize("seed,shape",
                         [(0, (7, 5, 4)), (1, (3, 1)), (2, (11, 9)), (3, (2, 3, 6, 2))])
def test_entropy_matches_float64_brute_force(seed, shape):
    """Zeros, NaN and negative entries add nothing; float32 stays float32."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]).astype(np.float32)
    p[rng.random(p.shape) < 0.2] = 0.0
    p.flat[rng.integers(0, p.size, 3)] = np.nan
    p.flat[rng.integers(0, p.size, 2)] = -0.25
    expect = np.zeros(shape[:-1])
    for idx in np.ndindex(*shape[:-1]):
        expect[idx] = -sum(v * math.log(v) for v in p[idx].astype(np.float64) if v > 0)
    got = metrics.entropy(p)
    assert got.dtype == np.float32 and got.shape == shape[:-1]
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(metrics.entropy(np.zeros((2, 0))), np.zeros(2))
