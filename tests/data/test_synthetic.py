"""Tests for epilsr.data.synthetic (the embedded demo scene with known ground truth)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from epilsr.data.synthetic import (
    CLASS_NAMES,
    DEFAULT_LABEL_GIVEN_CLASS,
    LABEL_NAMES,
    Scene,
    block_composition,
    classify_blocks,
    make_scene,
)

SEEDS = (0, 1, 2, 3)
N_CLASSES = len(CLASS_NAMES)


@functools.cache
def scene(seed: int, size=256, block: int = 32) -> Scene:
    return make_scene(seed, size=size, block=block)


def brute_force_composition(labels: np.ndarray, block: int) -> np.ndarray:
    h, w = labels.shape
    out = np.zeros((h // block, w // block, 4))
    for by in range(h // block):
        for bx in range(w // block):
            blk = labels[by * block : (by + 1) * block, bx * block : (bx + 1) * block]
            for k in range(4):
                out[by, bx, k] = np.mean(blk == k)
    return out


def brute_force_class(frac) -> int:
    w, t, v, i = frac
    if w >= 0.5:
        return CLASS_NAMES.index("open water")
    if i > 0.05:
        if i < 0.2:
            return CLASS_NAMES.index("developed open")
        if i < 0.5:
            return CLASS_NAMES.index("developed low")
        if i < 0.8:
            return CLASS_NAMES.index("developed medium")
        return CLASS_NAMES.index("developed high")
    if t >= 0.7:
        return CLASS_NAMES.index("forest")
    if v >= 0.7:
        return CLASS_NAMES.index("field")
    return CLASS_NAMES.index("mixed vegetation")


def block_values(a: np.ndarray, block: int) -> np.ndarray:
    """[nby, nbx, block*block] view of the pixels of each block."""
    h, w = a.shape
    return (
        a.reshape(h // block, block, w // block, block)
        .transpose(0, 2, 1, 3)
        .reshape(h // block, w // block, block * block)
    )


# ---------------------------------------------------------------------------------------


def test_names():
    s = scene(0)
    assert s.label_names == LABEL_NAMES == ("water", "tree canopy", "low vegetation", "impervious")
    assert s.class_names == CLASS_NAMES
    assert len(set(CLASS_NAMES)) == N_CLASSES


def test_deterministic():
    a = make_scene(7, size=128)
    b = make_scene(7, size=128)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


def test_different_seeds_differ():
    a, b = scene(0), scene(1)
    assert not np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, b.image)


def test_noise_changes_only_the_image():
    a = make_scene(3, size=128, noise=0.0)
    b = make_scene(3, size=128, noise=0.1)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.classes, b.classes)
    np.testing.assert_array_equal(a.label_given_class, b.label_given_class)
    diff = b.image - a.image
    assert 0.05 < float(diff.std()) < 0.1  # clipping at 0 and 1 reduces it a little


@pytest.mark.parametrize("seed", SEEDS)
def test_shapes_dtypes_ranges(seed):
    s = scene(seed)
    assert s.image.shape == (256, 256, 4) and s.image.dtype == np.float32
    assert s.labels.shape == (256, 256) and s.labels.dtype == np.int32
    assert s.classes.shape == (256, 256) and s.classes.dtype == np.int32
    assert s.label_given_class.shape == (N_CLASSES, 4)
    assert s.label_given_class.dtype == np.float32
    assert np.isfinite(s.image).all()
    assert s.image.min() >= 0.0 and s.image.max() <= 1.0
    assert s.labels.min() >= 0 and s.labels.max() <= 3
    assert s.classes.min() >= 0 and s.classes.max() < N_CLASSES


@pytest.mark.parametrize("seed", SEEDS)
def test_classes_constant_within_blocks_and_follow_binning(seed):
    s = scene(seed)
    blocks = block_values(s.classes, 32)
    assert (blocks == blocks[..., :1]).all()
    frac = brute_force_composition(s.labels, 32)
    expected = np.array([[brute_force_class(f) for f in row] for row in frac])
    np.testing.assert_array_equal(blocks[..., 0], expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_label_given_class(seed):
    s = scene(seed)
    table = s.label_given_class
    np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-6)
    assert (table >= 0).all()
    frac = brute_force_composition(s.labels, 32)
    cls = s.classes[::32, ::32]
    for c in range(N_CLASSES):
        sel = cls == c
        if sel.any():
            np.testing.assert_allclose(table[c], frac[sel].mean(axis=0), atol=1e-6)
        else:
            np.testing.assert_array_equal(table[c], DEFAULT_LABEL_GIVEN_CLASS[c])


def test_default_table():
    assert DEFAULT_LABEL_GIVEN_CLASS.shape == (N_CLASSES, 4)
    np.testing.assert_allclose(DEFAULT_LABEL_GIVEN_CLASS.sum(axis=1), 1.0, atol=1e-6)
    # each nominal row is classified as its own class
    for c in range(N_CLASSES):
        assert classify_blocks(DEFAULT_LABEL_GIVEN_CLASS[c]) == c


def test_classify_blocks_rules():
    cases = {
        (0.6, 0.1, 0.1, 0.2): "open water",
        (0.0, 0.9, 0.05, 0.05): "forest",  # 0.05 impervious is not developed
        (0.0, 0.85, 0.0, 0.15): "developed open",
        (0.0, 0.3, 0.3, 0.4): "developed low",
        (0.0, 0.1, 0.2, 0.7): "developed medium",
        (0.0, 0.0, 0.2, 0.8): "developed high",
        (0.0, 0.2, 0.8, 0.0): "field",
        (0.3, 0.3, 0.4, 0.0): "mixed vegetation",
    }
    comps = np.array(list(cases))
    got = classify_blocks(comps)
    assert [CLASS_NAMES[c] for c in got] == list(cases.values())
    np.testing.assert_array_equal(got, [brute_force_class(f) for f in comps])


@pytest.mark.parametrize("seed", SEEDS)
def test_block_composition_matches_brute_force(seed):
    s = scene(seed)
    np.testing.assert_allclose(
        block_composition(s.labels, 32), brute_force_composition(s.labels, 32)
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_all_labels_present(seed):
    assert set(np.unique(scene(seed).labels)) == {0, 1, 2, 3}


@pytest.mark.parametrize("seed", SEEDS)
def test_many_blocks_are_mixed(seed):
    frac = block_composition(scene(seed).labels, 32)
    assert (frac.max(axis=-1) < 0.9).mean() >= 1 / 3


@pytest.mark.parametrize("seed", SEEDS)
def test_class_baseline_leaves_room_for_lsr(seed):
    s = scene(seed)
    pred = s.label_given_class.argmax(axis=1)[s.classes]
    acc = float((pred == s.labels).mean())
    assert 0.6 <= acc <= 0.9, acc


def test_colour_statistics_are_plausible():
    s = scene(0)
    img, lab = s.image, s.labels
    mean = np.array([img[lab == k].mean(axis=0) for k in range(4)])  # [label, band]
    nir = mean[:, 3]
    water, tree, low, imp = range(4)
    assert nir[water] < nir[imp] < min(nir[tree], nir[low])  # vegetation is bright in NIR
    assert mean[water, :3].mean() < mean[low, :3].mean()  # water is dark
    assert mean[tree, 1] > mean[tree, 0] and mean[low, 1] > mean[low, 0]  # vegetation green
    assert mean[imp, :3].mean() > mean[tree, :3].mean()  # impervious brighter than canopy

    # texture: canopy is rough (crowns and shadows), low vegetation much less, water smooth;
    # measured by the std of NIR differences 2 px apart within runs of one label
    g = img[:, 2:, 3] - img[:, :-2, 3]
    same = (lab[:, 2:] == lab[:, :-2]) & (lab[:, 1:-1] == lab[:, 2:])
    rough = [float(g[same & (lab[:, 2:] == k)].std()) for k in range(4)]
    assert rough[tree] > 1.3 * rough[low] and rough[low] > rough[water]

    # colours overlap: a per-pixel nearest-class-mean rule is far from perfect
    d = ((img[:, :, None, :] - mean[None, None]) ** 2).sum(-1)
    assert (d.argmin(-1) == lab).mean() < 0.95


def test_non_square_and_tuple_size():
    s = make_scene(5, size=(128, 256), block=32)
    assert s.image.shape == (128, 256, 4)
    assert s.labels.shape == s.classes.shape == (128, 256)
    assert (block_values(s.classes, 32) == s.classes[::32, ::32, None]).all()
    t = make_scene(5, size=(128, 128), block=16)
    u = make_scene(5, size=128, block=16)
    np.testing.assert_array_equal(t.image, u.image)
    np.testing.assert_array_equal(t.classes, u.classes)


@pytest.mark.parametrize(("size", "block"), [(32, 32), (16, 8), ((8, 40), 8), (30, 30), (1, 1)])
def test_small_and_odd_sizes(size, block):
    s = make_scene(1, size=size, block=block)
    h, w = (size, size) if isinstance(size, int) else size
    assert s.image.shape == (h, w, 4) and s.labels.shape == (h, w)
    assert s.image.min() >= 0.0 and s.image.max() <= 1.0
    np.testing.assert_allclose(s.label_given_class.sum(axis=1), 1.0, atol=1e-6)
    assert (block_values(s.classes, block) == s.classes[::block, ::block, None]).all()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"size": 100}, "size"),
        ({"size": 0}, "size"),
        ({"size": -64}, "size"),
        ({"size": (64,)}, "size"),
        ({"size": (64, 48)}, "size"),
        ({"size": 64.0}, "size"),
        ({"block": 0}, "block"),
        ({"block": -32}, "block"),
        ({"block": 2.5}, "block"),
        ({"noise": -0.01}, "noise"),
        ({"noise": float("nan")}, "noise"),
        ({"noise": float("inf")}, "noise"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_scene(0, **kwargs)


def test_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        make_scene(-1)
    with pytest.raises(TypeError, match="seed"):
        make_scene(1.5)


def test_numpy_integer_arguments():
    a = make_scene(np.int64(2), size=np.int64(64), block=np.int32(32))
    b = make_scene(2, size=64, block=32)
    np.testing.assert_array_equal(a.image, b.image)
