"""Which correlation route is fastest for which shape, and how close `"auto"` comes.

    python -m benchmarks.correlate_crossover [--quick] [--repeats 7] [--direct-gflop 20]

Times the routes of :func:`epilsr.circular_correlate` (jitted, after a warm-up call, best of
``--repeats``) on the likelihood's shapes (``F = 2C = 8`` features, one layer): ``N`` in {128,
299, 499}, ``B`` in {32, 64, 256}, ``K`` in {7, 11, 15, 21}, plus small-``K`` shapes where the
direct route should win. Routes: ``hybrid``, ``dft`` and ``direct`` (the last skipped above
``--direct-gflop`` of arithmetic; the FFT route is far slower on the CPU and not timed). For
each shape it prints the times, the route ``"auto"`` picks (``epilsr.correlate._auto_method``)
and how much slower that is than the fastest route timed, then a summary; writes
``benchmarks/results/correlate_crossover.json``. This is the data the auto route's constants
(``_HYBRID_COST``, ``_HYBRID_COST_LARGE``) are fitted to.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _baselines as bl
from epilsr.correlate import _auto_method, circular_correlate, route_flops

F = 8
GRID = [(n, b, k) for n in (128, 299, 499) for b in (32, 64, 256) for k in (7, 11, 15, 21)
        if (n, b, k) != (499, 256, 21)]
SMALL_K = [(64, 64, 3), (128, 64, 3), (128, 256, 5), (299, 64, 5)]
QUICK = [(128, 64, 7), (128, 256, 15), (299, 64, 7), (299, 64, 11), (299, 256, 21), (128, 64, 3)]


def best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(min(times))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="six shapes")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per route and shape")
    p.add_argument("--direct-gflop", type=float, default=20.0,
                   help="skip the direct route above this many GFLOP per call")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    meta = bl.machine(None)
    key = jax.random.key(0)
    rows = []
    for n, b, k in QUICK if args.quick else SMALL_K + GRID:
        maps = jax.random.uniform(key, (1, n, n, F))
        kernels = jax.random.uniform(jax.random.fold_in(key, 1), (b, k, k, F))
        times = {}
        for method in ("direct", "hybrid", "dft"):
            if method == "direct" and route_flops("direct", maps.shape, kernels.shape) > (
                args.direct_gflop * 1e9
            ):
                continue
            fn = jax.jit(lambda m, x, method=method: circular_correlate(m, x, method=method))
            times[method] = best_time(fn, maps, kernels, repeats=args.repeats)
        auto = _auto_method(maps.shape, kernels.shape)
        fastest = min(times, key=times.get)
        loss = times[auto] / times[fastest] - 1 if auto in times else None
        rows.append({"N": n, "B": b, "K": k, "F": F, "times_s": times, "auto": auto,
                     "fastest": fastest, "auto_slower_by": loss})
        cells = "  ".join(f"{m} {t * 1e3:7.1f} ms" for m, t in times.items())
        verdict = "-" if loss is None else f"{loss * 100:4.0f} % slower" if loss > 0 else "fastest"
        print(f"N={n:3d} B={b:3d} K={k:2d}  {cells}  auto={auto:6s} {verdict}", flush=True)
    scored = [r for r in rows if r["auto_slower_by"] is not None]
    best = sum(r["auto_slower_by"] == 0 for r in scored)
    worst = max(scored, key=lambda r: r["auto_slower_by"])
    mean = float(np.mean([r["auto_slower_by"] for r in scored]))
    print(f"\nauto picked the fastest route in {best}/{len(scored)} shapes; mean excess "
          f"{mean * 100:.1f} %, worst {worst['auto_slower_by'] * 100:.0f} % (N={worst['N']} "
          f"B={worst['B']} K={worst['K']}: {worst['auto']} vs {worst['fastest']})")
    path = bl.write_json("correlate_crossover", {"meta": meta, "rows": rows,
                                                 "repeats": args.repeats}, args.out)
    print(f"wrote {path}")
    return {"rows": rows, "meta": meta}


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before timing
    main()
