"""Dense-prediction raster pipeline vs its windows alone: is ``predict_raster_files`` as fast as
its window compute?

    python -m benchmarks.predict_pipeline [--size 1024] [--epitome 128] [--layers 1]
                                          [--base-src /path/to/old/checkout/src]

A synthetic scene (``make_scene(seed, size, block=32)``) is written as a GeoTIFF
(:func:`benchmarks.raster_8192.make_inputs`) and predicted with a random ``N x N x 4`` epitome
and a random 4-label embedding at the segmentation setting of ``experiments.segment``
(``K = 31`` windows predicting their centre ``11 x 11`` at stride 11, ``T = (31/11)^2``,
tiles of 256 corners). In a *separate process* (so its peak RSS is the pipeline's own):

1. compiles the tile call on the first strip (shared with the pipeline's calls);
2. runs :func:`~epilsr.pipelines.raster_predict.predict_raster_files` end to end from the
   GeoTIFF (reader thread, batched tiles, writer thread: labels + entropy, deflate) ->
   Mpx/min;
3. times the tile compute alone on every strip read into memory beforehand (the same batched
   calls and their accumulation into the strip, no reading, no normalising, no writing);
4. reports ``compute / pipeline`` (1.0 = the pipeline costs nothing beyond its windows) and
   the peak RSS (``VmHWM``).

With ``--base-src`` the same GeoTIFF is also predicted by an older checkout's
``predict_raster_files`` (``epilsr.segment`` before the package layout of the house issue),
pipeline only, in its own process: the before/after rate on the same machine and input.
Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.raster_8192 import _peak_rss_mb, make_inputs

K, KL, STRIDE, TILE = 31, 11, 11, 256


def _model(n: int, layers: int, seed: int):
    import jax

    import epilsr

    epi = epilsr.init_epitome(jax.random.key(seed), size=n, channels=4, layers=layers)
    probs = np.random.default_rng(seed).dirichlet(np.ones(4), size=(layers, n, n))
    return epi, probs.astype(np.float32)


def _raster_predict():
    """The module holding ``predict_raster_files`` in this checkout (new or old layout)."""
    for name in ("epilsr.pipelines.raster_predict", "epilsr.segment"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("no predict_raster_files in this checkout")


def worker(args: argparse.Namespace) -> None:
    """Child process: compile, pipeline, (compute-only); print one JSON line."""
    rp = _raster_predict()
    try:
        from epilsr.io.geotiff import RasterReader
    except ImportError:  # an old checkout
        from epilsr.data.rasters import RasterReader
    work = Path(args.work)
    epi, probs = _model(args.epitome, args.layers, args.seed)
    kw = dict(patch_size=K, label_size=KL, stride=STRIDE, temperature=(K / KL) ** 2, tile=TILE)
    out: dict = {"code": args.code}
    with RasterReader(work / "naip.tif") as img:
        height, width = img.shape[:2]
        if hasattr(rp, "_predictor"):
            pred = rp._predictor(epi, probs, img, height=None, width=None, mask=None, chunk=64,
                                 route="auto", **kw)
            plan = pred.plan
            strip = pred.read_strip(0)

            def compute(si, tiles):
                acc = np.zeros((plan.buffer_rows, width, plan.n_labels), np.float32)
                cnt = np.zeros((plan.buffer_rows, width), np.float32)
                if hasattr(pred, "compute_strips"):  # read / compute / add split
                    got = pred.compute_strips([(si, tiles)])
                    tiles = (got() if callable(got) else got)[0]  # deferred (head) or list
                return pred.add_strip(si, acc, cnt, lambda: None, tiles)

            t0 = time.perf_counter()
            compute(0, strip)  # compile (shared with the pipeline's calls)
            out["compile_s"] = time.perf_counter() - t0
        else:  # an old checkout: compile by predicting the first tile rows in memory
            t0 = time.perf_counter()
            rp.predict_raster(epi, probs, img, height=min(height, TILE), **kw)
            out["compile_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rp.predict_raster_files(epi, probs, img, out_dir=work / f"out_{args.code}", **kw)
        out["pipeline_s"] = time.perf_counter() - t0
        out["peak_rss_mb"] = _peak_rss_mb()
        if hasattr(rp, "_predictor"):
            strips = [pred.read_strip(s) for s in range(len(plan.row_starts))]
            t0 = time.perf_counter()
            for si, tiles in enumerate(strips):
                compute(si, tiles)
            out["compute_only_s"] = time.perf_counter() - t0
    mpx = height * width / 1e6
    out["size"] = height
    out["pipeline_mpx_min"] = mpx / (out["pipeline_s"] / 60)
    if "compute_only_s" in out:
        out["compute_mpx_min"] = mpx / (out["compute_only_s"] / 60)
        out["compute_over_pipeline"] = out["compute_only_s"] / out["pipeline_s"]
    print(json.dumps(out))


def _run(args: argparse.Namespace, work: Path, code: str, src: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, str(Path(__file__).parents[1])]))
    cmd = [sys.executable, "-m", "benchmarks.predict_pipeline", "--worker", "--work", str(work),
           "--code", code, "--epitome", str(args.epitome), "--layers", str(args.layers),
           "--seed", str(args.seed)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode:
        raise RuntimeError(f"{code} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict] | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--epitome", type=int, default=128, help="epitome side N")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-src", default=None, help="an older checkout's src/ (before/after)")
    p.add_argument("--out", default="benchmarks/results/predict_pipeline.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--code", default="head", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    work = Path(tempfile.mkdtemp(prefix="predict_pipeline_"))
    try:
        make_inputs(work, size=args.size, seed=args.seed)
        src = str(Path(__file__).parents[1] / "src")
        rows = [_run(args, work, "head", src)]
        if args.base_src:
            rows.append(_run(args, work, "base", args.base_src))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        extra = ("" if "compute_mpx_min" not in r else
                 f"  windows only {r['compute_mpx_min']:6.2f} Mpx/min"
                 f"  compute/pipeline {r['compute_over_pipeline']:.3f}")
        print(f"{r['code']:>5} {args.size}^2 N={args.epitome} L={args.layers} K={K}->{KL} "
              f"stride {STRIDE}: pipeline {r['pipeline_mpx_min']:6.2f} Mpx/min{extra}  "
              f"peak RSS {r['peak_rss_mb']:.0f} MiB")
    if len(rows) == 2:
        ratio = rows[0]["pipeline_mpx_min"] / rows[1]["pipeline_mpx_min"]
        print(f"head / base pipeline rate: {ratio:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
