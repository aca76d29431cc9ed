"""Dataset-level embedding (Eqs. 6, 11), all-tile LSR and tiled dense prediction (Eq. 2)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile

from epilsr import Epitome, embed, predict, super_resolve
from epilsr.io import checkpoint
from epilsr.io.geotiff import RasterReader, write_raster
from epilsr.metrics import NODATA_LABEL
from epilsr.parallel import data_mesh
from epilsr.pipelines import embedding, raster_predict
from tests.reference import (
    _window_index,
    cut_patches,
    embed_labels_bf,
    posterior_bf,
    predict_bf,
    random_epitome_arrays,
)


def _epitome(rng, n_layers=2, n1=9, n2=9, c=3):
    mean, log_var, prior = random_epitome_arrays(rng, n_layers, n1, n2, c)
    return Epitome(jnp.asarray(mean), jnp.asarray(log_var), jnp.asarray(prior)), (
        mean, log_var, prior)


def _image_from(rng, mean, h, w, noise=0.05):
    l = rng.integers(mean.shape[0])
    rows = (rng.integers(mean.shape[1]) + np.arange(h)) % mean.shape[1]
    cols = (rng.integers(mean.shape[2]) + np.arange(w)) % mean.shape[2]
    img = mean[l][np.ix_(rows, cols)] + noise * rng.normal(size=(h, w, mean.shape[-1]))
    return img.astype(np.float32)


def _label_probs(rng, shape, n):
    return rng.dirichlet(np.full(n, 0.5), size=shape).astype(np.float32)


def predict_centre_bf(mean, log_var, prior, label_probs, image, k, kl, t):
    """Float64 Eq. 2 where each window predicts its centre ``Kl x Kl`` block only; the image
    is reflect-padded by ``(K - Kl) / 2``; every block position (stride 1)."""
    o = (k - kl) // 2
    img = np.pad(np.asarray(image, np.float64), ((o, o), (o, o), (0, 0)), mode="reflect")
    h, w = image.shape[:2]
    starts = [(r, c) for r in range(h - kl + 1) for c in range(w - kl + 1)]
    patches = np.stack([img[r : r + k, c : c + k] for r, c in starts])
    post = posterior_bf(mean, log_var, prior, patches, t)
    n_layers, n1, n2, n = label_probs.shape
    acc, cnt = np.zeros((h, w, n)), np.zeros((h, w))
    for b, (r, c) in enumerate(starts):
        y = np.zeros((k, k, n))
        for l in range(n_layers):
            for s1 in range(n1):
                for s2 in range(n2):
                    y += post[b, l, s1, s2] * label_probs[l][_window_index(s1, s2, k, k, n1, n2)]
        acc[r : r + kl, c : c + kl] += y[o : o + kl, o : o + kl]
        cnt[r : r + kl, c : c + kl] += 1
    return acc / cnt[..., None]


# --------------------------------------------------------------------------- dense prediction


@pytest.mark.parametrize("tile", [4, 100])
def test_predict_raster_vs_bruteforce(rng, tile):
    """Every pixel, every covering patch (stride 1), over several tiles of corners."""
    epi, (mean, log_var, prior) = _epitome(rng)
    image = _image_from(rng, mean, 11, 13)
    lp = _label_probs(rng, (2, 9, 9), 3)
    got = raster_predict.predict_raster(epi, lp, image, patch_size=3, temperature=9.0, tile=tile,
                                        chunk=8)
    want = predict_bf(mean, log_var, prior, lp, image, 3, 9.0)
    np.testing.assert_allclose(got.probs, want, atol=1e-4)
    assert got.windows == 9 * 11


def test_predict_centre_block_vs_bruteforce(rng):
    epi, (mean, log_var, prior) = _epitome(rng, 1, 11, 11, 2)
    image = _image_from(rng, mean, 9, 8)
    lp = _label_probs(rng, (1, 11, 11), 3)
    want = predict_centre_bf(mean, log_var, prior, lp, image, 5, 3, 25.0)
    got = predict(epi, lp, image, patch_size=5, label_size=3, temperature=25.0, chunk=8)
    np.testing.assert_allclose(got, want, atol=1e-4)
    tiled = raster_predict.predict_raster(epi, lp, image, patch_size=5, label_size=3,
                                          temperature=25.0,
                              tile=4, chunk=8)
    np.testing.assert_allclose(tiled.probs, want, atol=1e-4)


@pytest.mark.parametrize(
    "k,kl,stride,tile",
    [(4, None, 3, 4), (5, 3, 3, 5), (3, None, 1, 2)],
)
def test_predict_raster_equals_predict(rng, k, kl, stride, tile):
    """Tiling partitions the windows: identical to one call on the whole raster."""
    epi, (mean, _, _) = _epitome(rng, 2, 9, 9, 3)
    image = (np.clip(_image_from(rng, mean, 17, 14), 0, 1) * 255).astype(np.uint8)
    lp = _label_probs(rng, (2, 9, 9), 4)
    kw = dict(patch_size=k, label_size=kl, temperature=16.0, stride=stride)
    whole = predict(epi, lp, image, chunk=16, **kw)
    rows = []
    out = raster_predict.predict_raster(epi, lp, image, tile=tile, chunk=8,
                            on_rows=lambda r0, p: rows.append((r0, p)), **kw)
    assert out.probs is None
    assert [r for r, _ in rows] == sorted(r for r, _ in rows) and rows[0][0] == 0
    got = np.concatenate([p for _, p in rows])
    assert got.shape == (17, 14, 4)
    np.testing.assert_allclose(got, whole, atol=2e-5)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_raster_row_writer_geotiff(rng, tmp_path):
    epi, (mean, _, _) = _epitome(rng, 1, 9, 9, 3)
    image = _image_from(rng, mean, 20, 18)
    lp = _label_probs(rng, (1, 9, 9), 3)
    on_rows, close = raster_predict.raster_row_writer(tmp_path, height=20, width=18, n_labels=3,
                                                      probs=True)
    raster_predict.predict_raster(epi, lp, image, patch_size=3, temperature=9.0, stride=2, tile=8,
                      on_rows=on_rows)
    paths = close()
    want = np.asarray(predict(epi, lp, image, patch_size=3, temperature=9.0, stride=2))
    np.testing.assert_array_equal(tifffile.imread(paths["labels"]), want.argmax(-1))
    np.testing.assert_allclose(tifffile.imread(paths["probs"]), want, atol=2e-5)
    assert tifffile.imread(paths["entropy"]).shape == (20, 18)


class _Crash(RuntimeError):
    pass


def _crashing_reader(image, after):
    """An array reader that raises on its ``after``-th call (a crash halfway through a run)."""
    calls = {"n": 0}

    def read(row, col, h, w):
        calls["n"] += 1
        if calls["n"] == after:
            raise _Crash("simulated crash")
        return image[row : row + h, col : col + w]

    read.shape = image.shape
    return read


def test_predict_raster_files_resumes_after_a_crash(rng, tmp_path):
    """Checkpoint after every strip: a run killed halfway and rerun equals an uninterrupted run
    (and predict), nothing from the finished strips is recomputed, other settings refuse."""
    epi, (mean, _, _) = _epitome(rng, 1, 9, 9, 3)
    image = _image_from(rng, mean, 23, 19)
    lp = _label_probs(rng, (1, 9, 9), 3)
    kw = dict(patch_size=3, temperature=9.0, stride=2, tile=5, probs=True)
    whole = raster_predict.predict_raster_files(epi, lp, image, out_dir=tmp_path / "a", **kw)
    want = np.asarray(predict(epi, lp, image, patch_size=3, temperature=9.0, stride=2))
    np.testing.assert_allclose(tifffile.imread(whole.probs), want, atol=2e-5)

    n_tiles = whole.tiles
    with pytest.raises(_Crash):
        raster_predict.predict_raster_files(epi, lp, _crashing_reader(image, n_tiles // 2 + 1),
                                out_dir=tmp_path / "b", **kw)
    assert not (tmp_path / "b" / "labels.tif").exists()
    with pytest.raises(ValueError, match="different settings"):
        raster_predict.predict_raster_files(epi, lp, image, out_dir=tmp_path / "b",
                                **{**kw, "temperature": 4.0})
    again = raster_predict.predict_raster_files(epi, lp, _crashing_reader(image, 10**9),
                                    out_dir=tmp_path / "b", **kw)
    assert again.resumed_from > 0 and again.windows < whole.windows
    for name in ("labels", "probs", "entropy"):
        np.testing.assert_array_equal(tifffile.imread(getattr(again, name)),
                                      tifffile.imread(getattr(whole, name)))
    done = raster_predict.predict_raster_files(epi, lp, _crashing_reader(image, 10**9),
                                   out_dir=tmp_path / "b", **kw)
    assert done.windows == 0  # complete: nothing to do
    with pytest.raises(ValueError, match="different settings"):  # an array image is hashed
        raster_predict.predict_raster_files(epi, lp, image, out_dir=tmp_path / "b", **kw)
    fresh = raster_predict.predict_raster_files(epi, lp, image, out_dir=tmp_path / "b",
                                                resume=False,
                                    **{**kw, "temperature": 4.0})
    assert fresh.resumed_from == 0 and fresh.windows == whole.windows


def test_predict_raster_files_resumes_a_crash_while_closing(rng, tmp_path, monkeypatch):
    """Killed after the last strip, between closing one output and the next: the rerun keeps
    the closed file and finishes the others."""
    from epilsr.io.geotiff import RasterWriter

    epi, (mean, _, _) = _epitome(rng, 1, 9, 9, 3)
    image = _image_from(rng, mean, 12, 10)
    lp = _label_probs(rng, (1, 9, 9), 3)
    kw = dict(patch_size=3, temperature=9.0, tile=4, probs=True)
    want = raster_predict.predict_raster_files(epi, lp, image, out_dir=tmp_path / "a", **kw)
    close, calls = RasterWriter.close, {"n": 0}

    def flaky_close(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Crash("killed while closing")
        return close(self)

    monkeypatch.setattr(RasterWriter, "close", flaky_close)
    with pytest.raises(_Crash):
        raster_predict.predict_raster_files(epi, lp, image, out_dir=tmp_path / "b", **kw)
    monkeypatch.setattr(RasterWriter, "close", close)
    got = raster_predict.predict_raster_files(epi, lp, image, out_dir=tmp_path / "b", **kw)
    assert got.windows == 0
    for name in ("labels", "probs", "entropy"):
        np.testing.assert_array_equal(tifffile.imread(getattr(got, name)),
                                      tifffile.imread(getattr(want, name)))


# --------------------------------------------------------------------------- embedding


def _labelled_batch(rng, mean, b, k, kl, n, nodata_frac=0.0):
    patches = cut_patches(rng, mean, b, k, k, noise=0.1)
    blocks = rng.integers(0, n, size=(b, kl, kl))
    blocks[rng.uniform(size=blocks.shape) < nodata_frac] = NODATA_LABEL
    return patches, blocks


def test_accumulate_labels_vs_bruteforce_and_nodata_skipped(rng):
    epi, (mean, log_var, prior) = _epitome(rng, 2, 11, 11, 2)
    patches, blocks = _labelled_batch(rng, mean, 6, 5, 3, 4, nodata_frac=0.3)
    z = embed.accumulate_labels(jnp.zeros((2, 11, 11, 4)), epi, patches, blocks, temperature=25.0)
    onehot = np.zeros((*blocks.shape, 4))
    ok = blocks != NODATA_LABEL
    onehot[ok, blocks[ok]] = 1.0  # no-data rows stay zero
    want = embed_labels_bf(mean, log_var, prior, patches, onehot, 25.0)
    np.testing.assert_allclose(z, want, atol=1e-4 * want.max())
    np.testing.assert_allclose(float(jnp.sum(z)), ok.sum(), rtol=1e-4)


def test_accumulation_over_batches_equals_one_batch(rng):
    epi, (mean, _, _) = _epitome(rng, 2, 11, 11, 3)
    patches, blocks = _labelled_batch(rng, mean, 32, 5, 3, 4, nodata_frac=0.1)
    classes = rng.integers(-1, 3, size=32)  # -1: no data
    step_l = embed.make_accumulate_step(embed.accumulate_labels, temperature=25.0)
    step_c = embed.make_accumulate_step(embed.accumulate_classes, temperature=25.0)
    one_l = step_l(jnp.zeros((2, 11, 11, 4)), epi, patches, blocks)
    one_c = step_c(jnp.zeros((2, 11, 11, 3)), epi, patches, classes)
    zl, zc = jnp.zeros((2, 11, 11, 4)), jnp.zeros((2, 11, 11, 3))
    for i in range(0, 32, 8):
        zl = step_l(zl, epi, patches[i : i + 8], blocks[i : i + 8])
        zc = step_c(zc, epi, patches[i : i + 8], classes[i : i + 8])
    np.testing.assert_allclose(zl, one_l, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(zc, one_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(jnp.sum(zc)), 25 * np.sum(classes >= 0), rtol=1e-4)


@pytest.mark.parametrize("route", ["direct", "dft_rows", "dft_2d", "fft"])
def test_sharded_accumulation_equals_single_device(rng, route):
    """Each device counts its own patches with any route (no batch gathered), then a psum."""
    assert jax.device_count() >= 4, "conftest forces 4 CPU devices"
    mesh = data_mesh(jax.devices()[:4])
    epi, (mean, _, _) = _epitome(rng, 2, 11, 11, 3)
    patches, blocks = _labelled_batch(rng, mean, 16, 5, 3, 4, nodata_frac=0.1)
    patches = jax.device_put(patches, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data")))
    for fn, targets, n in ((embed.accumulate_labels, blocks, 4),
                           (embed.accumulate_classes, blocks[:, 1, 1] % 3, 3)):
        single = embed.make_accumulate_step(fn, temperature=25.0, route=route)
        sharded = embed.make_accumulate_step(fn, mesh=mesh, temperature=25.0, route=route)
        z0 = jnp.full((2, 11, 11, n), 0.5)
        want = single(z0, epi, patches, targets)
        got = sharded(z0, epi, patches, targets)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        hlo = sharded.lower(z0, epi, patches, targets).compile().as_text()
        assert "all-gather" not in hlo and "all-reduce" in hlo  # data parallel, summed once


def _dataset(rng, mean, t=3, h=16, w=14, n=3):
    images = np.stack([_image_from(rng, mean, h, w) for _ in range(t)])
    labels = rng.integers(0, n, size=(t, h, w)).astype(np.uint8)
    labels[:, :3] = NODATA_LABEL
    return images, labels


def test_embed_label_maps_sharded_equals_single_and_skips_nodata(rng):
    epi, (mean, _, _) = _epitome(rng, 1, 13, 13, 3)
    images, labels = _dataset(rng, mean)
    kw = dict(n_labels=3, patch_size=7, label_size=3, batch=8, num_batches=3, route="direct",
              temperature=49.0)
    key = jax.random.key(3)
    single = embedding.embed_label_maps(key, epi, images, labels, **kw)
    sharded = embedding.embed_label_maps(key, epi, images, labels,
                                         mesh=data_mesh(jax.devices()[:4]),
                                  **kw)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
    # every sampled window has a labelled centre; no-data block pixels add nothing
    assert float(jnp.sum(single)) <= 3 * 8 * 9 + 1e-3
    first = embedding.embed_label_maps(key, epi, images, labels, **{**kw, "num_batches": 1})
    assert float(jnp.sum(single)) > float(jnp.sum(first))  # batches accumulate
    classes = embedding.embed_class_maps(key, epi, images, labels, n_classes=3, patch_size=5,
                                         batch=8,
                                  num_batches=2, temperature=25.0)
    np.testing.assert_allclose(float(jnp.sum(classes)), 25 * 16, rtol=1e-4)


def test_label_probs_from_counts_and_all_tile_lsr(rng):
    z = np.zeros((1, 4, 4, 3), np.float32)
    z[0, 0, 0] = [2, 0, 2]
    z[0, 1, 1] = [0, 4, 0]
    p = np.asarray(embed.label_probs_from_counts(z))
    np.testing.assert_allclose(p[0, 0, 0], [0.5, 0, 0.5])
    np.testing.assert_allclose(p[0, 3, 3], [0.25, 0.5, 0.25])  # empty -> overall frequencies
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    counts = rng.uniform(size=(2, 5, 5, 3)).astype(np.float32)
    table = rng.dirichlet(np.ones(4), size=3).astype(np.float32)
    np.testing.assert_allclose(embedding.all_tile_lsr(counts, table), super_resolve(counts, table),
                               atol=1e-6)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs(rng):
    epi, (mean, _, _) = _epitome(rng, 1, 9, 9, 3)
    images, labels = _dataset(rng, mean, t=2, h=12, w=12)
    lp = _label_probs(rng, (1, 9, 9), 3)
    key = jax.random.key(0)
    kw = dict(n_labels=3, patch_size=5, label_size=3, batch=4, num_batches=1, temperature=1.0)
    with pytest.raises(ValueError, match="labels"):
        embedding.embed_label_maps(key, epi, images, labels[:, :-1], **kw)
    bad = labels.copy()
    bad[0, 5, 5] = 7
    with pytest.raises(ValueError, match="labels.*outside the class set"):
        embedding.embed_label_maps(key, epi, images, bad, **kw)
    with pytest.raises(ValueError, match="images.*channels"):
        embedding.embed_label_maps(key, epi, images[..., :2], labels, **kw)
    with pytest.raises(ValueError, match="classes.*outside"):
        embedding.embed_class_maps(key, epi, images, bad, n_classes=3, patch_size=5, batch=4,
                            num_batches=1, temperature=1.0)
    with pytest.raises(ValueError, match="labels.*no data"):
        embedding.embed_label_maps(key, epi, images, np.full_like(labels, 255), **kw)
    with pytest.raises(ValueError, match="image.*channels"):
        predict(epi, lp, images[0, ..., :2], patch_size=3, temperature=9.0)
    with pytest.raises(ValueError, match="image.*channels"):
        raster_predict.predict_raster(epi, lp, images[0, ..., :2], patch_size=3, temperature=9.0)
    with pytest.raises(ValueError, match="stride"):
        raster_predict.predict_raster(epi, lp, images[0], patch_size=5, label_size=3, stride=4,
                          temperature=9.0)
    with pytest.raises(ValueError, match="label_size"):
        predict(epi, lp, images[0], patch_size=5, label_size=2, temperature=9.0)


# --------------------------------------------------------------------------- driver


def _fake_lila_tree(root):
    from tests.data.test_chesapeake import _fake_lila

    _fake_lila(root)  # South: wv train, two 40 x 50 tiles
    _fake_lila(root, state="pa", year=2013, split="test", names=("m_3_sw_18_1",))  # North


def _compose(overrides):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    conf = str(Path(__file__).resolve().parents[2] / "src" / "epilsr" / "cli" / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return compose(config_name="segment", overrides=overrides)


def test_lila_folds_source_and_target(tmp_path):
    from experiments.segment import folds

    _fake_lila_tree(tmp_path)
    cfg = _compose(["+exp=chesapeake", f"data.root={tmp_path}", "data.crop=32"])
    [(train, test)] = folds(cfg)
    assert [t.name for t in train] == ["m_1_nw_17_1", "m_2_ne_17_1"]
    assert [t.name for t in test] == ["m_3_sw_18_1"]
    assert train[0].image.shape == (32, 32, 4) and test[0].classes.shape == (32, 32)
    assert train[0].labels.max() <= 3


@pytest.mark.slow
def test_driver_on_fake_lila(tmp_path, rng):
    import json

    from epilsr import init_epitome
    from experiments.segment import run

    _fake_lila_tree(tmp_path / "lila")
    path = checkpoint.save_epitome(tmp_path / "epi.npz",
                                   init_epitome(jax.random.key(0), size=32, channels=4))
    cfg = _compose(["+exp=chesapeake", f"data.root={tmp_path / 'lila'}", "data.crop=32",
                    f"segment.epitome={path}", "segment.hr.num_batches=2", "segment.hr.batch=8",
                    "segment.lr.num_batches=2", "segment.lr.batch=8",
                    "segment.hr.predict.stride=11", "segment.lr.predict.stride=11",
                    "segment.self_lsr=true"])
    res = run(cfg, tmp_path / "out")
    assert set(res) >= {"paint", "self_lsr", "hr", "lsr"}
    assert 0.0 <= res["hr"]["accuracy"] <= 1.0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["lsr"]["miou"] >= 0
    labels = tifffile.imread(tmp_path / "out" / "tiffs" / "m_3_sw_18_1_hr_labels.tif")
    assert labels.shape == (32, 32) and labels.max() <= 3
    assert (tmp_path / "out" / "fold0_fig5.png").exists()


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_predict_raster_files_refuses_non_finite_imagery(rng, tmp_path, bad):
    epi, (mean, _, _) = _epitome(rng, 1, 9, 9, 3)
    image = _image_from(rng, mean, 23, 19)
    lp = _label_probs(rng, (1, 9, 9), 3)
    kw = dict(patch_size=3, temperature=9.0, stride=2, tile=5)
    image[20, 4, 1] = bad
    with pytest.raises(ValueError, match=r"image_reader: window rows \d+:\d+, cols \d+:\d+ "
                                         "holds 1 NaN/inf"):
        raster_predict.predict_raster_files(epi, lp, image, out_dir=tmp_path, **kw)
    assert not (tmp_path / "labels.tif").exists()
    assert not json.loads((tmp_path / ".predict_state" / "progress.json").read_text())[
        "complete"]
    image[20, 4, 1] = 0.5
    image[0, 0, 0] = bad  # first strip: nothing opened
    with pytest.raises(ValueError, match="NaN/inf"):
        raster_predict.predict_raster(epi, lp, image, **kw)
    with pytest.raises(ValueError, match="NaN/inf"):
        raster_predict.predict_raster_files(epi, lp, image, out_dir=tmp_path / "b", **kw)
    assert not list((tmp_path / "b").glob("*.tif*"))


def test_predict_raster_files_refuses_a_changed_geotiff(rng, tmp_path):
    epi, (mean, _, _) = _epitome(rng, 1, 9, 9, 3)
    image = _image_from(rng, mean, 23, 19)
    lp = _label_probs(rng, (1, 9, 9), 3)
    kw = dict(patch_size=3, temperature=9.0, stride=2, tile=5, out_dir=tmp_path / "out")
    path = write_raster(tmp_path / "image.tif", image)
    with RasterReader(path) as reader:
        whole = raster_predict.predict_raster_files(epi, lp, reader, **kw)
    image[0, 0, 0] += 0.25
    write_raster(path, image)
    with RasterReader(path) as reader:
        with pytest.raises(ValueError, match=r"input image_reader \(.*image.tif\) changed"):
            raster_predict.predict_raster_files(epi, lp, reader, **kw)
        fresh = raster_predict.predict_raster_files(epi, lp, reader, resume=False, **kw)
    assert fresh.windows == whole.windows
    want = np.asarray(predict(epi, lp, image, patch_size=3, temperature=9.0, stride=2))
    np.testing.assert_array_equal(tifffile.imread(fresh.labels), want.argmax(-1))
