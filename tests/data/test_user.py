"""Your own rasters: label tables, imagery scaling, scene checks (epilsr.data.user)."""

from __future__ import annotations

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import Affine  # noqa: E402
from rasterio.warp import transform as warp_transform  # noqa: E402

from epilsr.data import user  # noqa: E402
from epilsr.data.chesapeake import load_nlcd_table  # noqa: E402
from epilsr.io.align import apply_affine  # noqa: E402
from tests.geo_scene import (  # noqa: E402
    ALBERS,
    IMG_T,
    UTM,
    make_geo_scene,
    write_table,
    write_tif,
)


@pytest.fixture(scope="module")
def geo(tmp_path_factory):
    return make_geo_scene(tmp_path_factory.mktemp("scene"))


def test_nlcd_table_matches_the_chesapeake_reader():
    t = user.load_label_table("nlcd")
    ref = load_nlcd_table()
    np.testing.assert_array_equal(t.codes, ref.codes)
    np.testing.assert_allclose(t.table, ref.mean.astype(np.float32))
    assert t.label_names == ("water", "tree canopy", "low vegetation", "impervious")
    assert 0 in t.nodata_codes.tolist()
    lut, lo = t.lut([255])
    assert lo == 0 and lut[0] == -1 and lut[255] == -1 and lut[11] == 1
    assert t.lut([11])[0][11] == -1  # a declared no-data value wins over its table row


def test_custom_table_names_colours_and_errors(tmp_path, rng):
    table = rng.dirichlet(np.ones(4), size=3)
    t = user.load_label_table(write_table(tmp_path / "t.csv", table))
    assert t.codes.tolist() == [0, 1, 2, 3] and t.table.shape == (4, 4)
    assert t.label_names == ("Water", "Trees", "Low vegetation", "Impervious")
    assert t.label_colors[0].tolist() == [0, 0, 255]
    np.testing.assert_allclose(t.table[1:], table, atol=1e-6)
    bad = tmp_path / "bad.csv"
    bad.write_text("code,weight\n1,0.5\n")
    with pytest.raises(ValueError, match=r"bad.csv: expected a 'code' .* p_<label> columns"):
        user.load_label_table(bad)
    bad.write_text("code,p_a,p_b\n1,0.5,x\n")
    with pytest.raises(ValueError, match="bad.csv line 2: expected an integer code"):
        user.load_label_table(bad)
    with pytest.raises(FileNotFoundError, match="data.table: .* is not a file"):
        user.load_label_table(tmp_path / "missing.csv")


def test_scene_on_the_same_grid_is_exact(geo):
    """A 32 m coarse map on the imagery's lattice: classes and imagery come back unchanged."""
    table = user.load_label_table(geo.table)
    scene = user.open_scene(geo.image, geo.coarse_same, table)
    try:
        h, w = geo.scene.labels.shape
        assert (scene.height, scene.width, scene.cell_size) == (h, w, 32)
        np.testing.assert_array_equal(scene.classes(0, 0, h, w), geo.scene.classes + 1)
        np.testing.assert_array_equal(scene.classes(17, 33, 40, 50),
                                      geo.scene.classes[17:57, 33:83] + 1)
        expect = np.round(np.clip(geo.scene.image, 0, 1) * 255) / np.float32(255)
        np.testing.assert_allclose(scene.image(0, 0, h, w), expect, atol=1e-7)
        assert scene.valid is None and scene.geo.epsg == 26917
        fp = scene.classes.fingerprint()  # cheap identities for the strip runner's resume check
        assert fp["path"].endswith("coarse_utm32.tif") and fp["shape"] == [h, w]
        assert scene.image.fingerprint()["scale"] == pytest.approx(1 / 255)
    finally:
        scene.close()


def test_scene_in_albers_matches_brute_force_and_cell_size(geo):
    table = user.load_label_table(geo.table)
    scene = user.open_scene(geo.image, geo.coarse_albers, table)
    try:
        h, w = geo.scene.labels.shape
        cls = scene.classes(0, 0, h, w)
        assert scene.cell_size == 30
        with rasterio.open(geo.coarse_albers) as ds:
            albers, src_t = ds.read(1), ds.transform
        rows, cols = np.mgrid[0:h, 0:w]
        xs, ys = apply_affine(IMG_T, cols.ravel() + 0.5, rows.ravel() + 0.5)
        ax, ay = warp_transform(UTM, ALBERS, xs, ys)
        c, r = apply_affine(~src_t, np.asarray(ax), np.asarray(ay))
        expect = albers[np.floor(r).astype(int), np.floor(c).astype(int)].reshape(h, w)
        # codes 1.. are table rows 1..; code 0 (cells the 1 m map did not fill) is no data
        np.testing.assert_array_equal(cls, np.where(expect == 0, -1, expect.astype(int)))
        assert 0 < np.mean(cls == -1) < 0.1
        assert np.mean(cls == geo.scene.classes + 1) > 0.7  # 30 m cells vs 32 m blocks
    finally:
        scene.close()


def test_imagery_scaling_12_bit_equals_8_bit(tmp_path, rng):
    x8 = rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
    x12 = np.round(x8.astype(np.float64) * 4095 / 255).astype(np.uint16)
    x14 = np.round(x8.astype(np.float64) * 16383 / 255).astype(np.uint16)
    coarse = write_tif(tmp_path / "c.tif", np.ones((4, 4), np.uint8), UTM,
                       Affine(30.0, 0, IMG_T.c - 30, 0, -30.0, IMG_T.f + 30))
    table = user.load_label_table(write_table(tmp_path / "t.csv", np.full((1, 4), 0.25)))
    images = {}
    for name, x in [("x8", x8), ("x12", x12), ("x14", x14), ("f", x8 / np.float32(255))]:
        s = user.open_scene(write_tif(tmp_path / f"{name}.tif", x, UTM, IMG_T), coarse, table)
        images[name] = s.image(0, 0, 40, 50)
        s.close()
    for name in ("x12", "x14", "f"):
        np.testing.assert_allclose(images[name], images["x8"], atol=1 / 8190 + 1e-7)
    np.testing.assert_allclose(images["x8"], x8 / np.float32(255), atol=1e-7)
    # reflectance x 10 000 is divided by its 99.9th percentile; a dark 12-bit scene needs its
    # bit depth given (data.bit_depth), otherwise the detected depth is used
    s = user.open_scene(write_tif(tmp_path / "dark.tif", x12 // 8, UTM, IMG_T), coarse, table,
                        bit_depth=12)
    assert s.scale == pytest.approx(1 / 4095)
    s.close()


def test_imagery_nodata_and_bad_inputs(tmp_path, rng):
    table = user.load_label_table(write_table(tmp_path / "t.csv", np.full((2, 4), 0.25)))
    coarse = write_tif(tmp_path / "c.tif", np.array([[1, 2], [3, 0]], np.uint8), UTM,
                       Affine(60.0, 0, IMG_T.c, 0, -60.0, IMG_T.f), nodata=0)
    img = rng.integers(1, 255, (40, 50, 4)).astype(np.uint8)
    img[:3] = 0
    # code 3 is not in the table (codes 0, 1, 2): refused before any work
    with pytest.raises(ValueError, match=r"c.tif: coarse codes \[3\] under i.tif are not in the "
                                         r"table .*t.csv"):
        user.open_scene(write_tif(tmp_path / "i.tif", img, UTM, IMG_T, nodata=0), coarse, table)
    coarse = write_tif(tmp_path / "c.tif", np.array([[1, 2], [2, 0]], np.uint8), UTM,
                       Affine(30.0, 0, IMG_T.c, 0, -30.0, IMG_T.f), nodata=0)
    s = user.open_scene(tmp_path / "i.tif", coarse, table)
    valid, cls = s.valid(0, 0, 40, 50), s.classes(0, 0, 40, 50)
    s.close()
    assert not valid[:3].any() and valid[3:].all()  # imagery no-data tag
    assert cls[0, 0] == 1 and cls[0, 30] == 2 and cls[35, 35] == -1  # coarse no-data (0)
    with pytest.raises(ValueError, match=r"i16.tif: unsupported imagery dtype int16"):
        user.open_scene(write_tif(tmp_path / "i16.tif", img.astype(np.int16), UTM, IMG_T),
                        coarse, table)
    with pytest.raises(ValueError, match=r"two.tif: expected imagery with 3 or more bands, got 2"):
        user.open_scene(write_tif(tmp_path / "two.tif", img[..., :2], UTM, IMG_T), coarse, table)
    with pytest.raises(ValueError, match="nocrs.tif: the imagery has no CRS"):
        user.open_scene(write_tif(tmp_path / "nocrs.tif", img, None, IMG_T), coarse, table)
    far = write_tif(tmp_path / "far.tif", np.ones((3, 3), np.uint8), ALBERS,
                    Affine(30.0, 0, 2e6, 0, -30.0, 2e6))
    with pytest.raises(ValueError, match="far.tif: the coarse raster does not overlap"):
        user.open_scene(tmp_path / "i.tif", far, table)


def test_find_images(tmp_path):
    for n in ("b.tif", "a.tif"):
        (tmp_path / n).write_bytes(b"")
    assert [p.name for p in user.find_images(tmp_path / "*.tif")] == ["a.tif", "b.tif"]
    with pytest.raises(FileNotFoundError, match="data.image: no file matches"):
        user.find_images(tmp_path / "*.jp2")


def test_code_zero_as_a_class_gets_a_free_fill(tmp_path):
    """A table whose code 0 is a class and a coarse raster without a no-data tag: pixels
    outside the coarse extent are no data (a free fill value), code 0 pixels are class 0."""
    csv = tmp_path / "t.csv"
    csv.write_text("code,p_a,p_b,p_c\n0,1,0,0\n1,0,1,0\n2,0,0,1\n")
    table = user.load_label_table(csv)
    coarse = write_tif(tmp_path / "c.tif", np.array([[0, 1]], np.uint8), UTM,
                       Affine(30.0, 0, IMG_T.c, 0, -30.0, IMG_T.f))
    img = write_tif(tmp_path / "i.tif", np.full((40, 60, 3), 9, np.uint8), UTM, IMG_T)
    with pytest.warns(UserWarning, match="covers only about"):
        s = user.open_scene(img, coarse, table)
    cls = s.classes(0, 0, 40, 60)
    s.close()
    assert s.classes is not None and cls[0, 0] == 0 and cls[0, 45] == 1 and cls[35, 0] == -1


def test_truth_mapping(tmp_path):
    table = user.load_label_table("nlcd")
    lc = write_tif(tmp_path / "t.tif", np.array([[1, 2, 3], [4, 5, 6], [15, 0, 3]], np.uint8),
                   UTM, IMG_T)
    how, fn = user.truth_mapping(lc, table)
    assert how == "chesapeake"
    assert fn(np.array([1, 2, 3, 4, 5, 6, 15, 0])).tolist() == [0, 1, 2, 3, 3, 3, 255, 255]
    lab = write_tif(tmp_path / "l.tif", np.array([[0, 1], [2, 3]], np.uint8), UTM, IMG_T)
    how, fn = user.truth_mapping(lab, table)
    assert how == "labels" and fn(np.array([0, 3, 255])).tolist() == [0, 3, 255]
    assert user.truth_mapping(lab, table, "chesapeake")[0] == "chesapeake"
    with pytest.raises(ValueError, match="data.truth_codes: expected auto, labels or chesapeake"):
        user.truth_mapping(lab, table, "lc")
