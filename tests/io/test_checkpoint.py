"""Checkpoints: exact round trip, shape checks, atomic writes, kill-and-resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from epilsr import Epitome, init_epitome
from epilsr.io import checkpoint
from epilsr.train import TrainState, make_train_step, train_init

WORKER = Path(__file__).parents[1] / "_subprocess_worker.py"
OPT = optax.adam(1e-2)
STEP = make_train_step(optimizer=OPT, temperature=1.0, promotion_threshold=0.05)


def _leaves(tree) -> list[np.ndarray]:
    out = []
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.asarray(x))
    return out


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def _trained_state(key=None, steps=2) -> TrainState:
    """A 6x6x2 epitome after ``steps`` steps (one shared compilation)."""
    ep = init_epitome(jax.random.key(3), size=6, channels=2)
    state = train_init(jax.random.key(4) if key is None else key, ep, OPT)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        state, _ = STEP(state, rng.uniform(size=(4, 3, 3, 2)).astype(np.float32))
    return state


def test_round_trip_is_exact(tmp_path):
    state = _trained_state()
    assert float(jnp.max(state.counters)) > 0 and int(state.step) == 2  # nontrivial state
    path = checkpoint.save(tmp_path / "ckpt.npz", state)
    template = train_init(
        jax.random.key(0), init_epitome(jax.random.key(9), size=6, channels=2), OPT
    )
    restored = checkpoint.restore(path, template)
    assert isinstance(restored, TrainState) and isinstance(restored.params, Epitome)
    _assert_trees_equal(restored, state)
    assert jnp.issubdtype(restored.key.dtype, jax.dtypes.prng_key)
    assert restored.step.dtype == jnp.int32
    meta = checkpoint.read_metadata(path)
    assert meta["step"] == 2 and meta["epitome_shape"] == [1, 6, 6, 2]
    assert meta["epilsr_version"] and meta["leaves"][".params.mean"]["shape"] == [1, 6, 6, 2]


def test_round_trip_raw_uint32_key(tmp_path):
    state = _trained_state(key=jax.random.PRNGKey(5), steps=1)
    checkpoint.save(tmp_path / "c.npz", state)
    template = train_init(jax.random.PRNGKey(0), state.params, OPT)
    restored = checkpoint.restore(tmp_path / "c.npz", template)
    _assert_trees_equal(restored, state)
    assert restored.key.dtype == jnp.uint32


def test_shape_mismatch_is_refused(tmp_path):
    checkpoint.save(tmp_path / "c.npz", _trained_state(steps=1))
    template = train_init(
        jax.random.key(0), init_epitome(jax.random.key(1), size=8, channels=2), OPT
    )
    with pytest.raises(ValueError, match=r"\(1, 6, 6, 2\).*\(1, 8, 8, 2\)"):
        checkpoint.restore(tmp_path / "c.npz", template)
    # Any other leaf shape difference (here the counters) is refused too, naming both shapes.
    good = train_init(jax.random.key(0), init_epitome(jax.random.key(1), size=6, channels=2), OPT)
    bad = good._replace(counters=jnp.zeros((1, 6, 5)))
    with pytest.raises(ValueError, match=r"counters.*\(1, 6, 6\).*\(1, 6, 5\)"):
        checkpoint.restore(tmp_path / "c.npz", bad)
    # A different optimizer (different state structure) is refused.
    sgd_template = train_init(jax.random.key(0), good.params, optax.sgd(0.1))
    with pytest.raises(ValueError, match="template lacks"):
        checkpoint.restore(tmp_path / "c.npz", sgd_template)


def test_failed_write_leaves_old_checkpoint_intact(tmp_path, monkeypatch):
    old = _trained_state(steps=1)
    path = checkpoint.save(tmp_path / "ckpt.npz", old)
    before = path.read_bytes()

    def crash(fileobj, arrays):
        fileobj.write(b"PK\x03\x04 partial zip")  # a partial archive, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_npz", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, _trained_state(steps=2))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]  # temp file removed
    _assert_trees_equal(checkpoint.restore(path, old), old)


def test_latest_ignores_temporary_files(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    assert checkpoint.latest(tmp_path / "missing") is None
    state = _trained_state(steps=1)
    for step in (3, 12, 7):
        checkpoint.save(checkpoint.checkpoint_path(tmp_path, step), state)
    (tmp_path / ".checkpoint_000000099.npz.abc.tmp").write_bytes(b"partial")  # killed writer
    (tmp_path / "checkpoint_notes.txt").write_text("x")
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoint_000000012.npz"


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif how == "flipped":  # one byte of an array member changed: the zip CRC no longer matches
        i = data.index(b"counters") + 200
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    else:  # a valid .npz, but not an epilsr checkpoint
        np.savez(path, a=np.zeros(3))


@pytest.mark.parametrize("how", ["truncated", "empty", "random", "flipped", "foreign"])
def test_damaged_checkpoint_is_named_and_never_suggests_pickle(tmp_path, how):
    state = _trained_state(steps=1)
    path = checkpoint.save(tmp_path / "ckpt.npz", state)
    _damage(path, how)
    calls = [lambda: checkpoint.restore(path, state), lambda: checkpoint.verify(path)]
    if how != "flipped":  # there the metadata alone is intact
        calls.append(lambda: checkpoint.read_metadata(path))
    for call in calls:
        with pytest.raises(checkpoint.CheckpointError) as info:
            call()
        msg = str(info.value)
        assert str(path) in msg and "pickle" not in msg and "\n" not in msg


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        checkpoint.restore(tmp_path / "nothere.npz", _trained_state(steps=1))


def test_newer_format_version_is_refused(tmp_path, monkeypatch):
    state = _trained_state(steps=1)
    monkeypatch.setattr(checkpoint, "_FORMAT_VERSION", 2)
    path = checkpoint.save(tmp_path / "ckpt.npz", state)
    monkeypatch.setattr(checkpoint, "_FORMAT_VERSION", 1)
    with pytest.raises(checkpoint.CheckpointError, match="format_version 2"):
        checkpoint.restore(path, state)


@pytest.mark.parametrize("how", ["truncated", "empty", "random"])
def test_restore_latest_falls_back_to_the_newest_readable(tmp_path, how, caplog):
    older, newer = _trained_state(steps=1), _trained_state(steps=2)
    checkpoint.save(checkpoint.checkpoint_path(tmp_path, 1), older)
    bad = checkpoint.save(checkpoint.checkpoint_path(tmp_path, 2), newer)
    _damage(bad, how)
    assert checkpoint.latest(tmp_path) == bad  # by name
    assert checkpoint.latest(tmp_path, readable=True) == checkpoint.checkpoint_path(tmp_path, 1)
    with caplog.at_level("WARNING", logger="epilsr.checkpoint"):
        state, path = checkpoint.restore_latest(tmp_path, newer)
    assert path == checkpoint.checkpoint_path(tmp_path, 1)
    _assert_trees_equal(state, older)
    assert bad.name in caplog.text and "skipping unreadable checkpoint" in caplog.text


def test_restore_latest_with_nothing_readable(tmp_path):
    state = _trained_state(steps=1)
    assert checkpoint.restore_latest(tmp_path, state) == (state, None)
    _damage(checkpoint.save(checkpoint.checkpoint_path(tmp_path, 5), state), "empty")
    with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint"):
        checkpoint.restore_latest(tmp_path, state)


def test_restore_latest_does_not_skip_a_template_mismatch(tmp_path):
    checkpoint.save(checkpoint.checkpoint_path(tmp_path, 1), _trained_state(steps=1))
    other = train_init(jax.random.key(0), init_epitome(jax.random.key(9), size=5, channels=2), OPT)
    with pytest.raises(ValueError, match="epitome shape") as info:
        checkpoint.restore_latest(tmp_path, other)
    assert not isinstance(info.value, checkpoint.CheckpointError)


def test_epitome_file(tmp_path):
    ep = init_epitome(jax.random.key(0), size=5, channels=3, layers=2)
    path = checkpoint.save_epitome(tmp_path / "sub" / "epitome.npz", ep)
    loaded = checkpoint.load_epitome(path)
    _assert_trees_equal(loaded, ep)
    with np.load(path) as z:  # plain NumPy is enough to read it
        np.testing.assert_array_equal(z["mean"], np.asarray(ep.mean))
    assert checkpoint.read_metadata(path)["shape"] == [2, 5, 5, 3]
    np.savez(tmp_path / "other.npz", mean=np.zeros((1, 2, 2, 1)))
    with pytest.raises(ValueError, match="missing arrays"):
        checkpoint.load_epitome(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="epilsr.checkpoint"):
        checkpoint.restore(path, _trained_state(steps=1))


def _worker(cache: Path, *args) -> subprocess.Popen:
    # A persistent compilation cache shared by the workers: only the first one compiles.
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return subprocess.Popen(
        [sys.executable, str(WORKER), "train", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"worker timed out\n{out}\n{err}")
    assert proc.returncode == 0, f"worker failed ({proc.returncode})\n{out}\n{err}"
    return out


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    steps, every = 16, 4
    cache = tmp_path / "jax_cache"
    # Uninterrupted reference run (it also fills the compilation cache).
    out = _finish(
        _worker(
            cache,
            "--ckpt-dir",
            tmp_path / "a",
            "--out",
            tmp_path / "a.npz",
            "--steps",
            steps,
            "--every",
            every,
        )
    )
    assert "START 0" in out and f"DONE {steps}" in out

    # Interrupted run, slowed down so that SIGKILL lands mid-run after two checkpoints.
    interrupted = _worker(
        cache,
        "--ckpt-dir",
        tmp_path / "b",
        "--out",
        tmp_path / "b.npz",
        "--steps",
        steps,
        "--every",
        every,
        "--sleep",
        0.25,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        found = checkpoint.latest(tmp_path / "b")
        if found is not None and found.name >= "checkpoint_000000008.npz":
            break
        if interrupted.poll() is not None:
            pytest.fail("interrupted worker ended early:\n" + interrupted.communicate()[1])
        time.sleep(0.02)
    else:
        interrupted.kill()
        pytest.fail("no checkpoint appeared")
    os.kill(interrupted.pid, signal.SIGKILL)
    interrupted.communicate(timeout=30)
    assert interrupted.returncode == -signal.SIGKILL
    assert not (tmp_path / "b.npz").exists()  # it really died mid-run
    resumed_from = int(checkpoint.read_metadata(checkpoint.latest(tmp_path / "b"))["step"])
    assert 2 * every <= resumed_from < steps

    out = _finish(
        _worker(
            cache,
            "--ckpt-dir",
            tmp_path / "b",
            "--out",
            tmp_path / "b.npz",
            "--steps",
            steps,
            "--every",
            every,
        )
    )
    assert f"START {resumed_from}" in out and f"DONE {steps}" in out

    template = train_init(
        jax.random.key(0), init_epitome(jax.random.key(1), size=8, channels=2), OPT
    )
    a = checkpoint.restore(tmp_path / "a.npz", template)
    b = checkpoint.restore(tmp_path / "b.npz", template)
    assert int(a.step) == int(b.step) == steps
    _assert_trees_equal(a, b)  # bit-identical: parameters, Adam moments, counters, step, key
