"""Batched, sharded windows: bit-identical to per-window calls and to one device
(4 forced CPU devices, tests/conftest.py)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import tifffile

from epilsr.data.synthetic import make_scene
from epilsr.parallel import data_mesh
from epilsr.pipelines.batching import WindowBatches
from epilsr.pipelines.raster_lsr import array_reader, lsr_raster
from epilsr.self_epitomic import self_epitomic_lsr

LSR = dict(patch_size=5, downsample=2)


@pytest.fixture(scope="module")
def scene():
    s = make_scene(5, size=(192, 224), block=32)
    image = (s.image * 255).round().astype(np.uint8)
    return image, s.classes.astype(np.int32), np.asarray(s.label_given_class, np.float32)


def test_four_devices_are_forced():
    assert len(jax.local_devices()) == 4


@pytest.mark.slow  # covered in the default suite through lsr_raster: 4 devices, padded
# batches == one window per call (test_lsr_raster_sharded_equals_one_device_and_unbatched) and
# one window == self_epitomic_lsr (tests/pipelines/test_raster_lsr.py)
def test_batches_equal_per_window_calls(scene):
    """Real LSR windows: 7 windows in a padded batch of 8 on 4 devices, and one by one."""
    image, classes, table = scene
    key, t = jax.random.key(3), 32
    corners = [(r, c) for r in (0, 64, 128) for c in (0, 96, 160)][:7]
    fn = jax.jit(functools.partial(self_epitomic_lsr, **LSR))
    want = [np.asarray(fn(jax.random.fold_in(key, i), image[r : r + t, c : c + t],
                          classes[r : r + t, c : c + t], table))
            for i, (r, c) in enumerate(corners)]
    wins = [(np.int32(i), image[r : r + t, c : c + t], classes[r : r + t, c : c + t], table)
            for i, (r, c) in enumerate(corners)]

    def per_window(k, i, img, cls, tab):
        return fn(jax.random.fold_in(k, i), img, cls, tab)

    for devices, batch, fixed in ((4, 6, 8), (1, 1, 1)):
        b = WindowBatches(per_window, mesh=data_mesh(jax.local_devices()[:devices]),
                          window_batch=batch)
        got = b((key,), wins)
        assert b.fixed == fixed and b.calls == -(-7 // fixed)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def test_auto_batch_respects_the_memory_budget():
    def fn(x):
        return x * 2.0

    wins = [(np.full((64, 64), i, np.float32),) for i in range(10)]
    big = WindowBatches(fn, max_batch=16, window_batch=None, memory_budget=2**30)
    small = WindowBatches(fn, max_batch=16, memory_budget=100_000)  # 2 windows/dev
    big.fixed = small.fixed = None  # CPU picks one window per device: test the budget rule
    for b in (big, small):
        got = b((), wins)
        np.testing.assert_array_equal(np.stack(got), np.stack([w[0] * 2 for w in wins]))
    assert big.calls == 1 and small.calls == 2  # 16 per call vs 8 (2 per device fit)
    with pytest.raises(ValueError, match="window_batch"):
        WindowBatches(fn, window_batch=0)


def _run(scene, out, **kw):
    image, classes, table = scene
    run = lsr_raster(jax.random.key(11), array_reader(image), array_reader(classes), table,
                     out_dir=out, tile=64, overlap=16, lsr_kwargs=LSR, write_probs=True,
                     progress=False, preview=None, nodata_class=99, **kw)
    return [tifffile.imread(p) for p in (run.labels, run.probs, run.entropy)], run


@pytest.fixture(scope="module")
def nodata_scene(scene):
    image, classes, table = scene
    classes = classes.copy()
    classes[:40, :50] = 99  # no data: some windows get the extra neutral class
    return image, classes, table


@pytest.fixture(scope="module")
def unbatched(tmp_path_factory, nodata_scene):
    """1 device, one window per call, one strip per call: the reference bytes."""
    out = tmp_path_factory.mktemp("single")
    got, run = _run(nodata_scene, out, mesh=data_mesh(jax.local_devices()[:1]), window_batch=1,
                    strips_per_call=1)
    assert run.computed == run.windows == 20  # 4 strips of 5 windows
    return [p.read_bytes() for p in sorted(out.glob("*.tif"))], got


def _spy_groups(monkeypatch, module):
    """Records the ``strips_per_call`` each run of ``module`` hands its strip runner."""
    seen = []
    for name in ("run_strips", "iter_strips"):
        real = getattr(module, name, None)
        if real is not None:
            def spy(*a, real=real, **kw):
                seen.append(kw.get("strips_per_call", 1))
                return real(*a, **kw)

            monkeypatch.setattr(module, name, spy)
    return seen


def _equal_to_unbatched(tmp_path, nodata_scene, unbatched, runs: list[dict]) -> None:
    for i, kw in enumerate(runs):
        got, _ = _run(nodata_scene, tmp_path / str(i), **kw)
        for a, b in zip(got, unbatched[1], strict=True):
            np.testing.assert_array_equal(a, b)
        assert [p.read_bytes() for p in sorted((tmp_path / str(i)).glob("*.tif"))] == \
            unbatched[0]


def test_lsr_raster_sharded_equals_one_device_and_unbatched(tmp_path, nodata_scene, unbatched,
                                                            monkeypatch):
    """4 devices x batches of 8 (one strip per call), 4 devices x 3 strips per call (15 + 5
    windows): outputs identical to one window per call on one device (the no-data class gives
    windows of two table shapes: two programs, across strips)."""
    from epilsr.pipelines import raster_lsr

    groups = _spy_groups(monkeypatch, raster_lsr)
    _equal_to_unbatched(tmp_path, nodata_scene, unbatched,
                        [dict(window_batch=8), dict(window_batch=16, strips_per_call=3)])
    assert groups == [1, 3]


@pytest.mark.slow  # one device in other batches: the 4-device runs above cover the equality
def test_lsr_raster_one_device_batches_equal_unbatched(tmp_path, nodata_scene, unbatched,
                                                       monkeypatch):
    """1 device x 4, 1 device sized by a big budget (several strips per call): outputs
    identical to one window per call."""
    from epilsr.pipelines import raster_lsr

    groups = _spy_groups(monkeypatch, raster_lsr)
    one = data_mesh(jax.local_devices()[:1])
    _equal_to_unbatched(tmp_path, nodata_scene, unbatched,
                        [dict(mesh=one, window_batch=4), dict(mesh=one, memory_budget=2**30)])
    assert groups == [1, 6]  # budget: 32 per call fit (max 8 strips x 5): 6 strips


def test_lsr_raster_resumes_a_crash_mid_group(tmp_path, nodata_scene, unbatched):
    """3 strips per call: a crash adding the 8th window (strip 1; strips 1-2 computed, not
    written) resumes from strip 1, here with one strip per call: the same bytes."""
    class Crash(Exception):
        pass

    ticks = {"n": 0}

    def crash():
        ticks["n"] += 1
        if ticks["n"] == 8:
            raise Crash("killed mid-group")

    with pytest.raises(Crash):
        _run(nodata_scene, tmp_path, window_batch=16, strips_per_call=3, on_window=crash)
    progress = (tmp_path / ".lsr_state" / "progress.json").read_text()
    assert '"next_strip": 1' in progress
    _, run = _run(nodata_scene, tmp_path, window_batch=4, strips_per_call=1)
    assert run.resumed_from == 5 and run.computed == 15
    assert [p.read_bytes() for p in sorted(tmp_path.glob("*.tif"))] == unbatched[0]


def test_predict_raster_sharded_equals_one_device_and_unbatched(rng):
    """Dense Eq. 2 tiles: 4 devices, one device in batches, one tile per call: equal bits;
    and equal to predict on the whole raster up to float32 summation order."""
    from epilsr import Epitome, predict
    from epilsr.pipelines.raster_predict import predict_raster

    mean = rng.normal(size=(1, 9, 9, 3)).astype(np.float32)
    epi = Epitome(mean, np.full_like(mean, -3.0), np.zeros((1, 9, 9), np.float32))
    lp = rng.dirichlet(np.full(3, 0.5), size=(1, 9, 9)).astype(np.float32)
    image = rng.normal(size=(23, 30, 3)).astype(np.float32)
    kw = dict(patch_size=3, temperature=9.0, stride=2, tile=5)
    one = data_mesh(jax.local_devices()[:1])
    runs = [predict_raster(epi, lp, image, window_batch=8, **kw).probs,
            predict_raster(epi, lp, image, mesh=one, window_batch=3, **kw).probs,
            predict_raster(epi, lp, image, mesh=one, window_batch=1, strips_per_call=1,
                           **kw).probs,
            predict_raster(epi, lp, image, window_batch=16, strips_per_call=3, **kw).probs,
            predict_raster(epi, lp, image, mesh=one, memory_budget=2**30, **kw).probs]
    for other in runs[1:]:  # several strips per call (explicit, or by the budget): same bits
        np.testing.assert_array_equal(runs[0], other)
    want = np.asarray(predict(epi, lp, image, patch_size=3, temperature=9.0, stride=2))
    np.testing.assert_allclose(runs[0], want, atol=2e-5)
    lanes = predict_raster(epi, lp, image, window_batch=8, window_lanes=2, **kw).probs
    np.testing.assert_allclose(lanes, runs[0], atol=1e-5)  # vmapped: float32 rounding only


def test_predict_raster_files_multi_strip_resume_and_grouping(rng, tmp_path, monkeypatch):
    """Dense Eq. 2 into files, 4 strips per call on 4 devices: equal bytes to one tile per
    call; a crash adding strip 2 (strips 2-3 computed, unwritten) resumes from strip 2 with
    other groups, same bytes. The budget picks several strips; a tiny one, one strip."""
    from epilsr import Epitome
    from epilsr.pipelines import raster_predict

    mean = rng.normal(size=(1, 9, 9, 3)).astype(np.float32)
    epi = Epitome(mean, np.full_like(mean, -3.0), np.zeros((1, 9, 9), np.float32))
    lp = rng.dirichlet(np.full(3, 0.5), size=(1, 9, 9)).astype(np.float32)
    image = rng.normal(size=(31, 17, 3)).astype(np.float32)
    kw = dict(patch_size=3, temperature=9.0, stride=2, tile=5, probs=True)
    one = data_mesh(jax.local_devices()[:1])

    def files(out, **more):
        run = raster_predict.predict_raster_files(epi, lp, image, out_dir=out, **kw, **more)
        return run, [p.read_bytes() for p in sorted(out.glob("*.tif"))]

    _, ref = files(tmp_path / "ref", mesh=one, window_batch=1, strips_per_call=1)
    groups = _spy_groups(monkeypatch, raster_predict)
    assert files(tmp_path / "multi", window_batch=16, strips_per_call=4)[1] == ref
    assert files(tmp_path / "budget", mesh=one, memory_budget=2**30)[1] == ref
    assert files(tmp_path / "tiny", mesh=one, memory_budget=1)[1] == ref
    assert groups == [4, 5, 1]  # 6 strips of 3 tiles: 16 fit (max 8 x 3) -> 5; tiny: 1

    class Crash(Exception):
        pass

    real, calls = raster_predict.check_window, {"n": 0}

    def crash(*a):
        calls["n"] += 1
        if calls["n"] == 7:  # the first tile of strip 2 (3 tiles a strip)
            raise Crash("killed mid-group")
        return real(*a)

    monkeypatch.setattr(raster_predict, "check_window", crash)
    with pytest.raises(Crash):
        files(tmp_path / "crash", window_batch=8, strips_per_call=2)
    monkeypatch.undo()
    run, got = files(tmp_path / "crash", window_batch=4, strips_per_call=3)
    assert run.resumed_from == 2 and got == ref


def test_strips_per_call_follows_the_budget():
    """A tiny budget: one window per call (one per device on 4), one strip per call; a big
    one: several strips (at most MAX_STRIPS); the CPU default: one window per device."""
    from epilsr.pipelines.batching import MAX_STRIPS

    def fn(x):
        return x * 2.0

    win = (jax.ShapeDtypeStruct((64, 64), np.float32),)
    one = data_mesh(jax.local_devices()[:1])
    tiny = WindowBatches(fn, mesh=one, memory_budget=1, max_batch=40)
    assert tiny.windows_per_call((), win) == 1 and tiny.strips_per_call((), win, 5) == 1
    tiny4 = WindowBatches(fn, memory_budget=1, max_batch=40)
    assert tiny4.windows_per_call((), win) == 4 and tiny4.strips_per_call((), win, 5) == 1
    big = WindowBatches(fn, mesh=one, memory_budget=2**30, max_batch=5 * MAX_STRIPS)
    assert big.windows_per_call((), win) == 32 and big.strips_per_call((), win, 5) == 6
    assert big.strips_per_call((), win, 1) == MAX_STRIPS  # bounded strips in flight
    assert big.strips_per_call((), win, 40) == 1  # a strip larger than the batch
    mid = WindowBatches(fn, mesh=one, memory_budget=100_000, max_batch=40)  # 32 KiB/window
    assert mid.windows_per_call((), win) == 2 and mid.strips_per_call((), win, 1) == 2
    cpu = WindowBatches(fn, max_batch=40)  # no budget on CPU: one window per device
    assert cpu.windows_per_call((), win) == 4
    assert cpu.strips_per_call((), win, 5) == 1 and cpu.strips_per_call((), win, 2) == 2
    with pytest.raises(ValueError, match="per_strip >= 1"):
        cpu.strips_per_call((), win, 0)
