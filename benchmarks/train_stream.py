"""Training patches streamed from whole tiles vs the in-memory crop (issue 17 item 7).

    python -m benchmarks.train_stream [--tiles 4] [--height 6000] [--width 7500] [--steps 16]
        [--batch 256] [--cache-mib 1024] [--step-n 499] [--step-sizes 11,31] [--root DIR]

Builds (once, under ``--root``) a LILA-format region of ``--tiles`` tiles of
``height x width`` at the LILA size (6000 x 7500): mosaics of 250^2 cells cut from the eight
shared ``chesapeake_wv`` tiles (imagery, land cover and NLCD together; random flips and
rotations), written with the project's GeoTIFF writer (deflate, 256^2 tiles). Then, each in its
own process so that peak memory is its own:

Draws run over the patch-size schedule twice; ``pass-1 draw_s`` is the mean of the first pass
(per-``K`` compilations of the in-memory samplers, cold windows of the stream), ``draw_s`` and
the patches/s columns are medians of the second.

- ``memory``: ``load_training_images`` at the LILA setting (``crop 2048``, all ``--tiles``
  tiles), then ``--steps`` draws of ``--batch`` patches (``K`` from 11..31, the training
  schedule) with :func:`epilsr.samplers.sample_patches` and label-conditioned draws (label 1,
  ``sample_labelled_patches``), as the prefetch thread of the train driver makes them.
- ``stream``: :class:`epilsr.pipelines.patch_stream.PatchStream` over every whole tile with a
  ``--cache-mib`` cache: the label index (one strip pass over the land cover), the same draws
  (the first ones read cold windows), bytes decoded, cache hits.
- both, with ``--loop-n`` (64): the driver's loop (prefetch thread + jitted step) at a small
  epitome whose step is fast, as on an accelerator: does the patch source keep up?
- ``step``: the jitted training step (``N = --step-n``, ``B = --batch``) at ``--step-sizes``:
  is the patch source the bottleneck? (The prefetch thread overlaps a draw with a step.)

Prints a table and writes JSON (default ``benchmarks/results/train_stream.json``). The
machine is shared: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STATE = "wv"
FOLDER = f"{STATE}_1m_2014_extended-debuffered-train_tiles"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_region(root: Path, tiles: int, height: int, width: int, cell: int = 250) -> float:
    """Writes the LILA-format tree (skipped when present); returns seconds spent."""
    from epilsr.data import chesapeake
    from epilsr.io.geotiff import write_raster

    folder = root / FOLDER
    stems = [folder / f"m_{t:07d}_nw_17_1" for t in range(tiles)]
    if all(Path(f"{s}_nlcd.tif").exists() for s in stems):
        return 0.0
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    shared = [chesapeake.load_tile(s) for s in chesapeake.find_tiles(chesapeake.data_root()
                                                                     / "chesapeake_wv")]
    codes = np.zeros(256, np.uint8)  # labels 0..3 back to Chesapeake codes (no data: 0)
    codes[:4] = [1, 2, 3, 5]
    layers = [np.concatenate([t.image, codes[t.labels][..., None], t.nlcd[..., None]], axis=-1)
              for t in shared]
    rng = np.random.default_rng(0)
    for stem in stems:
        out = np.empty((height, width, 6), np.uint8)
        for r in range(0, height, cell):
            for c in range(0, width, cell):
                src = layers[rng.integers(len(layers))]
                i, j = rng.integers(0, src.shape[0] - cell + 1, 2)
                block = np.rot90(src[i : i + cell, j : j + cell], rng.integers(4))
                if rng.integers(2):
                    block = block[:, ::-1]
                h, w = min(cell, height - r), min(cell, width - c)
                out[r : r + h, c : c + w] = block[:h, :w]
        write_raster(f"{stem}_naip-new.tif", out[..., :4])
        write_raster(f"{stem}_lc.tif", out[..., 4])
        write_raster(f"{stem}_nlcd.tif", out[..., 5])
    return time.perf_counter() - t0


def _config(args, stream: bool):
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "kind": "chesapeake_lila", "root": str(args.root), "states": [STATE], "split": "train",
        "max_tiles": args.tiles, "crop": 2048, "cell_size": 30, "stream": stream,
        "block": 512, "windows": 16, "cache_bytes": args.cache_mib * 2**20,
    })


def _schedule(args) -> list[int]:
    import jax

    from epilsr import samplers

    return [int(k) for k in samplers.patch_sizes(jax.random.key(0), num_steps=args.steps)]


def _time_draws(draw, sizes, label=None) -> list[float]:
    """Seconds per draw over the schedule, twice (keys differ): the first pass pays the
    per-``K`` compilations (memory) or cold reads (stream); the second is reported."""
    import jax

    out = []
    for step, k in enumerate([*sizes, *sizes]):
        t0 = time.perf_counter()
        jax.block_until_ready(draw(jax.random.fold_in(jax.random.key(1), step), k, label))
        out.append(time.perf_counter() - t0)
    return out


def _loop(args, draw) -> dict:
    """The driver's loop at a small epitome (``N = --loop-n``: a fast step, as on an
    accelerator): draws on the prefetch thread, jitted steps; seconds per step (wall) after a
    first pass over the patch sizes (compilations), and the step alone."""
    import jax
    import optax

    import epilsr
    from epilsr import train
    from epilsr.pipelines.prefetch import prefetch

    optimizer = optax.adam(3e-3)
    epitome = epilsr.init_epitome(jax.random.key(0), size=args.loop_n, channels=4, mean=0.5)
    step = train.make_train_step(optimizer=optimizer)
    state = train.train_init(jax.random.key(1), epitome, optimizer)
    sizes = _schedule(args)
    for k in sorted(set(sizes)):  # compile every size first
        state, _ = jax.block_until_ready(step(state, draw(jax.random.key(k), k, None), None))
    stream = prefetch((draw(jax.random.fold_in(jax.random.key(2), i), k, None)
                       for i, k in enumerate(sizes)), size=2)
    compute = 0.0
    t0 = time.perf_counter()
    for _ in sizes:
        patches = next(stream)
        t1 = time.perf_counter()
        state, _ = jax.block_until_ready(step(state, patches, None))
        compute += time.perf_counter() - t1
    wall = time.perf_counter() - t0
    stream.close()
    return {"loop_n": args.loop_n, "wall_per_step_s": wall / len(sizes),
            "step_per_step_s": compute / len(sizes)}


def mode_memory(args) -> dict:
    import jax

    from epilsr import samplers
    from epilsr.cli.common import load_training_images

    t0 = time.perf_counter()
    images, labels, _ = load_training_images(_config(args, False))
    images, labels = jax.device_put(images), jax.device_put(labels)
    load_s = time.perf_counter() - t0

    def draw(key, k, label):
        if label is None:
            return samplers.sample_patches(key, images, size=k, batch=args.batch)
        return samplers.sample_labelled_patches(key, images, labels, label=label, patch_size=k,
                                                batch=args.batch)[0]

    sizes = _schedule(args)
    plain = _time_draws(draw, sizes)
    labelled = _time_draws(draw, sizes[: max(2, args.steps // 4)], label=1)
    loop = _loop(args, draw) if args.loop_n else None
    return {"mode": "memory", "loop": loop, "setup_s": load_s, "plain_s": plain,
            "label_s": labelled,
            "held_bytes": int(images.nbytes + labels.nbytes), "peak_rss_mib": _rss_mib(),
            "pixels_seen": int(np.prod(labels.shape))}


def mode_stream(args) -> dict:
    from epilsr.cli.common import open_patch_stream

    t0 = time.perf_counter()
    src = open_patch_stream(_config(args, True), max_size=31)
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    present = src.label_pixels()
    index_s = time.perf_counter() - t0
    index_reads = src.bytes_read

    def draw(key, k, label):
        return src.sample(key, size=k, batch=args.batch, label=label)

    sizes = _schedule(args)
    plain = _time_draws(draw, sizes)
    labelled = _time_draws(draw, sizes[: max(2, args.steps // 4)], label=1)
    loop = _loop(args, draw) if args.loop_n else None
    return {"mode": "stream", "loop": loop, "setup_s": open_s, "index_s": index_s, "plain_s": plain,
            "label_s": labelled, "held_bytes": src.cache.bytes, "peak_rss_mib": _rss_mib(),
            "cache_hits": src.cache.hits, "cache_misses": src.cache.misses,
            "bytes_decoded": src.bytes_read - index_reads, "index_bytes": index_reads,
            "largest_read": list(src.largest_read), "label_pixels": present.tolist(),
            "pixels_seen": int(src.shapes.prod(axis=1).sum())}


def mode_step(args) -> dict:
    import jax
    import optax

    import epilsr
    from epilsr import train

    optimizer = optax.adam(3e-3)
    epitome = epilsr.init_epitome(jax.random.key(0), size=args.step_n, channels=4, mean=0.5)
    step = train.make_train_step(optimizer=optimizer)
    rows = {}
    for k in [int(s) for s in args.step_sizes.split(",")]:
        state = train.train_init(jax.random.key(1), epitome, optimizer)
        patches = jax.random.uniform(jax.random.key(k), (args.batch, k, k, 4))
        t0 = time.perf_counter()
        state, _ = jax.block_until_ready(step(state, patches, None))
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        state, _ = jax.block_until_ready(step(state, patches, None))
        rows[k] = {"compile_s": compile_s, "step_s": time.perf_counter() - t0}
    return {"mode": "step", "rows": rows, "peak_rss_mib": _rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--height", type=int, default=6000)
    parser.add_argument("--width", type=int, default=7500)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--cache-mib", type=int, default=1024)
    parser.add_argument("--step-n", type=int, default=499)
    parser.add_argument("--step-sizes", default="11,31")
    parser.add_argument("--loop-n", type=int, default=64)
    parser.add_argument("--root", type=Path, default=Path("/tmp/epilsr_train_stream_region"))
    parser.add_argument("--mode", choices=("memory", "stream", "step"), default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.mode:  # a child: one mode, its JSON on the last line of stdout
        run = {"memory": mode_memory, "stream": mode_stream, "step": mode_step}[args.mode]
        print(json.dumps(run(args)))
        return

    from benchmarks import _baselines as bl

    t_start = time.perf_counter()
    build_s = build_region(args.root, args.tiles, args.height, args.width)
    results = {}
    for mode in ("memory", "stream", "step"):
        if mode == "step" and not args.step_sizes:
            continue
        proc = subprocess.run([sys.executable, "-m", "benchmarks.train_stream", *sys.argv[1:],
                               "--mode", mode], capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"{mode}: failed\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = []
    for mode in ("memory", "stream"):
        r = results[mode]
        n, m = len(r["plain_s"]) // 2, len(r["label_s"]) // 2
        per = statistics.median(r["plain_s"][n:])
        rows.append([mode, r["setup_s"] + r.get("index_s", 0.0), sum(r["plain_s"][:n]) / n, per,
                     args.batch / per, args.batch / statistics.median(r["label_s"][m:]),
                     r["held_bytes"] / 2**20, r["peak_rss_mib"], r["pixels_seen"] / 1e6])
    ratio = rows[1][4] / rows[0][4]
    print(bl.table(["source", "setup_s", "pass-1 draw_s", "draw_s", "patches/s",
                    "label patches/s", "held MiB", "peak RSS MiB", "Mpx sampled from"], rows))
    s = results["stream"]
    print(f"stream / memory patches/s: {ratio:.2f}x; stream index {s['index_s']:.1f} s; cache "
          f"hits {s['cache_hits']} misses {s['cache_misses']}; decoded "
          f"{s['bytes_decoded'] / 2**20:.0f} MiB in draws; largest read {s['largest_read']}")
    for mode in ("memory", "stream"):
        loop = results[mode].get("loop")
        if loop:
            print(f"driver loop N={loop['loop_n']} B={args.batch}, {mode}: "
                  f"{loop['wall_per_step_s']:.3f} s/step wall, {loop['step_per_step_s']:.3f} s "
                  "in the step (the rest: waiting for patches)")
    if "step" in results:
        for k, r in results["step"]["rows"].items():
            print(f"train step N={args.step_n} B={args.batch} K={k}: {r['step_s']:.2f} s "
                  f"(compile {r['compile_s']:.1f} s); stream draw (median) "
                  f"{statistics.median(s['plain_s'][len(s['plain_s']) // 2:]):.3f} s")
    path = bl.write_json("train_stream", {
        "benchmark": "train_stream", "meta": bl.machine(), "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "build_s": build_s, "results": results, "stream_over_memory_patches_per_s": ratio,
        "total_s": time.perf_counter() - t_start}, args.out)
    print(f"wrote {path} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
