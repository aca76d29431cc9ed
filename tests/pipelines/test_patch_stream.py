"""The streamed training patches (issue 17 item 7): every tile of a LILA-format region, windowed
reads, an exact label index, the region's distribution, determinism."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf

from epilsr import samplers
from epilsr.cli.common import load_training_images, open_patch_stream, streams
from epilsr.data import chesapeake
from epilsr.io import geotiff
from epilsr.io.geotiff import write_raster
from epilsr.pipelines.patch_stream import PatchStream, WindowCache, forward_distance

SIZES = (40, 52), (64, 90)  # two tiles of different areas


def _position_image(t: int, h: int, w: int) -> np.ndarray:
    """Imagery whose pixels name themselves: (row, col, tile, 7)."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([r, c, np.full_like(r, t), np.full_like(r, 7)], axis=-1).astype(np.uint8)


def lila_tree(root, sizes=SIZES, far=True):
    """A LILA-format region (wv, train) written with the project's GeoTIFF writer (16^2 tiles):
    land cover 2/3 (tree canopy / low vegetation) everywhere; with ``far``, water (code 1,
    label 0) only in a 3 x 4 field at the far corner of the last tile."""
    folder = root / "wv_1m_2014_extended-debuffered-train_tiles"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    stems, labels = [], []
    for t, (h, w) in enumerate(sizes):
        stem = folder / f"m_{t}_nw_17_1"
        lc = rng.choice(np.array([2, 3], np.uint8), size=(h, w))
        if far and t == len(sizes) - 1:
            lc[h - 5 : h - 2, w - 4 :] = 1
        write_raster(f"{stem}_naip-new.tif", _position_image(t, h, w), tile=16)
        write_raster(f"{stem}_lc.tif", lc, tile=16)
        write_raster(f"{stem}_nlcd.tif", np.full((h, w), 41, np.uint8), tile=16)
        stems.append(stem)
        labels.append(chesapeake.lc_to_labels(lc))
    return stems, labels


def _stream(stems, **kw) -> PatchStream:
    kw = {"max_size": 7, "block": 16, "windows": 4, "cache_bytes": 2**20, **kw}
    return PatchStream([(f"{s}_naip-new.tif", f"{s}_lc.tif") for s in stems],
                       label_map=chesapeake.lc_to_labels, **kw)


def _where(patches) -> np.ndarray:
    """``[B, 3]`` (tile, row, col) of each patch's corner, from the self-naming imagery."""
    p = np.rint(patches * 255).astype(int)
    return np.stack([p[:, 0, 0, 2], p[:, 0, 0, 0], p[:, 0, 0, 1]], axis=1)


def test_forward_distance_matches_brute_force():
    rng = np.random.default_rng(1)
    ind = rng.random((23, 19)) < 0.04
    d = forward_distance(ind, 15, 6)
    for r in range(15):
        for c in range(19):
            want = next((k for k in range(6) if ind[r : r + k + 1, c : c + k + 1].any()), 6)
            assert d[r, c] == want, (r, c)


def test_index_is_exact_per_block_label_and_width(tmp_path):
    stems, labels = lila_tree(tmp_path)
    src = _stream(stems)
    for lab in range(4):
        for k in (1, 3, 6, 7):
            w = src.weights(k, lab)
            for t, lab_map in enumerate(labels):  # float64-free brute force: every window
                h, wd = lab_map.shape
                ok = np.array([[(lab_map[r : r + k, c : c + k] == lab).any()
                                for c in range(wd - k + 1)] for r in range(h - k + 1)])
                blocks = src._blocks[:, 0] == t
                assert w[blocks].sum() == ok.sum(), (lab, k, t)
                for (_, i, j), n in zip(src._blocks[blocks], w[blocks], strict=True):
                    assert n == ok[16 * i : 16 * i + 16, 16 * j : 16 * j + 16].sum()
    pixels = sum(np.bincount(lab.ravel(), minlength=256)[:4] for lab in labels)
    np.testing.assert_array_equal(src.label_pixels(), pixels)


def test_patches_are_the_tiles_pixels_and_hold_the_label(tmp_path):
    stems, labels = lila_tree(tmp_path)
    src = _stream(stems)
    images = [_position_image(t, *s) for t, s in enumerate(SIZES)]
    for label in (None, 0, 1):
        patches = src.sample(jax.random.key(3), size=5, batch=64, label=label)
        assert patches.shape == (64, 5, 5, 4) and patches.dtype == np.float32
        for p, (t, r, c) in zip(patches, _where(patches), strict=True):
            np.testing.assert_array_equal(p, images[t][r : r + 5, c : c + 5] / np.float32(255))
            if label is not None:
                assert (labels[t][r : r + 5, c : c + 5] == label).any()


def test_far_label_is_streamed_where_the_crop_misses_it(tmp_path):
    stems, labels = lila_tree(tmp_path)
    cfg = OmegaConf.create({"kind": "chesapeake_lila", "root": str(tmp_path), "states": ["wv"],
                            "split": "train", "max_tiles": 8, "crop": 32, "cell_size": 30,
                            "stream": True, "block": 16, "windows": 4, "cache_bytes": 2**20})
    _, cropped, _ = load_training_images(cfg)
    assert not (cropped == 0).any()  # the old path: water "absent"
    src = open_patch_stream(cfg, max_size=7)
    assert src.has_label(0) and not src.has_label(3)
    where = _where(src.sample(jax.random.key(0), size=7, batch=32, label=0))
    h, w = SIZES[1]
    assert (where[:, 0] == 1).all() and (where[:, 1] >= h - 5 - 6).all()
    assert (where[:, 2] >= w - 4 - 6).all()
    with pytest.raises(ValueError, match="no 7x7 window containing label 3 in the 2 tile"):
        src.sample(jax.random.key(0), size=7, batch=4, label=3)


def test_distribution_is_the_regions(tmp_path):
    """Per-tile frequencies ~ area weights (binomial, 5 s.d.); columns uniform (the narrow edge
    block no more likely than its width says); labelled windows ~ their count per tile."""
    stems, labels = lila_tree(tmp_path)
    src = _stream(stems, windows=8)
    k, n = 5, 0
    hits = np.zeros(2)
    cols = []
    for step in range(60):
        where = _where(src.sample(jax.random.fold_in(jax.random.key(1), step), size=k, batch=64))
        hits += np.bincount(where[:, 0], minlength=2)
        cols.append(where[where[:, 0] == 1, 2])
        n += 64
    area = np.array([(h - k + 1) * (w - k + 1) for h, w in SIZES], float)
    p = area / area.sum()
    assert abs(hits[1] - n * p[1]) < 5 * np.sqrt(n * p[1] * (1 - p[1]))
    cols = np.concatenate(cols)  # tile 1: corner columns 0..85 in blocks of 16, 16, .., 6
    want = len(cols) * np.array([16, 16, 16, 16, 16, 6]) / 86
    counts = np.bincount(cols // 16, minlength=6)
    assert (abs(counts - want) < 5 * np.sqrt(want)).all(), (counts, want)
    # label 1 (tree canopy): windows per tile as counted by the in-memory brute force
    allowed = np.array([samplers.label_positions(lab, label=1, size=k).sum() for lab in labels])
    q = allowed[1] / allowed.sum()
    hits = sum(np.bincount(_where(src.sample(jax.random.key(s), size=k, batch=64, label=1))[:, 0],
                           minlength=2) for s in range(30))
    assert abs(hits[1] - 1920 * q) < 5 * np.sqrt(1920 * q * (1 - q))


def test_reads_are_windows_never_a_whole_tile(tmp_path, monkeypatch):
    stems, _ = lila_tree(tmp_path, sizes=((64, 96),), far=False)

    def whole(self):
        raise AssertionError(f"whole read of {self.path}")

    monkeypatch.setattr(geotiff.RasterReader, "read", whole)
    src = _stream(stems, windows=2, cache_bytes=0)
    src.sample(jax.random.key(0), size=7, batch=16)
    assert src.reads == 2  # one window per block drawn, nothing else
    assert src.largest_read[0] <= 16 + 6 and src.largest_read[1] <= 16 + 6
    assert src.bytes_read <= 2 * 22 * 22 * 4 < 64 * 96 * 4
    src.sample(jax.random.key(1), size=7, batch=16, label=1)  # the index: strips of labels
    assert src.largest_read[0] <= 16 + 6


def test_deterministic_whatever_the_cache_and_threads(tmp_path):
    stems, _ = lila_tree(tmp_path)
    key = jax.random.key(5)
    a = _stream(stems).sample(key, size=7, batch=32, label=1)
    b = _stream(stems, cache_bytes=0, threads=1).sample(key, size=7, batch=32, label=1)
    warm = _stream(stems, cache_bytes=2**16)
    warm.sample(jax.random.key(9), size=3, batch=32)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, warm.sample(key, size=7, batch=32, label=1))
    assert not np.array_equal(a, warm.sample(jax.random.key(6), size=7, batch=32, label=1))


def test_cache_is_bounded_lru():
    cache = WindowCache(100)
    arr = lambda n: np.zeros(n, np.uint8)  # noqa: E731
    for key in "abc":
        cache.get(key, lambda: arr(40))
    assert cache.bytes == 80 and list(cache._items) == ["b", "c"]
    cache.get("b", lambda: arr(40))
    cache.get("d", lambda: arr(40))
    assert list(cache._items) == ["b", "d"] and cache.hits == 1 and cache.misses == 4
    cache.get("big", lambda: arr(500))
    assert cache.bytes == 80
    with pytest.raises(ValueError, match="cache_bytes"):
        WindowCache(-1)


def test_bad_inputs_name_the_file(tmp_path):
    stems, _ = lila_tree(tmp_path, sizes=((32, 32),), far=False)
    write_raster(tmp_path / "three.tif", np.zeros((32, 32, 3), np.uint8), tile=16)
    write_raster(tmp_path / "small_lc.tif", np.zeros((16, 32), np.uint8), tile=16)
    img = f"{stems[0]}_naip-new.tif"
    with pytest.raises(ValueError, match="three.tif: 3 bands of uint8; expected 4"):
        PatchStream([(img, None), (tmp_path / "three.tif", None)], max_size=5)
    with pytest.raises(ValueError, match="small_lc.tif: label shape"):
        PatchStream([(img, tmp_path / "small_lc.tif")], max_size=5)
    src = PatchStream([(img, None)], max_size=5)
    with pytest.raises(ValueError, match="needs a label raster for every tile"):
        src.has_label(0)
    with pytest.raises(ValueError, match="size: expected a patch width in 1..5"):
        src.sample(jax.random.key(0), size=7, batch=2)


def test_real_tiles_stream_as_a_flat_folder(data_root):
    """``chesapeake_wv`` with ``data.stream=true``: label and window counts equal those of
    whole-tile reads."""
    cfg = OmegaConf.create({"kind": "chesapeake", "root": str(data_root / "chesapeake_wv"),
                            "stream": True, "block": 128, "windows": 4, "cache_bytes": 2**22})
    assert streams(cfg)
    src = open_patch_stream(cfg, max_size=31)
    tiles = [chesapeake.load_tile(s) for s in chesapeake.find_tiles(cfg.root)]
    want = sum(np.bincount(t.labels.ravel(), minlength=256)[:4] for t in tiles)
    np.testing.assert_array_equal(src.label_pixels(), want)
    for lab in range(4):  # windows holding the label, by brute force over whole tiles
        total = sum(int(np.lib.stride_tricks.sliding_window_view(t.labels == lab, (11, 11))
                        .any(axis=(-1, -2)).sum()) for t in tiles)
        assert src.weights(11, lab).sum() == total
    with pytest.raises(ValueError, match="data.stream: streaming reads Chesapeake"):
        streams(OmegaConf.create({"kind": "synthetic", "stream": True}))


def test_index_file_is_reused_only_for_the_same_labels(tmp_path, monkeypatch):
    stems, _ = lila_tree(tmp_path / "lila")
    index = tmp_path / "run" / "stream_index.npz"
    first = _stream(stems, index_file=index)
    want = first.weights(5, 1).copy()
    assert index.is_file()

    def no_build(self):
        raise AssertionError("rebuilt")

    with monkeypatch.context() as m:  # same files and grid: loaded, not rebuilt
        m.setattr(PatchStream, "_build_index", no_build)
        np.testing.assert_array_equal(_stream(stems, index_file=index).weights(5, 1), want)
    write_raster(f"{stems[0]}_lc.tif", np.full((40, 52), 3, np.uint8), tile=16)  # low veg.
    again = _stream(stems, index_file=index)
    assert again.weights(5, 1).sum() < want.sum()  # tile 0 holds no tree canopy any more
    finer = _stream(stems, index_file=index, block=8)  # another grid: rebuilt
    assert finer.weights(5, 1).shape == (len(finer._blocks),)
    assert finer.weights(5, 1).sum() == again.weights(5, 1).sum()


def test_unreadable_and_corrupted_files_are_one_line_errors(tmp_path):
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError, match="junk.tif: not a readable TIFF"):
        PatchStream([(tmp_path / "junk.tif", None)], max_size=5)
    path = write_raster(tmp_path / "img.tif", _position_image(0, 32, 32), tile=16)
    src = PatchStream([(path, None)], max_size=5, block=16, windows=1)
    data = bytearray(path.read_bytes())
    with geotiff.RasterReader(path) as r:  # overwrite the middle of every tile's deflate data
        spans = list(zip(r._page.dataoffsets, r._page.databytecounts, strict=True))
    for off, n in spans:
        data[off + 2 : off + n - 2] = bytes(n - 4)
    (tmp_path / "bad.tif").write_bytes(bytes(data))
    bad = PatchStream([(tmp_path / "bad.tif", None)], max_size=5, block=16, windows=1)
    assert src.sample(jax.random.key(0), size=5, batch=2).shape == (2, 5, 5, 4)
    with pytest.raises(ValueError, match="bad.tif: cannot decode rows"):
        bad.sample(jax.random.key(0), size=5, batch=2)
