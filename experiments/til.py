"""TIL (lymphocyte) segmentation by epitomic LSR on CoNSeP H&E patches (paper Sec. 5.2, Table 2).

    python -m experiments.til                  # quick run, a few minutes on 2 CPU cores
    python -m experiments.til +til=full        # the full evaluation (all patches)

Fits everything (epitomes, embeddings, LSR, the composition table) on the dev split only and
scores the dev and the held-out tiles: ROC AUC per nucleus with bootstrap intervals over
patches, pixel AUC, against two baselines (the coarse density upsampled to pixels, mean
hematoxylin). Writes ``results.json`` and PNG panels (H&E | coarse map | predicted p(TIL) |
ground truth) into Hydra's output directory.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import jax
import jax.numpy as jnp
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from epilsr import viz
from epilsr.data import consep
from epilsr.pipelines import pathology
from experiments.common import atomic_write, format_table, one_line_errors

log = logging.getLogger("epilsr.til")


def _subset(n: int, k: int | None, seed: int) -> np.ndarray:
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, int(k), replace=False))


def _gray(x: np.ndarray, vmax: float = 1.0) -> np.ndarray:
    g = (255 * np.clip(np.asarray(x, np.float32) / vmax, 0, 1)).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def _zoom(x: np.ndarray, size: int = 256) -> np.ndarray:
    z = max(1, size // x.shape[0])
    return x.repeat(z, axis=0).repeat(z, axis=1)


class Scorer:
    """Nucleus truth of a set of patches; scores a ``[P, H, W]`` map into AUCs with intervals."""

    def __init__(self, ds: consep.ConsepSet, idx: np.ndarray, cfg):
        self.ds, self.idx, self.cfg = ds, idx, cfg
        self.ids, self.labels = [], []
        for p in idx:
            ids, pos = consep.nucleus_truth(ds.types[p], ds.instances[p])
            self.ids.append(ids)
            self.labels.append(pos)
        self.truth = ds.types[idx] == consep.INFLAMMATORY

    def __call__(self, scores: np.ndarray) -> dict:
        per = [
            pathology.nucleus_scores(s, self.ds.instances[p], i)
            for s, p, i in zip(scores, self.idx, self.ids, strict=True)
        ]
        y = np.concatenate(self.labels)
        if y.min() == y.max():  # AUC undefined on this subset (e.g. no TIL nucleus)
            return {"nucleus_auc": None, "ci": [None, None], "pixel_auc": None}
        lo, hi = pathology.bootstrap_auc(
            self.labels, per, n_boot=int(self.cfg.eval.n_boot), seed=int(self.cfg.seed)
        )
        return {
            "nucleus_auc": pathology.nucleus_auc(self.labels, per),
            "ci": [lo, hi],
            "pixel_auc": pathology.pixel_auc(
                self.truth, scores, max_pixels=int(self.cfg.eval.pixel_max), seed=int(self.cfg.seed)
            ),
        }

    @property
    def counts(self) -> tuple[int, int]:
        y = np.concatenate(self.labels)
        return int(y.size), int(y.sum())


@hydra.main(config_path="../conf", config_name="til", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> dict:
    out = Path(HydraConfig.get().runtime.output_dir)
    root = Path(cfg.data.root) if cfg.data.root else consep.consep_root()
    blocks = [int(b) for b in cfg.data.blocks]
    n_cls = int(cfg.data.n_classes)
    names = consep.find_patches(root)
    dev_names, held_names = consep.split_by_tile(names, holdout_every=int(cfg.data.holdout_every))
    if not dev_names or not held_names:
        raise ValueError(
            "data.holdout_every: both the dev and the held-out split must be non-empty"
        )
    log.info(
        "CoNSeP at %s: %d dev / %d held-out patches; outputs in %s",
        root,
        len(dev_names),
        len(held_names),
        out,
    )
    sets = {
        "dev": consep.load_consep(root, dev_names),
        "held-out": consep.load_consep(root, held_names),
    }
    for ds in sets.values():
        for b in blocks:
            consep.block_counts(ds.types[:1] > 0, block=b)  # block must divide the patches
    t0 = time.perf_counter()
    stain = {
        k: pathology.stain_image(ds.images, weight=float(cfg.stain.weight))
        for k, ds in sets.items()
    }
    hema = {k: pathology.hematoxylin(ds.images) for k, ds in sets.items()}
    coarse = {
        k: {b: consep.coarse_classes(ds.types, block=b, n_classes=n_cls) for b in blocks}
        for k, ds in sets.items()
    }
    # p(TIL | c) from the dev coarse maps only (the supervision the method is given).
    tables = {b: consep.composition_table(*coarse["dev"][b], n_classes=n_cls) for b in blocks}
    evals = {
        k: _subset(len(ds.names), cfg.data.eval_patches, int(cfg.seed) + i)
        for i, (k, ds) in enumerate(sets.items())
    }
    scorers = {k: Scorer(sets[k], evals[k], cfg) for k in sets}
    results: dict = {
        "splits": {
            k: {
                "patches": int(len(evals[k])),
                "nuclei": scorers[k].counts[0],
                "til_nuclei": scorers[k].counts[1],
            }
            for k in sets
        },
        "tables": {str(b): tables[b][:, 1].tolist() for b in blocks},
        "methods": {},
    }
    preds: dict = {k: {} for k in sets}

    def record(method: str, block, split: str, scores: np.ndarray) -> None:
        preds[split][(method, block)] = scores
        key = f"{method} @{block}" if block else method
        results["methods"].setdefault(key, {})[split] = scorers[split](scores)

    for split in sets:
        e = evals[split]
        record("mean hematoxylin", None, split, hema[split][e])
        for b in blocks:
            cls = coarse[split][b][1][e]
            up = consep.upsample_blocks(tables[b][cls, 1], block=b)
            record("upsampled density", b, split, up)
            h = np.clip(hema[split][e] / pathology.H_REF, 0, 1)
            record(
                "hematoxylin + coarse (Eq. 9)",
                b,
                split,
                pathology.coarse_posterior(h, cls, tables[b], block=b),
            )
    log.info("baselines: %.1f s", time.perf_counter() - t0)

    # Epitomic LSR: train on dev H&E, embed dev coarse classes (Eq. 11), LSR (Eqs. 8-9), Eq. 2.
    key = jax.random.key(int(cfg.seed))
    ep = OmegaConf.to_container(cfg.epitome, resolve=True)
    ep["sizes"] = tuple(ep["sizes"])
    for v, (variant, quantile) in enumerate(cfg.variants.items()):
        t0 = time.perf_counter()
        bar = tqdm(total=int(ep["steps"]), desc=f"train {variant}", unit="step")
        epi = pathology.train_epitome(
            jax.random.fold_in(key, v),
            stain["dev"],
            quantile=float(quantile),
            progress=lambda t, info, bar=bar: (
                bar.update(1),
                bar.set_postfix(loss=f"{info['loss']:.3g}"),
            ),
            **ep,
        )
        bar.close()
        maps = []
        for b in tqdm(blocks, desc=f"embed {variant}", unit="block size"):
            counts = pathology.embed_coarse(
                jax.random.fold_in(key, 100 + v),
                epi,
                stain["dev"],
                pathology.pixel_classes(coarse["dev"][b][1], block=b),
                n_classes=n_cls,
                n_patches=int(cfg.embed.n_patches),
                patch_size=int(cfg.embed.patch_size),
                temperature=cfg.embed.temperature,
            )
            q = pathology.til_label_probs(
                counts,
                tables[b],
                uniform_prior=bool(cfg.lsr.uniform_prior),
                iters=int(cfg.lsr.iters),
            )
            maps += [q, pathology.box_smooth(q, size=int(cfg.predict.box))]
        label_probs = jnp.stack(maps, axis=-1)  # [L, N, N, 2 * blocks]
        for split in sets:
            e = evals[split]
            bar = tqdm(total=len(e), desc=f"predict {variant} {split}", unit="patch")
            pred = pathology.predict_til(
                epi,
                label_probs,
                stain[split][e],
                patch_size=int(cfg.predict.patch_size),
                temperature=cfg.predict.temperature,
                stride=int(cfg.predict.stride),
                progress=lambda i, bar=bar: bar.update(1),
            )
            bar.close()
            for j, b in enumerate(blocks):
                cls = coarse[split][b][1][e]
                for suffix, ch in (("", 2 * j), (" (11x11 box)", 2 * j + 1)):
                    name = f"{variant} epitomic LSR{suffix}"
                    record(name, b, split, pred[..., ch])
                    record(
                        name + " + coarse",
                        b,
                        split,
                        pathology.coarse_posterior(pred[..., ch], cls, tables[b], block=b),
                    )
        np.savez_compressed(
            out / f"epitome_{variant}.npz",
            mean=np.asarray(epi.mean),
            log_var=np.asarray(epi.log_var),
            prior_logits=np.asarray(epi.prior_logits),
            label_probs=np.asarray(label_probs),
        )
        viz.save_png(
            out / f"epitome_{variant}.png",
            viz.panel(
                [
                    _zoom(np.clip(np.asarray(epi.mean[0, ..., :3]) * 255, 0, 255).astype(np.uint8)),
                    _zoom(
                        _gray(
                            label_probs[0, ..., 0], max(float(label_probs[0, ..., 0].max()), 1e-3)
                        )
                    ),
                ],
                ["epitome (RGB)", f"p(TIL | m, n) @{blocks[0]}"],
            ),
        )
        log.info("%s: %.1f s", variant, time.perf_counter() - t0)

    # Self-epitomic LSR: each patch is its own epitome, with its own coarse classes.
    n_self = cfg.self.eval_patches
    if n_self is None or int(n_self) > 0:
        kw = OmegaConf.to_container(cfg.self.kwargs, resolve=True)
        for split in sets:
            e = evals[split]
            sub = (
                np.arange(len(e)) if n_self is None else _subset(len(e), int(n_self), int(cfg.seed))
            )
            scorer = Scorer(sets[split], e[sub], cfg)
            for b in blocks:
                cls = coarse[split][b][1]
                out_maps = []
                for p in tqdm(e[sub], desc=f"self-epitomic {split} @{b}", unit="patch"):
                    out_maps.append(
                        np.asarray(
                            pathology.self_epitomic_til(
                                jax.random.fold_in(key, int(p)),
                                stain[split][p],
                                pathology.pixel_classes(cls[p], block=b),
                                tables[b],
                                cell_size=b,
                                **kw,
                            )
                        )
                    )
                pm = np.stack(out_maps)
                ref = scorer(consep.upsample_blocks(tables[b][cls[e[sub]], 1], block=b))
                for name, s in (
                    ("self-epitomic LSR", pm),
                    (
                        "self-epitomic LSR + coarse",
                        pathology.coarse_posterior(pm, cls[e[sub]], tables[b], block=b),
                    ),
                ):
                    entry = scorer(s)
                    entry["patches"] = int(len(sub))
                    results["methods"].setdefault(f"{name} @{b}", {})[split] = entry
                    # reference on the same subset, for a like-for-like comparison
                    entry["upsampled_density_same_patches"] = ref["nucleus_auc"]

    # Table (Table-2-like), JSON, pictures.
    rows = []
    for method, per in results["methods"].items():
        row = [method]
        for split in sets:
            r = per.get(split)
            row += (
                ["-", "-"]
                if r is None or r["nucleus_auc"] is None
                else [
                    f"{r['nucleus_auc']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]",
                    f"{r['pixel_auc']:.3f}",
                ]
            )
        rows.append(row)
    header = ["method (label training set: LR except hematoxylin)"]
    for split in sets:
        s = results["splits"][split]
        header += [
            f"{split} nucleus AUC [95% CI] ({s['nuclei']} nuclei, {s['til_nuclei']} TIL)",
            f"{split} pixel AUC",
        ]
    print(format_table(header, rows))
    results["config"] = OmegaConf.to_container(cfg, resolve=True)
    atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(results, indent=2)))

    # Pictures: the held-out patches with the most inflammatory pixels.
    split = "held-out"
    e = evals[split]
    best = preds[split].get(("div epitomic LSR + coarse", blocks[0]))
    til_pixels = (sets[split].types[e] == consep.INFLAMMATORY).sum(axis=(1, 2))
    for j in np.argsort(-til_pixels, kind="stable")[: int(cfg.eval.pictures)]:
        p = e[j]
        cls = coarse[split][blocks[0]][1][p]
        pr = best[j] if best is not None else hema[split][p]
        panels = [
            sets[split].images[p],
            _gray(consep.upsample_blocks(tables[blocks[0]][cls, 1], block=blocks[0]), 1.0),
            _gray(pr, max(float(pr.max()), 1e-3)),
            viz.colorize(
                (sets[split].types[p] == consep.INFLAMMATORY).astype(np.uint8), consep.TIL_COLORS
            ),
        ]
        titles = [
            "H&E",
            f"coarse p(TIL|c) @{blocks[0]}",
            f"div LSR + coarse (max {float(pr.max()):.2f})",
            "inflammatory (truth)",
        ]
        viz.save_png(out / f"{sets[split].names[p]}.png", viz.panel(panels, titles))
    log.info("wrote %s", out / "results.json")
    return results


if __name__ == "__main__":
    main()
