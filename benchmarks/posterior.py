"""`log_likelihood` / `log_posterior` throughput against a PyTorch conv2d and direct lax.conv.

    python -m benchmarks.posterior [--quick] [--rounds 3] [--direct-gflop 200] [--out PATH]
                                   [--shape N,B,K ...] [--chunk-mib M]

For every ``N`` in {128, 299, 499}, ``K`` in {7, 11, 21, 31}, ``B`` in {64, 256} (``C = 4``,
``L = 1``, uniform patches, an epitome from :func:`epilsr.init_epitome`), times in one
process, round-robin (one call of each per round, so all see the same background load):

* ``jax``: jitted :func:`epilsr.log_likelihood` (default ``route="auto"``) and
  :func:`epilsr.log_posterior` (``T = (K/11)^2``);
* ``direct``: the same with ``route="direct"`` (one ``lax.conv`` on the wrap-padded epitome;
  skipped above ``--direct-gflop`` of arithmetic);
* ``torch``: the plain PyTorch route (:class:`benchmarks._baselines.TorchLikelihood`: a
  ``conv2d`` of the patches over the circularly padded epitome, CUDA when present; skipped
  with a message when torch is absent).

Reported per row: median seconds per call, posterior evaluations per second ``B L N^2 / t``,
patches per second, the speed-up ``torch / jax`` and ``direct / jax`` (medians of per-round
ratios), peak memory (XLA's buffer assignment for the compiled call: temporaries + arguments
+ outputs; the device's peak on a GPU), and a roofline line: the flops the route performs and
the fraction of this machine's matrix-multiply rate it reaches, the rate measured in the same
run (2048^3 float32 products). The direct ``conv2d`` does ``2 B L N^2 K^2 2C`` flops; the
fraction of the matmul rate the *direct-equivalent* work would need is also given
(``equiv``). ``--quick`` runs the acceptance shapes only (N=299 B=64 K=7,31; N=499 B=256
K=31); ``--shape`` (repeatable) replaces the shape list. Also reported: the minor page faults
per call (MiB of pages first touched) of ours and of torch's log-likelihood. ``--chunk-mib``
overrides the memory bound of the transform routes' batch chunks (the ``chunk_bytes`` of the
platform's :class:`epilsr.correlate.CorrelationPlan`; its other budgets, e.g. the CPU's
``dft_2d_batch`` and ``column_group_bytes``, stay). Prints a table and writes
``benchmarks/results/posterior.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import epilsr
from benchmarks import _baselines as bl
from epilsr.correlate import CorrelationPlan, choose_route, plan_for
from epilsr.correlate import route_flops as _route_flops

C, L = 4, 1
FULL = [(n, b, k) for n in (128, 299, 499) for b in (64, 256) for k in (7, 11, 21, 31)]
QUICK = [(299, 64, 7), (299, 64, 31), (499, 256, 31)]


def route_flops(route: str, n: int, b: int, k: int, plan: CorrelationPlan) -> float:
    """Flops of the correlation route (:func:`epilsr.correlate.route_flops`; box sums and the
    epitome-side maps are O(N^2 K) and left out)."""
    return _route_flops(route, (L, n, n, 2 * C), (b, k, k, 2 * C), plan=plan)


def bench_one(n, b, k, *, rounds, torch, direct_gflop, key, plan):
    epi = epilsr.init_epitome(key, size=n, channels=C, layers=L, mean=0.5)
    patches = jax.random.uniform(jax.random.fold_in(key, 1), (b, k, k, C), jnp.float32)
    temp = (k / 11.0) ** 2
    ll = jax.jit(lambda e, x: epilsr.log_likelihood(e, x, plan=plan))
    lp = jax.jit(lambda e, x: epilsr.log_posterior(e, x, temperature=temp, plan=plan))
    fns = {
        "jax_ll": lambda: jax.block_until_ready(ll(epi, patches)),
        "jax_lp": lambda: jax.block_until_ready(lp(epi, patches)),
    }
    route = choose_route((L, n, n, 2 * C), (b, k, k, 2 * C), plan)
    do_direct = route != "direct" and route_flops("direct", n, b, k, plan) / 1e9 <= direct_gflop
    if do_direct:
        lld = jax.jit(lambda e, x: epilsr.log_likelihood(e, x, route="direct"))
        fns["direct_ll"] = lambda: jax.block_until_ready(lld(epi, patches))
    if torch is not None:
        tl = bl.TorchLikelihood(torch, epi)
        tx = torch.as_tensor(np.asarray(patches), device=tl.dev)

        def t_ll():
            with torch.no_grad():
                tl.log_likelihood(tx)
            bl.sync(torch)

        def t_lp():
            with torch.no_grad():
                tl.log_posterior(tx, temp)
            bl.sync(torch)

        fns["torch_ll"], fns["torch_lp"] = t_ll, t_lp
        # agreement check (float32 both sides)
        with torch.no_grad():
            ref = tl.log_likelihood(tx).cpu().numpy()
        got = np.asarray(ll(epi, patches))
        agree = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    else:
        agree = None
    faults: dict[str, list[int]] = {}
    times = bl.time_round_robin(fns, rounds, faults)
    med = {name: statistics.median(t) for name, t in times.items()}
    mem = bl.jax_memory(ll, epi, patches)
    row = {
        "N": n,
        "B": b,
        "K": k,
        "C": C,
        "L": L,
        "route": route,
        "times_s": times,
        "median_s": med,
        "min_s": {k_: min(t) for k_, t in times.items()},
        # Pages first touched per call (median, MiB): fresh mmaps of large temporaries.
        "faults_mib_per_call": {
            k_: statistics.median(v) * bl.PAGE_BYTES / 2**20 for k_, v in faults.items()
        },
        "posteriors_per_s": b * L * n * n / med["jax_ll"],
        "patches_per_s": b / med["jax_ll"],
        "memory": mem,
        "device_peak_bytes": bl.device_peak(),
        "flops": route_flops(route, n, b, k, plan),
        "direct_flops": route_flops("direct", n, b, k, plan),
        "max_rel_diff_vs_torch": agree,
    }
    for name in ("torch_ll", "direct_ll"):
        if name in times:
            row[f"{name.split('_')[0]}_over_jax_ll"] = bl.paired_ratio(times[name], times["jax_ll"])
    if "torch_lp" in times:
        row["torch_over_jax_lp"] = bl.paired_ratio(times["torch_lp"], times["jax_lp"])
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="acceptance shapes only")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per shape")
    p.add_argument(
        "--direct-gflop",
        type=float,
        default=200.0,
        help="skip the lax.conv route above this many GFLOP per call",
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    p.add_argument("--shape", action="append", default=None, metavar="N,B,K",
                   help="shapes to run (repeatable; default: --quick or the full grid)")
    p.add_argument("--chunk-mib", type=float, default=None,
                   help="override the transform routes' memory per batch chunk (MiB)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    shapes = QUICK if args.quick else FULL
    if args.shape:
        try:
            shapes = [tuple(int(v) for v in s_.split(",")) for s_ in args.shape]
        except ValueError:
            shapes = []
        if not shapes or any(len(s_) != 3 or min(s_) < 1 for s_ in shapes):
            p.error(f"--shape: expected N,B,K with positive integers, got {args.shape}")
    plan = plan_for()
    if args.chunk_mib is not None:
        if not args.chunk_mib > 0:
            p.error(f"--chunk-mib: expected a positive size, got {args.chunk_mib}")
        plan = dataclasses.replace(plan, chunk_bytes=int(args.chunk_mib * 2**20))
    torch, t_start, meta, rate = bl.start(args.no_torch)
    print(
        f"{meta['device']} ({meta['processor']}, {meta['cpu_affinity']} cores), jax "
        f"{meta['jax']}, torch {meta.get('torch')} on {meta.get('torch_device')}; load "
        f"{meta['load_average']:.2f}; matmul rate jax {rate['jax'] / 1e9:.0f} GFLOP/s"
        + (f", torch {rate['torch'] / 1e9:.0f} GFLOP/s" if "torch" in rate else ""),
        flush=True,
    )
    rows = []
    meta["plan"] = dataclasses.asdict(plan)
    for n, b, k in shapes:
        r = bench_one(
            n,
            b,
            k,
            rounds=args.rounds,
            torch=torch,
            direct_gflop=args.direct_gflop,
            key=jax.random.key(n * 1000 + k),
            plan=plan,
        )
        peak = rate["jax"]
        r["roofline"] = {
            "matmul_flops_per_s": peak,
            "achieved_flops_per_s": r["flops"] / r["median_s"]["jax_ll"],
            "fraction_of_matmul": r["flops"] / r["median_s"]["jax_ll"] / peak,
            "direct_equivalent_fraction": r["direct_flops"] / r["median_s"]["jax_ll"] / peak,
        }
        if "torch_ll" in r["median_s"]:
            r["roofline"]["torch_fraction_of_matmul"] = (
                r["direct_flops"] / r["median_s"]["torch_ll"] / rate.get("torch", peak)
            )
        rows.append(r)
        print(_line(r), flush=True)
    meta["load_average_end"] = __import__("os").getloadavg()[0]
    header = [
        "N",
        "B",
        "K",
        "route",
        "jax_ll_s",
        "jax_lp_s",
        "torch_ll_s",
        "torch/jax",
        "torch/jax lp",
        "direct/jax",
        "Mpost/s",
        "peak_MB",
        "GFLOP",
        "of_mm",
        "equiv",
        "fault_MiB",
        "torch_fault_MiB",
    ]
    print(
        f"\nlog_likelihood / log_posterior, C={C} L={L}, median of {args.rounds} rounds; "
        f"matmul rate {rate['jax'] / 1e9:.0f} GFLOP/s (jax)"
    )
    print(bl.table(header, [_cells(r) for r in rows]))
    path = bl.write_json(
        "posterior",
        {
            "benchmark": "posterior",
            "meta": meta,
            "matmul_rate": rate,
            "rounds": args.rounds,
            "rows": rows,
            "total_s": time.perf_counter() - t_start,
        },
        args.out,
    )
    print(f"wrote {path} ({time.perf_counter() - t_start:.0f} s)")
    return {"rows": rows, "meta": meta}


def _cells(r) -> list:
    m = r["median_s"]
    peak = r["device_peak_bytes"] or r["memory"].get("peak_bytes", 0)
    return [
        r["N"],
        r["B"],
        r["K"],
        r["route"],
        m["jax_ll"],
        m["jax_lp"],
        m.get("torch_ll", "-"),
        r.get("torch_over_jax_ll", "-"),
        r.get("torch_over_jax_lp", "-"),
        r.get("direct_over_jax_ll", "-"),
        r["posteriors_per_s"] / 1e6,
        peak / 1e6,
        r["flops"] / 1e9,
        r["roofline"]["fraction_of_matmul"],
        r["roofline"]["direct_equivalent_fraction"],
        r["faults_mib_per_call"]["jax_ll"],
        r["faults_mib_per_call"].get("torch_ll", "-"),
    ]


def _line(r) -> str:
    m = r["median_s"]
    s = f"N={r['N']} B={r['B']} K={r['K']} {r['route']}: ll {m['jax_ll'] * 1e3:.1f} ms"
    if "torch_ll" in m:
        s += f", torch {m['torch_ll'] * 1e3:.1f} ms ({r['torch_over_jax_ll']:.2f}x)"
    if "direct_ll" in m:
        s += f", direct {m['direct_ll'] * 1e3:.1f} ms ({r['direct_over_jax_ll']:.2f}x)"
    return s + f", peak {(r['device_peak_bytes'] or r['memory'].get('peak_bytes', 0)) / 1e6:.0f} MB"


if __name__ == "__main__":
    main()
