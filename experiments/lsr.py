"""Self-epitomic label super-resolution over a set of tiles (paper Sec. 5.1).

    python -m experiments.lsr                                    # embedded demo scene
    python -m experiments.lsr +exp=chesapeake_wv data.root=../shared/data/chesapeake_wv
    python -m experiments.lsr --help                             # options and experiments

Prints per-tile and pooled accuracy / mIoU of self-epitomic LSR against painting each coarse
cell with its most likely label, and writes label panels (PNG), probabilities (.npy) and
``metrics.json`` into Hydra's output directory.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import jax
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import epilsr
from epilsr import metrics, viz
from experiments.common import atomic_write, format_table, iter_tiles, one_line_errors

log = logging.getLogger("epilsr.lsr")


def _npy_writer(array: np.ndarray):
    def write(path: Path) -> None:
        with open(path, "wb") as f:
            np.save(f, array)

    return write


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


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> dict:
    out = Path(HydraConfig.get().runtime.output_dir)
    lsr_kwargs = OmegaConf.to_container(cfg.lsr, resolve=True)
    log.info("self-epitomic LSR on %s data; outputs in %s", cfg.data.kind, out)
    key = jax.random.key(cfg.seed)
    n_labels = None
    conf = {"paint": None, "lsr": None}
    rows, per_tile = [], {}
    tiles = list(iter_tiles(cfg.data))
    for i, tile in enumerate(tqdm(tiles, desc="tiles", unit="tile")):
        n_labels = tile.table.shape[1]
        start = time.perf_counter()
        probs = epilsr.self_epitomic_lsr(
            jax.random.fold_in(key, i),
            tile.image,
            tile.classes,
            tile.table,
            cell_size=int(cfg.data.cell_size),
            **lsr_kwargs,
        )
        probs = np.asarray(jax.block_until_ready(probs))
        seconds = time.perf_counter() - start
        pred = probs.argmax(-1).astype(np.uint8)
        paint = np.asarray(epilsr.paint_classes(tile.classes, tile.table)).argmax(-1)
        if cfg.output.probs:
            atomic_write(out / f"{tile.name}_probs.npy", _npy_writer(probs.astype(np.float16)))
        if cfg.output.png:
            viz.save_png(out / f"{tile.name}.png", _tile_panel(tile, paint, pred))
        if tile.labels is None:
            rows.append([tile.name, "-", "-", f"{seconds:.2f}"])
            continue
        row = [tile.name]
        for name, p in (("paint", paint), ("lsr", pred)):
            cm = metrics.confusion_matrix(tile.labels, p, n_classes=n_labels, ignore=255)
            conf[name] = cm if conf[name] is None else conf[name] + cm
            row.append(metrics.accuracy_from_confusion(cm))
        row.append(f"{seconds:.2f}")
        rows.append(row)
        per_tile[tile.name] = {"paint_acc": row[1], "lsr_acc": row[2], "seconds": seconds}

    print(format_table(["tile", "paint acc", "LSR acc", "seconds"], rows))
    results = {"tiles": per_tile, "config": OmegaConf.to_container(cfg, resolve=True)}
    if conf["lsr"] is not None:
        summary = []
        for name, label in (
            ("paint", "paint each coarse cell (baseline)"),
            ("lsr", "self-epitomic LSR"),
        ):
            per_class, mean_iou = metrics.iou_from_confusion(conf[name])
            acc = metrics.accuracy_from_confusion(conf[name])
            summary.append([label, acc, float(mean_iou)] + [float(v) for v in per_class])
            results[name] = {
                "accuracy": acc,
                "miou": float(mean_iou),
                "iou": [None if np.isnan(v) else float(v) for v in per_class],
            }
        names = list(tiles[0].label_names)
        print("\npooled over all tiles (IoU nan = class absent from truth and prediction)")
        print(format_table(["method", "acc", "mIoU"] + [f"IoU {n}" for n in names], summary))
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(results, indent=2)))
    log.info("wrote %s", out / "metrics.json")
    return results


if __name__ == "__main__":
    main()
