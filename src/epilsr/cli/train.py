"""Epitome training (paper Sec. 3): SGD + location promotion + diversification, resumable.

    python -m experiments.train +exp=demo
    python -m experiments.train +exp=chesapeake_wv data.root=../shared/data/chesapeake_wv
    python -m experiments.train +exp=chesapeake data.root=/path/to/lila
    python -m experiments.train +exp=demo hydra.run.dir=outputs/train/<run>   # continue it
    python -m experiments.train +exp=demo resume=false hydra.run.dir=outputs/train/<run>
    python -m experiments.train +exp=demo resume=outputs/train/<run>/checkpoints

Writes into Hydra's output directory: ``metrics.jsonl`` (one JSON line per step, plus held-out
evaluations), ``run_settings.json`` (what a resume must match), ``checkpoints/<stage>/
checkpoint_*.npz`` (the whole TrainState, atomic), ``epitome.npz``
(loadable with ``epilsr.io.checkpoint.load_epitome``), and PNGs of the epitome means and of the
location-promotion counters. Each step's patches are drawn with ``fold_in(seed_key, step)``, so
a resumed run continues exactly where the killed one stopped.

Patches come from the data in memory (``[T, H, W, C]``: the demo scene, ``chesapeake_wv``,
``data.stream=false``), or, with ``data.stream=true`` (the LILA default), from a
:class:`epilsr.pipelines.patch_stream.PatchStream` over every tile of the region: windows read
on the prefetch thread through a ``data.cache_bytes`` LRU cache, label-conditioned draws and the
cascade's "label absent" decision from an index over the whole region.

``resume`` (default ``true``): a rerun into a folder with checkpoints continues from the newest
*readable* one (damaged files are skipped with a warning) if the settings match, and refuses
otherwise; ``resume=false`` starts over, moving the previous run's log, checkpoints and results
to ``previous_run_<n>/`` (never appending to the old ``metrics.jsonl``); a path resumes from that
checkpoint file or folder. Leftover ``.tmp`` files of a killed run are removed at start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import hydra
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import epilsr
from epilsr import parallel, samplers, train, viz
from epilsr.cli.common import (
    atomic_write,
    check_route,
    load_training_images,
    one_line_errors,
    open_patch_stream,
    renamed_keys,
    renamed_settings,
    streams,
    use_cpu_devices,
)
from epilsr.io import checkpoint
from epilsr.pipelines.patch_stream import PatchStream
from epilsr.pipelines.prefetch import prefetch

log = logging.getLogger("epilsr.train")


def heldout_stats(epitome, patches, temperature) -> dict:
    """Coverage (positions with mean posterior > 1/(10 L N^2)) and log-likelihood per pixel."""
    logpost = epilsr.log_posterior(epitome, patches, temperature=temperature)
    usage = jnp.mean(jnp.exp(logpost), axis=0)
    loglik = epilsr.log_likelihood(epitome, patches) + epilsr.log_prior(epitome)
    marginal = jax.nn.logsumexp(loglik, axis=(1, 2, 3))
    k = patches.shape[1]
    return {
        "coverage": float(jnp.mean(usage > 1.0 / (10 * usage.size))),
        "loglik_per_pixel": float(jnp.mean(marginal) / (k * k)),
    }


def epitome_picture(epitome, counters=None) -> np.ndarray:
    zoom = max(1, 256 // epitome.mean.shape[1])
    means = [viz.rgb_preview(np.asarray(m)) for m in epitome.mean]
    titles = [f"layer {i}" for i in range(len(means))]
    if counters is not None:
        c = np.asarray(counters)
        for i, layer in enumerate(c):
            g = (255 * layer / max(float(c.max()), 1e-12)).astype(np.uint8)
            means.append(np.repeat(g[..., None], 3, axis=-1))
            titles.append(f"counters {i}")
    means = [m.repeat(zoom, axis=0).repeat(zoom, axis=1) for m in means]
    return viz.panel(means, titles)


def _truncate_log(path: Path, stage: str, step: int) -> None:
    """Drops this stage's log lines past ``step`` (written after the checkpoint we resume)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if rec["stage"] != stage or rec["step"] <= step:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


_RUN_FILES = ("metrics.jsonl", "run_settings.json", "results.json", "epitome.npz", "checkpoints")


#: Settings that do not change the training trajectory (read limits, cache, prefetch depth).
_NOT_SETTINGS = {"data": ("max_pixels", "max_bytes", "warn_mpx", "cache_bytes",
                          "read_threads"),
                 "train": ("prefetch",)}


def _run_settings(cfg) -> dict:
    """What a resumed run must share with the checkpoints' run (the training trajectory)."""
    out = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k])
           else cfg[k] for k in ("seed", "model", "train", "data")}
    for group, keys in _NOT_SETTINGS.items():
        for k in keys:
            out[group].pop(k, None)
    return out


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _clean_tmp(out: Path) -> None:
    """Temporary files of a killed run (the folder is locked: no other writer)."""
    for pattern in (".*.tmp", "*.tmp", "checkpoints/*/.*.tmp"):
        for tmp in out.glob(pattern):
            if tmp.is_file():
                log.info("removing leftover temporary file %s", tmp)
                tmp.unlink()


def _move_aside(out: Path, why: str) -> Path | None:
    """Moves the previous run's log, checkpoints and results to ``previous_run_<n>/``."""
    found = [out / f for f in _RUN_FILES if (out / f).exists()]
    if not found:
        return None
    n = 1 + max([int(p.name.rsplit("_", 1)[1]) for p in out.glob("previous_run_*")
                 if p.name.rsplit("_", 1)[1].isdigit()], default=0)
    dest = out / f"previous_run_{n}"
    dest.mkdir()
    for f in found:
        shutil.move(str(f), dest / f.name)
    log.warning("%s: moved the previous run's %s to %s (%s)", out, ", ".join(f.name for f in found),
                dest, why)
    return dest


def prepare_run_folder(out: Path, cfg, resume) -> str | Path | None:
    """Decides what ``run_stage`` resumes from (see the module docstring); process 0 only.

    Returns None (fresh start), the folder's own ``checkpoints`` (``resume=true`` and a
    compatible previous run) or the user's path. Raises ``ValueError`` when ``resume=true``
    meets checkpoints of other settings.
    """
    _clean_tmp(out)
    settings = _run_settings(cfg)
    saved = out / "run_settings.json"
    ckpts = out / "checkpoints"
    has_ckpts = any(ckpts.glob("*/checkpoint_*.npz"))
    result = None
    if resume is True:
        if has_ckpts and saved.exists():
            changed = _changed(renamed_settings(json.loads(saved.read_text())), settings)
            if changed:
                raise ValueError(
                    f"resume: {out} holds a run with other settings ({'; '.join(changed[:4])}); "
                    "pass resume=false to start over (the old run is kept in previous_run_<n>/) "
                    "or choose another hydra.run.dir"
                )
            result = ckpts
        else:
            _move_aside(out, "no resumable checkpoints of known settings; starting a new log")
    elif resume is False:
        _move_aside(out, "resume=false")
    else:
        result = resume
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(settings, indent=1, sort_keys=True))
    return result


def _restore(state, name: str, resume):
    """``state`` restored from ``resume`` (a checkpoint file, a stage folder, or a folder of
    stage folders: the newest readable checkpoint), or unchanged when a folder of stage folders
    has none for this stage yet (a later stage of a cascade)."""
    path = Path(resume)
    if path.is_file():
        return checkpoint.restore(path, state), path
    if not path.is_dir():
        raise FileNotFoundError(f"resume: {resume} is neither a checkpoint file nor a folder")
    folder = path / name if (path / name).is_dir() else path
    restored, found = checkpoint.restore_latest(folder, state)
    if found is None:
        if any(p.is_dir() for p in path.iterdir()):  # other stages' folders: this one not begun
            log.info("no checkpoint of stage %s under %s; it starts from step 0", name, path)
            return state, None
        raise FileNotFoundError(f"resume: no checkpoint found under {resume}")
    return restored, found


def _init_state(cfg, images, streamed: bool, key_init, key_data):
    """``(optimizer, state)`` of a new epitome whose means start at the data's mean colour."""
    if streamed:  # the region's mean, estimated from uniform patches of the whole region
        mean = jnp.asarray(images.mean(jax.random.fold_in(key_init, 1)))
    else:
        mean = jnp.mean(images, axis=(0, 1, 2))
    epitome = epilsr.init_epitome(
        key_init,
        size=int(cfg.model.size),
        channels=images.channels if streamed else images.shape[-1],
        layers=int(cfg.model.layers),
        mean=mean,
        var=float(cfg.model.init_var),
    )
    optimizer = optax.adam(float(cfg.train.lr))
    return optimizer, train.train_init(key_data, epitome, optimizer)


def _hyper(tcfg, epitome) -> dict:
    """The train step's static hyperparameters from ``train.*``."""
    hyper = dict(
        quantile=float(tcfg.quantile),
        promotion=bool(tcfg.promotion),
        promotion_threshold=train.default_promotion_threshold(epitome, c=float(tcfg.promotion_c)),
        delta=float(tcfg.delta),
    )
    if tcfg.temperature is not None:
        hyper["temperature"] = float(tcfg.temperature)
    hyper["route"] = check_route(tcfg.route, "train.route")  # sharded: shard_map'd likelihood
    return hyper


def _step_function(tcfg, state, optimizer, hyper: dict):
    """``(step, mesh or None, state placed for it, devices)``: one global mesh over every
    process's devices (several processes; each feeds its own share), a local mesh over
    ``train.devices`` (several devices), else the one-device jitted step."""
    n_dev = len(jax.local_devices()) if tcfg.devices is None else int(tcfg.devices)
    if jax.process_count() > 1:
        mesh = parallel.data_mesh(jax.devices())
        n_dev = len(jax.devices())
    elif n_dev > 1:
        mesh = parallel.data_mesh(jax.local_devices()[:n_dev])
    else:
        return train.make_train_step(optimizer=optimizer, **hyper), None, state, n_dev
    step_fn = parallel.make_sharded_train_step(mesh, optimizer=optimizer, **hyper)
    return step_fn, mesh, parallel.replicate(state, mesh), n_dev


def _patch_source(images, labels, *, sizes, base_key, batch: int, label, streamed: bool):
    """``draw(step) -> patches [batch, K, K, C]`` of this process: step-indexed randomness
    (``fold_in(base_key, step)``, and the process index when there are several)."""
    n_proc, proc = jax.process_count(), jax.process_index()

    def draw(step: int):
        k = int(sizes[step])
        skey = jax.random.fold_in(base_key, step)
        if n_proc > 1:
            skey = jax.random.fold_in(skey, proc)
        if streamed:  # windows of every tile, read on this (prefetch) thread
            return images.sample(skey, size=k, batch=batch, label=label)
        if label is None:
            return samplers.sample_patches(skey, images, size=k, batch=batch)
        return samplers.sample_labelled_patches(
            skey, images, labels, label=label, patch_size=k, batch=batch
        )[0]

    return draw


def _eval_patches(cfg, images, key_eval, streamed: bool):
    """The held-out patches every evaluation scores (``eval.patches`` of ``eval.patch_size``)."""
    k_eval, n = int(cfg.eval.patch_size), int(cfg.eval.patches)
    if streamed:
        return jnp.asarray(images.sample(key_eval, size=k_eval, batch=n))
    return samplers.sample_patches(key_eval, images, size=k_eval, batch=n)


def _save_checkpoint(cfg, out: Path, name: str, state, step: int) -> None:
    """Checkpoint ``step`` of stage ``name`` (the newest ``checkpoint.keep`` kept) and the
    picture of its epitome."""
    ckpt_dir = out / "checkpoints" / name
    checkpoint.save(checkpoint.checkpoint_path(ckpt_dir, step), state)
    for old in sorted(ckpt_dir.glob("checkpoint_*.npz"))[: -int(cfg.checkpoint.keep)]:
        old.unlink()
    viz.save_png(out / f"{name}_epitome.png", epitome_picture(state.params, state.counters))


def run_stage(cfg, name, images, labels, out, *, key, reference=None, label=None, resume=None):
    """Trains one epitome; returns (final state, heldout stats).

    ``images``: ``[T, H, W, C]`` in memory (``labels`` ``[T, H, W]`` or None), or a
    :class:`PatchStream` over the whole region (``labels`` unused)."""
    tcfg = cfg.train
    streamed = isinstance(images, PatchStream)
    key_init, key_data, key_sizes, key_eval = jax.random.split(key, 4)
    optimizer, state = _init_state(cfg, images, streamed, key_init, key_data)
    epitome = state.params
    if resume is not None:
        state, path = _restore(state, name, resume)
        if path is not None:
            log.info("resumed %s from %s at step %d", name, path, int(state.step))
        _truncate_log(out / "metrics.jsonl", name, int(state.step))
    base_key = state.key  # host-local copy (before any replication over a mesh)
    steps = int(tcfg.steps)
    sizes = samplers.patch_sizes(key_sizes, num_steps=steps, sizes=tuple(tcfg.patch_sizes))
    step_fn, mesh, state, n_dev = _step_function(tcfg, state, optimizer, _hyper(tcfg, epitome))
    batch = int(tcfg.batch)
    if batch % n_dev:
        raise ValueError(f"train.batch: {batch} is not divisible by the {n_dev} devices")
    draw = _patch_source(images, labels, sizes=sizes, base_key=base_key, label=label,
                         batch=batch // jax.process_count(), streamed=streamed)  # per process
    eval_patches = _eval_patches(cfg, images, key_eval, streamed)
    t_eval = train.default_temperature(int(cfg.eval.patch_size))
    start = int(state.step)
    stream = prefetch((draw(s) for s in range(start, steps)), size=int(tcfg.prefetch))
    writer = jax.process_index() == 0  # process 0 writes logs, pictures and checkpoints
    metrics_file = (out / "metrics.jsonl").open("a") if writer else open(os.devnull, "w")
    bar = tqdm(
        range(start, steps), desc=name, unit="step", initial=start, total=steps, disable=not writer
    )
    stats = {}
    try:
        for step in bar:
            patches = next(stream)
            if mesh is not None:
                patches = parallel.shard_batch(patches, mesh)
            t0 = time.perf_counter()
            state, info = step_fn(state, patches, reference)
            rec = {
                "stage": name,
                "step": step + 1,
                "patch_size": int(sizes[step]),
                **{k: float(v) for k, v in info._asdict().items()},
            }
            rec["seconds"] = time.perf_counter() - t0
            if not np.isfinite(rec["loss"]):
                raise FloatingPointError(f"non-finite loss at step {step + 1}: {rec}")
            if (step + 1) % int(cfg.eval.every) == 0 or step + 1 == steps:
                stats = heldout_stats(state.params, eval_patches, t_eval)
                rec.update({f"heldout_{k}": v for k, v in stats.items()})
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3g}", cover=f"{rec['coverage']:.2f}")
            if writer and ((step + 1) % int(cfg.checkpoint.every) == 0 or step + 1 == steps):
                _save_checkpoint(cfg, out, name, state, step + 1)
    finally:
        stream.close()
        metrics_file.close()
    if not stats:
        stats = heldout_stats(state.params, eval_patches, t_eval)
    return state, stats


@renamed_keys
@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@one_line_errors
def main(cfg: DictConfig) -> dict:
    use_cpu_devices(cfg)  # before any other JAX call
    dist = cfg.distributed
    parallel.initialize_distributed(dist.coordinator, int(dist.num_processes), int(dist.process_id))
    out = Path(HydraConfig.get().runtime.output_dir)
    check_route(cfg.train.route, "train.route")  # before reading any data
    images, labels, n_labels = _training_data(cfg, out)
    key = jax.random.key(int(cfg.seed))
    resume = _resume_from(cfg, out)
    if not cfg.train.cascade:
        state, stats = run_stage(
            cfg, "E", images, labels, out, key=key, label=cfg.train.label, resume=resume
        )
        final, results = state.params, {"E": stats}
    else:
        final, results = _cascade(cfg, images, labels, n_labels, out, key=key, resume=resume)
    if isinstance(images, PatchStream):
        images.close()
    if jax.process_index() != 0:
        return results
    _write_results(cfg, out, final, results)
    return results


def _training_data(cfg, out: Path):
    """``(images, labels, n_labels)``: a :class:`PatchStream` over every tile (``data.stream``;
    labels None, its label index kept in ``<out>/stream_index.npz``) or the in-memory
    ``[T, H, W, C]`` images and ``[T, H, W]`` labels (or None)."""
    if streams(cfg.data):
        max_size = max([int(k) for k in cfg.train.patch_sizes] + [int(cfg.eval.patch_size)])
        index = out / "stream_index.npz"  # the label index, reused by a resume
        images = open_patch_stream(cfg.data, max_size=max_size, index_file=index)
        log.info(
            "training on %s data streamed from all %d tiles (%.1f Mpx; windows of %d^2 "
            "positions, cache %.0f MiB); outputs in %s", cfg.data.kind, len(images.tiles),
            float(images.shapes.prod(axis=1).sum()) / 1e6, images.block,
            images.cache.max_bytes / 2**20, out,
        )
        return images, None, images.n_labels
    images, labels, n_labels = load_training_images(cfg.data)
    log.info(
        "training on %s data: %d image(s) %s; outputs in %s",
        cfg.data.kind,
        images.shape[0],
        tuple(images.shape[1:]),
        out,
    )
    return images, labels, n_labels


def _resume_from(cfg, out: Path):
    """What the stages resume from: process 0 decides (:func:`prepare_run_folder`); the other
    processes take their own folder's checkpoints, if any, with ``resume=true``."""
    resume = cfg.get("resume", True)
    if jax.process_index() == 0:
        return prepare_run_folder(out, cfg, resume)
    if resume is True:
        return out / "checkpoints" if (out / "checkpoints").is_dir() else None
    return None if resume is False else resume


def _cascade(cfg, images, labels, n_labels: int, out: Path, *, key, resume):
    """Sec. 5.1: per label, E0 -> E1 (worst quarter under E0) -> E2; ``(uniform mixture of
    every E1 and E2, held-out stats per stage)``. Labels absent from the data (streamed:
    from every tile of the region) are skipped."""
    streamed = isinstance(images, PatchStream)
    if not (images.has_labels if streamed else labels is not None):
        raise ValueError("train.cascade: needs label maps for label-conditioned sampling")
    parts, results = [], {}
    wanted = range(n_labels) if cfg.train.label is None else [int(cfg.train.label)]
    for lab in wanted:
        present = images.has_label(lab) if streamed else bool(jnp.any(labels == lab))
        if not present:  # streamed: decided over every tile of the region
            log.info("label %d absent from the data; skipping its cascade", lab)
            continue
        reference = None
        for stage in range(3):
            name = f"label{lab}_E{stage}"
            state, stats = run_stage(
                cfg, name, images, labels, out, key=jax.random.fold_in(key, 10 * lab + stage),
                reference=reference, label=lab, resume=resume,
            )
            results[name] = stats
            reference = state.params
            if stage > 0:
                parts.append(state.params)
    return train.mixture(*parts), results


def _write_results(cfg, out: Path, final, results: dict) -> None:
    """``epitome.npz``, ``epitome.png`` and ``results.json`` (process 0)."""
    checkpoint.save_epitome(out / "epitome.npz", final)
    viz.save_png(out / "epitome.png", epitome_picture(final))
    summary = {"heldout": results, "config": OmegaConf.to_container(cfg, resolve=True)}
    atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
    for name, stats in results.items():
        log.info(
            "%s: held-out coverage %.3f, log-likelihood per pixel %.3f",
            name,
            stats["coverage"],
            stats["loglik_per_pixel"],
        )
    log.info("wrote %s and %s", out / "epitome.npz", out / "epitome.png")


if __name__ == "__main__":
    main()
