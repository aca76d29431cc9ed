"""Reader thread ahead and writer thread behind the strip runner: same bytes as the
single-threaded order, errors in either thread surface with their message, no thread leaks,
and a crash in a thread resumes bit-identically."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from epilsr.io import strips
from epilsr.io.strips import StripPlan, array_reader, iter_strips, label_outputs, run_strips
from epilsr.io.threads import ReadAhead, WriteBehind
from epilsr.windows import blend_weights, tile_grid

H, W, TILE, OVERLAP, N = 300, 100, 64, 16, 3
NAMES = ("labels", "probs", "entropy")


class Crash(Exception):
    pass


def _softmax64(x):
    z = np.exp(3.0 * (x - x.max(-1, keepdims=True)).astype(np.float64))
    return z / z.sum(-1, keepdims=True)


def _pieces(image, read_crash=None, seen=None):
    """A pointwise model split into ``read_strip`` (reader thread) and ``add_strip``."""
    windows = tile_grid(H, W, tile=TILE, overlap=OVERLAP)
    th, tw = windows[0].height, windows[0].width
    weights = blend_weights((th, tw), OVERLAP)
    rows = tuple(sorted({w.row for w in windows}))
    by_strip = [[w for w in windows if w.row == r] for r in rows]

    def read_strip(s):
        if seen is not None:
            seen.append((s, threading.current_thread().name))
        if read_crash == s:
            raise Crash(f"cannot read strip {s}")
        return [(win, image[win.row : win.row + th, win.col : win.col + tw]) for win in
                by_strip[s]]

    def add_strip(s, acc, wsum, tick, inputs=None):
        inputs = read_strip(s) if inputs is None else inputs
        for win, x in inputs:
            acc[:, win.col : win.col + tw] += _softmax64(x).astype(np.float32) * weights[
                ..., None]
            wsum[:, win.col : win.col + tw] += weights
            tick()
        return {"windows": len(inputs)}

    return StripPlan(H, W, N, rows, th), read_strip, add_strip


def _run(out, image, *, threaded=True, read_crash=None, seen=None):
    plan, read_strip, add_strip = _pieces(image, read_crash, seen)
    return run_strips(plan, add_strip, who="fake", state_dir=out / ".state",
                      outputs=label_outputs(out, "", N, probs=True, entropy=True),
                      settings={"tile": TILE}, inputs={"image": array_reader(image)},
                      read_strip=read_strip if threaded else None)


def _bytes(out):
    return [(out / f"{name}.tif").read_bytes() for name in NAMES]


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(1).normal(size=(H, W, N)).astype(np.float32)


def _threads():
    return {t for t in threading.enumerate() if t.name.startswith("epilsr-")}


def test_threaded_equals_inline_and_reads_in_a_thread(tmp_path, image):
    seen = []
    _run(tmp_path / "a", image, seen=seen)
    assert [s for s, _ in seen] == list(range(len(seen)))  # in order, each once
    assert {name for _, name in seen} == {"epilsr-read"}
    _run(tmp_path / "b", image, threaded=False)
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    assert not _threads()


def test_iter_strips_with_reader_thread(image):
    plan, read_strip, add_strip = _pieces(image)
    a = [p for _, p, _, _ in iter_strips(plan, add_strip, read_strip=read_strip)]
    b = [p for _, p, _, _ in iter_strips(plan, add_strip)]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    gen = iter_strips(plan, add_strip, read_strip=read_strip)
    next(gen)
    gen.close()  # stopped early: the reader thread is joined
    assert not _threads()


@pytest.mark.parametrize("s", [0, 3])
def test_error_in_reader_thread(tmp_path, image, s):
    ref = tmp_path / "ref"
    _run(ref, image)
    out = tmp_path / "out"
    with pytest.raises(Crash, match=f"cannot read strip {s}"):
        _run(out, image, read_crash=s)
    assert not _threads()
    if s == 0:
        assert not list(out.glob("*.tif*"))
    else:  # the strips before were written and checkpointed
        run = _run(out, image)
        assert run.first_strip == s
        assert _bytes(out) == _bytes(ref)


@pytest.mark.parametrize("k", [1, 4])
def test_error_in_writer_thread(tmp_path, image, monkeypatch, k):
    ref = tmp_path / "ref"
    _run(ref, image)
    real, calls = strips.write_outputs, {"n": 0}

    def failing(*args, **kwargs):
        assert threading.current_thread().name == "epilsr-write"
        calls["n"] += 1
        if calls["n"] == k:
            raise Crash(f"disk full at write {k}")
        return real(*args, **kwargs)

    monkeypatch.setattr(strips, "write_outputs", failing)
    out = tmp_path / "out"
    with pytest.raises(Crash, match=f"disk full at write {k}"):
        _run(out, image)
    monkeypatch.undo()
    assert not _threads()
    assert not list(out.glob("*.tif"))  # no output completed
    _run(out, image)
    assert _bytes(out) == _bytes(ref)


def test_read_ahead_and_write_behind_units():
    with ReadAhead(lambda s: s * s, 2, 6, depth=1) as r:
        assert [r.get(s) for s in range(2, 6)] == [4, 9, 16, 25]
    with ReadAhead(lambda s: s, 0, 5) as r, pytest.raises(ValueError, match="expected item 0"):
        r.get(1)
    done = []
    w = WriteBehind(depth=1)
    for i in range(5):
        w.submit(lambda i=i: done.append(i))
    w.finish()
    assert done == list(range(5))
    w = WriteBehind()
    w.submit(lambda: 1 / 0)
    w.submit(lambda: done.append("skipped"))
    with pytest.raises(ZeroDivisionError):
        w.finish()
    assert "skipped" not in done and not _threads()
    with pytest.raises(ValueError, match="depth"):
        WriteBehind(depth=0)
