"""Which correlation route is fastest for which shape, how close `"auto"` comes, and the fit.

    python -m benchmarks.correlate_crossover [--quick] [--repeats 7] [--direct-gflop 20]
                                             [--from RESULTS.json] [--write [--plans PATH]]

Times the routes of :func:`epilsr.circular_correlate` (jitted, after a warm-up call, best of
``--repeats``) on the likelihood's shapes (``F = 2C = 8`` features, one layer): ``N`` in {128,
299, 499}, ``B`` in {32, 64, 256}, ``K`` in {7, 11, 15, 21}, plus small-``K`` shapes where the
direct route should win. Routes: ``dft_rows``, ``dft_2d`` and ``direct`` (the last skipped
above ``--direct-gflop`` of arithmetic; the FFT route is far slower on the CPU and not timed).
For each shape it prints the times, the route ``"auto"`` picks under this platform's
:class:`epilsr.correlate.CorrelationPlan` (:func:`epilsr.correlate.choose_route`) and how much
slower that is than the fastest route timed, then a summary; writes
``benchmarks/results/correlate_crossover.json``.

The fit: over a grid of the plan's route-choice constants (``direct_ratio``, ``dft_rows_cost``,
``dft_rows_cost_large``) it takes the one with the least mean excess time of ``"auto"`` over
the fastest route on these shapes (ties: the constants closest to the current plan), and
prints it. ``--from`` refits from a results JSON written earlier instead of timing.

Refitting a new machine (e.g. a GPU host, whose platform has no fitted entry yet and runs the
CPU cost model without its chunking rules):

    python -m benchmarks.correlate_crossover --write

on an idle machine writes the fitted plan into ``src/epilsr/correlate/plans.json`` under the
platform's name (``cpu``, ``gpu``, ``tpu``; other entries are kept); ``--plans PATH`` writes
another file. The memory budgets of the plan are carried over unchanged (they are set from
page-fault and peak-memory measurements, ``benchmarks/posterior.py``); record the run in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _baselines as bl
from epilsr.correlate import (
    CorrelationPlan,
    choose_route,
    circular_correlate,
    plan_for,
    route_flops,
)

F = 8
GRID = [(n, b, k) for n in (128, 299, 499) for b in (32, 64, 256) for k in (7, 11, 15, 21)
        if (n, b, k) != (499, 256, 21)]
SMALL_K = [(64, 64, 3), (128, 64, 3), (128, 256, 5), (299, 64, 5)]
QUICK = [(128, 64, 7), (128, 256, 15), (299, 64, 7), (299, 64, 11), (299, 256, 21), (128, 64, 3)]
TIMED = ("direct", "dft_rows", "dft_2d")
PLANS = Path(__file__).resolve().parents[1] / "src" / "epilsr" / "correlate" / "plans.json"
# The fit's search grid and the excess charged when "auto" picks a route that was not timed.
DIRECT_RATIOS = (1.0, 1.25, 1.5, 2.0, 3.0)
ROW_COSTS = tuple(np.round(np.arange(1.0, 10.01, 0.5), 2))
UNTIMED_EXCESS = 1.0
OLD_NAMES = {"hybrid": "dft_rows", "dft": "dft_2d"}


def best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(min(times))


def shapes_of(row: dict) -> tuple[tuple, tuple]:
    return (1, row["N"], row["N"], row["F"]), (row["B"], row["K"], row["K"], row["F"])


def excess(rows: list[dict], plan: CorrelationPlan) -> tuple[float, int, list[float]]:
    """``(mean excess, shapes where auto is fastest, per-row excess)`` of ``"auto"`` under
    ``plan`` over the fastest timed route (``UNTIMED_EXCESS`` where it picks an untimed one)."""
    losses = []
    for row in rows:
        times = row["times_s"]
        pick = choose_route(*shapes_of(row), plan)
        fastest = min(times.values())
        losses.append(times[pick] / fastest - 1 if pick in times else UNTIMED_EXCESS)
    return float(np.mean(losses)), sum(v == 0 for v in losses), losses


def fit_plan(rows: list[dict], plan: CorrelationPlan) -> tuple[CorrelationPlan, float]:
    """The plan's route-choice constants with the least mean excess on ``rows`` (ties: closest
    to ``plan``'s); the memory budgets are kept."""
    best, best_key = plan, None
    for ratio, small, large in itertools.product(DIRECT_RATIOS, ROW_COSTS, ROW_COSTS):
        cand = dataclasses.replace(plan, direct_ratio=float(ratio), dft_rows_cost=float(small),
                                   dft_rows_cost_large=float(large))
        distance = (abs(ratio - plan.direct_ratio) + abs(small - plan.dft_rows_cost)
                    + abs(large - plan.dft_rows_cost_large))
        key = (round(excess(rows, cand)[0], 6), distance)
        if best_key is None or key < best_key:
            best, best_key = cand, key
    return best, best_key[0]


def write_plan(path: Path, plan: CorrelationPlan, note: str) -> None:
    """Sets ``plan``'s entry (its platform) in the plans file, keeping the other entries."""
    entries = json.loads(path.read_text()) if path.exists() else {}
    fields = dataclasses.asdict(plan)
    platform = fields.pop("platform")
    entries[platform] = {"fitted_on": note,
                         "fitted_by": "python -m benchmarks.correlate_crossover --write",
                         "plan": fields}
    path.write_text(json.dumps(entries, indent=2) + "\n")


def time_rows(shapes, *, repeats: int, direct_gflop: float, plan: CorrelationPlan) -> list[dict]:
    key = jax.random.key(0)
    rows = []
    for n, b, k in shapes:
        maps = jax.random.uniform(key, (1, n, n, F))
        kernels = jax.random.uniform(jax.random.fold_in(key, 1), (b, k, k, F))
        times = {}
        for route in TIMED:
            if route == "direct" and route_flops("direct", maps.shape, kernels.shape) > (
                direct_gflop * 1e9
            ):
                continue
            fn = jax.jit(lambda m, x, route=route: circular_correlate(m, x, route=route, plan=plan))
            times[route] = best_time(fn, maps, kernels, repeats=repeats)
        rows.append({"N": n, "B": b, "K": k, "F": F, "times_s": times})
        cells = "  ".join(f"{r} {t * 1e3:7.1f} ms" for r, t in times.items())
        print(f"N={n:3d} B={b:3d} K={k:2d}  {cells}", flush=True)
    return rows


def summary(rows: list[dict], plan: CorrelationPlan, name: str) -> str:
    mean, best, losses = excess(rows, plan)
    worst = int(np.argmax(losses))
    r = rows[worst]
    return (f"{name}: auto picks the fastest route in {best}/{len(rows)} shapes; mean excess "
            f"{mean * 100:.1f} %, worst {losses[worst] * 100:.0f} % (N={r['N']} B={r['B']} "
            f"K={r['K']}: {choose_route(*shapes_of(r), plan)})")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="six shapes")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per route and shape")
    p.add_argument("--direct-gflop", type=float, default=20.0,
                   help="skip the direct route above this many GFLOP per call")
    p.add_argument("--from", dest="source", default=None,
                   help="refit from this results JSON instead of timing")
    p.add_argument("--write", action="store_true",
                   help="write the fitted plan into the plans file under this platform")
    p.add_argument("--plans", default=str(PLANS), help="plans file that --write updates")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    plan = plan_for()
    if args.source:
        record = json.loads(Path(args.source).read_text())
        meta, rows = record["meta"], record["rows"]
        for row in rows:  # records from before the routes were renamed
            row["times_s"] = {OLD_NAMES.get(r, r): t for r, t in row["times_s"].items()}
    else:
        meta = bl.machine(None)
        shapes = QUICK if args.quick else SMALL_K + GRID
        rows = time_rows(shapes, repeats=args.repeats, direct_gflop=args.direct_gflop, plan=plan)
    fitted, _ = fit_plan(rows, plan)
    for row in rows:
        row["auto"] = choose_route(*shapes_of(row), plan)
        row["auto_fitted"] = choose_route(*shapes_of(row), fitted)
    print(summary(rows, plan, f"current plan ({plan.platform})"))
    print(summary(rows, fitted, "fitted plan"))
    print(f"fitted: direct_ratio={fitted.direct_ratio} dft_rows_cost={fitted.dft_rows_cost} "
          f"dft_rows_cost_large={fitted.dft_rows_cost_large}")
    result = {"meta": meta, "rows": rows, "repeats": args.repeats,
              "plan": dataclasses.asdict(plan), "fitted_plan": dataclasses.asdict(fitted)}
    if not args.source:
        path = bl.write_json("correlate_crossover", result, args.out)
        print(f"wrote {path}")
    if args.write:
        date = meta.get("date") or datetime.datetime.now(datetime.UTC).isoformat()
        mean, best, _ = excess(rows, fitted)
        note = (f"{meta.get('processor', '?')} ({meta.get('cpu_affinity', '?')} cores), {date}: "
                f"{len(rows)} shapes, auto fastest in {best}, mean excess {mean * 100:.1f} %")
        write_plan(Path(args.plans), fitted, note)
        print(f"wrote the {fitted.platform} plan to {args.plans}")
    return result


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before timing
    main()
