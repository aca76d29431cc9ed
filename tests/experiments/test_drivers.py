"""The Hydra drivers end to end, in subprocesses, on tiny configurations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from epilsr.data.chesapeake import data_root
from epilsr.io import checkpoint

REPO = Path(__file__).resolve().parents[2]


def run(module: str, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_lsr_driver_on_demo_scene(tmp_path):
    proc = run("experiments.lsr", "data.size=128", "cpu_devices=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "cpu_devices=3: 3 CPU devices" in proc.stdout + proc.stderr  # over XLA_FLAGS' 4
    assert "self-epitomic LSR" in proc.stdout and "paint each coarse cell" in proc.stdout
    assert "published notebook EM" in proc.stdout
    results = json.loads((tmp_path / "metrics.json").read_text())
    pooled = {r["method"]: r for r in results["pooled"]}
    assert pooled["lsr"]["accuracy"] > pooled["paint"]["accuracy"]
    assert pooled["lsr"]["window"] == 256 and set(pooled) == {"paint", "notebook", "lsr"}
    eq7 = results["tiles"]["synthetic_seed0_128"]["eq7"]  # Eq. 7 of paint / LSR / truth maps
    assert set(eq7) == {"paint", "lsr", "truth"} and all(v < 0 for v in eq7.values())
    assert eq7["lsr"] > eq7["paint"] and "Eq. 7" in proc.stdout
    assert (tmp_path / "synthetic_seed0_128.png").exists()
    labels = tifffile.imread(tmp_path / "synthetic_seed0_128" / "lsr_W128_labels.tif")
    assert labels.shape == (128, 128) and labels.dtype == np.uint8


def test_lsr_driver_windows_and_georeferencing(tmp_path):
    """A flat folder of georeferenced tiles: every window size runs, outputs keep the geo tags."""
    from epilsr.data.synthetic import make_scene
    from epilsr.io.geotiff import GeoInfo, read_geoinfo, write_raster

    data = tmp_path / "data"
    data.mkdir()
    geo = GeoInfo(pixel_scale=(1.0, 1.0, 0.0), tiepoints=(0, 0, 0, 612000.0, 4200000.0, 0),
                  geokeys=(1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32617))
    scene = make_scene(3, size=96, block=32)
    stem = data / "tile_a"
    write_raster(f"{stem}_naip-new.tif", np.round(scene.image * 255).astype(np.uint8), geo=geo)
    nlcd = np.where(scene.classes % 2 == 0, 41, 81).astype(np.uint8)  # forest / pasture
    write_raster(f"{stem}_nlcd.tif", nlcd, geo=geo)
    write_raster(f"{stem}_lc.tif", (scene.labels + 1).astype(np.uint8), geo=geo)
    out = tmp_path / "out"
    proc = run("experiments.lsr", "+exp=chesapeake_wv", f"data.root={data}", "lsr.patch_size=3",
               "baselines.notebook=false", "raster.tile_sizes=[64,128]", "raster.overlap=16",
               "output.probs=true", f"hydra.run.dir={out}")  # notebook: the demo-scene test
    assert proc.returncode == 0, proc.stderr
    pooled = json.loads((out / "metrics.json").read_text())["pooled"]
    assert {(r["method"], r["window"]) for r in pooled} == {
        ("paint", None), ("lsr", 64), ("lsr", 128)}
    for name in ("lsr_W64_labels.tif", "lsr_W96_labels.tif", "lsr_W96_probs.tif"):
        got = read_geoinfo(out / "tile_a" / name)
        assert got.epsg == 32617 and got.tiepoints == geo.tiepoints, name


def test_lsr_driver_bad_input_is_one_line(tmp_path):
    proc = run(
        "experiments.lsr",
        "+exp=chesapeake_wv",
        f"data.root={tmp_path / 'missing'}",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert "is not a folder" in proc.stderr


TRAIN = (
    "+exp=demo",
    "model.size=24",
    "train.steps=12",
    "train.batch=8",
    "train.patch_sizes=[5,7]",
    "eval.every=4",
    "eval.patches=16",
    "eval.patch_size=5",
    "checkpoint.every=3",
    "train.devices=1",
)


def _same_epitome(a: Path, b: Path) -> None:
    a, b = checkpoint.load_epitome(a), checkpoint.load_epitome(b)
    np.testing.assert_array_equal(np.asarray(a.mean), np.asarray(b.mean))
    np.testing.assert_array_equal(np.asarray(a.log_var), np.asarray(b.log_var))
    np.testing.assert_array_equal(np.asarray(a.prior_logits), np.asarray(b.prior_logits))


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_driver_writes_outputs_and_resumes(tmp_path):
    """A 12-step run writes its outputs; a run resumed from its step-6 checkpoint ends with the
    same epitome and logs steps 7..12 only (the SIGKILL variant is the slow test below; the
    kill itself is tests/io/test_checkpoint.py::test_kill_and_resume_matches_uninterrupted_run)."""
    a = tmp_path / "a"
    proc = run("experiments.train", *TRAIN, "checkpoint.keep=100", f"hydra.run.dir={a}")
    assert proc.returncode == 0, proc.stderr
    assert _steps(a) == list(range(1, 13))
    epitome = checkpoint.load_epitome(a / "epitome.npz")
    assert epitome.mean.shape == (1, 24, 24, 4)
    assert (a / "epitome.png").exists() and (a / "E_epitome.png").exists()
    ckpt = a / "checkpoints" / "E" / "checkpoint_000000006.npz"
    b = tmp_path / "b"
    resumed = run("experiments.train", *TRAIN, f"resume={ckpt}", f"hydra.run.dir={b}")
    assert resumed.returncode == 0, resumed.stderr
    _same_epitome(a / "epitome.npz", b / "epitome.npz")
    assert _steps(b) == list(range(7, 13))


@pytest.mark.slow  # 3 runs (~28 s); the default suite resumes from a checkpoint (test above)
def test_train_driver_kill_and_resume(tmp_path):
    """SIGKILL mid-run, resume from the checkpoints: same final epitome as an uninterrupted run."""
    straight = tmp_path / "straight"
    assert run("experiments.train", *TRAIN, f"hydra.run.dir={straight}").returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.train",
            *TRAIN,
            "checkpoint.keep=100",
            f"hydra.run.dir={killed}",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = killed / "checkpoints" / "E"
    deadline = time.time() + 240
    while time.time() < deadline and not list(ckpts.glob("checkpoint_*.npz")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (killed / "epitome.npz").exists():
        pytest.skip("the run finished before it could be killed (machine too fast)")
    resumed = run("experiments.train", *TRAIN, f"resume={ckpts}", f"hydra.run.dir={killed}")
    assert resumed.returncode == 0, resumed.stderr
    _same_epitome(straight / "epitome.npz", killed / "epitome.npz")
    assert _steps(killed) == list(range(1, 13))  # no lost or repeated steps in the log either


@pytest.mark.slow  # 4 forced devices on 2 busy cores: XLA's 40 s collective rendezvous can time out
def test_train_driver_sharded_and_cascade(tmp_path):
    """Data parallel over 4 forced CPU devices, and the label cascade E0 -> E1 -> E2 + mixture."""
    overrides = [o for o in TRAIN if not o.startswith("train.devices")]
    proc = run(
        "experiments.train",
        *overrides,
        "train.devices=4",
        "train.steps=6",
        "train.cascade=true",
        "train.label=1",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())["heldout"]
    assert sorted(results) == ["label1_E0", "label1_E1", "label1_E2"]
    epitome = checkpoint.load_epitome(tmp_path / "epitome.npz")
    assert epitome.mean.shape == (2, 24, 24, 4)  # uniform mixture of E1 and E2


@pytest.mark.slow  # the 2-process sharded step itself is tests/test_parallel.py (default suite)
def test_train_driver_two_processes(tmp_path):
    """Two processes on loopback (jax.distributed, gloo): one global mesh, process 0 writes."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.train",
                *TRAIN[:-1],
                "train.steps=4",
                f"distributed.coordinator=127.0.0.1:{port}",
                "distributed.num_processes=2",
                f"distributed.process_id={i}",
                f"hydra.run.dir={tmp_path / str(i)}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert (tmp_path / "0" / "epitome.npz").exists()
    assert not (tmp_path / "1" / "epitome.npz").exists()
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "0" / "metrics.jsonl").read_text().split("\n")
        if x
    ]
    assert steps == [1, 2, 3, 4]


def _north_and_south(root: Path) -> None:
    from tests.data.test_chesapeake import _fake_lila

    _fake_lila(root, state="wv", split="train")  # South: must not be read
    _fake_lila(root, state="pa", year=2013, split="test", names=("m_9_sw_18_1",))


def test_lsr_driver_reads_lila_north(tmp_path):
    """+exp=chesapeake: the LSR driver's tiles are the North test split of a LILA-style tree
    (raster.states), loaded as the driver loads them (the run itself: the slow test below)."""
    from hydra import compose, initialize_config_module

    from epilsr.cli.common import iter_tiles
    from epilsr.cli.lsr import tile_data

    _north_and_south(tmp_path / "lila")
    with initialize_config_module("epilsr.cli.conf", version_base="1.3"):
        cfg = compose("config", ["+exp=chesapeake", f"data.root={tmp_path / 'lila'}"])
    tiles = list(iter_tiles(tile_data(cfg)))
    assert [t.name for t in tiles] == ["m_9_sw_18_1"]
    assert tiles[0].classes.shape == tiles[0].image.shape[:2] and tiles[0].labels is not None
    assert [t.name for t in iter_tiles(cfg.data)] == ["m_1_nw_17_1", "m_2_ne_17_1"]  # South


@pytest.mark.slow  # LSR runs on tiles: the two driver tests above; the North tiles: just above
def test_lsr_driver_on_lila_north(tmp_path):
    """+exp=chesapeake runs LSR on the North test split of a LILA-style tree (raster.states)."""
    _north_and_south(tmp_path / "lila")
    out = tmp_path / "out"
    proc = run("experiments.lsr", "+exp=chesapeake", f"data.root={tmp_path / 'lila'}",
               "lsr.patch_size=3", "baselines.notebook=false", "raster.tile_sizes=[32]",
               "raster.overlap=8", f"hydra.run.dir={out}")  # window sizes: the test above
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "metrics.json").read_text())
    assert list(results["tiles"]) == ["m_9_sw_18_1"]
    assert {r["window"] for r in results["pooled"] if r["method"] == "lsr"} == {32}
    assert (out / "m_9_sw_18_1" / "lsr_W32_labels.tif").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (data_root() / "consep").is_dir(), reason="needs ../shared/data/consep")
def test_til_driver_tiny_run(tmp_path):
    """The TIL driver's stages run end to end on real CoNSeP patches (tiny settings)."""
    res = subprocess.run(
        [sys.executable, "-m", "experiments.til", "data.eval_patches=4", "epitome.steps=5",
         "epitome.batch=8", "embed.n_patches=500", "self.eval_patches=2", "eval.n_boot=10",
         "eval.pictures=1", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"mean hematoxylin", "div epitomic LSR @64", "self-epitomic LSR @128"} <= set(
        results["methods"])
    assert len(list(tmp_path.glob("*.png"))) == 3
