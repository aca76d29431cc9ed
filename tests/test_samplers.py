"""On-device patch samplers and the prefetch iterator (epilsr.data.samplers)."""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epilsr.pipelines.prefetch import prefetch
from epilsr.samplers import (
    PATCH_SIZES,
    extract_patches,
    label_positions,
    patch_sizes,
    sample_labelled_patches,
    sample_patches,
)


def _coded_image(t: int, h: int, w: int) -> np.ndarray:
    """Tiles whose channels encode (tile, row, col), so every patch reveals where it was cut."""
    tt, rr, cc = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt, rr, cc], axis=-1).astype(np.float32)


def _windows(images: np.ndarray, size: int) -> set[bytes]:
    t, h, w, _ = images.shape
    return {
        images[i, r : r + size, c : c + size].tobytes()
        for i in range(t)
        for r in range(h - size + 1)
        for c in range(w - size + 1)
    }


def test_sample_patches_shapes_and_windows():
    images = _coded_image(2, 12, 9)
    patches = sample_patches(jax.random.key(0), images, size=5, batch=16)
    assert patches.shape == (16, 5, 5, 3) and patches.dtype == jnp.float32
    valid = _windows(images, 5)
    for p in np.asarray(patches):
        assert p.tobytes() in valid  # a genuine window, inside one tile, no wrap-around
    # Single image [H, W, C].
    assert sample_patches(jax.random.key(1), images[0], size=3, batch=4).shape == (4, 3, 3, 3)


def test_sample_patches_covers_all_corners():
    images = _coded_image(1, 6, 6)
    patches = np.asarray(sample_patches(jax.random.key(3), images, size=4, batch=400))
    corners = {(int(p[0, 0, 1]), int(p[0, 0, 2])) for p in patches}
    assert corners == {(r, c) for r in range(3) for c in range(3)}  # the max corner is reachable


def test_sample_patches_deterministic_per_key():
    images = np.random.default_rng(0).uniform(size=(20, 20, 2)).astype(np.float32)
    a = sample_patches(jax.random.key(7), images, size=5, batch=8)
    b = sample_patches(jax.random.key(7), images, size=5, batch=8)
    c = sample_patches(jax.random.key(8), images, size=5, batch=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    jitted = jax.jit(sample_patches, static_argnames=("size", "batch"))
    np.testing.assert_array_equal(jitted(jax.random.key(7), images, size=5, batch=8), a)


def test_uint8_is_scaled():
    images = np.full((8, 8, 1), 255, np.uint8)
    patches = sample_patches(jax.random.key(0), images, size=3, batch=2)
    np.testing.assert_allclose(patches, 1.0)


def test_patch_larger_than_image_raises():
    with pytest.raises(ValueError, match="larger than the tile"):
        sample_patches(jax.random.key(0), np.zeros((4, 4, 1), np.float32), size=5, batch=1)
    with pytest.raises(ValueError, match="rank"):
        sample_patches(jax.random.key(0), np.zeros((4, 4), np.float32), size=3, batch=1)


def test_label_positions_matches_brute_force(rng):
    labels = rng.integers(0, 4, size=(2, 9, 11))
    labels[labels == 3] = 0
    labels[0, 2, 7] = 3
    for size in (1, 3, 4):
        got = np.asarray(label_positions(labels, label=3, size=size))
        want = np.zeros((2, 9 - size + 1, 11 - size + 1), bool)
        for t in range(2):
            for r in range(want.shape[1]):
                for c in range(want.shape[2]):
                    want[t, r, c] = np.any(labels[t, r : r + size, c : c + size] == 3)
        np.testing.assert_array_equal(got, want)


def test_label_conditioned_patches_contain_label(rng):
    t, h, w, size = 2, 16, 16, 5
    labels = np.zeros((t, h, w), np.int32)
    labels[1, 10:12, 3] = 2  # a tiny region of label 2 in tile 1 only
    images = np.concatenate([_coded_image(t, h, w), labels[..., None].astype(np.float32)], -1)
    patches, blocks = sample_labelled_patches(jax.random.key(0), images, labels, label=2,
                                              patch_size=size, label_size=size, batch=16)
    patches = np.asarray(patches)
    np.testing.assert_array_equal(blocks, patches[..., 3])  # the blocks are the windows' labels
    assert patches.shape == (16, size, size, 4)
    for p in patches:
        assert np.any(p[..., 3] == 2)
        tile, row, col = int(p[0, 0, 0]), int(p[0, 0, 1]), int(p[0, 0, 2])
        assert np.any(labels[tile, row : row + size, col : col + size] == 2)
    # Uniform over valid windows: several distinct corners appear.
    assert len({p[0, 0, :3].tobytes() for p in patches}) > 3


def test_label_conditioned_determinism_and_precomputed_valid():
    labels = np.zeros((12, 12), np.int32)
    labels[5, 5] = 1
    images = _coded_image(1, 12, 12)[0]
    valid = label_positions(labels, label=1, size=3)
    a = sample_labelled_patches(jax.random.key(4), images, labels, label=1, patch_size=3,
                                batch=6)
    b = sample_labelled_patches(jax.random.key(4), images, labels, valid, patch_size=3, batch=6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_label_absent_raises():
    labels = np.zeros((10, 10), np.int32)
    images = np.zeros((10, 10, 1), np.float32)
    with pytest.raises(ValueError, match="no 3x3 window contains"):
        sample_labelled_patches(jax.random.key(0), images, labels, label=5, patch_size=3, batch=2)
    with pytest.raises(ValueError, match="to match images"):
        sample_labelled_patches(jax.random.key(0), images, labels[:9], label=0, patch_size=3,
                                batch=2)
    with pytest.raises(ValueError, match="label_size"):
        sample_labelled_patches(jax.random.key(0), images, labels, patch_size=3, label_size=5,
                                batch=2)


def test_extract_patches_corners():
    images = _coded_image(2, 8, 8)
    p = np.asarray(extract_patches(images, [1, 0], [2, 5], [3, 0], size=3))
    np.testing.assert_array_equal(p[:, 0, 0], [[1, 2, 3], [0, 5, 0]])


def test_patch_sizes():
    assert PATCH_SIZES == (11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31)
    drawn = patch_sizes(jax.random.key(0), num_steps=400)
    assert set(drawn.tolist()) == set(PATCH_SIZES) and drawn.shape == (400,)
    np.testing.assert_array_equal(drawn, patch_sizes(jax.random.key(0), num_steps=400))
    assert patch_sizes(jax.random.key(5), num_steps=3, sizes=(7,)).tolist() == [7, 7, 7]
    with pytest.raises(ValueError, match="sizes"):
        patch_sizes(jax.random.key(0), num_steps=1, sizes=())


def test_labelled_patches_uniform_and_centre_blocks():
    """Without ``valid``/``label`` every window is allowed (the draws of :func:`sample_patches`);
    each block is the label block centred in its patch (``o = (K - Kl) // 2``)."""
    images = _coded_image(2, 9, 11)
    labels = (images[..., 1] * 100 + images[..., 2]).astype(np.int32)  # row, col coded
    key = jax.random.key(3)
    patches, blocks = sample_labelled_patches(key, images, labels, patch_size=5, label_size=3,
                                              batch=32)
    np.testing.assert_array_equal(patches, sample_patches(key, images, size=5, batch=32))
    p = np.asarray(patches)
    rows, cols = p[:, 0, 0, 1].astype(int), p[:, 0, 0, 2].astype(int)
    np.testing.assert_array_equal(np.asarray(blocks)[:, 0, 0], (rows + 1) * 100 + cols + 1)
    _, centre = sample_labelled_patches(key, images, labels, patch_size=5, batch=32)
    np.testing.assert_array_equal(np.asarray(centre)[:, 0, 0], (rows + 2) * 100 + cols + 2)


def test_prefetch_order_device_and_errors():
    items = [np.full((2,), i, np.float32) for i in range(5)]
    out = list(prefetch(iter(items), size=2))
    assert [int(x[0]) for x in out] == list(range(5))
    assert all(isinstance(x, jax.Array) for x in out)

    def broken():
        yield np.zeros(1)
        raise RuntimeError("sampler failed")

    it = prefetch(broken())
    next(it)
    with pytest.raises(RuntimeError, match="sampler failed"):
        next(it)


def test_prefetch_runs_ahead_and_closes():
    produced = []

    def slow():
        for i in range(100):
            produced.append(i)
            yield np.zeros(1) + i

    it = prefetch(slow(), size=3)
    deadline = time.time() + 5
    while len(produced) < 4 and time.time() < deadline:
        time.sleep(0.01)
    assert 3 <= len(produced) <= 5  # filled the queue ahead of the consumer, then blocked
    assert float(next(it)[0]) == 0.0
    it.close()
    time.sleep(0.3)
    assert len(produced) < 100
    alive = [t for t in threading.enumerate() if t.name == "epilsr-prefetch" and t.is_alive()]
    assert not alive
    with pytest.raises(ValueError):
        prefetch(iter([]), size=0)
