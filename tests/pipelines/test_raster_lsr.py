"""Tile-by-tile LSR over rasters: grid, blending, seams, no-data, resume, GeoTIFF end to end."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
from _peak_memory_lsr import WIDTH as PEAK_WIDTH  # tests/pipelines is on sys.path
from _peak_memory_lsr import pointwise as _pointwise
from PIL import Image

import epilsr
from epilsr.data.synthetic import make_scene
from epilsr.io.geotiff import GeoInfo, RasterReader, read_geoinfo, write_raster
from epilsr.metrics import NODATA_LABEL
from epilsr.pipelines import raster_lsr
from epilsr.pipelines.raster_lsr import array_reader, lsr_raster
from epilsr.predict import grid_starts as predict_grid_starts
from epilsr.windows import Window, blend_weights, grid_starts, seam_disagreement, tile_grid

H, W, TILE, OVERLAP = 300, 260, 128, 32
LSR = dict(patch_size=5, downsample=2)


@pytest.fixture(scope="module")
def scene():
    s = make_scene(3, size=(320, 288), block=32)
    image = (s.image[:H, :W] * 255).round().astype(np.uint8)
    return image, s.classes[:H, :W].astype(np.int32), s.labels[:H, :W], s.label_given_class


def _run(scene, out_dir, **kwargs):
    image, classes, _, table = scene
    kw = dict(out_dir=out_dir, height=H, width=W, tile=TILE, overlap=OVERLAP, lsr_kwargs=LSR,
              progress=False, write_probs=True)
    kw.update(kwargs)
    return lsr_raster(jax.random.key(7), kw.pop("image_reader", array_reader(image)),
                      kw.pop("classes_reader", array_reader(classes)), table, **kw)


def _outputs(run):
    return (tifffile.imread(run.labels), tifffile.imread(run.probs),
            tifffile.imread(run.entropy))


# ------------------------------------------------------------------ grid and weights


@pytest.mark.parametrize("h, w, tile, overlap", [
    (300, 260, 128, 32), (256, 256, 128, 0), (1000, 130, 128, 64), (50, 700, 128, 16),
    (128, 128, 128, 32), (129, 1, 16, 3),
])
def test_tile_grid_covers_with_static_shape(h, w, tile, overlap):
    windows = tile_grid(h, w, tile=tile, overlap=overlap)
    shape = {(win.height, win.width) for win in windows}
    assert shape == {(min(tile, h), min(tile, w))}
    cover = np.zeros((h, w), int)
    for win in windows:
        assert win.row >= 0 and win.col >= 0
        assert win.row + win.height <= h and win.col + win.width <= w
        cover[win.row : win.row + win.height, win.col : win.col + win.width] += 1
    assert cover.min() >= 1
    assert windows == sorted(windows)  # raster order
    rows = sorted({win.row for win in windows})
    assert all(b - a <= tile - overlap for a, b in zip(rows, rows[1:], strict=False))


@pytest.mark.parametrize("size, k, stride", [(10, 3, 4), (10, 3, 1), (7, 7, 2), (9, 4, 4),
                                             (300, 128, 96), (5, 1, 3)])
def test_grid_starts_vs_bruteforce(size, k, stride):
    got = grid_starts(size, k, stride)
    want = sorted({min(s, size - k) for s in range(0, size - k + stride, stride)})
    assert got == want and got[-1] == size - k
    covered = np.zeros(size, bool)
    for s in got:
        covered[s : s + k] = True
    assert covered.all() == (stride <= k)
    assert predict_grid_starts is grid_starts  # one window grid
    with pytest.raises(ValueError, match="grid_starts"):
        grid_starts(3, 4, 1)


def test_tile_grid_errors():
    with pytest.raises(ValueError, match="overlap"):
        tile_grid(100, 100, tile=64, overlap=64)
    with pytest.raises(ValueError, match="height"):
        tile_grid(0, 100, tile=64, overlap=8)


@pytest.mark.parametrize("tile, overlap", [(128, 32), (64, 0), (17, 8), ((40, 24), 6)])
def test_blend_weights(tile, overlap):
    wts = blend_weights(tile, overlap)
    th, tw = (tile, tile) if np.ndim(tile) == 0 else tile
    assert wts.shape == (th, tw) and wts.dtype == np.float32
    assert wts.min() > 0 and wts.max() <= 1
    np.testing.assert_allclose(wts, wts[::-1, ::-1])
    np.testing.assert_allclose(wts, np.outer(wts[:, tw // 2], wts[th // 2, :]), rtol=1e-6)
    if overlap:  # cross-fade: the fall of one window plus the rise of the next is 1
        np.testing.assert_allclose(wts[th // 2, :overlap] + wts[th // 2, -overlap:], 1.0,
                                   rtol=1e-6)


def test_blend_weights_partition_of_unity():
    windows = tile_grid(H, W, tile=TILE, overlap=OVERLAP)
    wts = blend_weights(TILE, OVERLAP)
    total = np.zeros((H, W))
    parts = []
    for win in windows:
        part = np.zeros((H, W))
        part[win.row : win.row + TILE, win.col : win.col + TILE] = wts
        parts.append(part)
        total += part
    assert total.min() > 0
    np.testing.assert_allclose(sum(p / total for p in parts), 1.0, rtol=1e-12)


# ------------------------------------------------------------------ seams


def test_seam_disagreement_exact_example():
    labels = np.zeros((6, 6), np.uint8)
    labels[:, 3:] = 1
    windows = [Window(0, 0, 6, 3), Window(0, 3, 6, 3)]
    stats = seam_disagreement(labels, windows)
    assert (stats.border, stats.interior, stats.n_border, stats.n_interior) == (1.0, 0.0, 6, 54)
    assert stats.ratio == np.inf
    labels[0, 0] = NODATA_LABEL  # pairs touching no-data are ignored
    assert seam_disagreement(labels, windows).n_interior == 52


def test_seam_disagreement_detects_pasted_tiles(rng):
    h, w = 300, 260
    windows = tile_grid(h, w, tile=64, overlap=16)
    yy, xx = np.mgrid[:h, :w]
    smooth = ((np.sin(yy / 23.0) + np.cos(xx / 17.0)) > 0).astype(np.uint8)  # no tile structure
    assert 0.5 < seam_disagreement(smooth, windows).ratio < 2.0
    pasted = np.zeros_like(smooth)
    for win in windows:  # each window relabels the scene with its own permutation
        perm = rng.permutation(4).astype(np.uint8)
        sl = np.s_[win.row : win.row + win.height, win.col : win.col + win.width]
        pasted[sl] = perm[smooth[sl]]
    stats = seam_disagreement(pasted, windows)
    assert stats.ratio > 10 and stats.border > 0.3


# ------------------------------------------------------------------ stitching exactness


# ``_pointwise``: a fake 'LSR' that depends on each pixel only (the stitched map must equal it
# exactly); shared with the peak-memory subprocess, ``_peak_memory_lsr.py``.


def test_stitching_is_exact_for_pixelwise_model(tmp_path, monkeypatch, rng):
    monkeypatch.setattr(raster_lsr, "_lsr_fn", lambda kw: _pointwise)
    h, w = 1030, 301
    image = rng.integers(0, 255, (h, w, 4), dtype=np.uint8)
    classes = rng.integers(0, 5, (h, w)).astype(np.int32)
    table = rng.dirichlet(np.ones(3), size=5).astype(np.float32)
    calls = []

    def reader(r, c, hh, ww):
        calls.append((r, c))
        return image[r : r + hh, c : c + ww]

    run = lsr_raster(jax.random.key(0), reader, array_reader(classes), table, out_dir=tmp_path,
                     height=h, width=w, tile=128, overlap=48, write_probs=True, progress=False,
                     preview=None)
    expect = np.asarray(_pointwise(None, image, classes, table))
    labels, probs, ent = _outputs(run)
    np.testing.assert_allclose(probs, expect, atol=2e-6)
    np.testing.assert_array_equal(labels, expect.argmax(-1))
    np.testing.assert_allclose(ent, -(expect * np.log(expect)).sum(-1), atol=1e-5)
    assert calls == sorted(calls)  # raster order
    assert run.computed == run.windows == len(tile_grid(h, w, tile=128, overlap=48))


@pytest.mark.parametrize("group", [None, pytest.param(4, marks=pytest.mark.slow)])
def test_peak_memory_does_not_grow_with_height(tmp_path, group):
    """NumPy allocations (strip buffer, writer rows, the bounded reader/writer queues) stay flat
    when the raster gets 2x taller (both long enough to fill the thread queues); also with 4
    strips per call (the reader runs 4 strips ahead, a group's results wait to be added).
    Measured in a fresh process (``_peak_memory_lsr.py`` says why)."""
    heights = (256, 2048, 4096) if group is None else (256, 4096, 8192)
    cmd = [sys.executable, os.fspath(Path(__file__).with_name("_peak_memory_lsr.py")),
           "--out", os.fspath(tmp_path), "--heights", ",".join(map(str, heights))]
    done = subprocess.run(cmd + ([] if group is None else ["--group", str(group)]),
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])  # the first run warms up
    full_probs = heights[2] * PEAK_WIDTH * 3 * 4  # float32 [H, W, 3]
    assert peaks[2] < 1.3 * peaks[1] and peaks[2] < full_probs, peaks  # naive: grows 2x


def test_single_window_equals_self_epitomic_lsr(tmp_path, scene):
    image, classes, _, table = scene
    run = _run(scene, tmp_path, tile=512, preview=None)  # the raster is one window
    assert run.windows == 1
    expect = np.asarray(epilsr.self_epitomic_lsr(
        jax.random.fold_in(jax.random.key(7), 0), image, classes, table, **LSR))
    np.testing.assert_allclose(tifffile.imread(run.probs), expect, atol=1e-5)


# ------------------------------------------------------------------ the real thing


def test_lsr_raster_outputs(tmp_path, scene):
    _, classes, truth, table = scene
    run = _run(scene, tmp_path)
    labels, probs, ent = _outputs(run)
    assert labels.shape == (H, W) and labels.dtype == np.uint8
    assert probs.shape == (H, W, 4) and ent.shape == (H, W)
    assert np.isfinite(probs).all() and probs.min() >= 0
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(labels, probs.argmax(-1))
    assert np.isfinite(ent).all() and ent.min() >= -1e-6 and ent.max() <= np.log(4) + 1e-6
    assert run.windows == 9 and run.computed == 9 and run.skipped == 0
    acc = (labels == truth).mean()
    paint = (table[classes].argmax(-1) == truth).mean()
    assert acc > max(0.8, paint), (acc, paint)
    png = np.asarray(Image.open(run.preview))
    assert png.ndim == 3 and png.shape[1] > 2 * W  # imagery | labels | entropy
    state = json.loads((tmp_path / ".lsr_state" / "progress.json").read_text())
    assert state["complete"] and state["windows_done"] == 9
    again = _run(scene, tmp_path)  # completed: nothing to do
    assert again.computed == 0


def test_nodata_windows_are_skipped(tmp_path, scene):
    image, classes, _, table = scene
    nodata = 99
    cls = classes.copy()
    cls[:150, :140] = nodata  # covers window (0, 0) entirely
    mask = np.ones((H, W), bool)
    mask[290:, 250:] = False  # imagery no-data in a corner
    run = _run(scene, tmp_path, classes_reader=array_reader(cls), nodata_class=nodata,
               valid_reader=array_reader(mask))
    labels, probs, ent = _outputs(run)
    invalid = (cls == nodata) | ~mask
    assert run.skipped == 1 and run.computed == run.windows - 1
    np.testing.assert_array_equal(labels == NODATA_LABEL, invalid)
    assert np.isnan(probs[invalid]).all() and np.isnan(ent[invalid]).all()
    assert np.isfinite(probs[~invalid]).all()
    np.testing.assert_allclose(probs[~invalid].sum(-1), 1.0, atol=1e-5)
    assert read_geoinfo(run.labels).nodata == "255"


def test_on_window_ticks_once_per_window(tmp_path, scene):
    """``on_window`` counts every window of this call, computed or skipped; a completed run
    rerun ticks none (the driver adds ``windows - ticks`` to a bar shared by several rasters)."""
    _, classes, _, table = scene
    cls = np.where(np.arange(W)[None, :] < 60, classes, 8).astype(np.int32)  # column 0 valid
    ticks = []
    kw = dict(classes_reader=array_reader(cls), nodata_class=8, preview=None,
              write_probs=False, on_window=lambda: ticks.append(1))
    run = _run(scene, tmp_path, **kw)
    assert run.windows == len(tile_grid(H, W, tile=TILE, overlap=OVERLAP)) > 1
    assert len(ticks) == run.windows and 0 < run.skipped < run.windows
    again = _run(scene, tmp_path, **kw)
    assert len(ticks) == run.windows and again.resumed_from == run.windows


def test_all_nodata_raster(tmp_path, scene):
    run = _run(scene, tmp_path, classes_reader=array_reader(np.full((H, W), 8, np.int32)),
               nodata_class=8, preview=None)
    labels, probs, _ = _outputs(run)
    assert run.skipped == run.windows and (labels == NODATA_LABEL).all()
    assert np.isnan(probs).all()


def test_bad_classes_raise(tmp_path, scene):
    cls = scene[1].copy()
    cls[5, 5] = 8  # 8 coarse classes: index 8 is out of range
    with pytest.raises(ValueError, match="outside"):
        _run(scene, tmp_path, classes_reader=array_reader(cls))


class Crash(Exception):
    pass


def _crashing(reader, after):
    calls = {"n": 0}

    @functools.wraps(reader)
    def read(*args):
        calls["n"] += 1
        if calls["n"] > after:
            raise Crash(f"simulated crash after {after} windows")
        return reader(*args)

    return read


@pytest.mark.parametrize("after", [4, 8])
def test_resume_after_crash_is_identical(tmp_path, scene, after):
    ref = _outputs(_run(scene, tmp_path / "ref", preview=None))
    out = tmp_path / "crashy"
    with pytest.raises(Crash):
        _run(scene, out, image_reader=_crashing(array_reader(scene[0]), after), preview=None)
    assert not (out / "labels.tif").exists()  # never a half-written output
    assert (out / "labels.tif.partial").exists()
    state = json.loads((out / ".lsr_state" / "progress.json").read_text())
    assert state["windows_done"] == 3 * (after // 3) and not state["complete"]
    run = _run(scene, out, preview=None)
    assert run.resumed_from == state["windows_done"]
    assert run.computed == run.windows - run.resumed_from
    for a, b in zip(_outputs(run), ref, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not list(out.glob("*.partial*"))


def test_resume_refuses_other_settings(tmp_path, scene):
    with pytest.raises(Crash):
        _run(scene, tmp_path, image_reader=_crashing(array_reader(scene[0]), 4))
    with pytest.raises(ValueError, match="different settings"):
        _run(scene, tmp_path, overlap=16)
    run = _run(scene, tmp_path, overlap=16, resume=False, preview=None)  # starts over
    assert run.resumed_from == 0 and run.computed == run.windows


def test_geotiff_end_to_end(tmp_path, scene):
    image, classes, _, table = scene
    geo = GeoInfo(pixel_scale=(1.0, 1.0, 0.0), tiepoints=(0, 0, 0, 612000.0, 4200000.0, 0),
                  geokeys=(1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32617),
                  geo_ascii="WGS 84 / UTM zone 17N|")
    img_path = write_raster(tmp_path / "naip.tif", image, geo=geo, compression="lzw")
    cls_path = write_raster(tmp_path / "nlcd.tif", classes.astype(np.uint8), geo=geo)
    with RasterReader(img_path) as img, RasterReader(cls_path) as cls:
        run = lsr_raster(jax.random.key(7), img, cls, table, out_dir=tmp_path / "out", tile=TILE,
                         overlap=OVERLAP, lsr_kwargs=LSR, progress=False)
    ref = _run(scene, tmp_path / "ref", preview=None)
    np.testing.assert_array_equal(tifffile.imread(run.labels), tifffile.imread(ref.labels))
    for path in (run.labels, run.entropy):
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].geotiff_tags
        assert tags["ModelPixelScale"] == [1.0, 1.0, 0.0]
        assert tags["ModelTiepoint"] == [0.0, 0.0, 0.0, 612000.0, 4200000.0, 0.0]
        assert int(tags["ProjectedCSTypeGeoKey"]) == 32617
        assert read_geoinfo(path).epsg == 32617


# ------------------------------------------------------------------ inputs: changes, NaN


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_imagery_raises_under_the_jit(tmp_path, scene, bad):
    image = scene[0].astype(np.float32) / 255
    image[150, 100, 2] = bad  # second strip (rows 96..223); the jitted LSR never sees it
    with pytest.raises(ValueError, match=r"image_reader: window rows 96:224, cols 0:128 "
                                         r"holds 1 NaN/inf"):
        _run(scene, tmp_path, image_reader=array_reader(image), preview=None)
    state = json.loads((tmp_path / ".lsr_state" / "progress.json").read_text())
    assert state["next_strip"] == 1 and not state["complete"]
    assert not (tmp_path / "labels.tif").exists()
    image[150, 100, 2] = 0.5
    image[3, 3, 0] = bad  # first strip: no output is opened
    with pytest.raises(ValueError, match="NaN/inf"):
        _run(scene, tmp_path / "b", image_reader=array_reader(image), preview=None)
    assert not list((tmp_path / "b").glob("*.tif*"))


def test_non_finite_probabilities_commit_nothing(tmp_path, monkeypatch, scene):
    def broken(key, image, classes, table):
        p = _pointwise(key, image, classes, table)
        return jnp.where(classes[..., None] == 2, jnp.nan, p)  # a NaN wherever class 2 occurs

    monkeypatch.setattr(raster_lsr, "_lsr_fn", lambda kw: broken)
    with pytest.raises(ValueError, match=r"lsr_raster: window \(0, 0, 128, 128\) gave \d+ "
                                         "non-finite probabilities"):
        _run(scene, tmp_path, preview=None)
    assert not list(tmp_path.glob("*.tif*"))
    assert not (tmp_path / ".lsr_state" / "progress.json").exists()


def test_changed_input_is_refused_on_resume(tmp_path, monkeypatch, scene):
    def pointwise(key, image, classes, table):  # fast, all four labels
        return jax.nn.softmax(table[classes] + image[..., :1].astype(np.float32) / 40, axis=-1)

    monkeypatch.setattr(raster_lsr, "_lsr_fn", lambda kw: pointwise)
    image = scene[0].copy()
    with pytest.raises(Crash):
        _run(scene, tmp_path, image_reader=_crashing(array_reader(image), 4), preview=None)
    image[250, 250, 0] ^= 1  # one byte of a window not yet run
    with pytest.raises(ValueError, match="input image_reader changed.*resume=False"):
        _run(scene, tmp_path, image_reader=array_reader(image), preview=None)
    run = _run(scene, tmp_path, image_reader=array_reader(image), preview=None, resume=False)
    assert run.resumed_from == 0 and run.computed == run.windows
    ref = _run(scene, tmp_path / "ref", image_reader=array_reader(image), preview=None)
    for a, b in zip(_outputs(run), _outputs(ref), strict=True):
        np.testing.assert_array_equal(a, b)


def test_class_raster_of_another_size_is_refused(tmp_path, rng):
    """A class raster larger than the imagery is refused, never cropped to its top-left."""
    image = rng.integers(0, 255, (64, 64, 4), dtype=np.uint8)
    classes = np.zeros((80, 64), np.int32)
    table = np.full((1, 2), 0.5, np.float32)
    with pytest.raises(ValueError, match=r"classes_reader: expected a 64x64 raster"):
        lsr_raster(jax.random.key(0), array_reader(image), array_reader(classes), table,
                   out_dir=tmp_path, tile=64, overlap=0)
    assert not list(tmp_path.glob("*.tif"))
