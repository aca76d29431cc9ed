"""Throughput and peak memory of dense Eq. 2 prediction
(``epilsr.pipelines.raster_predict.predict_raster``).

    python -m benchmarks.predict_throughput [--epitome 499] [--repeats 1]

For each setting (patch size ``K``, centre block ``Kl``, stride) a *separate process* builds a
random ``N x N x 4`` epitome (one layer) with a random 4-label embedding, predicts a random
uint8 image tile by tile (one warm-up call compiles; the timed call runs the whole raster) and
reports megapixels per minute, windows per second and its peak RSS (``ru_maxrss``: the whole
process, JAX runtime included). Image sides are chosen per setting so that one run takes tens
of seconds on a 2-core CPU; throughput is per pixel, so it carries over to any raster size (the
tiled loop has constant memory). Prints a table and writes JSON (default
``benchmarks/results/predict_throughput.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

# (name, K, Kl or None, stride, image side)
SETTINGS = [
    ("K11 whole window, stride 1 (exact Eq. 2)", 11, None, 1, 32),
    ("K11 whole window, stride 2", 11, None, 2, 48),
    ("K11 whole window, stride 4", 11, None, 4, 96),
    ("K11 whole window, stride 11", 11, None, 11, 192),
    ("K31 centre 11, stride 1", 31, 11, 1, 24),
    ("K31 centre 11, stride 5", 31, 11, 5, 64),
    ("K31 centre 11, stride 11 (paper)", 31, 11, 11, 128),
]


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def run_one(n: int, k: int, kl: int | None, stride: int, side: int, chunk: int, tile: int,
            repeats: int) -> dict:
    """One setting in this process: returns timings and peak RSS."""
    import jax
    import numpy as np

    import epilsr
    from epilsr.pipelines import raster_predict

    key = jax.random.key(0)
    epi = epilsr.init_epitome(key, size=n, channels=4, layers=1)
    rng = np.random.default_rng(0)
    lp = rng.dirichlet(np.ones(4), size=(1, n, n)).astype(np.float32)
    image = rng.integers(0, 256, size=(side, side, 4), dtype=np.uint8)
    kw = dict(patch_size=k, label_size=kl, stride=stride, temperature=float((k / 11) ** 2),
              tile=tile, chunk=chunk)
    t0 = time.perf_counter()
    crop = image[: min(side, tile + k), : min(side, tile + k)]
    raster_predict.predict_raster(epi, lp, crop, **kw)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = raster_predict.predict_raster(epi, lp, image, **kw)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {
        "N": n, "K": k, "Kl": kl, "stride": stride, "image": side, "chunk": chunk, "tile": tile,
        "windows": res.windows, "compile_plus_small_run_s": compile_s, "seconds": times,
        "mpx_per_min": side * side / best * 60 / 1e6, "windows_per_s": res.windows / best,
        "peak_rss_mb": _peak_rss_mb(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epitome", type=int, default=499, help="epitome side N")
    ap.add_argument("--chunk", type=int, default=32, help="windows per posterior batch")
    ap.add_argument("--tile", type=int, default=128, help="tile of window corners")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--only", type=int, nargs="*", help="indices into SETTINGS")
    ap.add_argument("--out", default="benchmarks/results/predict_throughput.json")
    ap.add_argument("--one", nargs=5, type=str, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        k, kl, stride, side = (int(args.one[1]), None if args.one[2] == "None" else
                               int(args.one[2]), int(args.one[3]), int(args.one[4]))
        print(json.dumps(run_one(int(args.one[0]), k, kl, stride, side, args.chunk, args.tile,
                                 args.repeats)))
        return
    import jax

    rows = []
    chosen = SETTINGS if args.only is None else [SETTINGS[i] for i in args.only]
    for name, k, kl, stride, side in chosen:
        cmd = [sys.executable, "-m", "benchmarks.predict_throughput", "--chunk", str(args.chunk),
               "--tile", str(args.tile), "--repeats", str(args.repeats), "--one",
               str(args.epitome), str(k), str(kl), str(stride), str(side)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        rec["name"] = name
        rows.append(rec)
        print(f"{name:42s} {rec['mpx_per_min']:9.4f} Mpx/min  {rec['windows_per_s']:8.1f} "
              f"windows/s  peak {rec['peak_rss_mb']:7.0f} MiB", flush=True)
    print()
    hdr = f"{'setting (N=' + str(args.epitome) + ')':42s} {'Mpx/min':>9s} {'windows/s':>10s} " \
          f"{'image':>6s} {'s':>7s} {'peak MiB':>9s}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['name']:42s} {r['mpx_per_min']:9.4f} {r['windows_per_s']:10.1f} "
              f"{r['image']:6d} {min(r['seconds']):7.2f} {r['peak_rss_mb']:9.0f}")
    out = {
        "benchmark": "predict_throughput",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "config": {"epitome": args.epitome, "layers": 1, "channels": 4, "labels": 4,
                   "chunk": args.chunk, "tile": args.tile, "temperature": "(K/11)^2",
                   "method": "auto"},
        "rows": rows,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
