"""The strip runner: exact stitching, resume after a crash at every strip and inside every
checkpoint (outputs compared byte for byte), input fingerprints, non-finite inputs/outputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile

from epilsr.io import strips
from epilsr.io.geotiff import RasterReader, write_raster
from epilsr.io.strips import (
    StripPlan,
    array_reader,
    label_outputs,
    read_window,
    run_strips,
)
from epilsr.metrics import NODATA_LABEL
from epilsr.windows import blend_weights, tile_grid

H, W, TILE, OVERLAP, N = 300, 100, 64, 16, 3  # 6 strips of 2 windows; 256-row tiles
NAMES = ("labels", "probs", "entropy")


class Crash(Exception):
    pass


def _softmax64(x):
    z = np.exp(3.0 * (x - x.max(-1, keepdims=True)).astype(np.float64))
    return z / z.sum(-1, keepdims=True)


def _fake(reader, crash_at=None):
    """A pointwise window model over ``tile_grid``: the stitched map must equal it.

    ``crash_at = (s, j)`` raises before window ``j`` of strip ``s``.
    """
    windows = tile_grid(H, W, tile=TILE, overlap=OVERLAP)
    th, tw = windows[0].height, windows[0].width
    weights = blend_weights((th, tw), OVERLAP)
    rows = tuple(sorted({w.row for w in windows}))
    by_strip = [[w for w in windows if w.row == r] for r in rows]

    def add_strip(s, acc, wsum, tick):
        for j, win in enumerate(by_strip[s]):
            if crash_at == (s, j):
                raise Crash(f"crash at strip {s}, window {j}")
            x = read_window("image", reader, *win)
            p = _softmax64(x).astype(np.float32)
            acc[:, win.col : win.col + tw] += p * weights[..., None]
            wsum[:, win.col : win.col + tw] += weights
            tick()
        return {"windows": len(by_strip[s])}

    return StripPlan(H, W, N, rows, th), add_strip, len(windows)


def _run(out, image, *, crash_at=None, reader=None, **kw):
    reader = reader if reader is not None else array_reader(image)
    plan, add_strip, n = _fake(reader, crash_at)
    return run_strips(plan, add_strip, who="fake", state_dir=out / ".state",
                      outputs=label_outputs(out, "", N, probs=True, entropy=True),
                      settings={"tile": TILE}, inputs={"image": reader}, total=n,
                      progress_key="windows", **kw)


def _bytes(out):
    return [(out / f"{name}.tif").read_bytes() for name in NAMES]


def _state(out):
    return json.loads((out / ".state" / "progress.json").read_text())


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).normal(size=(H, W, N)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, image):
    out = tmp_path_factory.mktemp("ref")
    run = _run(out, image)
    return out, run


def test_pointwise_model_is_stitched_exactly(reference, image):
    out, run = reference
    n_strips = len(_fake(None)[0].row_starts)
    assert run.first_strip == 0 and run.counts["windows"] == _fake(None)[2]
    want = _softmax64(image)
    probs = tifffile.imread(out / "probs.tif")
    np.testing.assert_allclose(probs, want, atol=2e-6)
    np.testing.assert_array_equal(tifffile.imread(out / "labels.tif"), want.argmax(-1))
    np.testing.assert_allclose(tifffile.imread(out / "entropy.tif"),
                               -(want * np.log(want)).sum(-1), atol=1e-5)
    state = _state(out)
    assert state["complete"] and state["next_strip"] == n_strips
    assert [p.name for p in (out / ".state").iterdir()] == ["progress.json"]
    again = _run(out, image)  # complete: nothing to do
    assert again.counts == again.resumed == run.counts


def _crash_points():
    plan = _fake(None)[0]
    n_windows = [sum(1 for w in tile_grid(H, W, tile=TILE, overlap=OVERLAP) if w.row == r)
                 for r in plan.row_starts]
    return [(s, j) for s in range(len(plan.row_starts)) for j in sorted({0, n_windows[s] - 1})]


@pytest.mark.parametrize("crash_at", _crash_points())
def test_crash_in_every_strip_resumes_bit_identically(tmp_path, image, reference, crash_at):
    with pytest.raises(Crash):
        _run(tmp_path, image, crash_at=crash_at)
    s = crash_at[0]
    if s == 0:  # nothing committed, no output opened
        assert not list(tmp_path.glob("*.tif*"))
    else:
        assert _state(tmp_path)["next_strip"] == s and not _state(tmp_path)["complete"]
        assert not list(tmp_path.glob("*.tif")) and len(list(tmp_path.glob("*.partial"))) == 3
        for partial in tmp_path.glob("*.partial"):  # a torn write after the checkpoint
            with open(partial, "ab") as f:
                f.write(b"torn tile bytes")
    run = _run(tmp_path, image)
    assert run.first_strip == s and run.resumed.get("windows", 0) < run.counts["windows"]
    assert _bytes(tmp_path) == _bytes(reference[0])
    assert not list(tmp_path.glob("*.partial*"))
    assert [p.name for p in (tmp_path / ".state").iterdir()] == ["progress.json"]


@pytest.mark.parametrize("fail", ["json", "npz", "npy"])
def test_crash_inside_every_checkpoint_resumes_bit_identically(tmp_path, image, reference,
                                                               monkeypatch, fail):
    """The k-th carry / pending-row / progress.json write fails (after the writers' partial
    files grew): the rerun truncates them to the last recorded length. Every k in turn."""
    targets = {"json": (strips, "write_json_atomic"), "npz": (strips, "save_npz_atomic"),
               "npy": (strips.RasterWriter.checkpoint.__globals__, "save_npy_atomic")}
    owner, name = targets[fail]
    real = owner[name] if isinstance(owner, dict) else getattr(owner, name)
    for k in range(1, 60, 4 if fail == "npy" else 1):  # npy: each writer in turn
        out = tmp_path / str(k)
        calls = {"n": 0}

        def flaky(*args, k=k, calls=calls, **kwargs):
            calls["n"] += 1
            if calls["n"] == k:
                raise Crash(f"crash in write {k}")
            return real(*args, **kwargs)

        if isinstance(owner, dict):
            monkeypatch.setitem(owner, name, flaky)
        else:
            monkeypatch.setattr(owner, name, flaky)
        try:
            _run(out, image)
            crashed = False
        except Crash:
            crashed = True
        finally:
            monkeypatch.undo()
        if not crashed:  # fewer than k such writes in a run
            break
        _run(out, image)
        assert _bytes(out) == _bytes(reference[0]), (fail, k)
    assert k > 2


def test_repeated_crashes_then_resume(tmp_path, image, reference):
    for crash_at in [(1, 1), (1, 0), (4, 1)]:
        with pytest.raises(Crash):
            _run(tmp_path, image, crash_at=crash_at)
    _run(tmp_path, image)
    assert _bytes(tmp_path) == _bytes(reference[0])


def test_resume_refuses_changed_array_input(tmp_path, image, reference):
    with pytest.raises(Crash):
        _run(tmp_path, image, crash_at=(4, 0))
    changed = image.copy()
    changed[260, 40, 1] += 1.0  # one value, in a strip not yet run
    with pytest.raises(ValueError, match="input image changed.*resume=False"):
        _run(tmp_path, changed)
    assert not (tmp_path / "labels.tif").exists()
    fresh = _run(tmp_path, changed, resume=False)
    assert fresh.first_strip == 0
    ref = tmp_path / "ref_changed"
    _run(ref, changed)
    assert _bytes(tmp_path) == _bytes(ref) != _bytes(reference[0])
    with pytest.raises(ValueError, match="input image changed"):  # complete run: also refused
        _run(tmp_path, image)


def test_resume_refuses_other_settings(tmp_path, image):
    with pytest.raises(Crash):
        _run(tmp_path, image, crash_at=(1, 0))
    plan, add_strip, _ = _fake(array_reader(image))
    with pytest.raises(ValueError, match="different settings"):
        run_strips(plan, add_strip, who="fake", state_dir=tmp_path / ".state",
                   outputs=label_outputs(tmp_path, "", N, probs=True, entropy=True),
                   settings={"tile": TILE + 1}, inputs={"image": array_reader(image)})


def test_raster_reader_fingerprint_and_changed_geotiff(tmp_path, image):
    path = tmp_path / "image.tif"
    write_raster(path, image, compression=None, tile=16)
    with RasterReader(path) as a, RasterReader(path) as b:
        assert a.fingerprint() == b.fingerprint()
        first = a.fingerprint()
        out = tmp_path / "out"
        with pytest.raises(Crash):
            _run(out, image, reader=a, crash_at=(2, 0))
    changed = image.copy()
    changed[260, 40, 1] += 1.0  # one pixel, rewritten: a new mtime
    write_raster(path, changed, compression=None, tile=16)
    with RasterReader(path) as c:
        with pytest.raises(ValueError, match=r"input image \(.*image.tif\) changed"):
            _run(out, changed, reader=c)
        _run(out, changed, reader=c, resume=False)
    np.testing.assert_allclose(tifffile.imread(out / "probs.tif"), _softmax64(changed),
                               atol=2e-6)
    stat = os.stat(path)
    changed[3, 3, 0] += 1.0  # same size and mtime: caught in the header / sampled tiles
    write_raster(path, changed, compression=None, tile=16)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with RasterReader(path) as d:
        assert os.stat(path).st_size == stat.st_size and d.fingerprint() != first


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_imagery_is_refused_before_any_output(tmp_path, image, bad):
    img = image.copy()
    img[3, 4, 0] = bad
    with pytest.raises(ValueError, match=r"image: window rows 0:64, cols 0:64 holds 1 NaN/inf"):
        _run(tmp_path, img)
    assert not list(tmp_path.glob("*.tif*"))
    img = image.copy()
    img[200, 30, 2] = bad  # a later strip: the finished strips stay checkpointed
    with pytest.raises(ValueError, match="NaN/inf"):
        _run(tmp_path, img)
    assert not _state(tmp_path)["complete"] and not (tmp_path / "labels.tif").exists()


def test_read_window_names_the_file(tmp_path, image):
    img = image.copy()
    img[5, 5, 1] = np.nan
    path = write_raster(tmp_path / "naip.tif", img)
    with RasterReader(path) as r, pytest.raises(ValueError, match=r"naip.tif\): window rows"):
        read_window("image_reader", r, 0, 0, 8, 8)
    assert read_window("image_reader", r_ := array_reader(img), 8, 8, 4, 4).shape == (4, 4, 3)
    assert r_.fingerprint() != array_reader(image).fingerprint()


def test_valid_mask_gives_nodata(tmp_path, image):
    mask = np.ones((H, W), bool)
    mask[10:20, 5:9] = False
    _run(tmp_path, image, valid=array_reader(mask))
    labels = tifffile.imread(tmp_path / "labels.tif")
    probs = tifffile.imread(tmp_path / "probs.tif")
    np.testing.assert_array_equal(labels == NODATA_LABEL, ~mask)
    assert np.isnan(probs[~mask]).all() and np.isfinite(probs[mask]).all()


def test_plan_and_counter_errors(tmp_path, image):
    plan, add_strip, _ = _fake(array_reader(image))
    kw = dict(who="fake", outputs=label_outputs(tmp_path, "", N, probs=False, entropy=False),
              settings={}, inputs={})
    with pytest.raises(ValueError, match="more than buffer_rows"):
        run_strips(plan._replace(buffer_rows=30), add_strip, state_dir=tmp_path / "a", **kw)
    with pytest.raises(ValueError, match="'complete' is reserved"):
        run_strips(plan, lambda *a: {"complete": 1}, state_dir=tmp_path / "b", **kw)


# ------------------------------------------------------------------ groups of strips per call


def _grouped(reader, *, compute_crash=None, add_crash=None, log=None, deferred=False):
    """The pointwise model split into ``read_strip``, ``compute_strips`` (a group of strips at
    once) and ``add_strip``: the same float32 window results, added in the same order.

    ``compute_crash = s`` raises computing the group that holds strip ``s``; ``add_crash = s``
    raises adding strip ``s`` (its group, and later strips, already computed). ``log`` records
    ``("read", s)`` / ``("add", s)`` events (reader and main thread). ``deferred``:
    ``compute_strips`` returns ``result()`` (dispatched work), the crash raised when resolved."""
    plan, _, _ = _fake(reader)
    windows = tile_grid(H, W, tile=TILE, overlap=OVERLAP)
    th, tw = windows[0].height, windows[0].width
    weights = blend_weights((th, tw), OVERLAP)
    by_strip = [[w for w in windows if w.row == r] for r in plan.row_starts]
    groups = []

    def read_strip(s):
        if log is not None:
            log.append(("read", s))
        return [(win, read_window("image", reader, *win)) for win in by_strip[s]]

    def compute_strips(items):
        groups.append([s for s, _ in items])
        if log is not None:
            log.append(("dispatch", groups[-1][0]))
        crash = compute_crash in groups[-1]
        if crash and not deferred:
            raise Crash(f"crash computing strips {groups[-1]}")

        def result():
            if crash:
                raise Crash(f"crash computing strips {[s for s, _ in items]}")
            return [[(win, _softmax64(x).astype(np.float32)) for win, x in inputs]
                    for _, inputs in items]

        return result if deferred else result()

    def add_strip(s, acc, wsum, tick, results):
        if add_crash == s:
            raise Crash(f"crash adding strip {s}")
        for win, p in results:
            acc[:, win.col : win.col + tw] += p * weights[..., None]
            wsum[:, win.col : win.col + tw] += weights
            tick()
        if log is not None:
            log.append(("add", s))
        return {"windows": len(results)}

    return plan, read_strip, compute_strips, add_strip, groups


def _run_grouped(out, image, group, **kw):
    reader = array_reader(image)
    plan, read_strip, compute_strips, add_strip, groups = _grouped(reader, **kw)
    run = run_strips(plan, add_strip, who="fake", state_dir=out / ".state",
                     outputs=label_outputs(out, "", N, probs=True, entropy=True),
                     settings={"tile": TILE}, inputs={"image": reader},
                     progress_key="windows", read_strip=read_strip,
                     compute_strips=compute_strips, strips_per_call=group)
    return run, groups


@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("group", [1, 2, 4, 6, 9])
def test_groups_of_strips_equal_one_strip_at_a_time(tmp_path, image, reference, group,
                                                     deferred):
    """Several strips per compute call, results returned or deferred: the same bytes as the
    per-strip runner (6 strips)."""
    run, groups = _run_grouped(tmp_path, image, group, deferred=deferred)
    assert groups == [list(g) for g in strips.strip_groups(0, 6, group)]
    assert run.counts == reference[1].counts
    assert _bytes(tmp_path) == _bytes(reference[0])


@pytest.mark.parametrize("group", [1, 2])
def test_deferred_results_dispatch_the_next_group_before_adding(tmp_path, image, group):
    """A deferred ``compute_strips``: group ``k + 1`` is dispatched before the first strip of
    group ``k`` is added (the device is never idle while the host adds); each group once."""
    log = []
    _, groups = _run_grouped(tmp_path, image, group, deferred=True, log=log)
    order = [e for e in log if e[0] != "read"]
    starts = [g[0] for g in groups]
    assert sorted(starts) == starts and len(set(starts)) == len(starts)
    for k, start in enumerate(starts[:-1]):
        assert order.index(("dispatch", starts[k + 1])) < order.index(("add", start))
    plain = []
    _run_grouped(tmp_path / "plain", image, group, log=plain)
    order = [e for e in plain if e[0] != "read"]  # returned results: no look-ahead
    assert order.index(("dispatch", starts[1])) > order.index(("add", starts[0]))


@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("crash", [dict(add_crash=3), dict(add_crash=5), dict(compute_crash=4),
                                   dict(add_crash=2)])
def test_crash_mid_group_resumes_bit_identically(tmp_path, image, reference, crash, deferred):
    """Groups of 3 strips (0-2, 3-5): a crash adding strip 3 or 5 (strips 4-5 / none computed
    but unwritten) or computing the group of strip 4; the checkpoint is the last strip
    written, and a rerun with other groups recomputes from there: same bytes."""
    with pytest.raises(Crash):
        _run_grouped(tmp_path, image, 3, deferred=deferred, **crash)
    s = crash.get("add_crash", 3)  # the compute crash happens before strip 3 is added
    assert _state(tmp_path)["next_strip"] == s and not _state(tmp_path)["complete"]
    run, groups = _run_grouped(tmp_path, image, 2)
    assert run.first_strip == s and groups[0][0] == s
    assert _bytes(tmp_path) == _bytes(reference[0])


@pytest.mark.parametrize("deferred", [False, True])
def test_strips_in_flight_are_bounded(tmp_path, deferred):
    """A 40-strip raster, groups of 3, a slow add: at most g + max(2, g) + 1 strips are ever
    read and not yet added, 2 g + max(2, g) + 1 with deferred results (the next group
    dispatched ahead); the bound does not grow with the height."""
    tall = np.random.default_rng(2).normal(size=(48 * 40 + 16, 40, N)).astype(np.float32)
    windows = tile_grid(*tall.shape[:2], tile=TILE, overlap=OVERLAP)
    rows = tuple(sorted({w.row for w in windows}))
    assert len(rows) == 40
    events, group = [], 3

    def read_strip(s):
        events.append(("read", s))
        return s

    def add_strip(s, acc, wsum, tick, result):
        import time

        time.sleep(0.002)  # the reader gets every chance to run ahead
        acc[:, : tall.shape[1]] += 1.0
        wsum[:, : tall.shape[1]] += 1.0
        events.append(("add", s))
        return {}

    plan = StripPlan(tall.shape[0], tall.shape[1], N, rows, TILE)
    outs = label_outputs(tmp_path, "", N, probs=False, entropy=False)
    run_strips(plan, add_strip, who="fake", state_dir=tmp_path / ".state", outputs=outs,
               settings={}, inputs={}, read_strip=read_strip,
               compute_strips=lambda items: (lambda: [s for s, _ in items]) if deferred
               else [s for s, _ in items], strips_per_call=group)
    ahead = held = 0
    for kind, _ in list(events):
        held += 1 if kind == "read" else -1
        ahead = max(ahead, held)
    assert sorted(s for k, s in events if k == "read") == list(range(40))
    assert group <= ahead <= (2 if deferred else 1) * group + max(2, group) + 1, ahead
    with pytest.raises(ValueError, match="strips_per_call: expected a positive integer"):
        run_strips(plan, add_strip, who="fake", state_dir=tmp_path / ".s2", outputs=outs,
                   settings={}, inputs={}, strips_per_call=0)
