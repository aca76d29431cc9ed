"""``python -m experiments.lsr data=geotiff``: your own GeoTIFFs end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import Affine  # noqa: E402

from epilsr.data import user  # noqa: E402
from epilsr.pipelines.raster_lsr import array_reader, lsr_raster  # noqa: E402
from tests.geo_scene import IMG_T, UTM, make_geo_scene, write_tif  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def run(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.lsr", *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_geotiff_driver_end_to_end(tmp_path):
    geo = make_geo_scene(tmp_path / "in")
    h, w = geo.scene.labels.shape
    with rasterio.open(geo.image) as ds:  # a second image: a crop with 8 rows of no data
        crop = np.moveaxis(ds.read(window=((32, 96), (40, 136))), 0, -1)
    crop[:8] = 0
    write_tif(tmp_path / "in" / "scene_crop.tif", crop, UTM,
              Affine(1.0, 0, IMG_T.c + 40, 0, -1.0, IMG_T.f - 32), nodata=0)
    out = tmp_path / "out"
    proc = run("data=geotiff", f"data.image={tmp_path / 'in'}/scene_*.tif",
               f"data.coarse={geo.coarse_albers}", f"data.table={geo.table}",
               f"data.truth={geo.truth}", "output.probs=true", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "metrics.json").read_text())
    pooled = {r["method"]: r for r in results["pooled"]}
    assert set(pooled) == {"lsr"}  # baselines only when asked
    # one progress bar over the windows of both images, with its total from the start
    per_image = [t["lsr"]["windows"] for t in results["tiles"].values()]
    bars = re.findall(r"LSR windows: +\d+%\|[^|]*\| (\d+)/(\d+)", proc.stderr)
    assert len(per_image) == 2 and bars and {t for _, t in bars} == {str(sum(per_image))}
    assert bars[-1][0] == str(sum(per_image))
    assert pooled["lsr"]["accuracy"] > 0.8, pooled
    for name, shape in (("scene_image", (h, w)), ("scene_crop", (64, 96))):
        folder = out / name
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
            "entropy.tif", "labels.tif", "labels.tif.aux.xml", "preview.png", "probs.tif"]
        with rasterio.open(folder / "labels.tif") as ds:
            labels = ds.read(1)
            assert labels.shape == shape and ds.crs == UTM and ds.nodata == 255
            assert ds.colormap(1)[0][:3] == (0, 0, 255) and ds.tags()["LABEL_1"] == "Trees"
        with rasterio.open(folder / "probs.tif") as ds:
            probs = np.moveaxis(ds.read(), 0, -1)
            assert ds.descriptions == ("Water", "Trees", "Low vegetation", "Impervious")
        with rasterio.open(folder / "entropy.tif") as ds:
            ent = ds.read(1)
        nodata = labels == 255
        assert np.all(np.isnan(probs[nodata])) and np.all(np.isnan(ent[nodata]))
        assert np.allclose(probs[~nodata].sum(-1), 1, atol=1e-3)
        np.testing.assert_array_equal(labels[~nodata], probs[~nodata].argmax(-1))
    with rasterio.open(out / "scene_crop" / "labels.tif") as ds:
        assert ds.transform.almost_equals(Affine(1.0, 0, IMG_T.c + 40, 0, -1.0, IMG_T.f - 32))
        assert np.all(ds.read(1)[:8] == 255) and np.mean(ds.read(1)[8:] == 255) < 0.1
    with rasterio.open(out / "scene_image" / "labels.tif") as ds:
        with rasterio.open(geo.coarse_albers) as c:  # NLCD-like no-data cells -> label 255
            assert 0 < np.mean(ds.read(1) == 255) < 0.1 and c.nodata == 0


def test_geotiff_path_equals_prealigned_path(tmp_path):
    """Same CRS, coarse cells on the imagery's lattice: the windowed GeoTIFF path (aligned
    reader, table from CSV, no-data handling on) gives the labels of the in-memory path."""
    geo = make_geo_scene(tmp_path / "in", size=(64, 96))
    table = user.load_label_table(geo.table)
    scene = user.open_scene(geo.image, geo.coarse_same, table)
    kw = dict(patch_size=5, sample_fraction=0.2, cell_size=32, iters=10)
    key = jax.random.key(3)
    try:
        a = lsr_raster(key, scene.image, scene.classes, table.table, out_dir=tmp_path / "a",
                       tile=256, lsr_kwargs=kw, geo=scene.geo, nodata_class=-1,
                       valid_reader=scene.valid, progress=False, preview=None)
    finally:
        scene.close()
    img = np.round(np.clip(geo.scene.image, 0, 1) * 255).astype(np.uint8)
    b = lsr_raster(key, array_reader(img), array_reader(geo.scene.classes),
                   geo.scene.label_given_class, out_dir=tmp_path / "b", tile=256, lsr_kwargs=kw,
                   progress=False, preview=None)
    with rasterio.open(a.labels) as la, rasterio.open(b.labels) as lb:
        x, y = la.read(1), lb.read(1)
    np.testing.assert_array_equal(x, y)


def test_geotiff_driver_bad_input_is_one_line(tmp_path):
    geo = make_geo_scene(tmp_path / "in", size=(64, 64))
    far = write_tif(tmp_path / "far.tif", np.ones((3, 3), np.uint8), UTM,
                    Affine(30.0, 0, 1e5, 0, -30.0, 1e6))
    proc = run("data=geotiff", f"data.image={geo.image}", f"data.coarse={far}",
               f"hydra.run.dir={tmp_path / 'o'}")
    assert proc.returncode == 2
    assert "error: far.tif: the coarse raster does not overlap the imagery" in proc.stderr
    proc = run("data=geotiff", f"data.coarse={far}", f"hydra.run.dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and "error: data.image: give the imagery" in proc.stderr
