"""Many processes over one list of rasters (issue 17 item 5): partition, check, 2-process runs.

The driver tests run ``python -m experiments.lsr data=geotiff`` on three tiny GeoTIFFs (crops of
one synthetic scene, 64 px windows): two ``jax.distributed`` processes on 127.0.0.1 write
byte-identical outputs to one process; killing one of two independent processes mid-raster and
rerunning it completes the set (``python -m experiments.lsr_check``).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from epilsr.cli.hosts import Hosts, join
from epilsr.data.synthetic import make_scene
from epilsr.io.geotiff import GeoInfo, write_raster
from epilsr.pipelines import partition

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import Affine  # noqa: E402

from tests.geo_scene import IMG_T, UTM, make_geo_scene, write_tif  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 240
#: name -> (row, col, height, width) crop of the 320 x 192 scene
CROPS = {"img_a": (0, 0, 320, 160), "img_b": (224, 96, 96, 96), "img_e": (32, 32, 288, 160)}
FAST = ("raster.tile_sizes=[64]", "raster.overlap=16", "lsr.patch_size=5",
        "lsr.sample_fraction=0.2", "lsr.iters=5", "output.png=false")


# ----------------------------------------------------------------------------- pure helpers


def test_assign_balanced_deterministic_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n, k = int(rng.integers(1, 8)), int(rng.integers(1, 4))
        pixels = [int(p) for p in rng.integers(0, 1000, n)]
        owner = partition.assign(pixels, k)
        assert owner == partition.assign(list(pixels), k)  # deterministic
        load = max(sum(p for p, o in zip(pixels, owner, strict=True) if o == q)
                   for q in range(k))
        best = min(max(sum(p for p, o in zip(pixels, own, strict=True) if o == q)
                       for q in range(k)) for own in itertools.product(range(k), repeat=n))
        assert load <= best * 4 / 3 + 1e-9  # the LPT bound against the exhaustive optimum
        mine = [partition.owned(pixels, q, k) for q in range(k)]
        assert sorted(i for m in mine for i in m) == list(range(n))  # a partition
        assert all(m == sorted(m) for m in mine)  # input order
    assert partition.assign([5, 5, 5, 5], 2) == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="index"):
        partition.owned([1, 2], 2, 2)
    with pytest.raises(ValueError, match="count"):
        partition.assign([1], 0)


def test_check_reports_missing_changed_unfinished_and_stale(tmp_path):
    plan = partition.make_plan(["a", "b", "c"], [4, 3, 2], ["fa", "fb", "fc"], 2)
    partition.write_plan(tmp_path, plan)
    report = partition.check(tmp_path)
    assert not report.ok and report.done == 0 and report.expected == 3
    for name in "abc":
        f = tmp_path / name / "labels.tif"
        f.parent.mkdir()
        f.write_bytes(b"x" * 10)
        state = tmp_path / name / ".lsr_state" / "progress.json"
        state.parent.mkdir()
        state.write_text(json.dumps({"complete": True}))
        owner = plan["items"]["abc".index(name)]["owner"]
        partition.record_done(tmp_path, owner, name,
                              [partition.output_entry(f, tmp_path, state)], f"f{name}")
    report = partition.check(tmp_path)
    assert report.ok and report.done == 3, report.text()
    (tmp_path / "a" / "labels.tif").write_bytes(b"y" * 11)  # overwritten after recording
    (tmp_path / "b" / ".lsr_state" / "progress.json").write_text('{"complete": false}')
    partition.write_plan(tmp_path, partition.make_plan(["a", "b", "c"], [4, 3, 2],
                                                       ["fa", "fb", "fc2"], 2))  # c changed
    report = partition.check(tmp_path)
    why = {p.name: p.why for p in report.problems}
    assert report.done == 0 and set(why) == {"a", "b", "c"}
    assert "changed" in why["a"] and "unfinished" in why["b"] and "stale" in why["c"]
    assert "rerun process(es)" in report.text()
    os.remove(tmp_path / "a" / "labels.tif")
    assert "missing" in {p.name: p.why for p in partition.check(tmp_path).problems}["a"]


def test_join_without_a_coordinator_starts_nothing():
    def dist(coordinator=None, n=1, p=0):
        return OmegaConf.create({"coordinator": coordinator, "num_processes": n, "process_id": p})

    assert join(None) == Hosts(0, 1, False) and join(dist()) == Hosts(0, 1, False)
    assert join(dist(None, 4, 3)) == Hosts(3, 4, False)  # independent: no jax.distributed
    with pytest.raises(ValueError, match="process_id"):
        join(dist(None, 2, 2))


# ----------------------------------------------------------------------------- driver runs


def _inputs(folder: Path) -> list[str]:
    geo = make_geo_scene(folder, size=(320, 192))
    with rasterio.open(geo.image) as ds:
        image = np.moveaxis(ds.read(), 0, -1)
    for name, (r, c, h, w) in CROPS.items():
        write_tif(folder / f"{name}.tif", image[r:r + h, c:c + w], UTM,
                  Affine(1.0, 0, IMG_T.c + c, 0, -1.0, IMG_T.f - r), tiled=True,
                  blockxsize=64, blockysize=64)
    return ["data=geotiff", f"data.image={folder}/img_*.tif", f"data.coarse={geo.coarse_same}",
            f"data.table={geo.table}", f"data.truth={geo.truth}", *FAST]


def _start(out: Path, args, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.lsr", *args, *extra,
                             f"hydra.run.dir={out}"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _wait(proc: subprocess.Popen) -> str:
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"run did not finish within {TIMEOUT} s")
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


def _check(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.lsr_check", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT)


def _outputs(out: Path) -> dict[str, bytes]:
    files = sorted(p for name in CROPS for p in (out / name).glob("*.tif"))
    assert len(files) == 2 * len(CROPS)  # labels.tif, entropy.tif per image
    return {os.path.relpath(p, out): p.read_bytes() for p in files}


def _pooled(out: Path) -> list:
    return json.loads((out / "metrics.json").read_text())["pooled"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process_run(tmp_path_factory, name: str, inputs) -> tuple[list[str], Path]:
    """``(driver arguments, folder of their one-process run)`` for the inputs that
    ``inputs(folder)`` writes (the reference of the multi-process runs)."""
    folder = tmp_path_factory.mktemp(name)
    args = inputs(folder / "in")
    _wait(_start(folder / "one", args))
    return args, folder / "one"


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    args, ref = _one_process_run(tmp_path_factory, "hosts", _inputs)
    assert partition.check(ref).ok
    return args, ref


@pytest.mark.slow
def test_two_processes_byte_identical_to_one(scene, tmp_path):
    args, ref = scene
    dist = [f"distributed.coordinator=127.0.0.1:{_port()}", "distributed.num_processes=2"]
    procs = [_start(tmp_path, args, *dist, f"distributed.process_id={i}") for i in range(2)]
    for p in procs:
        _wait(p)
    manifests = partition.read_manifests(tmp_path)
    assert sorted(manifests) == [0, 1] and all(m["items"] for m in manifests.values())
    assert partition.check(tmp_path).ok
    got, want = _outputs(tmp_path), _outputs(ref)
    assert got.keys() == want.keys()
    assert all(got[k] == want[k] for k in want), [k for k in want if got[k] != want[k]]
    assert _pooled(tmp_path) == _pooled(ref)  # process 0 merged the parts


def _strips_done(folder: Path) -> int:
    """Strips an output folder (a raster's, or a band's) has checkpointed; -1: complete."""
    try:
        state = json.loads((folder / ".lsr_state" / "progress.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return -1 if state.get("complete") else int(state["next_strip"])


def _kill_process_1_mid(out: Path, args, folder: Path) -> list[str]:
    """Two independent processes (no coordinator) into ``out``: process 1 SIGKILLed once
    ``folder`` (one of its units) has checkpointed a strip, process 0 run to its end. Returns
    the ``distributed.*`` overrides of the run (for the reruns)."""
    dist = ["distributed.num_processes=2"]
    p0 = _start(out, args, *dist, "distributed.process_id=0")
    p1 = _start(out, args, *dist, "distributed.process_id=1")
    deadline = time.monotonic() + TIMEOUT
    while _strips_done(folder) < 1 and p1.poll() is None:
        assert time.monotonic() < deadline, "process 1 never checkpointed a strip"
        time.sleep(0.01)
    assert p1.poll() is None, "process 1 finished before it could be killed"
    p1.send_signal(signal.SIGKILL)
    p1.communicate()
    _wait(p0)
    return dist


@pytest.mark.slow
def test_killed_process_rerun_completes_the_set(scene, tmp_path):
    args, ref = scene
    pixels = [h * w for _, _, h, w in CROPS.values()]
    owner = dict(zip(CROPS, partition.assign(pixels, 2), strict=True))
    victim = max((n for n in CROPS if owner[n] == 1), key=lambda n: CROPS[n][2])
    dist = _kill_process_1_mid(tmp_path, args, tmp_path / victim)
    check = _check(tmp_path)
    assert check.returncode == 1 and victim in check.stdout, check.stdout + check.stderr
    assert "rerun process(es) [1]" in check.stdout
    _wait(_start(tmp_path, args, *dist, "distributed.process_id=1"))  # the rerun resumes
    check = _check(tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    got, want = _outputs(tmp_path), _outputs(ref)
    assert all(got[k] == want[k] for k in want), [k for k in want if got[k] != want[k]]
    assert _pooled(tmp_path) == _pooled(ref)


def _tile_folder(folder: Path) -> Path:
    """A flat Chesapeake-style folder of three tiles (96^2, 64^2, 64^2)."""
    folder.mkdir()
    geo = GeoInfo(pixel_scale=(1.0, 1.0, 0.0), tiepoints=(0, 0, 0, 612000.0, 4200000.0, 0),
                  geokeys=(1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32617))
    for seed, (name, size) in enumerate((("tile_a", 96), ("tile_b", 64), ("tile_c", 64))):
        scene = make_scene(seed, size=size, block=32)
        stem = folder / name
        write_raster(f"{stem}_naip-new.tif", np.round(scene.image * 255).astype(np.uint8),
                     geo=geo)
        write_raster(f"{stem}_nlcd.tif", np.where(scene.classes % 2 == 0, 41, 81).astype(
            np.uint8), geo=geo)
        write_raster(f"{stem}_lc.tif", (scene.labels + 1).astype(np.uint8), geo=geo)
    return folder


@pytest.mark.slow
def test_tiles_two_processes_equal_one(tmp_path):
    """The tiles path (+exp=chesapeake_wv / LILA): outputs byte-identical, merged tables equal."""
    args = ["+exp=chesapeake_wv", f"data.root={_tile_folder(tmp_path / 'data')}",
            "lsr.patch_size=3", "baselines.notebook=false", "raster.tile_sizes=[64]",
            "raster.overlap=16", "output.png=false"]
    one = tmp_path / "one"
    _wait(_start(one, args))
    assert _check(one).returncode == 0  # a one-process run checks too
    two = tmp_path / "two"
    dist = [f"distributed.coordinator=127.0.0.1:{_port()}", "distributed.num_processes=2"]
    procs = [_start(two, args, *dist, f"distributed.process_id={i}") for i in range(2)]
    stdout = [_wait(p) for p in procs]
    assert "pooled over all tiles" in stdout[0] and "pooled" not in stdout[1]
    assert [sorted(m["items"]) for m in partition.read_manifests(two).values()] == [
        ["tile_a"], ["tile_b", "tile_c"]]
    files = sorted(p.relative_to(one) for p in one.glob("tile_*/*.tif"))
    assert len(files) == 6
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (two, one))
    assert list(got["tiles"]) == list(want["tiles"]) == ["tile_a", "tile_b", "tile_c"]
    assert got["pooled"] == want["pooled"]
    assert got["eq7_pixel_weighted"] == pytest.approx(want["eq7_pixel_weighted"], rel=1e-12)
