"""Tile-by-tile LSR survives SIGKILL: a killed and resumed run equals an uninterrupted one.

``tests/_kill_worker_lsr.py`` runs :func:`epilsr.pipelines.raster_lsr.lsr_raster` on a 320x320
synthetic scene (tile 128, overlap 32: 3 strips of 3 windows) in a subprocess. The parent polls
``<out>/.lsr_state/progress.json``, SIGKILLs the child at a seeded random moment after the first
strip is checkpointed, reruns it to completion in a fresh subprocess and compares
``labels.tif``, ``probs.tif`` and ``entropy.tif`` with an uninterrupted run, bit for bit. Every
subprocess is bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

WORKER = Path(__file__).with_name("_kill_worker_lsr.py")
OUTPUTS = ("labels.tif", "probs.tif", "entropy.tif")
N_STRIPS, N_WINDOWS = 3, 9
SLEEP = 0.25  # seconds per window read in the killed run: widens the window for the kill
TIMEOUT = 240.0  # per subprocess


def _start(out: Path, sleep: float = 0.0, group: int | None = None) -> subprocess.Popen:
    more = [] if group is None else ["--strips-per-call", str(group)]
    return subprocess.Popen(
        [sys.executable, os.fspath(WORKER), "--out", os.fspath(out), "--sleep", str(sleep),
         *more],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),  # same XLA_FLAGS for every run
    )


def _finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"worker did not finish within {timeout} s")
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{stderr[-3000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


def _read_outputs(folder: Path) -> list[np.ndarray]:
    return [tifffile.imread(folder / name) for name in OUTPUTS]


def _progress(folder: Path) -> dict | None:
    path = folder / ".lsr_state" / "progress.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


@pytest.mark.parametrize("seed, group", [(0, None), pytest.param(0, 2, marks=pytest.mark.slow)])
def test_lsr_raster_survives_sigkill(tmp_path, seed, group):
    """``group = 2``: the victim computes 2 strips per call (killed with strip 1 computed and
    perhaps unwritten); the rerun computes one strip per call: the same bytes."""
    ref_dir, out = tmp_path / "uninterrupted", tmp_path / "killed"
    reference = _start(ref_dir)  # runs alongside the victim
    victim = _start(out, sleep=SLEEP, group=group)
    delay = random.Random(seed).uniform(0.0, 6 * SLEEP)  # strips 2-3 take >= 6 * SLEEP
    if group is not None:  # at the first checkpoint: strip 1 computed with strip 0, unwritten
        delay = 0.0
    finals = [out / name for name in OUTPUTS]
    try:
        deadline = time.monotonic() + TIMEOUT
        state = None
        while time.monotonic() < deadline and victim.poll() is None:
            existing = [p.name for p in finals if p.exists()]  # before reading the state
            state = _progress(out)
            if state is None or (not state["complete"] and state["next_strip"] < N_STRIPS):
                # Outputs appear only once every strip is checkpointed: never half-written.
                assert not existing, (existing, state)
            if state is not None and state["next_strip"] >= 1:
                break
            time.sleep(0.02)
        else:
            if victim.poll() is None:
                pytest.fail(f"no strip was checkpointed within {TIMEOUT} s")
        time.sleep(delay)
        if victim.poll() is not None:
            _finish(victim)
            pytest.skip(
                f"the run finished {delay:.2f} s after its first checkpoint, before the SIGKILL "
                f"(per-window sleep {SLEEP} s too short for this machine)"
            )
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        assert victim.returncode == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        victim.stdout.close()
        victim.stderr.close()

    # State at the kill: a consistent checkpoint of at least one strip.
    state = _progress(out)
    if state is not None and state["complete"]:  # killed while exiting: nothing to resume
        _finish(reference)
        pytest.skip(f"the run completed {delay:.2f} s after its first checkpoint, before the "
                    "SIGKILL")
    assert state is not None and not state["complete"]
    assert 1 <= state["next_strip"] <= N_STRIPS
    assert state["windows_done"] == 3 * state["next_strip"]
    if state["next_strip"] < N_STRIPS:
        assert not [p.name for p in finals if p.exists()]
        for p in finals:
            assert p.with_name(p.name + ".partial").exists(), p

    run = _finish(_start(out))  # a fresh process resumes and completes the run
    assert run["windows"] == N_WINDOWS
    assert run["resumed_from"] == state["windows_done"]
    assert run["computed"] == N_WINDOWS - state["windows_done"]
    assert _finish(reference) == {
        "windows": N_WINDOWS,
        "computed": N_WINDOWS,
        "resumed_from": 0,
        "skipped": 0,
    }

    for name, got, want in zip(OUTPUTS, _read_outputs(out), _read_outputs(ref_dir), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert _progress(out)["complete"]
    assert not list(out.glob("*.partial*"))
    assert [p.name for p in (out / ".lsr_state").iterdir()] == ["progress.json"]
