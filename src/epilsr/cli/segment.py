"""Epitomes as segmentation models (paper Secs. 2 and 5.1), the Table-1 epitome rows.

    python -m experiments.segment +exp=chesapeake_wv data.root=../shared/data/chesapeake_wv
    python -m experiments.train +exp=chesapeake data.root=/path/to/lila          # South imagery
    python -m experiments.segment +exp=chesapeake data.root=/path/to/lila \\
        segment.epitome=outputs/train/<run>/epitome.npz                         # North tiles

For every fold (tile ``i`` is held out in fold ``i % segment.folds``; or the LILA source/target
regions): an epitome (trained here on the fold's training tiles, or ``segment.epitome``), the
high-resolution label embedding of the training tiles (Eq. 6), the NLCD class embedding
(Eq. 11) of the held-out tiles followed by the LSR EM (Eqs. 8-9), and Eq. 2 prediction of the
held-out tiles with both embeddings. Prints per-tile and pooled accuracy / mIoU against painting
each coarse cell and self-epitomic LSR on the same tiles; writes ``metrics.json``,
``fold<f>_embeddings.npz``, Fig. 5-style pictures and per-tile panels into Hydra's output dir.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import jax
import numpy as np
import tifffile
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

import epilsr
from epilsr import embed, metrics, viz
from epilsr.cli.common import (
    LabelledTile,
    atomic_write,
    check_route,
    format_table,
    iter_tiles,
    one_line_errors,
    read_limits,
    renamed_keys,
    use_cpu_devices,
)
from epilsr.cli.train import run_stage
from epilsr.data import chesapeake
from epilsr.epitome import as_float_image
from epilsr.io import checkpoint
from epilsr.pipelines import embedding, raster_predict

log = logging.getLogger("epilsr.segment")

METHODS = (
    ("paint", "paint each NLCD cell", "LR (held-out tile)"),
    ("self_lsr", "self-epitomic LSR (defaults)", "LR (held-out tile)"),
    ("hr", "epitome + HR label embedding", "HR (training tiles)"),
    ("lsr", "all-tile epitomic LSR", "LR (held-out tiles)"),
    ("lsr_train", "all-tile epitomic LSR", "LR (training tiles)"),
)


def lila_tiles(group) -> list[LabelledTile]:
    """Central ``crop`` of every tile of a ``chesapeake_lila`` data group, with NLCD indices."""
    table = chesapeake.load_nlcd_table()
    stems = chesapeake.find_lila_tiles(group.root, states=list(group.states), split=group.split)
    out = []
    for stem in stems[: int(group.max_tiles)]:
        t = chesapeake.load_tile(stem, **read_limits(group))
        h, w = t.image.shape[:2]
        c = min(int(group.crop), h, w)
        r0, c0 = (h - c) // 2, (w - c) // 2
        sl = (slice(r0, r0 + c), slice(c0, c0 + c))
        out.append(LabelledTile(t.name, t.image[sl], table.index(t.nlcd[sl]),
                                None if t.labels is None else t.labels[sl], table.mean,
                                chesapeake.LABEL_NAMES, chesapeake.LABEL_COLORS))
    return out


def load_tiles(data) -> list[LabelledTile]:
    return lila_tiles(data) if data.kind == "chesapeake_lila" else list(iter_tiles(data))


def folds(cfg) -> list[tuple[list[LabelledTile], list[LabelledTile]]]:
    """``[(train tiles, held-out tiles)]`` per fold."""
    tiles = load_tiles(cfg.data)
    if cfg.segment.target is not None:
        target = OmegaConf.merge(cfg.data, cfg.segment.target)
        return [(tiles, load_tiles(target))]
    k = int(cfg.segment.folds)
    if k < 1 or k > len(tiles):
        raise ValueError(f"segment.folds: expected 1..{len(tiles)} (number of tiles), got {k}")
    if k == 1:
        log.warning("segment.folds=1: training and evaluating on the same tiles (in-sample)")
        return [(tiles, tiles)]
    return [([t for i, t in enumerate(tiles) if i % k != f],
             [t for i, t in enumerate(tiles) if i % k == f]) for f in range(k)]


def fold_epitome(cfg, f, train_tiles, out, key):
    """The fold's epitome: ``segment.epitome`` (one path or one per fold) or trained here."""
    path = cfg.segment.epitome
    if isinstance(path, ListConfig | list):
        if f >= len(path):
            raise ValueError(f"segment.epitome: {len(path)} paths for more folds ({f + 1}+)")
        path = path[f]
    if path is not None:
        return checkpoint.load_epitome(path)
    images = np.stack([np.asarray(as_float_image(t.image)) for t in train_tiles])
    has_labels = all(t.labels is not None for t in train_tiles)
    labels = np.stack([t.labels for t in train_tiles]) if has_labels else None
    state, _ = run_stage(cfg, f"fold{f}", images, labels, out, key=key)
    checkpoint.save_epitome(out / f"fold{f}_epitome.npz", state.params)
    return state.params


def _mesh(cfg):
    n = len(jax.local_devices()) if cfg.segment.devices is None else int(cfg.segment.devices)
    return epilsr.parallel.data_mesh(jax.local_devices()[:n]) if n > 1 else None


def _temperature(group) -> float:
    """``group.temperature``, or the training temperature ``(K/11)^2`` when null."""
    if group.temperature is not None:
        return float(group.temperature)
    return epilsr.train.default_temperature(int(group.patch_size))


def embeddings(cfg, epitome, train_tiles, class_tiles, key, mesh):
    """``{"hr_counts", "hr", "class_counts_<m>", "<m>"}`` for one fold; ``class_tiles`` maps
    a method name (``lsr``, ``lsr_train``) to the tiles whose NLCD it embeds."""
    hr, lr = cfg.segment.hr, cfg.segment.lr
    route = cfg.segment.route
    n_labels = train_tiles[0].table.shape[1]
    if any(t.labels is None for t in train_tiles):
        raise ValueError("data: the training tiles need high-resolution labels (<tile>_lc.tif)")
    out = {}
    out["hr_counts"] = embedding.embed_label_maps(
        jax.random.fold_in(key, 0), epitome, np.stack([t.image for t in train_tiles]),
        np.stack([t.labels for t in train_tiles]), n_labels=n_labels,
        patch_size=int(hr.patch_size), label_size=int(hr.label_size), batch=int(hr.batch),
        num_batches=int(hr.num_batches), temperature=_temperature(hr), mesh=mesh, route=route,
        progress=True)
    out["hr"] = embed.label_probs_from_counts(out["hr_counts"],
                                                pseudo_count=float(hr.pseudo_count))
    for i, (name, tiles) in enumerate(class_tiles.items()):
        table = tiles[0].table
        counts = embedding.embed_class_maps(
            jax.random.fold_in(key, 1 + i), epitome, np.stack([t.image for t in tiles]),
            np.stack([t.classes for t in tiles]), n_classes=table.shape[0],
            patch_size=int(lr.patch_size), batch=int(lr.batch), num_batches=int(lr.num_batches),
            temperature=_temperature(lr), mesh=mesh, route=route, progress=True)
        out[f"class_counts_{name}"] = counts
        out[name] = embedding.all_tile_lsr(counts, table, min_share=float(lr.min_share),
                                         iters=int(lr.iters))
    return out


def fig5(epitome, hr_probs, lsr_probs, colors, names) -> np.ndarray:
    """Fig. 5: epitome means | HR label embedding (argmax) | LSR embedding (argmax), per layer."""
    zoom = max(1, 256 // epitome.mean.shape[1])
    tiles, titles = [], []
    for l in range(epitome.layers):
        tiles += [viz.rgb_preview(np.asarray(epitome.mean[l])),
                  viz.colorize(np.asarray(hr_probs[l]).argmax(-1), colors),
                  viz.colorize(np.asarray(lsr_probs[l]).argmax(-1), colors)]
        titles += [f"epitome {l} (mean)", "HR label embedding", "all-tile LSR embedding"]
    tiles = [t.repeat(zoom, 0).repeat(zoom, 1) for t in tiles]
    legend = [(n, tuple(int(v) for v in c)) for n, c in zip(names, colors, strict=True)]
    return viz.panel(tiles, titles, legend=legend)


def predict_tile(cfg, group, epitome, label_probs, tile, out=None, prefix=""):
    """Eq. 2 on one tile with ``group``'s (``segment.hr`` / ``segment.lr``) patch size,
    temperature, ``predict.label_size`` and ``predict.stride``."""
    p = group.predict
    kw = dict(patch_size=int(group.patch_size), temperature=_temperature(group),
              label_size=None if p.label_size is None else int(p.label_size),
              stride=int(p.stride), tile=int(cfg.segment.predict.tile),
              chunk=int(cfg.segment.predict.chunk), route=cfg.segment.route)
    if out is None:
        return raster_predict.predict_raster(epitome, label_probs, tile.image, **kw).probs
    # GeoTIFFs written strip by strip, checkpointed: an interrupted run resumes where it stopped.
    files = raster_predict.predict_raster_files(epitome, label_probs, tile.image, out_dir=out,
                                         prefix=prefix, probs=True, geo=tile.geo,
                                         resume=bool(cfg.segment.resume), **kw)
    return tifffile.imread(files.probs)


@renamed_keys
@hydra.main(config_path="conf", config_name="segment", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> dict:
    use_cpu_devices(cfg)  # before any other JAX call
    return run(cfg, Path(HydraConfig.get().runtime.output_dir))


def _class_tiles(cfg, train_tiles, test_tiles) -> dict[str, list[LabelledTile]]:
    """``segment.lr.sources`` as ``{embedding name: the tiles whose NLCD it embeds}``."""
    sources = list(cfg.segment.lr.sources)
    if not set(sources) <= {"target", "train"}:
        raise ValueError(f"segment.lr.sources: expected 'target' and/or 'train', got {sources}")
    return {("lsr" if s == "target" else "lsr_train"): (test_tiles if s == "target" else
                                                        train_tiles) for s in sources}


def _predict_tile_all(cfg, key, tile, epitome, emb: dict, out: Path) -> tuple[dict, dict]:
    """Every method's ``[H, W]`` labels of one held-out tile and its seconds: paint,
    self-epitomic LSR (``segment.self_lsr``, key ``key``), Eq. 2 with each embedding."""
    preds, secs = {}, {}
    s = time.perf_counter()
    preds["paint"] = np.asarray(epilsr.paint_classes(tile.classes, tile.table)).argmax(-1)
    secs["paint"] = time.perf_counter() - s
    if cfg.segment.self_lsr:
        s = time.perf_counter()
        p = epilsr.self_epitomic_lsr(key, tile.image, tile.classes, tile.table,
                                     cell_size=int(cfg.data.cell_size))
        preds["self_lsr"] = np.asarray(p).argmax(-1)
        secs["self_lsr"] = time.perf_counter() - s
    for name in ("hr", "lsr", "lsr_train"):
        if name not in emb:
            continue
        group = cfg.segment.hr if name == "hr" else cfg.segment.lr
        s = time.perf_counter()
        tif = out / "tiffs" if cfg.segment.write_tiffs else None
        p = predict_tile(cfg, group, epitome, emb[name], tile, tif,
                         prefix=f"{tile.name}_{name}_")
        preds[name] = p.argmax(-1)
        secs[name] = time.perf_counter() - s
    return preds, secs


def _tile_panel(tile, preds: dict, colors, names) -> np.ndarray:
    """imagery | each method's labels | truth of one held-out tile."""
    panels = [viz.rgb_preview(tile.image)] + [
        viz.colorize(preds[m], colors) for m, *_ in METHODS if m in preds]
    titles = ["imagery"] + [m for m, *_ in METHODS if m in preds]
    if tile.labels is not None:
        panels.append(viz.colorize(tile.labels, colors, ignore=255))
        titles.append("truth")
    legend = [(n, tuple(int(v) for v in c)) for n, c in zip(names, colors, strict=True)]
    return viz.panel(panels, titles, legend=legend)


def _score_tile(tile, fold: int, preds: dict, secs: dict, conf: dict) -> tuple[list, dict]:
    """Each method's accuracy on one tile (confusions added to ``conf``): ``(table row,
    metrics record)``."""
    rec = {"fold": fold, "seconds": secs}
    row = [tile.name[-12:], fold]
    for m, *_ in METHODS:
        if m not in preds:
            row.append("-")
            continue
        cm = metrics.confusion_matrix(tile.labels, preds[m], n_classes=tile.table.shape[1],
                                      ignore=255)
        conf[m] = cm if conf[m] is None else conf[m] + cm
        rec[f"{m}_acc"] = metrics.accuracy_from_confusion(cm)
        row.append(rec[f"{m}_acc"])
    return row, rec


def _pooled(conf: dict, label_names, results: dict) -> None:
    """Prints the pooled table of every method with a confusion matrix; adds its rows to
    ``results``."""
    table = []
    for m, label, data in METHODS:
        if conf[m] is None:
            continue
        per_class, miou = metrics.iou_from_confusion(conf[m])
        acc = metrics.accuracy_from_confusion(conf[m])
        table.append([label, data, acc, float(miou)] + [float(v) for v in per_class])
        results[m] = {"accuracy": acc, "miou": float(miou),
                      "iou": [None if np.isnan(v) else float(v) for v in per_class]}
    if table:
        print("\npooled over held-out tiles (IoU nan = class absent from truth and prediction)")
        print(format_table(["method", "labels used", "acc", "mIoU"]
                           + [f"IoU {n}" for n in label_names], table))


def run(cfg: DictConfig, out: Path) -> dict:
    check_route(cfg.segment.route, "segment.route")
    out.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(int(cfg.seed))
    mesh = _mesh(cfg)
    conf: dict[str, np.ndarray | None] = {m: None for m, *_ in METHODS}
    rows, per_tile, timing = [], {}, {}
    splits = folds(cfg)
    for f, (train_tiles, test_tiles) in enumerate(splits):
        log.info("fold %d: train/embed on %s; predict %s", f, [t.name for t in train_tiles],
                 [t.name for t in test_tiles])
        kf = jax.random.fold_in(key, f)
        t0 = time.perf_counter()
        epitome = fold_epitome(cfg, f, train_tiles, out, jax.random.fold_in(kf, 0))
        timing[f"fold{f}_epitome_s"] = time.perf_counter() - t0
        class_tiles = _class_tiles(cfg, train_tiles, test_tiles)
        t0 = time.perf_counter()
        emb = embeddings(cfg, epitome, train_tiles, class_tiles, jax.random.fold_in(kf, 1), mesh)
        emb = jax.block_until_ready(emb)
        timing[f"fold{f}_embed_s"] = time.perf_counter() - t0
        np.savez(out / f"fold{f}_embeddings.npz", **{k: np.asarray(v) for k, v in emb.items()})
        colors, names = test_tiles[0].label_colors, test_tiles[0].label_names
        if cfg.output.png:
            viz.save_png(out / f"fold{f}_fig5.png",
                         fig5(epitome, emb["hr"], emb.get("lsr", emb.get("lsr_train")), colors,
                              names))
        for i, tile in enumerate(test_tiles):
            preds, secs = _predict_tile_all(cfg, jax.random.fold_in(kf, 100 + i), tile,
                                            epitome, emb, out)
            if cfg.output.png:
                viz.save_png(out / f"{tile.name}.png", _tile_panel(tile, preds, colors, names))
            if tile.labels is not None:
                row, per_tile[tile.name] = _score_tile(tile, f, preds, secs, conf)
                rows.append(row)
    print(format_table(["tile", "fold"] + [f"{m} acc" for m, *_ in METHODS], rows))
    results = {"tiles": per_tile, "timing": timing,
               "config": OmegaConf.to_container(cfg, resolve=True)}
    _pooled(conf, list(splits[0][1][0].label_names), results)
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(results, indent=2)))
    log.info("wrote %s", out / "metrics.json")
    return results


if __name__ == "__main__":
    main()
