"""Drivers with hostile and unlucky inputs (issue 18): each case ends as one line naming the
file or argument with exit 2, or is handled as documented; never a silent wrong answer."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import tifffile

from epilsr.io import checkpoint
from epilsr.io.lock import LOCK_NAME
from tests.experiments.test_drivers import run


def _one_line(proc, *needles: str) -> str:
    """The driver failed with exit 2 and exactly one ``error:`` line holding every needle."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _data(tmp_path, image, *, csv: str | None = None) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    h, w = image.shape[:2]
    tifffile.imwrite(data / "t_naip-new.tif", image, photometric="rgb", extrasamples=[0])
    tifffile.imwrite(data / "t_nlcd.tif", np.full((h, w), 41, np.uint8))
    if csv is not None:
        (data / "nlcd_label_priors.csv").write_text(csv)
    return data


LSR = ("+exp=chesapeake_wv", "lsr.patch_size=3", "notebook.patch_size=3",
       "raster.tile_sizes=[32]", "raster.overlap=8")


def test_nan_tile_exits_2_naming_the_file(tmp_path):
    image = np.random.default_rng(0).uniform(size=(32, 32, 4)).astype(np.float32)
    image[4:6, 7, :] = np.nan
    data = _data(tmp_path, image)
    proc = run("experiments.lsr", *LSR, f"data.root={data}", f"hydra.run.dir={tmp_path / 'o'}")
    _one_line(proc, str(data / "t_naip-new.tif"), "NaN/inf pixel values")
    assert not list((tmp_path / "o").glob("t/*.tif"))  # refused before any output


def test_corrupted_deflate_tile_exits_2_naming_the_file(tmp_path):
    data = _data(tmp_path, np.zeros((8, 8, 4), np.uint8))
    path = data / "t_naip-new.tif"
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 4), dtype=np.uint8)
    tifffile.imwrite(path, image, compression="zlib", tile=(16, 16), photometric="rgb",
                     extrasamples=[0])
    with tifffile.TiffFile(path) as tif:
        off, cnt = tif.pages[0].dataoffsets[5], tif.pages[0].databytecounts[5]
    raw = bytearray(path.read_bytes())
    raw[off : off + cnt] = bytes((b * 7 + 13) % 256 for b in raw[off : off + cnt])
    path.write_bytes(bytes(raw))
    proc = run("experiments.lsr", *LSR, f"data.root={data}", f"hydra.run.dir={tmp_path / 'o'}")
    _one_line(proc, str(path), "cannot decode the pixel data")


def test_duplicate_table_row_exits_2_naming_file_and_line(tmp_path):
    from epilsr.data import chesapeake

    shipped = Path(chesapeake.__file__).with_name("nlcd_label_priors.csv").read_text()
    csv = shipped + "41,deciduous forest,0.00,0.10,0.86,0.04,0.03,0.19,0.16,0.07\n"
    data = _data(tmp_path, np.zeros((32, 32, 4), np.uint8), csv=csv)
    proc = run("experiments.lsr", *LSR, f"data.root={data}", f"hydra.run.dir={tmp_path / 'o'}")
    _one_line(proc, str(data / "nlcd_label_priors.csv"), "NLCD code 41 repeats line 10")


def test_pixel_limit_from_the_config(tmp_path):
    data = _data(tmp_path, np.zeros((32, 32, 4), np.uint8))
    proc = run("experiments.lsr", *LSR, f"data.root={data}", "data.max_pixels=1000",
               f"hydra.run.dir={tmp_path / 'o'}")
    _one_line(proc, str(data / "t_naip-new.tif"), "exceeds data.max_pixels=1000")


def test_second_run_into_a_locked_folder_refuses_before_touching_it(tmp_path):
    out = tmp_path / "out"
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text("winner: settings\n")
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                             "started": "now"}))
    proc = run("experiments.lsr", "data.size=64", f"hydra.run.dir={out}")
    _one_line(proc, str(out), f"another run (pid {os.getpid()}")
    assert (out / ".hydra" / "config.yaml").read_text() == "winner: settings\n"
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, ".hydra"]


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    proc = run("experiments.lsr", "data.size=64", f"hydra.run.dir={tmp_path / 'taken' / 'out'}")
    _one_line(proc, "hydra.run.dir", str(tmp_path / "taken"), "is a file")


def test_read_only_output_folder():
    target = Path("/sys/epilsr_hostile_test/out")  # sysfs: mkdir refused even for root
    if os.access("/sys", os.W_OK) and not Path("/sys").is_mount():
        pytest.skip("no read-only mount to write into")
    proc = run("experiments.lsr", "data.size=64", f"hydra.run.dir={target}")
    _one_line(proc, "hydra.run.dir: cannot create", str(target))


TRAIN = ("+exp=demo", "model.size=16", "train.steps=4", "train.batch=8", "train.patch_sizes=[5]",
         "eval.every=2", "eval.patches=8", "eval.patch_size=5", "checkpoint.every=2",
         "train.devices=1")


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # four short training runs (~80 s on 2 busy cores)
def test_train_rerun_falls_back_refuses_other_settings_and_starts_a_new_log(tmp_path):
    out = tmp_path / "run"
    first = run("experiments.train", *TRAIN, f"hydra.run.dir={out}")
    assert first.returncode == 0, first.stderr[-3000:]
    want = checkpoint.load_epitome(out / "epitome.npz")
    ckpts = out / "checkpoints" / "E"
    assert sorted(p.name for p in ckpts.glob("*.npz")) == [
        "checkpoint_000000002.npz", "checkpoint_000000004.npz"]

    # (1) a corrupted latest checkpoint and a killed writer's leftovers: rerun (resume=true)
    newest = ckpts / "checkpoint_000000004.npz"
    newest.write_bytes(newest.read_bytes()[:100])
    (ckpts / ".checkpoint_000000006.npz.x1.tmp").write_bytes(b"partial")
    (out / ".results.json.tmp").write_text("{")
    (out / "epitome.npz").unlink()
    again = run("experiments.train", *TRAIN, f"hydra.run.dir={out}")
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr  # Hydra logs to stdout
    assert "skipping unreadable checkpoint" in said and newest.name in said
    got = checkpoint.load_epitome(out / "epitome.npz")
    np.testing.assert_array_equal(np.asarray(got.mean), np.asarray(want.mean))  # from step 2
    assert _steps(out) == [1, 2, 3, 4]
    assert not list(out.rglob("*.tmp"))

    # (2) other settings into the same folder: refused, nothing moved
    other = run("experiments.train", *TRAIN, "model.size=12", f"hydra.run.dir={out}")
    _one_line(other, "resume:", str(out), "model.size: 16 -> 12", "resume=false")
    assert _steps(out) == [1, 2, 3, 4]

    # (3) resume=false: a new log; the old run moved aside, not appended to
    fresh = run("experiments.train", *TRAIN, "train.steps=2", "resume=false",
                f"hydra.run.dir={out}")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert _steps(out) == [1, 2]
    old = out / "previous_run_1"
    assert _steps(old) == [1, 2, 3, 4] and (old / "checkpoints" / "E").is_dir()
    assert sorted(p.name for p in ckpts.glob("*.npz")) == ["checkpoint_000000002.npz"]
    shutil.rmtree(out)


def _raise(err):
    def main():
        raise err

    return main


@pytest.mark.parametrize("err, needle", [
    (FileExistsError(17, "File exists", "/out/x.tif"), "FileExistsError: [Errno 17] File exists"),
    (PermissionError(30, "Read-only file system", "/ro/out"), "Read-only file system: '/ro/out'"),
    (MemoryError(), "out of memory (MemoryError)"),
    (ValueError("t.tif: bad\nthing"), "t.tif: bad thing"),
])
def test_one_line_handler_catches_what_escaped(monkeypatch, capsys, err, needle):
    from experiments.common import one_line_errors

    monkeypatch.setattr("sys.argv", ["driver"])
    with pytest.raises(SystemExit) as info:
        one_line_errors(_raise(err))()
    assert info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and needle in stderr


def test_one_line_handler_imagecodecs_and_debug(monkeypatch, capsys):
    imagecodecs = pytest.importorskip("imagecodecs")
    from experiments.common import one_line_errors

    monkeypatch.setattr("sys.argv", ["driver"])
    with pytest.raises(SystemExit):
        one_line_errors(_raise(imagecodecs.DeflateError("libdeflate_zlib_decompress", 1)))()
    assert "LIBDEFLATE_BAD_DATA" in capsys.readouterr().err
    with pytest.raises(TypeError):  # a bug, not a user error: the traceback stays
        one_line_errors(_raise(TypeError("bug")))()
    monkeypatch.setattr("sys.argv", ["driver", "debug=true"])
    with pytest.raises(ValueError):
        one_line_errors(_raise(ValueError("x")))()
