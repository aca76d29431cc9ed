"""A test scene as users get it, from the eight real West-Virginia tiles (issue 16).

    python -m benchmarks.user_scene --out /tmp/wv_user      # then run the printed commands

Mosaics the 256 x 256 tiles of ``shared/data/chesapeake_wv`` (2 rows x 4 columns), gives the
mosaic a made-up but valid UTM 17N transform (EPSG:26917, 1 m), and writes:

* ``naip.tif`` (uint8 R, G, B, NIR), ``naip12.tif`` (the same scene at 12 bits in uint16:
  ``round(x * 4095 / 255)``), ``truth.tif`` (labels 0..3, 255 = no data);
* ``nlcd_1m_utm.tif``: the 1 m NLCD layer on the imagery grid (the pre-aligned input);
* ``nlcd_30m_5070.tif``: a 30 m NLCD in EPSG:5070 derived from the 1 m layer by reprojection
  (GDAL ``mode``), as NLCD is distributed; ``nlcd_30m_5070_strip.tif``: the same with a
  150 m wide no-data (0) strip.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.warp import calculate_default_transform, reproject

from epilsr.data import chesapeake

UTM, ALBERS = CRS.from_epsg(26917), CRS.from_epsg(5070)
TRANSFORM = Affine(1.0, 0.0, 581234.0, 0.0, -1.0, 4172345.0)  # near m_3708020 (37.9 N, 80.1 W)


def _write(path: Path, data: np.ndarray, crs, transform, nodata=None) -> Path:
    bands = data[None] if data.ndim == 2 else np.moveaxis(data, -1, 0)
    with rasterio.open(path, "w", driver="GTiff", width=bands.shape[2], height=bands.shape[1],
                       count=bands.shape[0], dtype=bands.dtype, crs=crs, transform=transform,
                       nodata=nodata, tiled=True, compress="deflate", photometric="minisblack"
                       ) as ds:
        ds.write(bands)
    return path


def build(out: Path, root: Path) -> dict[str, Path]:
    """Write the scene into ``out``; returns the paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    tiles = [chesapeake.load_tile(s) for s in chesapeake.find_tiles(root)][:8]
    if len(tiles) < 8:
        raise FileNotFoundError(f"{root}: expected the 8 chesapeake_wv tiles")

    def mosaic(arrs):
        return np.concatenate([np.concatenate(arrs[r * 4 : r * 4 + 4], axis=1) for r in (0, 1)])

    image = mosaic([t.image for t in tiles])
    truth = mosaic([t.labels for t in tiles])
    nlcd = mosaic([t.nlcd for t in tiles])
    h, w = nlcd.shape
    paths = {
        "naip": _write(out / "naip.tif", image, UTM, TRANSFORM),
        "naip12": _write(out / "naip12.tif",
                         np.round(image.astype(np.float64) * 4095 / 255).astype(np.uint16),
                         UTM, TRANSFORM),
        "truth": _write(out / "truth.tif", truth, UTM, TRANSFORM, nodata=255),
        "nlcd_1m": _write(out / "nlcd_1m_utm.tif", nlcd, UTM, TRANSFORM, nodata=0),
    }
    left, top = TRANSFORM.c, TRANSFORM.f
    t, dw, dh = calculate_default_transform(UTM, ALBERS, w, h, left, top - h, left + w, top,
                                            resolution=30)
    t = Affine(30.0, 0.0, np.floor(t.c / 30) * 30, 0.0, -30.0, np.ceil(t.f / 30) * 30)
    coarse = np.zeros((dh + 2, dw + 2), np.uint8)
    reproject(nlcd, coarse, src_transform=TRANSFORM, src_crs=UTM, dst_transform=t,
              dst_crs=ALBERS, resampling=Resampling.mode, src_nodata=0, dst_nodata=0)
    paths["nlcd_30m"] = _write(out / "nlcd_30m_5070.tif", coarse, ALBERS, t, nodata=0)
    strip = coarse.copy()
    c0 = strip.shape[1] // 2
    strip[:, c0 : c0 + 5] = 0  # 5 cells = 150 m of NLCD no data
    paths["nlcd_strip"] = _write(out / "nlcd_30m_5070_strip.tif", strip, ALBERS, t, nodata=0)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--root", type=Path, default=chesapeake.data_root() / "chesapeake_wv")
    args = ap.parse_args()
    p = build(args.out, args.root)
    base = (f"python -m experiments.lsr data=geotiff data.table=nlcd data.truth={p['truth']}")
    runs = {
        "pre-aligned (1 m NLCD on the imagery grid)":
            f"data.image={p['naip']} data.coarse={p['nlcd_1m']} baselines.paint=true",
        "generic (30 m NLCD, EPSG:5070)":
            f"data.image={p['naip']} data.coarse={p['nlcd_30m']} baselines.paint=true",
        "12-bit imagery": f"data.image={p['naip12']} data.coarse={p['nlcd_30m']}",
        "RGB only": f"data.image={p['naip']} data.coarse={p['nlcd_30m']} data.bands=[1,2,3]",
        "NLCD no-data strip": f"data.image={p['naip']} data.coarse={p['nlcd_strip']}",
    }
    for name, extra in runs.items():
        print(f"# {name}\n{base} {extra} hydra.run.dir={args.out}/run_{name.split()[0]}")


if __name__ == "__main__":
    main()
