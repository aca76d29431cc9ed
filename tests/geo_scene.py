"""A small synthetic scene written as GeoTIFFs the way a user gets them (tests only)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.warp import calculate_default_transform, reproject

from epilsr.data.synthetic import make_scene

UTM = CRS.from_epsg(26917)
ALBERS = CRS.from_epsg(5070)
ORIGIN = (500007.0, 4100003.0)
IMG_T = Affine(1.0, 0.0, ORIGIN[0], 0.0, -1.0, ORIGIN[1])
BLOCK = 32


class GeoScene(NamedTuple):
    image: Path  # uint8 [H, W, 4] EPSG:26917 1 m
    coarse_same: Path  # codes (class + 1) EPSG:26917, 32 m cells on the imagery's lattice
    coarse_albers: Path  # the same map reprojected to EPSG:5070 30 m (mode), nodata 0
    truth: Path  # uint8 labels 0..3 on the imagery grid
    table: Path  # CSV: code, name, p_<label> (+ name and color rows)
    scene: object  # epilsr.data.synthetic.Scene


def write_tif(path, data, crs, transform, nodata=None, **kw) -> Path:
    data = np.asarray(data)
    bands = data[None] if data.ndim == 2 else np.moveaxis(data, -1, 0)
    with rasterio.open(path, "w", driver="GTiff", width=bands.shape[2], height=bands.shape[1],
                       count=bands.shape[0], dtype=bands.dtype, crs=crs, transform=transform,
                       nodata=nodata, **kw) as ds:
        ds.write(bands)
    return Path(path)


def write_table(path, table: np.ndarray, *, names=True) -> Path:
    labels = ["water", "tree_canopy", "low_vegetation", "impervious"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["code", "class_name"] + [f"p_{x}" for x in labels])
        w.writerow([0, "nodata"] + [0.0] * 4)
        for c, row in enumerate(table):
            w.writerow([c + 1, f"class {c}"] + [f"{v:.6f}" for v in row])
        if names:
            w.writerow(["name", ""] + ["Water", "Trees", "Low vegetation", "Impervious"])
            w.writerow(["color", ""] + ["#0000ff", "#267300", "#a3ff73", "#9c9c9c"])
    return Path(path)


def make_geo_scene(folder: Path, *, seed: int = 5, size=(128, 160)) -> GeoScene:
    folder.mkdir(parents=True, exist_ok=True)
    scene = make_scene(seed, size=size, block=BLOCK)
    h, w = scene.labels.shape
    image = np.round(np.clip(scene.image, 0, 1) * 255).astype(np.uint8)
    codes = (scene.classes[::BLOCK, ::BLOCK] + 1).astype(np.uint8)
    coarse_t = Affine(float(BLOCK), 0.0, ORIGIN[0], 0.0, -float(BLOCK), ORIGIN[1])
    same = write_tif(folder / "coarse_utm32.tif", codes, UTM, coarse_t, nodata=0)
    # What a user downloads: 30 m cells in EPSG:5070 on their own lattice.
    full = (scene.classes + 1).astype(np.uint8)
    dst_t, dw, dh = calculate_default_transform(UTM, ALBERS, w, h, *_bounds(h, w), resolution=30)
    dst_t = Affine(30.0, 0.0, np.floor(dst_t.c / 30) * 30 - 60, 0.0, -30.0,
                   np.ceil(dst_t.f / 30) * 30 + 60)
    albers = np.zeros((dh + 6, dw + 6), np.uint8)
    reproject(full, albers, src_transform=IMG_T, src_crs=UTM, dst_transform=dst_t,
              dst_crs=ALBERS, resampling=Resampling.mode, src_nodata=0, dst_nodata=0)
    coarse_albers = write_tif(folder / "nlcd_like_5070.tif", albers, ALBERS, dst_t, nodata=0)
    return GeoScene(
        write_tif(folder / "scene_image.tif", image, UTM, IMG_T, tiled=True, blockxsize=64,
                  blockysize=64, compress="deflate"),
        same, coarse_albers,
        write_tif(folder / "truth.tif", scene.labels.astype(np.uint8), UTM, IMG_T),
        write_table(folder / "table.csv", scene.label_given_class), scene)


def _bounds(h, w):
    return (ORIGIN[0], ORIGIN[1] - h, ORIGIN[0] + w, ORIGIN[1])
