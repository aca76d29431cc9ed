"""CoNSeP data layer: coarse density classes, composition table, nucleus truth, the reader."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from epilsr.data import consep


def _brute_class(count: int, area: int, n: int = 10) -> int:
    f = Fraction(count, area)
    for c in range(n):
        if Fraction(c, n) <= f < Fraction(c + 1, n):
            return c
    return n - 1  # f == 1


def test_block_counts_and_fractions():
    mask = np.zeros((4, 6), bool)
    mask[0, 0] = mask[1, 1] = mask[3, 5] = True
    np.testing.assert_array_equal(consep.block_counts(mask, block=2), [[2, 0, 0], [0, 0, 1]])
    np.testing.assert_allclose(consep.block_fractions(mask, block=2), [[0.5, 0, 0], [0, 0, 0.25]])


def test_coarse_classes_match_brute_force_bins(rng):
    block, n, t = 10, 10, 7
    # Every count 0..100 occurs (exact bin edges 10, 20, ... included), plus random blocks.
    counts = np.concatenate([np.arange(101), rng.integers(0, 101, t * 16 - 101)])
    blocks = np.zeros((t * 16, block * block), np.uint8)
    for i, cnt in enumerate(counts):
        blocks[i, rng.permutation(block * block)[:cnt]] = consep.INFLAMMATORY
    types = blocks.reshape(t, 4, 4, block, block).transpose(0, 1, 3, 2, 4).reshape(t, 40, 40)
    types[types == 0] = rng.choice([0, 1, 3, 4], size=int((types == 0).sum()))
    fractions, classes = consep.coarse_classes(types, block=block, n_classes=n)
    expected = np.array([_brute_class(int(c), block * block) for c in counts]).reshape(t, 4, 4)
    np.testing.assert_array_equal(classes, expected)
    np.testing.assert_allclose(fractions, counts.reshape(t, 4, 4) / 100)
    np.testing.assert_array_equal(consep.density_classes(fractions, n_classes=n), expected)


def test_all_bin_edges():
    counts = np.arange(4097)
    f = counts / 4096
    want = np.array([_brute_class(int(c), 4096) for c in counts])
    np.testing.assert_array_equal(consep.density_classes(f), want)
    assert consep.density_classes(np.array([0.1, 0.3, 0.7, 0.9999, 1.0])).tolist() == [
        1,
        3,
        7,
        9,
        9,
    ]


def test_composition_table_is_mean_fraction_per_bin():
    f = np.array([[0.0, 0.02, 0.15], [0.19, 0.55, 1.0]])
    c = consep.density_classes(f)
    table = consep.composition_table(f, c)
    assert table.shape == (10, 2)
    np.testing.assert_allclose(table[0, 1], 0.01)
    np.testing.assert_allclose(table[1, 1], 0.17)
    np.testing.assert_allclose(table[5, 1], 0.55)
    np.testing.assert_allclose(table[9, 1], 1.0)
    np.testing.assert_allclose(table[3, 1], 0.35)  # empty bin: its centre
    np.testing.assert_allclose(table.sum(-1), 1.0, rtol=1e-6)


def test_upsample_blocks():
    x = np.array([[1, 2], [3, 4]])
    up = consep.upsample_blocks(x, block=3)
    assert up.shape == (6, 6) and up[2, 2] == 1 and up[3, 5] == 4 and up[0, 3] == 2


def test_nucleus_truth_majority():
    types = np.array([[2, 2, 1, 0], [2, 3, 3, 0], [0, 2, 2, 0]], np.uint8)
    inst = np.array([[1, 1, 2, 0], [1, 2, 2, 0], [0, 3, 3, 0]], np.int32)
    ids, pos = consep.nucleus_truth(types, inst)
    np.testing.assert_array_equal(ids, [1, 2, 3])
    np.testing.assert_array_equal(pos, [True, False, True])
    # A tie (half of the pixels) is not a majority.
    ids, pos = consep.nucleus_truth(np.array([[2, 3]]), np.array([[5, 5]]))
    assert ids.tolist() == [5] and pos.tolist() == [False]


def test_split_by_tile_keeps_tiles_together():
    names = [f"train_{t}_{k:03d}" for t in range(1, 28) for k in range(16)]
    dev, held = consep.split_by_tile(names)
    assert len(held) == 9 * 16 and len(dev) == 18 * 16
    assert {consep.tile_of(n) for n in dev}.isdisjoint({consep.tile_of(n) for n in held})
    assert consep.tile_of("train_10_003") == "train_10"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: consep.block_counts(np.zeros((64, 64)), block=48), "block: 48 does not divide"),
        (lambda: consep.block_counts(np.zeros((64, 64)), block=128), "block: 128 is larger"),
        (lambda: consep.block_counts(np.zeros((64, 64)), block=0), "block: expected a positive"),
        (lambda: consep.block_counts(np.zeros(64), block=8), "mask: expected rank"),
        (lambda: consep.density_classes(np.array([1.5])), "fractions: expected finite"),
        (lambda: consep.composition_table(np.zeros((2, 2)), np.zeros((2, 3), int)), "classes"),
        (lambda: consep.composition_table(np.zeros(2), np.array([0, 12])), "classes: expected"),
        (lambda: consep.nucleus_truth(np.zeros((4, 4)), np.zeros((4, 5), int)), "instances"),
        (lambda: consep.nucleus_truth(np.zeros(4), np.zeros(4, int)), "types: expected rank"),
        (lambda: consep.split_by_tile(["train_1_000"], holdout_every=1), "holdout_every"),
        (lambda: consep.tile_of("noname"), "name: expected"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="root: no 'images/'"):
        consep.find_patches(tmp_path / "nope")
    (tmp_path / "images").mkdir()
    (tmp_path / "type_masks").mkdir()
    with pytest.raises(FileNotFoundError, match="inst_masks_train.npz"):
        consep.load_consep(tmp_path)


def test_reader_on_a_fake_folder(tmp_path, rng):
    (tmp_path / "images").mkdir()
    (tmp_path / "type_masks").mkdir()
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    types = rng.integers(0, 5, (32, 32), dtype=np.uint8)
    inst = rng.integers(0, 9, (32, 32)).astype(np.uint16)
    Image.fromarray(image).save(tmp_path / "images" / "train_4_001.jpg")
    Image.fromarray(types).save(tmp_path / "type_masks" / "train_4_001.png")
    np.savez(tmp_path / "inst_masks_train.npz", train_4_001=inst)
    ds = consep.load_consep(tmp_path)
    assert ds.names == ("train_4_001",)
    assert ds.images.shape == (1, 32, 32, 3) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.types[0], types)
    np.testing.assert_array_equal(ds.instances[0], inst)
    with pytest.raises(FileNotFoundError, match="missing file"):
        consep.load_consep(tmp_path, ["train_4_002"])


def test_real_data_layout(consep_root):
    names = consep.find_patches(consep_root)
    assert len(names) == 432
    ds = consep.load_consep(consep_root, names[:4])
    assert ds.images.shape == (4, 256, 256, 3) and ds.types.shape == (4, 256, 256)
    assert set(np.unique(ds.types)) <= {0, 1, 2, 3, 4}
    f, c = consep.coarse_classes(ds.types, block=64)
    assert f.shape == c.shape == (4, 4, 4)
    # Instances carry one type each (up to a few boundary pixels): truth is well defined.
    ids, pos = consep.nucleus_truth(ds.types[0], ds.instances[0])
    assert ids.size > 0 and pos.dtype == bool
