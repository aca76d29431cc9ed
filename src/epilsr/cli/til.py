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

import dataclasses
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
from epilsr.cli.common import atomic_write, format_table, one_line_errors, use_cpu_devices
from epilsr.data import consep
from epilsr.pipelines import pathology

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


@dataclasses.dataclass
class Study:
    """What the stages of the TIL study share: the splits with their stain images and coarse
    maps, the composition tables p(TIL | c), the scored subsets, and the results so far."""

    cfg: DictConfig
    out: Path
    blocks: list[int]
    n_cls: int
    sets: dict  # split -> consep.ConsepSet
    stain: dict  # split -> [P, H, W, 4] RGB + weighted hematoxylin
    hema: dict  # split -> [P, H, W] hematoxylin
    coarse: dict  # split -> block -> (fractions, classes)
    tables: dict  # block -> [n_cls, 2] p(label | class), from the dev split only
    evals: dict  # split -> indices of the scored patches
    scorers: dict
    results: dict
    preds: dict = dataclasses.field(default_factory=dict)

    def record(self, method: str, block, split: str, scores: np.ndarray) -> None:
        self.preds.setdefault(split, {})[(method, block)] = scores
        key = f"{method} @{block}" if block else method
        self.results["methods"].setdefault(key, {})[split] = self.scorers[split](scores)


def load_study(cfg: DictConfig, out: Path) -> Study:
    """Splits, stains, coarse maps and tables; every block size must divide the patches."""
    root = Path(cfg.data.root) if cfg.data.root else consep.consep_root()
    blocks = [int(b) for b in cfg.data.blocks]
    n_cls = int(cfg.data.n_classes)
    names = consep.find_patches(root)
    dev_names, held_names = consep.split_by_tile(names, holdout_every=int(cfg.data.holdout_every))
    if not dev_names or not held_names:
        raise ValueError(
            "data.holdout_every: both the dev and the held-out split must be non-empty"
        )
    log.info("CoNSeP at %s: %d dev / %d held-out patches; outputs in %s", root,
             len(dev_names), len(held_names), out)
    sets = {"dev": consep.load_consep(root, dev_names),
            "held-out": consep.load_consep(root, held_names)}
    for ds in sets.values():
        for b in blocks:
            consep.block_counts(ds.types[:1] > 0, block=b)  # block must divide the patches
    stain = {k: pathology.stain_image(ds.images, weight=float(cfg.stain.weight))
             for k, ds in sets.items()}
    hema = {k: pathology.hematoxylin(ds.images) for k, ds in sets.items()}
    coarse = {k: {b: consep.coarse_classes(ds.types, block=b, n_classes=n_cls) for b in blocks}
              for k, ds in sets.items()}
    # p(TIL | c) from the dev coarse maps only (the supervision the method is given).
    tables = {b: consep.composition_table(*coarse["dev"][b], n_classes=n_cls) for b in blocks}
    evals = {k: _subset(len(ds.names), cfg.data.eval_patches, int(cfg.seed) + i)
             for i, (k, ds) in enumerate(sets.items())}
    scorers = {k: Scorer(sets[k], evals[k], cfg) for k in sets}
    results = {
        "splits": {k: {"patches": int(len(evals[k])), "nuclei": scorers[k].counts[0],
                       "til_nuclei": scorers[k].counts[1]} for k in sets},
        "tables": {str(b): tables[b][:, 1].tolist() for b in blocks},
        "methods": {},
    }
    return Study(cfg, out, blocks, n_cls, sets, stain, hema, coarse, tables, evals, scorers,
                 results, {k: {} for k in sets})


def run_baselines(st: Study) -> None:
    """Mean hematoxylin, the upsampled coarse density, and hematoxylin + coarse (Eq. 9)."""
    for split in st.sets:
        e = st.evals[split]
        st.record("mean hematoxylin", None, split, st.hema[split][e])
        for b in st.blocks:
            cls = st.coarse[split][b][1][e]
            st.record("upsampled density", b, split,
                      consep.upsample_blocks(st.tables[b][cls, 1], block=b))
            h = np.clip(st.hema[split][e] / pathology.H_REF, 0, 1)
            st.record("hematoxylin + coarse (Eq. 9)", b, split,
                      pathology.coarse_posterior(h, cls, st.tables[b], block=b))


def train_variant(st: Study, key, quantile: float, variant: str):
    """An epitome of the dev H&E (diversified when ``quantile < 1``)."""
    ep = OmegaConf.to_container(st.cfg.epitome, resolve=True)
    ep["sizes"] = tuple(ep["sizes"])
    bar = tqdm(total=int(ep["steps"]), desc=f"train {variant}", unit="step")
    epi = pathology.train_epitome(
        key, st.stain["dev"], quantile=float(quantile),
        progress=lambda t, info: (bar.update(1), bar.set_postfix(loss=f"{info['loss']:.3g}")),
        **ep,
    )
    bar.close()
    return epi


def embed_variant(st: Study, key, epi, variant: str) -> jax.Array:
    """``[L, N, N, 2 * blocks]``: p(TIL | m, n) per block size (Eq. 11, Eqs. 8-9), plain and
    box-smoothed."""
    cfg = st.cfg
    maps = []
    for b in tqdm(st.blocks, desc=f"embed {variant}", unit="block size"):
        counts = pathology.embed_coarse(
            key, epi, st.stain["dev"], pathology.pixel_classes(st.coarse["dev"][b][1], block=b),
            n_classes=st.n_cls, n_patches=int(cfg.embed.n_patches),
            patch_size=int(cfg.embed.patch_size), temperature=cfg.embed.temperature,
        )
        q = pathology.til_label_probs(counts, st.tables[b],
                                      uniform_prior=bool(cfg.lsr.uniform_prior),
                                      iters=int(cfg.lsr.iters))
        maps += [q, pathology.box_smooth(q, size=int(cfg.predict.box))]
    return jnp.stack(maps, axis=-1)


def predict_variant(st: Study, epi, label_probs, variant: str) -> None:
    """Eq. 2 on the scored patches of every split, alone and combined with the coarse map."""
    cfg = st.cfg
    for split in st.sets:
        e = st.evals[split]
        bar = tqdm(total=len(e), desc=f"predict {variant} {split}", unit="patch")
        pred = pathology.predict_til(
            epi, label_probs, st.stain[split][e], patch_size=int(cfg.predict.patch_size),
            temperature=cfg.predict.temperature, stride=int(cfg.predict.stride),
            progress=lambda i, bar=bar: bar.update(1),
        )
        bar.close()
        for j, b in enumerate(st.blocks):
            cls = st.coarse[split][b][1][e]
            for suffix, ch in (("", 2 * j), (" (11x11 box)", 2 * j + 1)):
                name = f"{variant} epitomic LSR{suffix}"
                st.record(name, b, split, pred[..., ch])
                st.record(name + " + coarse", b, split,
                          pathology.coarse_posterior(pred[..., ch], cls, st.tables[b], block=b))


def save_variant(st: Study, epi, label_probs, variant: str) -> None:
    """``epitome_<variant>.npz`` (the epitome and its label maps) and a PNG of both."""
    np.savez_compressed(
        st.out / f"epitome_{variant}.npz", mean=np.asarray(epi.mean),
        log_var=np.asarray(epi.log_var), prior_logits=np.asarray(epi.prior_logits),
        label_probs=np.asarray(label_probs),
    )
    rgb = np.clip(np.asarray(epi.mean[0, ..., :3]) * 255, 0, 255).astype(np.uint8)
    til = label_probs[0, ..., 0]
    viz.save_png(st.out / f"epitome_{variant}.png", viz.panel(
        [_zoom(rgb), _zoom(_gray(til, max(float(til.max()), 1e-3)))],
        ["epitome (RGB)", f"p(TIL | m, n) @{st.blocks[0]}"],
    ))


def run_epitomic(st: Study, key) -> None:
    """Epitomic LSR per variant: train on dev H&E, embed dev coarse classes, predict."""
    for v, (variant, quantile) in enumerate(st.cfg.variants.items()):
        t0 = time.perf_counter()
        epi = train_variant(st, jax.random.fold_in(key, v), quantile, variant)
        label_probs = embed_variant(st, jax.random.fold_in(key, 100 + v), epi, variant)
        predict_variant(st, epi, label_probs, variant)
        save_variant(st, epi, label_probs, variant)
        log.info("%s: %.1f s", variant, time.perf_counter() - t0)


def run_self_epitomic(st: Study, key) -> None:
    """Self-epitomic LSR: each patch is its own epitome, with its own coarse classes."""
    cfg, n_self = st.cfg, st.cfg.self.eval_patches
    if n_self is not None and int(n_self) <= 0:
        return
    kw = OmegaConf.to_container(cfg.self.kwargs, resolve=True)
    for split in st.sets:
        e = st.evals[split]
        sub = np.arange(len(e)) if n_self is None else _subset(len(e), int(n_self), int(cfg.seed))
        scorer = Scorer(st.sets[split], e[sub], cfg)
        for b in st.blocks:
            cls = st.coarse[split][b][1]
            pm = np.stack([
                np.asarray(pathology.self_epitomic_til(
                    jax.random.fold_in(key, int(p)), st.stain[split][p],
                    pathology.pixel_classes(cls[p], block=b), st.tables[b], cell_size=b, **kw,
                ))
                for p in tqdm(e[sub], desc=f"self-epitomic {split} @{b}", unit="patch")
            ])
            ref = scorer(consep.upsample_blocks(st.tables[b][cls[e[sub]], 1], block=b))
            combined = pathology.coarse_posterior(pm, cls[e[sub]], st.tables[b], block=b)
            for name, s in (("self-epitomic LSR", pm), ("self-epitomic LSR + coarse", combined)):
                entry = scorer(s)
                entry["patches"] = int(len(sub))
                st.results["methods"].setdefault(f"{name} @{b}", {})[split] = entry
                # reference on the same subset, for a like-for-like comparison
                entry["upsampled_density_same_patches"] = ref["nucleus_auc"]


def print_table(st: Study) -> None:
    """The Table-2-like summary: nucleus AUC [95% CI] and pixel AUC per method and split."""
    rows = []
    for method, per in st.results["methods"].items():
        row = [method]
        for split in st.sets:
            r = per.get(split)
            row += (["-", "-"] if r is None or r["nucleus_auc"] is None else [
                f"{r['nucleus_auc']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]",
                f"{r['pixel_auc']:.3f}",
            ])
        rows.append(row)
    header = ["method (label training set: LR except hematoxylin)"]
    for split in st.sets:
        s = st.results["splits"][split]
        header += [
            f"{split} nucleus AUC [95% CI] ({s['nuclei']} nuclei, {s['til_nuclei']} TIL)",
            f"{split} pixel AUC",
        ]
    print(format_table(header, rows))


def save_pictures(st: Study) -> None:
    """PNG panels of the held-out patches with the most inflammatory pixels."""
    split, b0 = "held-out", st.blocks[0]
    e, ds = st.evals[split], st.sets[split]
    best = st.preds[split].get(("div epitomic LSR + coarse", b0))
    til_pixels = (ds.types[e] == consep.INFLAMMATORY).sum(axis=(1, 2))
    for j in np.argsort(-til_pixels, kind="stable")[: int(st.cfg.eval.pictures)]:
        p = e[j]
        cls = st.coarse[split][b0][1][p]
        pr = best[j] if best is not None else st.hema[split][p]
        panels = [
            ds.images[p],
            _gray(consep.upsample_blocks(st.tables[b0][cls, 1], block=b0), 1.0),
            _gray(pr, max(float(pr.max()), 1e-3)),
            viz.colorize((ds.types[p] == consep.INFLAMMATORY).astype(np.uint8),
                         consep.TIL_COLORS),
        ]
        titles = ["H&E", f"coarse p(TIL|c) @{b0}",
                  f"div LSR + coarse (max {float(pr.max()):.2f})", "inflammatory (truth)"]
        viz.save_png(st.out / f"{ds.names[p]}.png", viz.panel(panels, titles))


@hydra.main(config_path="conf", config_name="til", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> dict:
    use_cpu_devices(cfg)  # before any other JAX call
    out = Path(HydraConfig.get().runtime.output_dir)
    st = load_study(cfg, out)
    t0 = time.perf_counter()
    run_baselines(st)
    log.info("baselines: %.1f s", time.perf_counter() - t0)
    key = jax.random.key(int(cfg.seed))
    run_epitomic(st, key)
    run_self_epitomic(st, key)
    print_table(st)
    st.results["config"] = OmegaConf.to_container(cfg, resolve=True)
    atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(st.results, indent=2)))
    save_pictures(st)
    log.info("wrote %s", out / "results.json")
    return st.results


if __name__ == "__main__":
    main()
