"""How many patches per batch chunk ``"dft_2d"`` should take (``CorrelationPlan.dft_2d_batch``).

    python -m benchmarks.dft_2d_batch [--batches 16,32] [--rounds 5] [--quick] [--out PATH]

The plan's ``dft_2d_batch`` (16 on the CPU) is not fitted by ``benchmarks.correlate_crossover``
(that fits the route choice). This times :func:`epilsr.circular_correlate` with
``route="dft_2d"`` under the platform's plan with each ``--batches`` value, round robin
(:func:`benchmarks._baselines.time_round_robin`: the variants share the background load), on
every likelihood shape of a grid (one layer, ``F = 8``; epitome ``N`` in {32, 64, 128, 256,
299}, ``K`` in {7, 11, 21, 31}, ``B`` in {64, 256}) where ``"auto"`` takes ``"dft_2d"``, plus
dense prediction's posterior chunk (``N = 64``, ``B = 192``, ``K = 31``; see
``benchmarks/window_bound.py``). Prints the median times, each value's time relative to the
first and the geometric mean over the shapes; writes ``benchmarks/results/dft_2d_batch.json``.
A value that wins on some shapes and loses on others (e.g. by ``B``) says the rule needs more
than one number; change ``plans.json`` only on a clear geometric-mean win with no large loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _baselines as bl
from epilsr.correlate import choose_route, circular_correlate, plan_for

F = 8
PREDICT = (64, 192, 31)  # dense prediction's posterior chunk (N, B, K)
QUICK = [(32, 256, 21), (64, 256, 21), (128, 256, 31), (299, 64, 11), PREDICT]


def shapes(plan, quick: bool) -> list[tuple[int, int, int]]:
    """``(N, B, K)`` where ``"auto"`` takes ``"dft_2d"`` under ``plan``."""
    if quick:
        grid = QUICK
    else:
        grid = [(n, b, k) for n in (32, 64, 128, 256, 299) for k in (7, 11, 21, 31)
                for b in (64, 256) if k < n] + [PREDICT]
    return [(n, b, k) for n, b, k in grid
            if choose_route((1, n, n, F), (b, k, k, F), plan) == "dft_2d"]


def time_shape(n: int, b: int, k: int, batches: list[int], plan, rounds: int) -> dict:
    """Median seconds of one jitted ``dft_2d`` call per batch value."""
    rng = np.random.default_rng(n * 1000 + b + k)
    maps = jnp.asarray(rng.normal(size=(1, n, n, F)), jnp.float32)
    kernels = jnp.asarray(rng.normal(size=(b, k, k, F)), jnp.float32)
    fns = {}
    for value in batches:
        variant = dataclasses.replace(plan, dft_2d_batch=value)
        f = jax.jit(lambda m, x, p=variant: circular_correlate(m, x, route="dft_2d", plan=p))
        fns[str(value)] = lambda f=f: jax.block_until_ready(f(maps, kernels))
    times = bl.time_round_robin(fns, rounds)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="16,32", help="comma-separated dft_2d_batch values")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per shape")
    p.add_argument("--quick", action="store_true", help=f"{len(QUICK)} shapes")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    try:
        batches = [int(v) for v in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches: expected comma-separated integers, got {args.batches!r}")
    if len(batches) < 2 or min(batches) < 1:
        p.error(f"--batches: expected at least two positive values, got {args.batches!r}")
    plan = plan_for()
    rows = []
    for n, b, k in shapes(plan, args.quick):
        med = time_shape(n, b, k, batches, plan, args.rounds)
        rows.append({"N": n, "B": b, "K": k, "median_s": med})
        first = med[str(batches[0])]
        print(f"N={n} B={b} K={k}: " + ", ".join(
            f"{v}: {med[str(v)] * 1e3:.1f} ms ({med[str(v)] / first:.2f})" for v in batches),
            flush=True)
    header = ["N", "B", "K"] + [f"{v} ms" for v in batches] + [
        f"{v}/{batches[0]}" for v in batches[1:]]
    table = [[r["N"], r["B"], r["K"]] + [r["median_s"][str(v)] * 1e3 for v in batches]
             + [r["median_s"][str(v)] / r["median_s"][str(batches[0])] for v in batches[1:]]
             for r in rows]
    print(bl.table(header, table))
    geo = {str(v): float(np.exp(np.mean([np.log(r["median_s"][str(v)]
                                                 / r["median_s"][str(batches[0])])
                                         for r in rows]))) for v in batches[1:]}
    for v, g in geo.items():
        worst = max(r["median_s"][v] / r["median_s"][str(batches[0])] for r in rows)
        print(f"dft_2d_batch {v} / {batches[0]}: geometric mean {g:.3f}, worst {worst:.2f} "
              f"over {len(rows)} shapes (plan {plan.platform}: {plan.dft_2d_batch})")
    result = {"meta": bl.machine(None), "plan_dft_2d_batch": plan.dft_2d_batch,
              "batches": batches, "rounds": args.rounds, "rows": rows, "geomean": geo}
    print(f"wrote {bl.write_json('dft_2d_batch', result, args.out)}")
    return result


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before timing
    main()
