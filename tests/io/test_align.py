"""Coarse rasters aligned on the fly (rasterio/GDAL) against a per-pixel brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
from rasterio.crs import CRS  # noqa: E402
from rasterio.transform import Affine  # noqa: E402
from rasterio.warp import transform as warp_transform  # noqa: E402
from rasterio.warp import transform_bounds  # noqa: E402

from epilsr.io.align import (  # noqa: E402
    AlignedReader,
    RasterioReader,
    apply_affine,
    geoinfo_from_rasterio,
    geoinfo_to_rasterio,
)
from epilsr.io.geotiff import GeoInfo, read_geoinfo  # noqa: E402

UTM = CRS.from_epsg(26917)
ALBERS = CRS.from_epsg(5070)
IMG_T = Affine(1.0, 0.0, 500123.3, 0.0, -1.0, 4100456.7)  # 1 m, off any 30 m lattice


def write_tif(path, data, crs, transform, nodata=None, **kw):
    data = np.asarray(data)
    bands = data[None] if data.ndim == 2 else np.moveaxis(data, -1, 0)
    with rasterio.open(path, "w", driver="GTiff", width=bands.shape[2], height=bands.shape[1],
                       count=bands.shape[0], dtype=bands.dtype, crs=crs, transform=transform,
                       nodata=nodata, **kw) as ds:
        ds.write(bands)
    return path


def coarse_grid(h, w, *, margin=3, cell=30.0, shift=(0.0, 0.0)):
    """A 30 m EPSG:5070 grid covering the imagery (``h x w`` at IMG_T) with ``margin`` cells."""
    left, top = apply_affine(IMG_T, 0, 0)
    right, bottom = apply_affine(IMG_T, w, h)
    b = transform_bounds(UTM, ALBERS, left, bottom, right, top, densify_pts=21)
    x0 = math.floor(b[0] / cell) * cell - margin * cell + 7.0 + shift[0]
    y0 = math.ceil(b[3] / cell) * cell + margin * cell - 11.0 + shift[1]
    cols = math.ceil((b[2] - x0) / cell) + margin
    rows = math.ceil((y0 - b[1]) / cell) + margin
    return Affine(cell, 0.0, x0, 0.0, -cell, y0), rows, cols


def brute_force(coarse, src_t, h, w, fill):
    """Per-pixel nearest neighbour: the coarse cell holding each target pixel's centre."""
    rows, cols = np.mgrid[0:h, 0:w]
    xs, ys = apply_affine(IMG_T, cols.ravel() + 0.5, rows.ravel() + 0.5)
    ax, ay = warp_transform(UTM, ALBERS, xs, ys)
    c, r = apply_affine(~src_t, np.asarray(ax), np.asarray(ay))
    c, r = np.floor(c).astype(int), np.floor(r).astype(int)
    inside = (c >= 0) & (c < coarse.shape[1]) & (r >= 0) & (r < coarse.shape[0])
    out = np.full(h * w, fill, coarse.dtype)
    out[inside] = coarse[r[inside], c[inside]]
    return out.reshape(h, w)


@pytest.mark.parametrize("window", [(0, 0, 90, 110), (13, 27, 40, 51), (89, 109, 1, 1)])
def test_aligned_reader_matches_brute_force(tmp_path, rng, window):
    h, w = 90, 110
    src_t, rows, cols = coarse_grid(h, w)
    coarse = rng.integers(1, 200, size=(rows, cols)).astype(np.uint8)
    path = write_tif(tmp_path / "nlcd.tif", coarse, ALBERS, src_t, nodata=0)
    expect = brute_force(coarse, src_t, h, w, 0)
    with AlignedReader(path, crs=UTM, transform=IMG_T, height=h, width=w) as rd:
        r, c, wh, ww = window
        got = rd(r, c, wh, ww)
        assert rd.covered == 1.0 and rd.nodata == 0
    assert got.dtype == np.uint8 and got.shape == (wh, ww)
    np.testing.assert_array_equal(got, expect[r : r + wh, c : c + ww])
    assert len(np.unique(expect)) > 5  # the window crosses several 30 m cells


def test_partial_cover_warns_and_fills_nodata(tmp_path, rng):
    h, w = 90, 110
    src_t, rows, cols = coarse_grid(h, w, margin=0)
    cols = cols // 2  # the coarse raster stops half way across
    coarse = rng.integers(1, 200, size=(rows, cols)).astype(np.uint8)
    coarse[0, :] = 7  # a row at the coarse no-data value
    path = write_tif(tmp_path / "nlcd.tif", coarse, ALBERS, src_t, nodata=7)
    with pytest.warns(UserWarning, match=r"covers only about \d+% of the imagery"):
        rd = AlignedReader(path, crs=UTM, transform=IMG_T, height=h, width=w)
    with rd:
        got = rd(0, 0, h, w)
        assert 0.2 < rd.covered < 0.8
    expect = brute_force(coarse, src_t, h, w, 7)
    np.testing.assert_array_equal(got, expect)
    assert np.mean(got == 7) > 0.2  # outside the extent and the no-data row read as no data


def test_no_overlap_is_refused(tmp_path, rng):
    src_t, rows, cols = coarse_grid(90, 110)
    far = Affine(30.0, 0.0, src_t.c + 300_000, 0.0, -30.0, src_t.f)  # 300 km east
    path = write_tif(tmp_path / "far.tif", np.ones((rows, cols), np.uint8), ALBERS, far)
    with pytest.raises(ValueError, match="far.tif: the coarse raster does not overlap"):
        AlignedReader(path, crs=UTM, transform=IMG_T, height=90, width=110)


def test_missing_crs_is_refused(tmp_path):
    path = write_tif(tmp_path / "nocrs.tif", np.ones((5, 5), np.uint8), None,
                     Affine(30.0, 0, 0, 0, -30.0, 0))
    with pytest.raises(ValueError, match="nocrs.tif: the coarse raster has no CRS"):
        AlignedReader(path, crs=UTM, transform=IMG_T, height=9, width=9)
    good = write_tif(tmp_path / "ok.tif", np.ones((5, 5), np.uint8), ALBERS,
                     Affine(30.0, 0, 0, 0, -30.0, 0))
    with pytest.raises(ValueError, match="target grid .* has no CRS"):
        AlignedReader(good, crs=None, transform=IMG_T, height=9, width=9)


def test_source_values_and_fingerprint(tmp_path, rng):
    h, w = 60, 60
    src_t, rows, cols = coarse_grid(h, w, margin=10)
    coarse = np.full((rows, cols), 99, np.uint8)  # far cells hold 99
    with AlignedReader(write_tif(tmp_path / "c.tif", coarse, ALBERS, src_t, nodata=0),
                       crs=UTM, transform=IMG_T, height=h, width=w) as rd:
        near = brute_force(coarse, src_t, h, w, 0)
    coarse[5:-5, 5:-5] = rng.integers(1, 50, size=(rows - 10, cols - 10))
    path = write_tif(tmp_path / "c.tif", coarse, ALBERS, src_t, nodata=0)
    with AlignedReader(path, crs=UTM, transform=IMG_T, height=h, width=w) as rd:
        vals = rd.source_values()
        near = np.unique(brute_force(coarse, src_t, h, w, 0))
        assert set(near.tolist()) <= set(vals.tolist())
        assert 99 not in vals.tolist()  # cells far from the imagery are not read
        fp = rd.fingerprint()
        assert fp["size"] > 0 and fp["shape"] == [h, w] and "mtime_ns" in fp


def test_rasterio_reader_windows_mask_and_geo(tmp_path, rng):
    img = rng.integers(1, 255, size=(40, 50, 3)).astype(np.uint8)
    img[:5, :7] = 0
    path = write_tif(tmp_path / "img.tif", img, UTM, IMG_T, nodata=0)
    with RasterioReader(path) as rd:
        assert rd.shape == (40, 50, 3) and rd.dtype == np.uint8 and rd.has_mask
        np.testing.assert_array_equal(rd(3, 4, 10, 11), img[3:13, 4:15])
        valid = rd.valid(0, 0, 40, 50)
        np.testing.assert_array_equal(valid, np.any(img != 0, axis=-1))
        assert rd.geo.epsg == 26917
        crs, t = geoinfo_to_rasterio(rd.geo)
        assert crs == UTM and t.almost_equals(IMG_T)


@pytest.mark.parametrize("transform", [IMG_T, Affine(0.8, 0.3, 500000.0, 0.2, -0.9, 4.1e6)])
def test_geoinfo_rasterio_round_trip(transform):
    geo = geoinfo_from_rasterio(UTM, transform, nodata=255)
    crs, t = geoinfo_to_rasterio(geo)
    assert crs.to_epsg() == 26917 and t.almost_equals(transform) and geo.nodata == "255"
    assert np.allclose(geo.geotransform, transform.to_gdal())


def test_custom_wkt_crs_recognised_by_gdal(tmp_path):
    wkt = CRS.from_epsg(5070).to_wkt()
    custom = CRS.from_wkt(wkt.replace("NAD83 / Conus Albers", "my albers"))
    path = write_tif(tmp_path / "wkt.tif", np.ones((4, 4), np.uint8), custom,
                     Affine(30.0, 0, 1e5, 0, -30.0, 2e6))
    geo = read_geoinfo(path)
    crs, _ = geoinfo_to_rasterio(geo)
    with rasterio.open(path) as ds:
        assert crs == ds.crs  # GDAL's own reading of the tags
    assert "Albers" in crs.to_wkt()


@pytest.mark.parametrize("rotated", [False, True])
def test_pixel_is_point_geotransform_matches_gdal(tmp_path, rotated):
    """GTRasterTypeGeoKey = PixelIsPoint: tie points are pixel centres; GDAL moves the
    origin by half a pixel, and so does GeoInfo.geotransform."""
    keys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 2, 3072, 0, 1, 26917)
    if rotated:
        geo = GeoInfo(transformation=(2.0, 0.5, 0, 500000.0, 0.25, -2.0, 0, 4e6,
                                      0, 0, 0, 0, 0, 0, 0, 1), geokeys=keys)
    else:
        geo = GeoInfo(pixel_scale=(2.0, 3.0, 0.0), tiepoints=(0, 0, 0, 500000.0, 4e6, 0),
                      geokeys=keys)
    assert geo.pixel_is_point
    _, t = geoinfo_to_rasterio(geo)
    assert np.allclose(geo.geotransform, t.to_gdal())
    area = GeoInfo(pixel_scale=(2.0, 3.0, 0.0), tiepoints=(0, 0, 0, 500000.0, 4e6, 0),
                   geokeys=keys[:11] + (1,) + keys[12:])
    assert area.geotransform == (500000.0, 2.0, 0.0, 4e6, 0.0, -3.0)


def test_rasterio_reader_reads_a_vrt(tmp_path, rng):
    img = rng.integers(0, 255, (30, 40, 3)).astype(np.uint8)
    tif = write_tif(tmp_path / "img.tif", img, UTM, IMG_T)
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource>'
        f'<SourceFilename relativeToVRT="1">img.tif</SourceFilename><SourceBand>{b}</SourceBand>'
        "</SimpleSource></VRTRasterBand>" for b in (1, 2, 3))
    vrt = tmp_path / "img.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="40" rasterYSize="30"><SRS>EPSG:26917</SRS>'
                   f"<GeoTransform>{', '.join(map(str, IMG_T.to_gdal()))}</GeoTransform>"
                   f"{bands}</VRTDataset>")
    with RasterioReader(vrt) as rd:
        np.testing.assert_array_equal(rd(2, 3, 10, 20), img[2:12, 3:23])
        crs, t = geoinfo_to_rasterio(rd.geo)  # built from GDAL's CRS and transform
        assert crs.to_epsg() == 26917 and t.almost_equals(IMG_T)
        assert rd.fingerprint()["path"].endswith("img.vrt") and tif.exists()
