"""Raster LSR pipeline vs its windows alone: is ``lsr_raster`` as fast as its window compute?

    python -m benchmarks.raster_pipeline [--sizes 1024,2048] [--settings paper,default]

For each size, a synthetic scene (``make_scene(seed, size, block=32)``) is written as GeoTIFFs
(imagery uint8 LZW, classes) by :func:`benchmarks.raster_8192.make_inputs`. For each setting
(``paper``: ``downsample=2``, 7 x 7, ``sample_fraction=0.05``; ``default``: the library default,
``downsample=1``; ``paper-approx`` / ``default-approx``: the same with the approximate route
``rank=16, position_stride=2``, see ``docs/approx_route.md``) a *separate process* (so its
peak RSS is the pipeline's own):

1. compiles the batched window call (the same :class:`~epilsr.pipelines.batching.WindowBatches`
   object the pipeline will use; compiled calls are shared) on the first strip's windows;
2. runs :func:`~epilsr.pipelines.raster_lsr.lsr_raster` end to end from the GeoTIFFs (reader
   thread, batched windows, writer thread: labels + entropy, deflate; no preview) -> Mpx/min
   of the first run and its peak RSS;
3. times the window compute alone on every strip (``--compute-strips``) read into memory
   beforehand (the same batched calls, no I/O, no blending, no writing) -> Mpx/min at that
   per-window rate (window cost depends on the content: a subset would be biased), alternated
   ``--ratio-repeats`` times with further pipeline runs (a drift in the machine's speed hits
   both alike; medians);
4. times the first two strips as unbatched per-window jitted calls (the path before batching)
   and again batched;
5. reports ``pipeline / compute`` (medians; 1.0 = the pipeline costs nothing beyond its
   windows; also the first run's), the
   batched vs unbatched window rate and the peak RSS (``VmHWM``), which must not grow with the
   raster size;
6. **several strips per call** (``--strips-per-call K``, default 2): the pipeline end to end
   with one strip per call and with ``K`` (the library's window batch), alternated, and the
   windows alone as one looped call per strip (``window_batch`` = a strip, rounded up to
   ``2^k``) vs one call per ``K`` strips -> ``multi_over_one`` rates (about 1 on CPU);
7. the windows per call and strips per call that
   :meth:`~epilsr.pipelines.batching.WindowBatches.strips_per_call` picks for a GPU-sized
   budget (``--gpu-budget-gib``, default 40: half an 80 GB card), for this raster and for a
   6000 x 7500 LILA tile, from the compiled call's memory analysis (on CPU: XLA:CPU's sizes
   stand in for the accelerator's).

Both rates come from the same process, so their ratio holds on a busy machine; absolute rates
depend on the load (the 2 CPU cores are shared). Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.raster_8192 import _peak_rss_mb, make_inputs

SETTINGS = {
    "paper": dict(patch_size=7, downsample=2, sample_fraction=0.05),
    "default": dict(),
    # the optional approximate route (docs/approx_route.md): opt-in, not the default
    "paper-approx": dict(patch_size=7, downsample=2, sample_fraction=0.05, rank=16,
                         position_stride=2),
    "default-approx": dict(rank=16, position_stride=2),
}


def worker(args: argparse.Namespace) -> None:
    """Child process: compile, pipeline, compute-only; print one JSON line."""
    import jax

    from epilsr.io.geotiff import RasterReader
    from epilsr.pipelines import raster_lsr
    from epilsr.pipelines.batching import WindowBatches
    from epilsr.windows import tile_grid

    work, kw = Path(args.work), SETTINGS[args.setting]
    table = np.load(work / "table.npy")
    key = jax.random.key(args.seed)
    with RasterReader(work / "naip.tif") as img, RasterReader(work / "classes.tif") as cls:
        height, width = img.shape[:2]
        windows = tile_grid(height, width, tile=args.tile, overlap=args.overlap)
        per_strip = sum(1 for w in windows if w.row == 0)
        batches = WindowBatches(raster_lsr._window_fn(raster_lsr._lsr_fn(kw)),
                                max_batch=per_strip, window_batch=args.window_batch)
        classes = raster_lsr._Classes(cls, None, raster_lsr._check_table(table),
                                      np.zeros(0), False)
        plan, read_strip, _, _ = raster_lsr._lsr_strips(key, batches, img, classes, windows,
                                                        args.overlap, height, width)

        def compute(inputs):
            group = [(np.int32(i), x, got[0], got[1]) for i, _, got, x in inputs]
            return batches((key,), group)

        t0 = time.perf_counter()
        compute(read_strip(0))  # compile (shared with the pipeline's calls)
        compile_s = time.perf_counter() - t0
        rss_before = _peak_rss_mb()

        def pipeline():
            t0 = time.perf_counter()
            run = raster_lsr.lsr_raster(key, img, cls, table, out_dir=work / f"out_{args.setting}",
                                        tile=args.tile, overlap=args.overlap, lsr_kwargs=kw,
                                        write_entropy=True, progress=False, resume=False,
                                        preview=None, window_batch=args.window_batch)
            return time.perf_counter() - t0, run

        first_s, run = pipeline()
        rss_pipeline = _peak_rss_mb()  # before the windows-only strips are held in memory

        n = len(plan.row_starts) if args.compute_strips <= 0 else min(args.compute_strips,
                                                                       len(plan.row_starts))
        strips = [read_strip(s) for s in range(n)]
        done = sum(len(s) for s in strips)

        def windows_only():
            t0 = time.perf_counter()
            for inputs in strips:
                compute(inputs)
            return (time.perf_counter() - t0) / done

        pipe_s, window_s = [], []
        for rep in range(max(1, args.ratio_repeats)):  # alternated: drifts in load hit both
            for step in (("win", "pipe") if rep % 2 == 0 else ("pipe", "win")):
                if step == "pipe":
                    pipe_s.append(pipeline()[0])
                else:
                    window_s.append(windows_only())
        pipeline_s, per_window = float(np.median(pipe_s)), float(np.median(window_s))
        single = raster_lsr._lsr_fn(kw)  # the unbatched per-window call, for comparison
        i, _, got, x = strips[0][0]
        jax.block_until_ready(single(jax.random.fold_in(key, i), x, got[0], got[1]))
        t0 = time.perf_counter()
        few = strips[:2]
        for inputs in few:
            for i, _, got, x in inputs:
                jax.block_until_ready(single(jax.random.fold_in(key, i), x, got[0], got[1]))
        per_window_single = (time.perf_counter() - t0) / sum(len(s) for s in few)
        t0 = time.perf_counter()
        for inputs in few:
            compute(inputs)
        per_window_few = (time.perf_counter() - t0) / sum(len(s) for s in few)
        multi = _multi_strip(args, raster_lsr, kw, key, img, cls, table, windows, strips,
                             compute)
    mpx = height * width / 1e6
    compute_s = per_window * run.computed
    print(json.dumps({
        "size": height, "setting": args.setting, "lsr_kwargs": kw, "windows": run.windows,
        "windows_per_call": batches.fixed or max(batches._size.values()),
        "devices": batches.devices,
        "compile_s": compile_s,
        "pipeline_s": pipeline_s, "compute_only_s": compute_s,
        "pipeline_mpx_min": mpx / (pipeline_s / 60), "compute_mpx_min": mpx / (compute_s / 60),
        "pipeline_over_compute": compute_s / pipeline_s,
        "ratio_repeats": len(pipe_s), "pipeline_runs_s": pipe_s,
        "compute_only_runs_s": [t * run.computed for t in window_s],
        "pipeline_first_run_s": first_s,
        "pipeline_over_compute_first_run": compute_s / first_s,
        "seconds_per_window": per_window, "seconds_per_window_unbatched": per_window_single,
        "batched_over_unbatched": per_window_single / per_window_few,
        "peak_rss_mb_before": rss_before,
        "peak_rss_mb": rss_pipeline, "backend": jax.default_backend(), **multi,
        "device_peak_mb": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0)
        / 2**20,
    }))


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _multi_strip(args, raster_lsr, kw, key, img, cls, table, windows, strips, compute) -> dict:
    """Items 6 and 7 of the module doc (same process, same windows)."""
    import jax

    from epilsr.pipelines.batching import MAX_STRIPS, WindowBatches
    from epilsr.windows import tile_grid

    k, per_strip = max(1, args.strips_per_call), len(strips[0])
    mpx = img.shape[0] * img.shape[1] / 1e6
    pipe = {1: [], k: []}
    for rep in range(args.repeats):  # alternated: the machine's load hits both alike
        for g in (1, k) if rep % 2 == 0 else (k, 1):
            t0 = time.perf_counter()
            raster_lsr.lsr_raster(key, img, cls, table, out_dir=Path(args.work) / f"multi_{g}",
                                  tile=args.tile, overlap=args.overlap, lsr_kwargs=kw,
                                  progress=False, resume=False, preview=None,
                                  window_batch=args.window_batch, strips_per_call=g)
            pipe[g].append(mpx / ((time.perf_counter() - t0) / 60))
    fn = raster_lsr._window_fn(raster_lsr._lsr_fn(kw))
    looped = {1: WindowBatches(fn, window_batch=_pow2(per_strip)),
              k: WindowBatches(fn, window_batch=_pow2(k * per_strip))}

    def flat(group):
        return [(np.int32(i), x, got[0], got[1]) for inputs in group
                for i, _, got, x in inputs if got is not None]

    groups = {g: [strips[a : a + g] for a in range(0, len(strips), g)] for g in looped}
    for g, b in looped.items():  # compile both shapes first
        b((key,), flat(groups[g][0]))
    rate = {g: [] for g in looped}
    for rep in range(args.repeats):
        for g in (1, k) if rep % 2 == 0 else (k, 1):
            t0 = time.perf_counter()
            n = 0
            for group in groups[g]:
                n += len(looped[g]((key,), flat(group)))
            rate[g].append(n / (time.perf_counter() - t0))
    budget = int(args.gpu_budget_gib * 2**30)
    sizing = {}
    probe = raster_lsr._Classes(cls, None, raster_lsr._check_table(table), np.zeros(0), False)
    th, tw = windows[0].height, windows[0].width
    example = raster_lsr._example_window(img, probe, th, tw)
    for name, (h, w) in (("this_raster", img.shape[:2]), ("lila_6000x7500", (7500, 6000))):
        grid = tile_grid(h, w, tile=args.tile, overlap=args.overlap)
        n_strip = sum(1 for x in grid if x.row == 0)
        b = WindowBatches(fn, memory_budget=budget, max_batch=n_strip * MAX_STRIPS)
        n_strips = len({x.row for x in grid})  # a group never passes the last strip
        sizing[name] = dict(windows_per_strip=n_strip, strips=n_strips,
                            windows_per_call=b.windows_per_call((key,), example),
                            strips_per_call=min(n_strips, b.strips_per_call((key,), example,
                                                                            n_strip)))
    med = {g: float(np.median(v)) for g, v in pipe.items()}
    loop = {g: float(np.median(v)) for g, v in rate.items()}
    return {"strips_per_call": k, "devices": len(jax.local_devices()),
            "pipeline_mpx_min_one_strip_per_call": med[1],
            "pipeline_mpx_min_k_strips_per_call": med[k],
            "pipeline_multi_over_one": med[k] / med[1],
            "looped_windows_per_s_one_strip_per_call": loop[1],
            "looped_windows_per_s_k_strips_per_call": loop[k],
            "looped_multi_over_one": loop[k] / loop[1],
            "gpu_budget_gib": args.gpu_budget_gib, "gpu_budget_sizing": sizing}


def main(argv: list[str] | None = None) -> list[dict] | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1024,2048")
    p.add_argument("--settings", default="paper,default")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--compute-strips", type=int, default=0, help="0 = every strip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window-batch", type=int, default=None,
                   help="windows per call (default: the library's choice; 1 per device on CPU)")
    p.add_argument("--strips-per-call", type=int, default=2,
                   help="strips per call compared with one strip per call (item 6)")
    p.add_argument("--ratio-repeats", type=int, default=3,
                   help="alternated pipeline / windows-only runs for the ratio (medians)")
    p.add_argument("--repeats", type=int, default=2,
                   help="alternated repeats of the multi-strip comparison (median)")
    p.add_argument("--gpu-budget-gib", type=float, default=40.0,
                   help="per-device budget for the GPU-sized batch choice (item 7)")
    p.add_argument("--out", default="benchmarks/results/raster_pipeline.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--setting", default="paper", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        work = Path(tempfile.mkdtemp(prefix="raster_pipeline_"))
        try:
            make_inputs(work, size=size, seed=args.seed)
            for setting in args.settings.split(","):
                cmd = [sys.executable, "-m", "benchmarks.raster_pipeline", "--worker",
                       "--work", str(work), "--setting", setting, "--tile", str(args.tile),
                       "--overlap", str(args.overlap), "--seed", str(args.seed),
                       "--compute-strips", str(args.compute_strips),
                       "--strips-per-call", str(args.strips_per_call),
                       "--repeats", str(args.repeats),
                       "--ratio-repeats", str(args.ratio_repeats),
                       "--gpu-budget-gib", str(args.gpu_budget_gib)] + (
                           [] if args.window_batch is None else
                           ["--window-batch", str(args.window_batch)])
                out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(r)
                print(f"{size:>5}^2 {setting:<8} {r['windows']:>4} windows  pipeline "
                      f"{r['pipeline_mpx_min']:6.1f} Mpx/min  windows only "
                      f"{r['compute_mpx_min']:6.1f} Mpx/min  ratio "
                      f"{r['pipeline_over_compute']:.3f} (first run "
                      f"{r['pipeline_over_compute_first_run']:.3f})  batched/unbatched windows "
                      f"{r['batched_over_unbatched']:.2f}x  peak RSS {r['peak_rss_mb']:.0f} MiB "
                      f"(after compile {r['peak_rss_mb_before']:.0f})", flush=True)
                lila = r["gpu_budget_sizing"]["lila_6000x7500"]
                print(f"      {r['strips_per_call']} strips/call vs 1: pipeline "
                      f"{r['pipeline_mpx_min_k_strips_per_call']:.1f} vs "
                      f"{r['pipeline_mpx_min_one_strip_per_call']:.1f} Mpx/min "
                      f"({r['pipeline_multi_over_one']:.2f}x); looped calls "
                      f"{r['looped_multi_over_one']:.2f}x; {r['gpu_budget_gib']:g} GiB budget: "
                      f"{r['gpu_budget_sizing']['this_raster']['windows_per_call']} windows "
                      f"({r['gpu_budget_sizing']['this_raster']['strips_per_call']} strips)"
                      f"/call here, {lila['windows_per_call']} ({lila['strips_per_call']} "
                      f"strips of {lila['windows_per_strip']}) on a LILA tile", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
