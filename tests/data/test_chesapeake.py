"""The Chesapeake reader and the NLCD table (real files skip when the data folder is absent)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from epilsr.data import chesapeake


def test_shipped_table_matches_shared_csv(data_root):
    shipped = chesapeake.load_nlcd_table()
    shared = chesapeake.load_nlcd_table(data_root / "chesapeake_wv" / "nlcd_label_priors.csv")
    np.testing.assert_array_equal(shipped.codes, shared.codes)
    np.testing.assert_allclose(shipped.mean, shared.mean)
    np.testing.assert_allclose(shipped.sd, shared.sd)


def test_table_contents():
    table = chesapeake.load_nlcd_table()
    assert table.mean.shape == (22, 4) and table.sd.shape == (22, 4)
    forest = int(np.flatnonzero(table.codes == 41)[0])
    assert table.mean[forest].argmax() == 1  # tree canopy
    assert np.all(table.mean >= 0)


def test_lc_mapping():
    lc = np.array([[0, 1, 2, 3], [4, 5, 6, 15]], np.uint8)
    np.testing.assert_array_equal(chesapeake.lc_to_labels(lc), [[255, 0, 1, 2], [3, 3, 3, 255]])


def test_nlcd_index_and_unknown_code():
    table = chesapeake.load_nlcd_table()
    idx = table.index(np.array([[41, 82], [21, 11]], np.uint8))
    np.testing.assert_array_equal(table.codes[idx], [[41, 82], [21, 11]])
    with pytest.raises(ValueError, match="nlcd: codes \\[13\\]"):
        table.index(np.array([[41, 13]], np.uint8))


def test_real_tiles_load(data_root):
    stems = chesapeake.find_tiles(data_root / "chesapeake_wv")
    assert len(stems) == 8
    tile = chesapeake.load_tile(stems[0])
    assert tile.image.shape == (256, 256, 4) and tile.image.dtype == np.uint8
    assert tile.labels.shape == tile.nlcd.shape == (256, 256)
    assert set(np.unique(tile.labels)) <= {1, 2, 3}


def test_missing_companion_file(tmp_path):
    tifffile.imwrite(tmp_path / "t_nlcd.tif", np.full((8, 8), 41, np.uint8))
    (tmp_path / "t_naip-new.tif").write_bytes(b"")
    (tmp_path / "t_naip-new.tif").unlink()
    with pytest.raises(FileNotFoundError, match="no '\\*_naip-new.tif' tiles"):
        chesapeake.find_tiles(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing companion file"):
        chesapeake.load_tile(str(tmp_path / "t"))


def test_shape_mismatch(tmp_path):
    tifffile.imwrite(tmp_path / "t_naip-new.tif", np.zeros((8, 8, 4), np.uint8))
    tifffile.imwrite(tmp_path / "t_nlcd.tif", np.full((8, 9), 41, np.uint8))
    with pytest.raises(ValueError, match="nlcd shape"):
        chesapeake.load_tile(str(tmp_path / "t"))
    tifffile.imwrite(tmp_path / "u_naip-new.tif", np.zeros((8, 8, 3), np.uint8))
    tifffile.imwrite(tmp_path / "u_nlcd.tif", np.full((8, 8), 41, np.uint8))
    with pytest.raises(ValueError, match="expected \\[H, W, 4\\]"):
        chesapeake.load_tile(str(tmp_path / "u"))


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        chesapeake.find_tiles(tmp_path / "nope")


def _fake_lila(root, state="wv", year=2014, split="train", names=("m_1_nw_17_1", "m_2_ne_17_1")):
    folder = root / f"{state}_1m_{year}_extended-debuffered-{split}_tiles"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in names:
        tifffile.imwrite(folder / f"{name}_naip-new.tif",
                         rng.integers(0, 255, (40, 50, 4), dtype=np.uint8), compression="lzw")
        tifffile.imwrite(folder / f"{name}_nlcd.tif", np.full((40, 50), 41, np.uint8))
        tifffile.imwrite(folder / f"{name}_lc.tif", rng.integers(1, 7, (40, 50), dtype=np.uint8))
    return folder


def test_lila_index_and_training_images(tmp_path):
    from omegaconf import OmegaConf

    from experiments.common import load_training_images

    _fake_lila(tmp_path)
    _fake_lila(tmp_path, state="pa", year=2013, names=("m_3_sw_18_1",))
    stems = chesapeake.find_lila_tiles(tmp_path, states=["wv", "md"], split="train")
    assert [s.rsplit("/", 1)[-1] for s in stems] == ["m_1_nw_17_1", "m_2_ne_17_1"]
    assert len(chesapeake.find_lila_tiles(tmp_path, states=["pa"])) == 1
    with pytest.raises(FileNotFoundError, match="extended-debuffered-test_tiles"):
        chesapeake.find_lila_tiles(tmp_path, states=["wv"], split="test")
    cfg = OmegaConf.create({"kind": "chesapeake_lila", "root": str(tmp_path), "states": ["wv"],
                            "split": "train", "max_tiles": 8, "crop": 32, "cell_size": 30})
    images, labels, n_labels = load_training_images(cfg)
    assert images.shape == (2, 32, 32, 4) and images.dtype == np.float32
    assert labels.shape == (2, 32, 32) and n_labels == 4
    assert 0.0 <= images.min() and images.max() <= 1.0
