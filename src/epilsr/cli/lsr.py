"""Self-epitomic label super-resolution over a set of tiles (paper Sec. 5.1).

    python -m experiments.lsr                                    # embedded demo scene
    python -m experiments.lsr +exp=chesapeake_wv data.root=../shared/data/chesapeake_wv
    python -m experiments.lsr --help                             # options and experiments

    python -m experiments.lsr +exp=chesapeake data.root=/path/to/cvpr_chesapeake_landcover

    python -m experiments.lsr data=geotiff data.image=<GeoTIFF or glob> data.coarse=<GeoTIFF> \
        data.table=nlcd [data.truth=<GeoTIFF>]                  # your own rasters (epilsr[geo])

Runs self-epitomic LSR over every tile in windows of each size in ``raster.tile_sizes`` (the
paper's Table 1 uses 256, 512, 1024 and 2048; windows overlap and are blended, see
:mod:`epilsr.pipelines.raster_lsr`), and in the same run the two baselines: painting each coarse
cell with its most likely label, and the published notebook's EM (``notebook``: uniform ``p(c)``
over all NLCD classes). Prints per-tile accuracy and a Table-1 style pooled table (method, W,
accuracy, mIoU, per-class IoU) and writes, per tile and method, GeoTIFFs (labels uint8, entropy,
optional float16 probabilities) with the input's georeferencing, PNG previews and
``metrics.json`` into Hydra's output directory. With ``data=geotiff`` see
:mod:`epilsr.cli.lsr_geotiff` (one folder per input image; baselines only when asked). With
``distributed.num_processes > 1`` the tiles / images are divided among processes
(:mod:`epilsr.cli.hosts`, ``docs/scale.md``); with ``data=geotiff`` a raster larger than
``distributed.band_mpx`` (or any, when there are fewer rasters than processes) is cut into bands
of window strips shared like rasters. The set is checked, the bands' VRT mosaics written and the
metrics merged by process 0 or ``epilsr-lsr-check <run dir>``.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path

import hydra
import jax
import numpy as np
import tifffile
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import epilsr
from epilsr import metrics, viz
from epilsr.cli import hosts as multi
from epilsr.cli import lsr_geotiff
from epilsr.cli.common import (
    atomic_write,
    count_tiles,
    format_table,
    iter_tiles,
    one_line_errors,
    use_cpu_devices,
)
from epilsr.io.strips import array_digest
from epilsr.pipelines import partition, raster_lsr
from epilsr.windows import tile_grid

log = logging.getLogger("epilsr.lsr")


def _tile_panel(tile, paint, pred) -> np.ndarray:
    colors = tile.label_colors
    ignore = 255 if tile.labels is not None and tile.labels.dtype == np.uint8 else None
    panels = [viz.rgb_preview(tile.image), viz.colorize(paint, colors), viz.colorize(pred, colors)]
    titles = ["imagery", "coarse: paint", "self-epitomic LSR"]
    if tile.labels is not None:
        panels.append(viz.colorize(tile.labels, colors, ignore=ignore))
        titles.append("ground truth")
    legend = [(n, tuple(c)) for n, c in zip(tile.label_names, colors, strict=True)]
    return viz.panel(panels, titles, legend=legend)


def _notebook_kwargs(cfg: DictConfig, *, cell_size: bool = True) -> dict:
    """The published notebook's self-epitomic LSR: 2x-downsampled tile, 7x7 patches, 20 000
    patches per 1024^2 of input, 20 EM iterations, uniform p(c) over every NLCD class
    (``cell_size=False``: without the data's cell size, set per raster by the caller)."""
    kwargs = OmegaConf.to_container(cfg.notebook, resolve=True)
    per_pixel = kwargs.pop("patches_per_1024") / 1024**2
    kwargs = {**kwargs, "sample_fraction": per_pixel}
    return {**kwargs, "cell_size": int(cfg.data.cell_size)} if cell_size else kwargs


def _methods(cfg: DictConfig) -> list[tuple[str, str, dict | str | None]]:
    """(key, table label, self_epitomic_lsr kwargs; "notebook" for the notebook baseline, whose
    kwargs come from :func:`_notebook_kwargs`; None for the paint baseline)."""
    ours = {**OmegaConf.to_container(cfg.lsr, resolve=True), "cell_size": int(cfg.data.cell_size)}
    methods = [("paint", "paint each coarse cell (baseline)", None)]
    if cfg.baselines.notebook or cfg.baselines.notebook is None:  # null: on for these data
        methods.append(("notebook", "self-epitomic LSR, published notebook EM", "notebook"))
    methods.append(("lsr", "self-epitomic LSR (epilsr defaults)", ours))
    return methods


def _objective_check(cfg, tile, key, maps: dict[str, np.ndarray]) -> dict[str, float] | None:
    """Eq. 7 of hard label maps under the tile's own coarse data: the self-epitomic class counts
    of the ``lsr`` settings and the published table (after ``min_share``), each map as ``p(l|s)``
    with 2 % label smoothing; no-data pixels uniform in every map. A reference map that scores
    *below* ours is one the coarse data and the table do not support: no optimiser of Eq. 7 will
    find it. The EM's class prior is the observed one (the library default). ``None`` for
    tiles larger than ``report.objective_max_side``."""
    if tile.labels is None or max(tile.image.shape[:2]) > int(cfg.report.objective_max_side):
        return None
    kw = OmegaConf.to_container(cfg.lsr, resolve=True)
    d, n = int(kw["downsample"]), tile.table.shape[1]
    counts = epilsr.self_epitomic_counts(
        key, tile.image, tile.classes, tile.table.shape[0],
        **{k: kw[k] for k in ("patch_size", "var", "downsample", "sample_fraction", "temperature",
                              "wrap", "class_spread")},
    )
    table = np.asarray(tile.table, np.float64)
    table = table / np.maximum(table.sum(1, keepdims=True), 1e-12)
    table = np.where(table >= float(kw["min_share"]), table, 0.0)
    nodata = tile.labels == 255
    scores = {}
    for name, labels in maps.items():
        q = np.eye(n)[np.where(nodata, 0, labels)] * 0.98 + 0.02 / n
        q[nodata] = 1.0 / n
        h, w = q.shape[:2]  # block means onto the counts' grid (edge-padded like the tile)
        q = np.pad(q, ((0, -h % d), (0, -w % d), (0, 0)), mode="edge")
        q = q.reshape(q.shape[0] // d, d, q.shape[1] // d, d, n).mean((1, 3))
        scores[name] = float(epilsr.lsr_objective(counts, table, q.astype(np.float32)))
    return scores


def _windows_of_tile(cfg, tile, methods, windows: list[int]) -> int:
    """LSR windows one tile costs over every method and window size (for the progress bar)."""
    h, w = tile.image.shape[:2]
    sizes: dict[int, int] = {}  # the main loop runs each effective size min(W, side) once
    for s in windows:
        sizes.setdefault(min(s, max(h, w)), s)
    per_size = sum(len(tile_grid(h, w, tile=s, overlap=min(int(cfg.raster.overlap), s // 4)))
                   for s in sizes.values())
    return per_size * sum(kwargs is not None for _, _, kwargs in methods)


def _run_window_lsr(cfg, tile, key, kwargs, window: int, out: Path, prefix: str,
                    bar=None) -> np.ndarray:
    """Self-epitomic LSR of one tile in ``window``-sized tiles
    (:func:`epilsr.pipelines.raster_lsr.lsr_raster`, GeoTIFF outputs carrying the tile's
    georeferencing), ticking ``bar`` once per window; returns the ``[H, W]`` uint8 labels."""
    run = raster_lsr.lsr_raster(
        key,
        raster_lsr.array_reader(tile.image),
        raster_lsr.array_reader(tile.classes),
        tile.table,
        out_dir=out,
        tile=window,
        overlap=min(int(cfg.raster.overlap), window // 4),
        lsr_kwargs=kwargs,
        geo=tile.geo,
        write_probs=bool(cfg.output.probs),
        probs_dtype=np.float16,
        prefix=prefix,
        preview=1024 if cfg.output.png else None,
        label_names=tile.label_names,
        label_colors=tile.label_colors,
        progress=False,
        on_window=None if bar is None else bar.update,
        resume=bool(cfg.get("resume", True)),
    )
    if bar is not None:
        bar.update(run.resumed_from)  # done by an earlier, interrupted run
    return tifffile.imread(run.labels)


def tile_data(cfg: DictConfig) -> DictConfig:
    """The ``data`` group whose tiles LSR runs on: on a LILA tree, ``raster.states`` /
    ``raster.split`` (+exp=chesapeake: the North test split) replace the training ones."""
    if cfg.data.kind == "chesapeake_lila" and cfg.raster.states is not None:
        return OmegaConf.merge(cfg.data, {"states": cfg.raster.states, "split": cfg.raster.split})
    return cfg.data


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> dict:
    out = Path(HydraConfig.get().runtime.output_dir)
    use_cpu_devices(cfg)  # before any other JAX call
    hosts = multi.join(cfg.get("distributed"))
    if cfg.data.kind == "geotiff":  # your own rasters: one folder per image, baselines when asked
        return _run_geotiff(cfg, out, hosts)
    if (cfg.get("distributed") or {}).get("band_mpx") is not None:
        raise ValueError(f"distributed.band_mpx: bands of one raster apply to data=geotiff; the "
                         f"{cfg.data.kind} tiles are divided among processes whole (set it to "
                         "null)")
    return _run_tiles(cfg, out, hosts)


def _run_geotiff(cfg: DictConfig, out: Path, hosts: multi.Hosts) -> dict:
    """``data=geotiff`` (:func:`epilsr.cli.lsr_geotiff.run`), its metrics written or shared."""
    ours = OmegaConf.to_container(cfg.lsr, resolve=True)
    results = lsr_geotiff.run(cfg, out, lsr_kwargs=ours,
                              notebook_kwargs=_notebook_kwargs(cfg, cell_size=False),
                              process=hosts[:2])
    if _shared(out, hosts, results):
        return finish(out) if hosts.index == 0 and hosts.coordinated else results
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(results, indent=2)))
    log.info("wrote %s", out / "metrics.json")
    return results


def _tile_windows(cfg: DictConfig) -> list[int]:
    windows = sorted({int(w) for w in cfg.raster.tile_sizes})
    if not windows or min(windows) < 1:
        raise ValueError(f"raster.tile_sizes: expected positive window sides, got {windows}")
    return windows


def _run_tile(cfg, tile, tile_key, methods, windows: list[int], out: Path, bar,
              conf: dict) -> tuple[list, dict, dict, list]:
    """Every method and window size on one tile (confusions added to ``conf``): ``(table row,
    metrics record, {(method, effective window): labels}, manifest entries)``."""
    side = max(tile.image.shape[:2])
    record, row, done, written = {}, [tile.name], {}, []
    for name, _, kwargs in methods:
        for w in [0] if kwargs is None else windows:
            start = time.perf_counter()
            eff = min(w, side)  # windows at least as large as the tile are the whole tile
            if (name, eff) in done:
                pred = done[(name, eff)]
            elif kwargs is None:
                pred = np.asarray(epilsr.paint_classes(tile.classes, tile.table)).argmax(-1)
            else:
                kw = _notebook_kwargs(cfg) if kwargs == "notebook" else kwargs
                pred = _run_window_lsr(cfg, tile, tile_key, kw, w, out / tile.name,
                                       f"{name}_W{eff}_", bar)
                folder = out / tile.name
                written.append(partition.output_entry(
                    folder / f"{name}_W{eff}_labels.tif", out,
                    folder / f".{name}_W{eff}_lsr_state" / "progress.json"))
            done[(name, eff)] = pred
            seconds = time.perf_counter() - start
            tag = f"{name}" if not w else f"{name} W={w}"
            entry = {"seconds": seconds}
            if tile.labels is not None:
                cm = metrics.confusion_matrix(tile.labels, pred, n_classes=tile.table.shape[1],
                                              ignore=255)
                conf[(name, w)] = conf[(name, w)] + cm if (name, w) in conf else cm
                entry["accuracy"] = metrics.accuracy_from_confusion(cm)
                row.append(entry["accuracy"])
            else:
                row.append(f"{seconds:.1f}s")
            record[tag] = entry
            if name == "lsr" and w == windows[0] and cfg.output.png:
                viz.save_png(out / f"{tile.name}.png",
                             _tile_panel(tile, done[("paint", 0)], pred))
    return row, record, done, written


def _eq7_row(cfg, tile, tile_key, done: dict, window: int) -> tuple[dict, list] | None:
    """Eq. 7 of the paint, LSR (first window size) and truth maps of a tile
    (:func:`_objective_check`): ``(scores, table row)``, or None when not reported."""
    if not cfg.report.objective or tile.labels is None:
        return None
    maps = {"paint": done[("paint", 0)], "lsr": done[("lsr", min(window, max(
        tile.image.shape[:2])))], "truth": tile.labels}
    scores = _objective_check(cfg, tile, tile_key, maps)
    if scores is None:
        return None
    return scores, ([tile.name] + [scores[k] for k in maps]
                    + ["yes" if scores["truth"] < scores["lsr"] else "no"])


def _run_tiles(cfg: DictConfig, out: Path, hosts: multi.Hosts) -> dict:
    """The benchmark tiles (synthetic, Chesapeake, LILA): every method and window size per
    tile, per-tile and pooled tables (or this process's part of them)."""
    data = tile_data(cfg)
    windows = _tile_windows(cfg)
    methods = _methods(cfg)
    log.info("self-epitomic LSR on %s data, windows %s; outputs in %s", data.kind, windows, out)
    key = jax.random.key(cfg.seed)
    conf: dict[tuple[str, int], np.ndarray] = {}
    rows, per_tile, names, objective_rows, objective_pixels = [], {}, None, [], []
    mine = None  # tiles of this process (None: all)
    if hosts.count > 1:  # a first pass lists the tiles (each is loaded once more)
        listing = [(t.name, t.image.shape[0] * t.image.shape[1],
                    array_digest(t.image, t.classes, t.table)) for t in iter_tiles(data)]
        mine = _plan(out, hosts, listing)
    listing = []
    tiles = iter_tiles(data)
    first = next(tiles, None)  # bad roots / missing files fail here, before the progress bar
    if first is None:
        raise ValueError(f"data.root: no tiles found under {data.root}")
    n_tiles = count_tiles(data) if mine is None else len(mine)
    bar = tqdm(total=None, desc=f"LSR windows ({n_tiles} tiles)", unit="window")
    estimate = None
    for i, tile in enumerate(itertools.chain([first], tiles)):
        if mine is not None and i not in mine:
            continue
        # one bar over all tiles: total from the first tile's windows, corrected per tile
        cost = _windows_of_tile(cfg, tile, methods, windows)
        if estimate is None:
            bar.total, estimate = cost * n_tiles, cost
        else:
            bar.total += cost - estimate
        bar.refresh()
        digest = array_digest(tile.image, tile.classes, tile.table)
        if hosts.count == 1:
            listing.append((tile.name, tile.image.shape[0] * tile.image.shape[1], digest))
        names = list(tile.label_names)
        tile_key = jax.random.fold_in(key, i)
        row, record, done, written = _run_tile(cfg, tile, tile_key, methods, windows, out, bar,
                                               conf)
        eq7 = _eq7_row(cfg, tile, tile_key, done, windows[0])
        if eq7 is not None:
            record["eq7"] = eq7[0]
            objective_rows.append(eq7[1])
            objective_pixels.append(int(np.sum(tile.labels != 255)))  # scored pixels
        rows.append(row)
        per_tile[tile.name] = record
        partition.record_done(out, hosts.index, tile.name, written, digest)
    bar.close()
    if hosts.count == 1:
        _plan(out, hosts, listing)
    part = {"kind": "tiles", "rows": rows, "tiles": per_tile, "names": names,
            "conf": {f"{k[0]}|{k[1]}": v.tolist() for k, v in conf.items()},
            "objective": [objective_rows, objective_pixels],
            "config": OmegaConf.to_container(cfg, resolve=True)}
    if _shared(out, hosts, part):
        return finish(out) if hosts.index == 0 and hosts.coordinated else part
    results = _report(cfg, rows, per_tile, conf, objective_rows, objective_pixels, names)
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(results, indent=2)))
    log.info("wrote %s", out / "metrics.json")
    return results


def _plan(out: Path, hosts: multi.Hosts, listing: list[tuple[str, int, str]]) -> set[int]:
    """Writes the plan of ``listing`` (name, pixels, fingerprint per tile); this process's
    tile indices."""
    names, pixels, fps = zip(*listing, strict=True) if listing else ((), (), ())
    partition.write_plan(out, partition.make_plan(names, pixels, fps, hosts.count))
    return set(partition.owned(pixels, hosts.index, hosts.count))


def _shared(out: Path, hosts: multi.Hosts, part: dict) -> bool:
    """Saves this process's metrics part; with several processes waits for the others
    (coordinated run) and returns True: process 0 then checks and merges (:func:`finish`)."""
    multi.save_part(out, hosts, part)
    if hosts.count == 1:
        return False
    if hosts.coordinated:
        multi.barrier(out)
    else:
        log.info("process %d of %d done; check the set with epilsr-lsr-check %s",
                 hosts.index, hosts.count, out)
    return True


def finish(out: Path) -> dict:
    """Completeness check of a run folder (raises with the report), then the processes'
    metrics merged into ``<out>/metrics.json`` (``python -m experiments.lsr_check <out>``).
    First the VRT mosaics of every raster divided into bands whose bands are all complete
    (:func:`epilsr.cli.lsr_geotiff.write_mosaics`), whether or not the whole set is."""
    lsr_geotiff.write_mosaics(out)
    multi.check(out)
    plan, parts = multi.load_parts(out)
    if parts[0].get("kind") != "tiles":
        results = lsr_geotiff.merge(plan, parts)
    else:
        order = {item["name"]: k for k, item in enumerate(plan["items"])}
        rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: order[r[0]])
        per_tile = {k: v for p in parts for k, v in p["tiles"].items()}
        per_tile = {r[0]: per_tile[r[0]] for r in rows}
        conf: dict[tuple[str, int], np.ndarray] = {}
        for p in parts:
            for k, cm in p["conf"].items():
                name, w = k.split("|")
                conf[(name, int(w))] = conf.get((name, int(w)), 0) + np.asarray(cm, np.int64)
        objective = sorted((pair for p in parts for pair in zip(*p["objective"], strict=True)),
                           key=lambda rp: order[rp[0][0]])
        names = next(p["names"] for p in parts if p["names"] is not None)
        results = _report(OmegaConf.create(parts[0]["config"]), rows, per_tile, conf,
                          [list(r) for r, _ in objective], [px for _, px in objective], names)
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(results, indent=2)))
    log.info("wrote %s", out / "metrics.json")
    return results


def _report(cfg: DictConfig, rows: list, per_tile: dict, conf: dict, objective_rows: list,
            objective_pixels: list, names: list[str]) -> dict:
    """Prints the per-tile, pooled (Table 1) and Eq. 7 tables; the ``metrics.json`` content."""
    methods = _methods(cfg)
    windows = sorted({int(w) for w in cfg.raster.tile_sizes})
    header = ["tile"] + [t for t in next(iter(per_tile.values())) if t != "eq7"]
    print(format_table(header, [r + [""] * (len(header) - len(r)) for r in rows]))
    results = {"tiles": per_tile, "config": OmegaConf.to_container(cfg, resolve=True)}
    if conf:
        summary, results["pooled"] = [], []
        for name, label, kwargs in methods:
            for w in [0] if kwargs is None else windows:
                if (name, w) not in conf:
                    continue
                per_class, mean_iou = metrics.iou_from_confusion(conf[(name, w)])
                acc = metrics.accuracy_from_confusion(conf[(name, w)])
                summary.append([label, w or "-", acc, float(mean_iou)]
                               + [float(v) for v in per_class])
                results["pooled"].append({
                    "method": name, "window": w or None, "accuracy": acc,
                    "miou": float(mean_iou),
                    "iou": [None if np.isnan(v) else float(v) for v in per_class],
                })
        print("\npooled over all tiles (Table 1; IoU nan = class absent from truth and prediction)")
        print(format_table(["method", "W", "acc", "mIoU"] + [f"IoU {n}" for n in names], summary))
    if objective_rows:
        weights = np.asarray(objective_pixels, np.float64) / sum(objective_pixels)
        mean = [float(weights @ [r[j] for r in objective_rows]) for j in (1, 2, 3)]
        objective_rows.append(["all (pixel-weighted)", *mean, "yes" if mean[2] < mean[1] else "no"])
        results["eq7_pixel_weighted"] = dict(zip(("paint", "lsr", "truth"), mean, strict=True))
        print("\nEq. 7 (to be maximised) of hard maps under each tile's coarse data and the table;"
              " 'truth below LSR' = the data prefer our map to the truth")
        print(format_table(["tile", "paint", f"LSR W={windows[0]}", "truth", "truth below LSR"],
                           objective_rows))
    return results


if __name__ == "__main__":
    main()
