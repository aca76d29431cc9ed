"""The train driver with ``data.stream=true`` on a tiny LILA-format region (issue 17 item 7)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from epilsr.cli.train import _changed, _run_settings
from epilsr.io import checkpoint
from tests.experiments.test_drivers import run
from tests.pipelines.test_patch_stream import lila_tree

STREAM = (
    "+exp=chesapeake",
    "model.size=12",
    "train.batch=8",
    "train.patch_sizes=[5,7]",
    "eval.every=2",
    "eval.patches=16",
    "eval.patch_size=5",
    "checkpoint.every=2",
    "checkpoint.keep=100",
    "train.devices=1",
    "data.block=16",
    "data.windows=4",
)


def _far_label_run(tmp_path, *extra):
    lila_tree(tmp_path / "lila")
    args = (*STREAM, f"data.root={tmp_path / 'lila'}", "train.steps=4", "train.label=0",
            "train.cascade=false", "data.crop=32")
    proc = run("experiments.train", *args, *extra, f"hydra.run.dir={tmp_path / 'a'}")
    assert proc.returncode == 0, proc.stderr
    return args


def test_stream_driver_far_label(tmp_path):
    """Water lies only at a far corner of the region: the streamed run trains on it (the
    cropped in-memory path would not see it) and keeps its label index in the run folder."""
    _far_label_run(tmp_path)
    assert "streamed from all 2 tiles" in (tmp_path / "a" / "train.log").read_text()
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert checkpoint.load_epitome(tmp_path / "a" / "epitome.npz").mean.shape == (1, 12, 12, 4)
    assert (tmp_path / "a" / "stream_index.npz").is_file()


@pytest.mark.slow
def test_stream_driver_resume_is_bit_identical(tmp_path):
    """A resume from step 2 (another cache size: not a training setting) ends bit-identical."""
    args = _far_label_run(tmp_path)
    ckpt = tmp_path / "a" / "checkpoints" / "E" / "checkpoint_000000002.npz"
    resumed = run("experiments.train", *args, "data.cache_bytes=0", f"resume={ckpt}",
                  f"hydra.run.dir={tmp_path / 'b'}")
    assert resumed.returncode == 0, resumed.stderr
    a = checkpoint.load_epitome(tmp_path / "a" / "epitome.npz")
    b = checkpoint.load_epitome(tmp_path / "b" / "epitome.npz")
    np.testing.assert_array_equal(np.asarray(a.mean), np.asarray(b.mean))
    np.testing.assert_array_equal(np.asarray(a.log_var), np.asarray(b.log_var))
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 4]


@pytest.mark.slow
def test_stream_driver_cascade_decides_absence_over_the_region(tmp_path):
    """The cascade trains water (only at a far corner) and skips impervious (nowhere)."""
    lila_tree(tmp_path / "lila")
    proc = run("experiments.train", *STREAM, f"data.root={tmp_path / 'lila'}", "train.steps=2",
               "train.cascade=true", "data.crop=32", f"hydra.run.dir={tmp_path / 'a'}")
    assert proc.returncode == 0, proc.stderr
    stages = {json.loads(line)["stage"] for line in
              (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()}
    assert stages == {f"label{lab}_E{s}" for lab in (0, 1, 2) for s in range(3)}
    assert "label 3 absent from the data" in (tmp_path / "a" / "train.log").read_text()


def test_run_settings_see_stream_settings_not_the_cache():
    with initialize_config_module("epilsr.cli.conf", version_base="1.3"):
        base = compose("train", ["+exp=chesapeake"])
        cache = compose("train", ["+exp=chesapeake", "data.cache_bytes=1"])
        block = compose("train", ["+exp=chesapeake", "data.block=256"])
        memory = compose("train", ["+exp=chesapeake", "data.stream=false"])
    assert base.data.stream is True
    assert _changed(_run_settings(base), _run_settings(cache)) == []
    assert _changed(_run_settings(base), _run_settings(block)) == ["data.block: 512 -> 256"]
    assert _changed(_run_settings(base), _run_settings(memory)) == ["data.stream: True -> False"]
