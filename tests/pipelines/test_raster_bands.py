"""One raster divided among processes: bands of strips equal a single-process run exactly."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tifffile

from epilsr.data.synthetic import make_scene
from epilsr.io.geotiff import GeoInfo, read_geoinfo
from epilsr.pipelines.raster_bands import (
    band_rows,
    split_strips,
    strip_count,
    strip_row_starts,
    write_band_vrts,
)
from epilsr.pipelines.raster_lsr import array_reader, lsr_raster

# last strip shifted to 152: it overlaps strips 4 and 5, so its band rebuilds a 2-strip carry
H, W, TILE, OVERLAP = 200, 60, 48, 20
LSR = dict(patch_size=5, downsample=2)
GEO = GeoInfo(pixel_scale=(2.0, 2.0, 0.0), tiepoints=(0.0, 0.0, 0.0, 1000.0, 5000.0, 0.0))


@pytest.fixture(scope="module")
def scene():
    s = make_scene(3, size=(208, 64), block=16)
    image = (s.image[:H, :W] * 255).round().astype(np.uint8)
    return image, s.classes[:H, :W].astype(np.int32), s.label_given_class


def _run(scene, out_dir, strips=None, classes_reader=None):
    image, classes, table = scene
    classes_reader = classes_reader or array_reader(classes)
    run = lsr_raster(jax.random.key(3), array_reader(image), classes_reader, table,
                     out_dir=out_dir, height=H, width=W, tile=TILE, overlap=OVERLAP,
                     lsr_kwargs=LSR, progress=False, write_probs=True, geo=GEO,
                     strips=strips, preview=None)
    return run, [tifffile.imread(p) for p in (run.labels, run.probs, run.entropy)]


@pytest.fixture(scope="module")
def single(scene, tmp_path_factory):
    return _run(scene, tmp_path_factory.mktemp("single"))[1]


def test_split_strips_balanced():
    assert split_strips(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert split_strips(2, 4) == [(0, 1), (1, 2)]
    for n in range(1, 12):
        for p in range(1, 6):
            parts = split_strips(n, p)
            sizes = [b - a for a, b in parts]
            assert parts[0][0] == 0 and parts[-1][1] == n and max(sizes) - min(sizes) <= 1
            assert all(x[1] == y[0] for x, y in zip(parts, parts[1:], strict=False))
    with pytest.raises(ValueError, match="processes"):
        split_strips(3, 0)


@pytest.mark.parametrize("processes", [2, 3, 7])
def test_bands_equal_single_process_exactly(scene, single, tmp_path, processes):
    starts = strip_row_starts(H, W, tile=TILE, overlap=OVERLAP)
    assert starts == (0, 28, 56, 84, 112, 140, 152)
    parts = split_strips(strip_count(H, W, tile=TILE, overlap=OVERLAP), processes)
    bands, dirs = [], []
    for p, strips in enumerate(parts):
        dirs.append(tmp_path / f"band-{p}")
        run, arrays = _run(scene, dirs[-1], strips)
        r0, r1 = band_rows(starts, H, strips)
        assert arrays[0].shape == (r1 - r0, W)
        assert read_geoinfo(run.labels).geotransform == (1000.0, 2.0, 0.0, 5000.0 - 2 * r0,
                                                         0.0, -2.0)
        assert run.windows == 2 * (strips[1] - strips[0])
        bands.append(arrays)
    for k in range(3):  # labels, probs, entropy: bit-identical (NaN where no data)
        got = np.concatenate([b[k] for b in bands])
        np.testing.assert_array_equal(got, single[k])
    if processes == 3:
        rasterio = pytest.importorskip("rasterio")
        vrts = write_band_vrts(tmp_path / "mosaic-", dirs, geo=GEO)
        assert set(vrts) == {"labels", "probs", "entropy"}
        with rasterio.open(vrts["labels"]) as ds:
            np.testing.assert_array_equal(ds.read(1), single[0])
            assert ds.transform.f == 5000.0 and ds.nodata == 255
        with rasterio.open(vrts["probs"]) as ds:
            np.testing.assert_array_equal(np.moveaxis(ds.read(), 0, -1), single[1])


def test_band_resume_returns_same(scene, single, tmp_path):
    _, first = _run(scene, tmp_path, (5, 7))
    run, again = _run(scene, tmp_path, (5, 7))
    assert run.computed == 0
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


class _Flaky:
    """Classes reader that fails at rows >= ``row`` while ``fail`` (no fingerprint)."""

    def __init__(self, classes, row):
        self.classes, self.row, self.fail, self.shape = classes, row, True, classes.shape

    def __call__(self, r, c, h, w):
        if self.fail and r >= self.row:
            raise OSError("disk gone")
        return self.classes[r : r + h, c : c + w]


def test_interrupted_band_resumes_exactly(scene, single, tmp_path):
    """Band (2, 7) stopped at strip 5 resumes from its checkpoint (not the rebuilt carry)."""
    flaky = _Flaky(scene[1], row=140)
    with pytest.raises(OSError, match="disk gone"):
        _run(scene, tmp_path, (2, 7), flaky)
    flaky.fail = False
    run, arrays = _run(scene, tmp_path, (2, 7), flaky)
    assert run.resumed_from > 0 and run.computed < run.windows
    r0 = strip_row_starts(H, W, tile=TILE, overlap=OVERLAP)[2]
    for k in range(3):
        np.testing.assert_array_equal(arrays[k], single[k][r0:])


def test_bad_strips_rejected(scene, tmp_path):
    with pytest.raises(ValueError, match="strips must be"):
        _run(scene, tmp_path, (3, 9))
