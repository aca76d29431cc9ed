"""One raster over several processes (issue 17 item 5): bands of window strips in the driver.

``python -m experiments.lsr data=geotiff`` on one 320 x 96 GeoTIFF (64 px windows, 7 strips):
with fewer rasters than processes (or ``distributed.band_mpx``) the raster is cut into bands
of strips, each a unit of work with its own outputs (``<raster>/band-<k>/``) and manifest
entry; the finishing step writes ``<raster>/labels.vrt`` (+ entropy, probs) whose pixels equal
the one-process ``labels.tif`` exactly, and pooled metrics equal.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from epilsr.cli import hosts
from epilsr.cli.lsr_geotiff import _units, combine_bands
from epilsr.pipelines import partition
from epilsr.pipelines.raster_bands import split_strips, strip_row_starts

rasterio = pytest.importorskip("rasterio")

from tests.experiments.test_hosts import (  # noqa: E402
    FAST,
    _check,
    _kill_process_1_mid,
    _one_process_run,
    _port,
    _start,
    _wait,
)
from tests.geo_scene import IMG_T, UTM, make_geo_scene, write_tif  # noqa: E402

H, W = 320, 96
BANDS = ("labels", "entropy", "probs", "paint_labels")


# ----------------------------------------------------------------------------- pure helpers


def test_bands_per_input_auto_and_by_size():
    # automatic: bands only when there are fewer rasters than processes
    assert partition.bands_per_input([100, 50, 7], [5, 5, 5], 2, None) == [1, 1, 1]
    assert partition.bands_per_input([100], [6], 2, None) == [2]
    assert partition.bands_per_input([100, 50], [6, 6], 5, None) == [3, 3]
    assert partition.bands_per_input([100], [2], 8, None) == [2]  # at most one band per strip
    # by size: ceil(pixels / band_pixels), independent of the process count
    for count in (1, 3):
        assert partition.bands_per_input([100, 30, 31], [9, 9, 9], count, 30) == [4, 1, 2]
    with pytest.raises(ValueError, match="band_mpx"):
        partition.bands_per_input([1], [1], 1, 0)
    with pytest.raises(ValueError, match="strips"):
        partition.bands_per_input([1, 2], [1], 1, None)


def test_band_mpx_refused_on_tile_data_and_when_not_a_size(tmp_path):
    proc = _start(tmp_path / "a", ["distributed.band_mpx=5"])  # the synthetic tiles
    assert proc.wait(timeout=120) != 0
    err = proc.stderr.read()
    assert "distributed.band_mpx: bands of one raster apply to data=geotiff" in err, err[-2000:]
    assert partition.bands_per_input([], [], 3, None) == []
    scenes = [SimpleNamespace(height=H, width=W)]
    for bad in ("many", -1, 0):
        with pytest.raises(ValueError, match="distributed.band_mpx"):
            _units(scenes, ["big"], ["fp"], window=64, overlap=16, count=1, band_mpx=bad)


def test_units_cover_the_raster_rows_once():
    scenes = [SimpleNamespace(height=H, width=W), SimpleNamespace(height=64, width=64)]
    starts = strip_row_starts(H, W, tile=64, overlap=16)
    units = _units(scenes, ["big", "small"], ["f0", "f1"], window=64, overlap=16, count=1,
                   band_mpx=0.012)
    assert [u.name for u in units] == ["big/band-0", "big/band-1", "big/band-2", "small"]
    big = units[:3]
    assert [u.strips for u in big] == split_strips(len(starts), 3)
    assert [u.rows for u in big] == [(0, starts[3]), (starts[3], starts[5]), (starts[5], H)]
    assert sum(u.pixels for u in big) == H * W and units[3].strips is None
    assert len({u.input for u in units}) == 4 and units[3].input == "f1"
    assert units[1].extra() == {"raster": "big", "band": 1, "bands": 3, "strips": [3, 5],
                                "rows": [starts[3], starts[5]]}


def _band_items(raster: str, k: int, owner=0) -> list[dict]:
    return [{"name": f"{raster}/band-{b}", "pixels": 10, "owner": owner, "input": f"f{b}",
             "raster": raster, "band": b, "bands": k} for b in range(k)]


def test_complete_bands_needs_every_band():
    plan = {"count": 2, "items": [{"name": "x", "raster": "x"}, *_band_items("a", 2),
                                  *_band_items("b", 3)]}
    ok = partition.Report(6, 6, [])
    assert [[i["name"] for i in v] for v in partition.complete_bands(plan, ok).values()] == [
        ["a/band-0", "a/band-1"], ["b/band-0", "b/band-1", "b/band-2"]]
    one_missing = partition.Report(6, 5, [partition.Problem("b/band-1", 1, "not done")])
    assert list(partition.complete_bands(plan, one_missing)) == ["a"]


def test_summary_counts_rasters_and_bands_apart():
    """lsr_check's head line: a raster in bands counts once; its bands are counted apart."""
    plan = {"count": 2, "items": [{"name": "x", "raster": "x"}, *_band_items("a", 4),
                                  {"name": "y"}]}
    assert hosts.summary(plan, partition.Report(6, 6, [])) == "3 rasters (1 in 4 bands): complete"
    two = {"items": [*_band_items("a", 2), *_band_items("b", 3)]}
    assert hosts.summary(two, partition.Report(5, 5, [])) == "2 rasters (2 in 5 bands): complete"
    assert hosts.summary({"items": [{"name": "x"}]}, partition.Report(1, 1, [])) == \
        "1 raster: complete"
    missing = [partition.Problem("a/band-1", 1, "not done"), partition.Problem("y", 0, "stale")]
    lines = hosts.summary(plan, partition.Report(6, 4, missing)).splitlines()
    assert lines == ["1/3 rasters complete (1 in 4 bands, 3/4 bands complete); 2 not:",
                     "  a/band-1 (process 1): not done", "  y (process 0): stale",
                     "rerun process(es) [0, 1] with the same settings to complete the set"]
    no_bands = hosts.summary({"items": [{"name": "x"}, {"name": "y"}]},
                             partition.Report(2, 1, missing[1:]))
    assert no_bands.splitlines()[0] == "1/2 rasters complete; 1 not:"


def test_lsr_check_prints_the_summary(tmp_path, capsys):
    """``python -m epilsr.cli.lsr_check`` on a run whose processes recorded nothing yet."""
    from epilsr.cli import lsr_check

    units = [{"raster": "x"}, *({k: v for k, v in i.items() if k in ("raster", "band", "bands")}
                                for i in _band_items("a", 3))]
    names = ["x", "a/band-0", "a/band-1", "a/band-2"]
    partition.write_plan(tmp_path, partition.make_plan(names, [4, 1, 1, 1], list("fghi"), 2,
                                                       units))
    assert lsr_check.main([str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "0/2 rasters complete (1 in 3 bands, 0/3 bands complete); 4 not:"
    assert "a/band-2 (process 1): not done" in out and "error:" in err and "0/2 rasters" in err


def test_combine_bands_adds_confusion_exactly():
    rng = np.random.default_rng(0)
    cms = [rng.integers(0, 50, (4, 4)) for _ in range(3)]
    plan = {"items": [{"name": "x"}, *_band_items("a", 3)]}
    tiles = {f"a/band-{b}": {"cell_size": 8, "lsr": {
        "seconds": 1.0, "windows": 2, "skipped": 0, "scored": int(cm.sum()),
        "labels": f"/run/a/band-{b}/labels.tif", "confusion": cm.tolist()}}
        for b, cm in enumerate(cms)}
    got = combine_bands(plan, {"x": {"lsr": {"accuracy": 0.5}}, **tiles})
    assert list(got) == ["x", "a"] and got["x"] == {"lsr": {"accuracy": 0.5}}
    whole = got["a"]["lsr"]
    total = np.sum(cms, axis=0).astype(np.float64)  # float64 brute force
    assert whole["confusion"] == np.sum(cms, axis=0).tolist()
    assert whole["accuracy"] == pytest.approx(np.trace(total) / total.sum(), rel=1e-15)
    assert whole["windows"] == 6 and whole["seconds"] == 3.0 and got["a"]["cell_size"] == 8
    assert whole["labels"] == "/run/a/labels.vrt" and list(got["a"]["bands"]) == list(tiles)


# ----------------------------------------------------------------------------- driver runs


def _inputs(folder: Path, name: str = "big") -> list[str]:
    geo = make_geo_scene(folder, size=(H, 192))
    with rasterio.open(geo.image) as ds:
        image = np.moveaxis(ds.read(), 0, -1)[:, :W]
    write_tif(folder / f"{name}.tif", image, UTM, IMG_T, tiled=True, blockxsize=64,
              blockysize=64)
    return ["data=geotiff", f"data.image={folder}/{name}.tif", f"data.coarse={geo.coarse_same}",
            f"data.table={geo.table}", f"data.truth={geo.truth}", "output.probs=true",
            "baselines.paint=true", *FAST]


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def _same_as_one(two: Path, one: Path) -> None:
    """The VRT mosaics of ``two`` read (rasterio) as ``one``'s GeoTIFFs, exactly; same
    georeferencing; pooled and per-raster metrics equal."""
    for name in BANDS:
        with rasterio.open(two / "big" / f"{name}.vrt") as got, \
                rasterio.open(one / "big" / f"{name}.tif") as want:
            assert got.shape == want.shape == (H, W) and got.crs == want.crs
            assert np.array_equal(got.nodata, want.nodata, equal_nan=True)
            assert got.transform == want.transform and got.count == want.count
            np.testing.assert_array_equal(got.read(), want.read())  # NaN where no data too
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (two, one))
    assert got["pooled"] == want["pooled"]
    for method in ("lsr", "paint"):
        assert got["tiles"]["big"][method]["accuracy"] == want["tiles"]["big"][method]["accuracy"]
    assert got["confusion"] == want["confusion"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    args, one = _one_process_run(tmp_path_factory, "bands", _inputs)
    assert sorted(p.name for p in (one / "big").glob("*.tif")) == [
        "entropy.tif", "labels.tif", "paint_labels.tif", "probs.tif"]  # one process: no bands
    return args, one


def test_one_raster_two_processes_equal_one(scene, tmp_path):
    """Coordinated (jax.distributed on 127.0.0.1): each process one band; process 0 writes
    the VRTs after the barrier."""
    args, one = scene
    dist = [f"distributed.coordinator=127.0.0.1:{_port()}", "distributed.num_processes=2"]
    procs = [_start(tmp_path, args, *dist, f"distributed.process_id={i}") for i in range(2)]
    stdout = [_wait(p) for p in procs]
    assert "pooled over all images" in stdout[0]
    plan = partition.read_plan(tmp_path)
    assert [(i["name"], i["owner"], i["strips"]) for i in plan["items"]] == [
        ("big/band-0", 0, [0, 4]), ("big/band-1", 1, [4, 7])]
    assert {p: sorted(m["items"]) for p, m in partition.read_manifests(tmp_path).items()} == {
        0: ["big/band-0"], 1: ["big/band-1"]}
    for b in range(2):
        assert sorted(p.name for p in (tmp_path / "big" / f"band-{b}").glob("*.tif")) == [
            "entropy.tif", "labels.tif", "paint_labels.tif", "probs.tif"]
    _same_as_one(tmp_path, one)


@pytest.mark.slow
def test_band_mpx_one_process_writes_the_vrts(scene, tmp_path):
    """``distributed.band_mpx`` cuts the raster whatever the process count; one process alone
    writes the VRTs itself (3 bands: 320 x 96 px over 0.012 Mpx)."""
    args, one = scene
    _wait(_start(tmp_path, args, "distributed.band_mpx=0.012"))
    assert len(partition.read_plan(tmp_path)["items"]) == 3
    _same_as_one(tmp_path, one)


@pytest.mark.slow
def test_killed_band_rerun_completes_the_raster(scene, tmp_path):
    """Independent processes: process 1 killed inside its band; lsr_check names the band and
    writes no VRT; rerunning process 1 resumes the band and lsr_check writes the VRTs."""
    args, one = scene
    dist = _kill_process_1_mid(tmp_path, args, tmp_path / "big" / "band-1")
    check = _check(tmp_path)
    assert check.returncode == 1, check.stdout + check.stderr
    assert "0/1 raster complete (1 in 2 bands, 1/2 bands complete)" in check.stdout
    assert "big/band-1 (process 1)" in check.stdout
    assert "rerun process(es) [1]" in check.stdout
    assert not list((tmp_path / "big").glob("*.vrt"))  # not before every band is done
    _wait(_start(tmp_path, args, *dist, "distributed.process_id=1"))  # resumes its band
    assert not list((tmp_path / "big").glob("*.vrt"))  # independent: left to lsr_check
    check = _check(tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    _same_as_one(tmp_path, one)


@pytest.mark.slow
def test_changed_imagery_makes_the_other_band_stale(tmp_path):
    args = _inputs(tmp_path / "in")
    out, dist = tmp_path / "run", ["distributed.num_processes=2"]
    procs = [_start(out, args, *dist, f"distributed.process_id={i}") for i in range(2)]
    for p in procs:
        _wait(p)
    assert _check(out).returncode == 0 and (out / "big" / "labels.vrt").exists()
    path = tmp_path / "in" / "big.tif"
    with rasterio.open(path) as ds:
        profile, data = ds.profile, ds.read()
    data[:, :8, :8] = 255 - data[:, :8, :8]
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    again = _start(out, args, *dist, "distributed.process_id=0")
    again.communicate(timeout=240)
    assert again.returncode != 0  # resume refuses a changed input
    assert not (out / "big" / "labels.vrt").exists()  # the mosaic would mix old and new
    _wait(_start(out, args, *dist, "distributed.process_id=0", "resume=false"))
    check = _check(out)
    assert check.returncode == 1, check.stdout + check.stderr
    assert "big/band-1 (process 1): stale" in check.stdout
    assert not (out / "big" / "labels.vrt").exists()
    assert os.path.exists(out / "big" / "band-0" / "labels.tif")
