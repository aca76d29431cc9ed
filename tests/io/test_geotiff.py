"""GeoTIFF rasters: georeferencing tags, windowed reads, the block-wise writer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile

from epilsr.io.geotiff import (
    GeoInfo,
    RasterReader,
    RasterWriter,
    raster_shape,
    read_geoinfo,
    read_window,
    write_raster,
)

UTM17N = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32617)
GEO = GeoInfo(
    pixel_scale=(0.6, 0.6, 0.0),
    tiepoints=(0.0, 0.0, 0.0, 500000.0, 4100000.0, 0.0),
    geokeys=UTM17N,
    geo_ascii="WGS 84 / UTM zone 17N|",
    nodata="0",
)


def _write_input(path, data, **kwargs):
    """A GeoTIFF written by plain tifffile (as a third-party file would be)."""
    planar = kwargs.pop("planarconfig", "contig" if data.ndim == 3 else None)
    if planar == "separate":
        data = np.moveaxis(data, -1, 0)
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig=planar,
                     extratags=GEO.extratags(), metadata=None, **kwargs)
    return path


# ------------------------------------------------------------------ GeoInfo


def test_geoinfo_read_back(tmp_path, rng):
    path = _write_input(tmp_path / "a.tif", rng.integers(0, 255, (40, 30), dtype=np.uint8))
    geo = read_geoinfo(path)
    assert geo == GEO
    assert geo.epsg == 32617
    assert geo.is_georeferenced
    np.testing.assert_allclose(geo.geotransform, (500000.0, 0.6, 0.0, 4100000.0, 0.0, -0.6))


def test_geoinfo_plain_tiff(tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8))
    geo = read_geoinfo(path)
    assert geo == GeoInfo() and geo.epsg is None and not geo.is_georeferenced
    assert geo.extratags() == [] and geo.geotransform is None


@pytest.mark.parametrize(
    "keys, epsg",
    [
        (UTM17N, 32617),
        ((1, 1, 0, 2, 1024, 0, 1, 2, 2048, 0, 1, 4326), 4326),  # geographic
        ((1, 1, 0, 2, 1024, 0, 1, 1, 3072, 0, 1, 32767), None),  # user-defined CRS
        ((1, 1, 0, 1, 3072, 34737, 5, 0), None),  # value not inline
        ((1, 1, 0, 0), None),
    ],
)
def test_epsg_from_geokeys(keys, epsg):
    assert GeoInfo(geokeys=keys).epsg == epsg


def test_window_shifts_tiepoint_by_pixel_scale():
    sub = GEO.window(10, 25)
    assert sub.tiepoints == (0.0, 0.0, 0.0, 500000.0 + 25 * 0.6, 4100000.0 - 10 * 0.6, 0.0)
    assert (sub.pixel_scale, sub.geokeys, sub.geo_ascii, sub.epsg) == (
        GEO.pixel_scale, GEO.geokeys, GEO.geo_ascii, 32617)
    # pixel (r, c) of the window is pixel (r + 10, c + 25) of the raster
    x0, dx, _, y0, _, dy = GEO.geotransform
    sx0, sdx, _, sy0, _, sdy = sub.geotransform
    assert math.isclose(sx0 + 3 * sdx, x0 + 28 * dx) and math.isclose(sy0 + 4 * sdy, y0 + 14 * dy)
    assert GEO.window(0, 0) == GEO


def test_window_tiepoint_not_at_origin_and_transformation_and_gcps():
    geo = GeoInfo(pixel_scale=(2.0, 3.0, 0.0), tiepoints=(5.0, 7.0, 0.0, 100.0, 200.0, 0.0))
    sub = geo.window(1, 4)  # raster point stays (5, 7); model point moves
    assert sub.tiepoints == (5.0, 7.0, 0.0, 108.0, 197.0, 0.0)
    m = (2.0, 0.5, 0.0, 100.0, 0.25, -3.0, 0.0, 200.0, 0, 0, 0, 0, 0, 0, 0, 1.0)
    sub = GeoInfo(transformation=m).window(2, 3)
    assert sub.transformation[3] == 100.0 + 2.0 * 3 + 0.5 * 2
    assert sub.transformation[7] == 200.0 + 0.25 * 3 - 3.0 * 2
    gcps = GeoInfo(tiepoints=(0, 0, 0, 10, 20, 0, 50, 60, 0, 30, 40, 0)).window(5, 6)
    assert gcps.tiepoints == (-6, -5, 0, 10, 20, 0, 44, 55, 0, 30, 40, 0)


def test_with_nodata():
    assert GEO.with_nodata(255).nodata == "255"
    assert GEO.with_nodata(float("nan")).nodata == "nan"
    assert GEO.with_nodata(-1.5).nodata == "-1.5"
    assert GEO.with_nodata(None).nodata is None


# ------------------------------------------------------------------ windowed reads

LAYOUTS = {
    "uncompressed": dict(),
    "uncompressed-strips": dict(rowsperstrip=9),
    "lzw-strips": dict(compression="lzw", rowsperstrip=16),
    "lzw-tiled": dict(compression="lzw", tile=(32, 48)),
    "deflate-predictor": dict(compression="zlib", predictor=True, rowsperstrip=7),
    "deflate-tiled-predictor": dict(compression="zlib", predictor=True, tile=(16, 16)),
    "separate-lzw": dict(planarconfig="separate", compression="lzw", rowsperstrip=10),
    "separate-uncompressed": dict(planarconfig="separate"),
}


@pytest.mark.parametrize("layout, bands", [
    (layout, bands) for layout in LAYOUTS for bands in (None, 4)
    if bands or not layout.startswith("separate")  # one band has no planar configuration
])
@pytest.mark.parametrize("cache_bytes", [0, 32 * 2**20])
def test_read_window_equals_slice(tmp_path, rng, layout, bands, cache_bytes):
    kwargs = dict(LAYOUTS[layout])
    shape = (150, 130) + ((bands,) if bands else ())
    data = rng.integers(0, 60000, shape, dtype=np.uint16)
    path = _write_input(tmp_path / "a.tif", data, **kwargs)
    assert raster_shape(path) == shape
    full = tifffile.imread(path)
    if kwargs.get("planarconfig") == "separate":
        full = np.moveaxis(full, 0, -1)
    np.testing.assert_array_equal(full, data)
    with RasterReader(path, cache_bytes=cache_bytes) as reader:
        assert reader.shape == shape and reader.dtype == np.uint16
        for row, col, h, w in [(13, 29, 50, 77), (0, 0, 150, 130), (149, 129, 1, 1),
                               (100, 0, 50, 130), (31, 47, 33, 49), (13, 29, 50, 77)]:
            win = reader(row, col, h, w)
            assert win.dtype == np.uint16
            np.testing.assert_array_equal(win, full[row : row + h, col : col + w])
    np.testing.assert_array_equal(read_window(path, 5, 6, 7, 8), full[5:12, 6:14])


def test_read_window_decodes_only_needed_segments(tmp_path, rng, monkeypatch):
    data = rng.integers(0, 255, (512, 256, 3), dtype=np.uint8)
    path = _write_input(tmp_path / "big.tif", data, compression="lzw", rowsperstrip=8)
    requested = []
    original = tifffile.FileHandle.read_segments

    def spy(self, offsets, bytecounts, *args, **kwargs):
        requested.append(len(offsets))
        return original(self, offsets, bytecounts, *args, **kwargs)

    monkeypatch.setattr(tifffile.FileHandle, "read_segments", spy)
    with RasterReader(path) as reader:
        win = reader(100, 10, 20, 30)  # rows 100..119 -> strips 12..14
    np.testing.assert_array_equal(win, data[100:120, 10:40])
    assert requested == [3]

    tiled = _write_input(tmp_path / "tiled.tif", data, compression="lzw", tile=(64, 64))
    requested.clear()
    np.testing.assert_array_equal(read_window(tiled, 60, 60, 10, 10), data[60:70, 60:70])
    assert requested == [4]  # the 2 x 2 tiles around (64, 64)


def test_overlapping_windows_decode_each_segment_once(tmp_path, rng):
    """The pipelines' windows overlap (strips of windows, tile overlap): with the decoded-segment
    cache each tile is decoded once; values equal the uncached reads; a cache too small for a
    tile row still returns the right pixels (evicting), decoding more."""
    data = rng.integers(0, 255, (200, 190, 4), dtype=np.uint8)
    path = _write_input(tmp_path / "t.tif", data, compression="lzw", tile=(32, 32))
    n_tiles = -(-200 // 32) * -(-190 // 32)
    windows = [(r, c, 64, 64) for r in range(0, 137, 48) for c in range(0, 127, 48)]
    counts = {}
    for cache in (0, 1 << 20, 3 * 32 * 32 * 4):  # none, all tiles, three tiles
        with RasterReader(path, cache_bytes=cache) as reader:
            for r, c, h, w in windows:
                win = reader(r, c, h, w)
                np.testing.assert_array_equal(win, data[r : r + h, c : c + w])
                assert not np.shares_memory(win, reader._cache[next(iter(reader._cache))][3]) \
                    if reader._cache else True
                win[:] = 0  # the caller's copy: the cached tiles stay intact
            counts[cache] = reader.decoded
    touched = sum((-(-(r + h) // 32) - r // 32) * (-(-(c + w) // 32) - c // 32)
                  for r, c, h, w in windows)
    assert counts[0] == touched  # no cache: every window decodes every tile it touches
    assert counts[1 << 20] == len({(i, j) for r, c, h, w in windows
                                   for i in range(r // 32, -(-(r + h) // 32))
                                   for j in range(c // 32, -(-(c + w) // 32))}) <= n_tiles
    assert counts[1 << 20] < counts[3 * 32 * 32 * 4] <= counts[0]
    with pytest.raises(ValueError, match="cache_bytes"):
        RasterReader(path, cache_bytes=-1)


def test_read_window_rejects_outside(tmp_path, rng):
    path = _write_input(tmp_path / "a.tif", rng.integers(0, 255, (20, 30), dtype=np.uint8))
    for args in [(15, 0, 10, 5), (0, -1, 5, 5), (0, 0, 0, 5), (0, 25, 5, 6)]:
        with pytest.raises(ValueError, match="outside"):
            read_window(path, *args)


def test_reads_real_chesapeake_patch(data_root):
    path = next((data_root / "chesapeake_wv").glob("*_naip-new.tif"))
    full = tifffile.imread(path)
    np.testing.assert_array_equal(read_window(path, 30, 40, 100, 90), full[30:130, 40:130])


# ------------------------------------------------------------------ writer


@pytest.mark.parametrize(
    "dtype, bands, compression",
    [(np.uint8, None, "lzw"), (np.uint8, None, "deflate"), (np.float32, 4, "deflate"),
     (np.float16, 3, "lzw"), (np.float32, None, None)],
)
def test_writer_round_trip(tmp_path, rng, dtype, bands, compression):
    shape = (300, 260) + ((bands,) if bands else ())
    data = (rng.random(shape) * 200).astype(dtype)
    path = tmp_path / "out.tif"
    sub = GEO.window(40, 20)
    with RasterWriter(path, height=300, width=260, dtype=dtype, bands=bands, geo=sub,
                      nodata=255 if dtype == np.uint8 else float("nan"),
                      compression=compression) as w:
        for r in range(0, 300, 37):  # blocks not aligned with the 256 tiles
            w.write(data[r : r + 37])
    np.testing.assert_array_equal(tifffile.imread(path), data)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
        assert page.compression == {"lzw": 5, "deflate": 8, None: 1}[compression]
    geo = read_geoinfo(path)
    assert geo.epsg == 32617 and geo.pixel_scale == GEO.pixel_scale
    assert geo.tiepoints[3:5] == (500000.0 + 20 * 0.6, 4100000.0 - 40 * 0.6)
    assert geo.nodata == ("255" if dtype == np.uint8 else "nan")
    np.testing.assert_array_equal(read_window(path, 250, 200, 50, 60), data[250:, 200:])


def test_writer_bigger_than_one_tile_row(tmp_path, rng):
    data = rng.integers(0, 4, (600, 530), dtype=np.uint8)
    path = write_raster(tmp_path / "l.tif", data, geo=GEO, compression="lzw", block_rows=100)
    np.testing.assert_array_equal(tifffile.imread(path), data)


def test_no_file_at_final_path_until_close(tmp_path, rng):
    data = rng.integers(0, 4, (300, 100), dtype=np.uint8)
    path = tmp_path / "labels.tif"
    w = RasterWriter(path, height=300, width=100, dtype=np.uint8, geo=GEO)
    w.write(data[:280])
    assert not path.exists() and w.partial.exists()
    with pytest.raises(ValueError, match="280 of 300 rows"):
        w.close()
    assert not path.exists()
    w.write(data[280:])
    w.close()
    assert path.exists() and not w.partial.exists()
    assert not list(tmp_path.glob("*.partial*"))
    np.testing.assert_array_equal(tifffile.imread(path), data)


def test_failed_write_leaves_no_output(tmp_path):
    path = tmp_path / "labels.tif"
    with pytest.raises(RuntimeError), RasterWriter(path, height=10, width=10, dtype=np.uint8) as w:
        w.write(np.zeros((5, 10), np.uint8))
        raise RuntimeError("crash")
    assert not path.exists()


def test_writer_rejects_bad_rows(tmp_path):
    w = RasterWriter(tmp_path / "x.tif", height=10, width=8, dtype=np.float32, bands=2)
    with pytest.raises(ValueError, match="shape"):
        w.write(np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="exceed"):
        w.write(np.zeros((11, 8, 2), np.float32))
    w.abort()
    assert not w.partial.exists()
    with pytest.raises(ValueError, match="compression"):
        RasterWriter(tmp_path / "y.tif", height=4, width=4, dtype=np.uint8, compression="jpeg")


def test_writer_checkpoint_resume_identical(tmp_path, rng):
    data = rng.random((700, 300, 2)).astype(np.float32)
    ref = write_raster(tmp_path / "ref.tif", data, geo=GEO)
    kwargs = dict(height=700, width=300, dtype=np.float32, bands=2, geo=GEO)
    path = tmp_path / "out.tif"
    w = RasterWriter(path, **kwargs)
    w.write(data[:300])  # one full tile row + 44 pending rows
    state = w.checkpoint(tmp_path / "pending.npy")
    assert state["rows"] == 300 and state["pending"]
    w.write(data[300:600])  # progress after the checkpoint that is lost in the crash
    w.abort(keep_partial=True)
    w = RasterWriter.resume(path, state, **kwargs)
    assert w.rows_written == 300
    w.write(data[300:])
    w.close()
    np.testing.assert_array_equal(tifffile.imread(path), data)
    assert path.read_bytes() == ref.read_bytes()


def test_writer_resume_when_every_row_was_written(tmp_path, rng):
    """Checkpointed after the last rows (the partial last tile row already flushed), killed
    before close: the resumed writer closes to the same file."""
    data = rng.integers(0, 255, size=(300, 70), dtype=np.uint8)
    ref = write_raster(tmp_path / "ref.tif", data, geo=GEO)
    kwargs = dict(height=300, width=70, dtype=np.uint8, geo=GEO)
    path = tmp_path / "out.tif"
    w = RasterWriter(path, **kwargs)
    w.write(data)
    state = w.checkpoint(tmp_path / "pending.npy")
    assert state["rows"] == 300 and state["pending"] is None
    w.abort(keep_partial=True)
    w = RasterWriter.resume(path, state, **kwargs)
    w.close()
    assert path.read_bytes() == ref.read_bytes()


def test_writer_single_band(tmp_path, rng):
    """``bands=1`` writes a plain 2-D page (read back as ``[H, W]``)."""
    data = rng.random((40, 33, 1)).astype(np.float32)
    w = RasterWriter(tmp_path / "one.tif", height=40, width=33, dtype=np.float32, bands=1,
                     geo=GEO)
    w.write(data)
    w.close()
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "one.tif"), data[..., 0])


def test_single_strip_window_is_bounded_by_max_segment_bytes(tmp_path):
    """A 1x1 window of a compressed one-strip file decodes the whole strip: refused above the
    limit, with the file named, before any decoding; fine under it."""
    path = tmp_path / "one_strip.tif"
    data = np.arange(300 * 200, dtype=np.uint16).reshape(300, 200)
    tifffile.imwrite(path, data, compression="zlib", rowsperstrip=300)
    with RasterReader(path, max_segment_bytes=1000) as r:
        assert r.segment_bytes == 300 * 200 * 2
        with pytest.raises(ValueError, match=r"one_strip.tif: every window decodes whole strips"):
            r(5, 5, 1, 1)
    with RasterReader(path) as r:
        assert r(5, 5, 1, 1)[0, 0] == data[5, 5]
