"""Seconds per training step against the same step written the plain PyTorch way.

    python -m benchmarks.train_step [--sizes 11,21,31] [--rounds 3] [--no-direct] [--out PATH]

One step = forward + backward + Adam + constraints + location-promotion counters, on
``N = 299``, ``L = 1``, ``C = 4``, ``B = 256`` uniform patches with self-diversification
(``q = 0.25``) and ``T = (K/11)^2``:

* ``jax``: :func:`epilsr.train.make_train_step` (``route="auto"``);
* ``direct``: the same with ``route="direct"`` (one ``lax.conv``; ``--no-direct`` skips it);
* ``torch``: :class:`benchmarks._baselines.TorchTrainer` (``conv2d`` forward, autograd
  backward, ``torch.optim.Adam``, in-place clamps; CUDA when present).

Each variant gets a warm-up step (compilation) and ``--rounds`` timed steps, round-robin.
Ratios are medians of per-round ratios; the acceptance figure is their mean over ``K``. The
roofline line counts the forward correlation's flops three times (forward, and the two
products of the backward) against the matmul rate measured in the same run; peak memory is
XLA's buffer assignment for the compiled step. Prints a table, writes
``benchmarks/results/train_step.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import optax

import epilsr
from benchmarks import _baselines as bl
from epilsr import train
from epilsr.correlate import choose_route, plan_for, route_flops

N, L, C, B = 299, 1, 4, 256


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="11,21,31")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-direct", action="store_true", help="skip the lax.conv route")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch, t_start, meta, rate = bl.start(args.no_torch)
    print(
        f"{meta['device']}, load {meta['load_average']:.2f}, matmul {rate['jax'] / 1e9:.0f} "
        f"GFLOP/s",
        flush=True,
    )
    optimizer = optax.adam(3e-3)
    epi = epilsr.init_epitome(jax.random.key(0), size=N, channels=C, layers=L, mean=0.5)
    rows = []
    for k in [int(s) for s in args.sizes.split(",")]:
        batches = [
            jax.random.uniform(jax.random.fold_in(jax.random.key(k), i), (B, k, k, C))
            for i in range(args.rounds + 1)
        ]
        fns, states = {}, {}
        step = train.make_train_step(optimizer=optimizer)
        variants = {"jax": step}
        if not args.no_direct:
            variants["direct"] = train.make_train_step(optimizer=optimizer, route="direct")
        for name, fn in variants.items():
            states[name] = train.train_init(jax.random.key(1), epi, optimizer)
            counter = iter(range(10**6))

            def run(name=name, fn=fn, counter=counter, batches=batches, states=states):
                i = next(counter) % len(batches)
                states[name], info = fn(states[name], batches[i])
                jax.block_until_ready((states[name], info))

            fns[name] = run
        if torch is not None:
            trainer = bl.TorchTrainer(torch, epi)
            tb = [torch.as_tensor(np.asarray(x), device=trainer.lik.dev) for x in batches]
            tcount = iter(range(10**6))

            def trun(trainer=trainer, tb=tb, tcount=tcount):
                trainer.step(tb[next(tcount) % len(tb)])
                bl.sync(torch)

            fns["torch"] = trun
        times = bl.time_round_robin(fns, args.rounds)
        med = {name: statistics.median(t) for name, t in times.items()}
        state0 = train.train_init(jax.random.key(1), epi, optimizer)
        mem = bl.jax_memory(step, state0, batches[0])
        plan = plan_for(batches[0])
        route = choose_route((L, N, N, 2 * C), (B, k, k, 2 * C), plan)
        flops = 3 * route_flops(route, (L, N, N, 2 * C), (B, k, k, 2 * C), plan=plan)
        row = {
            "K": k,
            "route": route,
            "times_s": times,
            "median_s": med,
            "min_s": {n_: min(t) for n_, t in times.items()},
            "memory": mem,
            "device_peak_bytes": bl.device_peak(),
            "flops": flops,
            "roofline": {
                "matmul_flops_per_s": rate["jax"],
                "fraction_of_matmul": flops / med["jax"] / rate["jax"],
            },
        }
        for other in ("torch", "direct"):
            if other in times:
                row[f"{other}_over_jax"] = bl.paired_ratio(times[other], times["jax"])
        rows.append(row)
        print(
            f"K={k} {route}: jax {med['jax']:.3f} s/step"
            + (f", torch {med['torch']:.3f} ({row['torch_over_jax']:.2f}x)" if torch else "")
            + (
                f", direct {med['direct']:.3f} ({row['direct_over_jax']:.2f}x)"
                if "direct" in med
                else ""
            ),
            flush=True,
        )
    mean_ratio = statistics.mean(r["torch_over_jax"] for r in rows) if torch is not None else None
    header = [
        "K",
        "route",
        "jax_s",
        "torch_s",
        "torch/jax",
        "direct_s",
        "direct/jax",
        "peak_MB",
        "GFLOP",
        "of_mm",
    ]
    print(
        f"\ntrain step N={N} L={L} C={C} B={B}, Adam, q=0.25, promotion; median of "
        f"{args.rounds} rounds; matmul {rate['jax'] / 1e9:.0f} GFLOP/s"
    )
    print(
        bl.table(
            header,
            [
                [
                    r["K"],
                    r["route"],
                    r["median_s"]["jax"],
                    r["median_s"].get("torch", "-"),
                    r.get("torch_over_jax", "-"),
                    r["median_s"].get("direct", "-"),
                    r.get("direct_over_jax", "-"),
                    (r["device_peak_bytes"] or r["memory"].get("peak_bytes", 0)) / 1e6,
                    r["flops"] / 1e9,
                    r["roofline"]["fraction_of_matmul"],
                ]
                for r in rows
            ],
        )
    )
    if mean_ratio is not None:
        print(f"mean torch/jax over K: {mean_ratio:.2f}x")
    meta["load_average_end"] = __import__("os").getloadavg()[0]
    path = bl.write_json(
        "train_step",
        {
            "benchmark": "train_step",
            "meta": meta,
            "matmul_rate": rate,
            "config": {"N": N, "L": L, "C": C, "B": B, "optimizer": "adam(3e-3)", "quantile": 0.25},
            "rows": rows,
            "mean_torch_over_jax": mean_ratio,
            "total_s": time.perf_counter() - t_start,
        },
        args.out,
    )
    print(f"wrote {path} ({time.perf_counter() - t_start:.0f} s)")
    return {"rows": rows, "mean": mean_ratio}


if __name__ == "__main__":
    main()
