"""RasterWriter outputs read back with GDAL (rasterio): self-describing Cloud Optimized GeoTIFFs."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tifffile

rasterio = pytest.importorskip("rasterio")
from rasterio import shutil as rio_shutil  # noqa: E402
from rasterio.crs import CRS  # noqa: E402
from rasterio.enums import Resampling  # noqa: E402
from rasterio.transform import Affine  # noqa: E402

from epilsr.io import geotiff  # noqa: E402
from epilsr.io.align import geoinfo_from_rasterio  # noqa: E402
from epilsr.io.geotiff import RasterWriter, read_geoinfo  # noqa: E402

T = Affine(1.0, 0.0, 500007.0, 0.0, -1.0, 4100003.0)
NAMES = ["water", "tree canopy", "low vegetation", "impervious"]
COLORS = [[0, 92, 230], [38, 115, 0], [163, 255, 115], [156, 156, 156]]


def cog_layout_errors(path) -> list[str]:
    """The layout rules of GDAL's validate_cloud_optimized_geotiff.py (IFD and block order)."""
    errors = []
    with tifffile.TiffFile(path) as tif:
        pages = list(tif.pages)
        header = 16 if tif.is_bigtiff else 8
        if pages[0].offset != header:
            errors.append(f"main IFD at {pages[0].offset}, expected {header}")
        for p in pages:
            if not p.is_tiled and max(p.shape[:2]) > 512:
                errors.append("not tiled")
        ifd_end = max(p.offset for p in pages)
        first_block = [min(o for o in p.dataoffsets if o) for p in pages]
        if min(first_block) < ifd_end:
            errors.append("pixel data before the last IFD")
        for i in range(1, len(pages)):
            if pages[i].offset <= pages[i - 1].offset:
                errors.append(f"IFD of overview {i} before the previous one")
            if first_block[i] >= first_block[i - 1]:
                errors.append(f"blocks of level {i - 1} before those of overview {i}")
        for p in pages:
            offs = [o for o in p.dataoffsets if o]
            if offs != sorted(offs):
                errors.append("blocks not in row-major order")
        if max(pages[0].shape[:2]) > 512 and len(pages) == 1:
            errors.append("no overviews")
    return errors


def write(path, data, **kw):
    bands = data.shape[2] if data.ndim == 3 else None
    with RasterWriter(path, height=data.shape[0], width=data.shape[1], dtype=data.dtype,
                      bands=bands, geo=geoinfo_from_rasterio(CRS.from_epsg(26917), T), **kw) as w:
        for r in range(0, data.shape[0], 100):  # row blocks not aligned with the tiles
            w.write(data[r : r + 100])
    return path


def test_label_raster_round_trip(tmp_path, rng):
    labels = rng.integers(0, 4, (600, 700)).astype(np.uint8)
    labels[:13] = 255
    path = write(tmp_path / "labels.tif", labels, nodata=255, label_names=NAMES,
                 label_colors=COLORS)
    with rasterio.open(path) as ds:
        assert ds.crs.to_epsg() == 26917 and ds.transform.almost_equals(T)
        assert ds.nodata == 255 and ds.dtypes == ("uint8",)
        assert ds.overviews(1) == [2, 4]  # halved until one 256 tile holds it
        np.testing.assert_array_equal(ds.read(1), labels)
        cmap = ds.colormap(1)
        assert [cmap[i][:3] for i in range(4)] == [tuple(c) for c in COLORS]
        assert cmap[255][:3] == (0, 0, 0)
        tags = ds.tags()
        assert [tags[f"LABEL_{i}"] for i in range(4)] == NAMES
        assert tags["LABELS"] == "; ".join(NAMES)
        over = ds.read(1, out_shape=(300, 350), resampling=Resampling.nearest)
        np.testing.assert_array_equal(over, labels[::2, ::2])  # nearest overview
        assert ds.profile["tiled"] and ds.profile["compress"] == "deflate"
    assert cog_layout_errors(path) == []


def _gdal_band_xml(path, tmp_path):
    """Band 1 as GDAL sees it (PAM sidecar included), serialised by a VRT copy."""
    vrt = tmp_path / "copy.vrt"
    rio_shutil.copy(path, vrt, driver="VRT")
    return ET.parse(vrt).getroot().find("VRTRasterBand")


def test_label_names_sidecar_is_read_by_gdal(tmp_path, rng):
    """``labels.tif.aux.xml`` (GDAL PAM): category names and colour table, the QGIS legend."""
    labels = rng.integers(0, 4, (40, 50)).astype(np.uint8)
    names = [*NAMES[:3], "roads & <roofs>"]
    path = write(tmp_path / "labels.tif", labels, nodata=255, label_names=names,
                 label_colors=COLORS)
    sidecar = tmp_path / "labels.tif.aux.xml"
    band = _gdal_band_xml(path, tmp_path)
    assert [c.text for c in band.find("CategoryNames")] == names
    entries = band.find("ColorTable")
    assert [[int(e.get(k)) for k in ("c1", "c2", "c3")] for e in entries[:4]] == COLORS
    assert len(entries) == 256 and entries[255].get("c4") == "0"
    sidecar.unlink()  # control: without the sidecar GDAL knows no category names
    assert _gdal_band_xml(path, tmp_path).find("CategoryNames") is None
    path = write(tmp_path / "labels.tif", labels, nodata=255, label_names=names)
    assert sidecar.exists()
    write(tmp_path / "labels.tif", labels, nodata=255)  # a rewrite drops a stale sidecar
    assert not sidecar.exists()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_probability_bands_round_trip(tmp_path, rng, dtype):
    probs = rng.dirichlet(np.ones(4), size=(300, 530)).astype(dtype)
    probs[:5] = np.nan  # rows 0-4: overview rows 0, 1 NaN, row 2 the mean of row 5 alone
    path = write(tmp_path / "probs.tif", probs, nodata=float("nan"), band_names=NAMES)
    with rasterio.open(path) as ds:
        assert ds.descriptions == tuple(NAMES) and np.isnan(ds.nodata)
        assert ds.overviews(1) == [2, 4] and ds.count == 4
        np.testing.assert_array_equal(np.moveaxis(ds.read(), 0, -1).astype(dtype), probs)
        over = np.moveaxis(ds.read(out_shape=(4, 150, 265), resampling=Resampling.nearest), 0, -1)
    x = probs.astype(np.float64).reshape(150, 2, 265, 2, 4)
    expect = np.nanmean(np.where(np.isnan(x), np.nan, x), axis=(1, 3))  # 2 x 2 block means
    np.testing.assert_allclose(over, expect, rtol=2e-3 if dtype == np.float16 else 1e-6)
    assert np.isnan(over[:2]).all() and not np.isnan(over[3:]).any()
    assert cog_layout_errors(path) == []
    assert read_geoinfo(path).epsg == 26917


def test_layout_check_can_fail(tmp_path, rng):
    """A plain tifffile GeoTIFF (data before overview IFDs, no overviews) fails the check."""
    data = rng.integers(0, 4, (600, 700)).astype(np.uint8)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, data, tile=(256, 256))
    with tifffile.TiffWriter(tmp_path / "two.tif") as tw:
        tw.write(data, tile=(256, 256))
        tw.write(data[::2, ::2], tile=(256, 256), subfiletype=1)
    assert "no overviews" in cog_layout_errors(path)
    assert any("before" in e for e in cog_layout_errors(tmp_path / "two.tif"))


def test_small_rasters_and_descriptions(tmp_path, rng):
    ent = rng.random((100, 120)).astype(np.float32)
    path = write(tmp_path / "entropy.tif", ent, nodata=float("nan"), description="entropy (nats)")
    with rasterio.open(path) as ds:
        assert ds.overviews(1) == [] and ds.descriptions == ("entropy (nats)",)
        np.testing.assert_array_equal(ds.read(1), ent)
    with pytest.raises(ValueError, match="band_names: expected 4 names, got 2"):
        RasterWriter(tmp_path / "x.tif", height=4, width=4, dtype=np.float32, bands=4,
                     band_names=["a", "b"])


def test_bigtiff_layout(tmp_path, rng, monkeypatch):
    """The BigTIFF variant (64-bit offsets, used above ~4 GB) of the same COG."""
    monkeypatch.setattr(geotiff, "_BIGTIFF_BYTES", 0)
    labels = rng.integers(0, 4, (300, 520)).astype(np.uint8)
    path = write(tmp_path / "big.tif", labels, nodata=255, label_names=NAMES,
                 label_colors=COLORS)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
    with rasterio.open(path) as ds:
        np.testing.assert_array_equal(ds.read(1), labels)
        assert ds.overviews(1) == [2, 4] and ds.tags()["LABEL_3"] == NAMES[3]
        assert ds.crs.to_epsg() == 26917 and ds.colormap(1)[1][:3] == tuple(COLORS[1])
    assert cog_layout_errors(path) == []
