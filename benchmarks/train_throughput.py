"""Training-step throughput: seconds per step and patches/s, routing baseline, device scaling.

    python -m benchmarks.train_throughput [--steps 5] [--sizes 11,21,31] [--devices 1,2,4]
        [--direct-sizes 11,21,31] [--scaling-sizes 11,21]

One training step is the jitted :func:`epilsr.train.train_step` (forward, backward, Adam,
:func:`epilsr.clamp_epitome`, location-promotion counters; self-diversification ``q = 0.25``)
at ``N = 299``, ``L = 1``, ``C = 4``, ``B = 256`` on uniform random patches. Each timing is one
warm-up call (compilation + first step, reported as ``compile_s``) followed by ``--steps``
steps, each closed by ``jax.block_until_ready``; the median and the minimum are reported.
Variants that are compared (auto vs direct at one ``K``; 1, 2, 4 devices at one ``K``) are
timed round-robin, one step each per round, and ratios are medians of the per-round ratios,
so a change of background load on a shared machine hits both sides.

1. **Patch size** (single device): ``K`` in ``--sizes`` with the default ``route="auto"``
   correlation routing.
2. **Routing baseline**: the same step with ``route="direct"`` (``lax.conv`` for every
   ``K``) at ``--direct-sizes``; ``ratio = direct / auto`` seconds per step (> 1: auto wins).
3. **Device scaling**: :func:`epilsr.parallel.make_sharded_train_step` over ``--devices`` forced
   host CPU devices at each ``--scaling-sizes`` width (``--scaling-steps`` timed steps); after
   one step from the same state on the same batch the parameters are compared with the
   single-device step (max abs difference, under Adam and under plain SGD: Adam's first step
   ``lr g / (|g| + eps)`` turns float32 reduction-order noise in near-zero gradients into
   differences up to ``lr``). The compiled sharded step's collectives are listed: apart from
   the ``[B]`` score all-gather of the global worst-quantile selection, an all-gather means a
   batch-sharded intermediate is replicated on every device.

The forced device count (``XLA_FLAGS=--xla_force_host_platform_device_count``) is set below
before JAX is imported; forced devices share the machine's cores, so on a small CPU box the
scaling rows measure the partitioning overhead more than a speed-up. Prints a table and writes JSON
(default ``benchmarks/results/train_throughput.json``).
"""

from __future__ import annotations

import os

_FORCE = "--xla_force_host_platform_device_count"
if _FORCE not in os.environ.get("XLA_FLAGS", ""):  # must precede the first `import jax`
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FORCE}=4").strip()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import epilsr  # noqa: E402
from epilsr import parallel, train  # noqa: E402
from epilsr.cli.tables import format_table  # noqa: E402
from epilsr.correlate import choose_route, plan_for  # noqa: E402

N, LAYERS, CHANNELS, BATCH = 299, 1, 4, 256


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _batches(size: int, count: int, *, seed: int = 0) -> list[jax.Array]:
    """``count`` distinct ``[B, K, K, C]`` uniform batches (one per timed call)."""
    key = jax.random.fold_in(jax.random.key(seed), size)
    return [
        jax.random.uniform(jax.random.fold_in(key, i), (BATCH, size, size, CHANNELS))
        for i in range(count)
    ]


def _initial_state(optimizer) -> train.TrainState:
    epitome = epilsr.init_epitome(
        jax.random.key(0), size=N, channels=CHANNELS, layers=LAYERS, mean=0.5
    )
    return train.train_init(jax.random.key(1), epitome, optimizer)


class Runner:
    """One step variant to time: ``step(state, prepare(patches)) -> (state, info)``."""

    def __init__(self, step, state, *, prepare=lambda p: p, rounds: int):
        self.step, self.state, self.prepare, self.rounds = step, state, prepare, rounds
        self.times: list[float] = []
        self.compile_s = float("nan")
        self.info = None

    def call(self, patches) -> float:
        patches = self.prepare(patches)
        jax.block_until_ready(patches)
        t0 = time.perf_counter()
        self.state, self.info = self.step(self.state, patches)
        jax.block_until_ready((self.state, self.info))
        return time.perf_counter() - t0

    def result(self) -> dict:
        median = statistics.median(self.times)
        return {
            "compile_s": self.compile_s,
            "step_s": median,
            "step_min_s": min(self.times),
            "step_times_s": self.times,
            "patches_per_s": BATCH / median,
            "loss_finite": bool(np.isfinite(float(self.info.loss))),
        }


def time_interleaved(runners: dict[str, Runner], batches: list) -> dict[str, dict]:
    """Warm-up call of each runner (``compile_s``), then timed rounds, round-robin.

    Round ``i`` runs every runner with ``rounds > i`` on ``batches[i + 1]``, one after the
    other, so variants compared in the same round see the same background load (the box is
    shared). Each call ends with ``jax.block_until_ready``.
    """
    for r in runners.values():
        r.compile_s = r.call(batches[0])
    for i in range(max(r.rounds for r in runners.values())):
        for r in runners.values():
            if i < r.rounds:
                r.times.append(r.call(batches[i + 1]))
    return {name: r.result() for name, r in runners.items()}


def paired_ratio(num: dict, den: dict) -> float:
    """Median over rounds of ``num_i / den_i`` (the rounds both ran)."""
    pairs = zip(num["step_times_s"], den["step_times_s"], strict=False)
    return statistics.median(a / b for a, b in pairs)


def _max_abs_diff(a: epilsr.Epitome, b: epilsr.Epitome) -> dict:
    names = ("mean", "log_var", "prior_logits")
    return {
        n: float(jnp.max(jnp.abs(jnp.asarray(getattr(a, n)) - jnp.asarray(getattr(b, n)))))
        for n in names
    }


def _routing(size: int) -> str:
    maps, patches = (LAYERS, N, N, 2 * CHANNELS), (BATCH, size, size, 2 * CHANNELS)
    return choose_route(maps, patches, plan_for())


_COLLECTIVE = re.compile(r"= (\S+) (all-gather|all-reduce|all-to-all|reduce-scatter)\(")


def collectives(step, state, patches) -> dict:
    """Collectives of the compiled sharded step: ``{kind: [result shapes]}``."""
    hlo = step.lower(state, patches).compile().as_text()
    found: dict[str, list[str]] = {}
    for shape, kind in _COLLECTIVE.findall(hlo):
        found.setdefault(kind, []).append(shape.split("{")[0])
    return found


def scale(k, devices, state0, optimizer, step_auto, *, steps, sgd_check, collectives_=True):
    """Sharded step on each forced device count at patch width ``k``."""
    batches = _batches(k, steps + 1, seed=1)
    ref_state, ref_info = step_auto(state0, batches[0])
    ref_params = jax.device_get(ref_state.params)
    # Adam's first step is lr * g / (|g| + eps): +-lr wherever |g| >> eps, so a float32
    # reduction-order difference only shows where |g| ~ eps. Plain SGD shows it linearly.
    sgd = optax.sgd(3e-3)
    sgd_state0 = train.train_init(jax.random.key(1), state0.params, sgd)
    sgd_ref = None
    if sgd_check:
        sgd_ref = jax.device_get(train.make_train_step(optimizer=sgd)(sgd_state0, batches[0])[0])
        sgd_update = max(_max_abs_diff(sgd_ref.params, state0.params).values())
    runners, meshes = {}, {}
    for n_dev in _ints(devices):
        if n_dev > len(jax.devices()):
            print(f"skipping {n_dev} devices: only {len(jax.devices())} available")
            continue
        if BATCH % n_dev:
            print(f"skipping {n_dev} devices: batch {BATCH} not divisible")
            continue
        mesh = meshes[str(n_dev)] = parallel.data_mesh(jax.devices()[:n_dev])
        step_sh = parallel.make_sharded_train_step(mesh, optimizer=optimizer)
        runners[str(n_dev)] = Runner(
            step_sh,
            parallel.replicate(state0, mesh),
            prepare=lambda x, m=mesh: parallel.shard_batch(x, m),
            rounds=steps,
        )
    out = time_interleaved(runners, batches)
    for name, r in out.items():
        mesh, step_sh, n_dev = meshes[name], runners[name].step, int(name)
        state_sh = parallel.replicate(state0, mesh)
        first = parallel.shard_batch(batches[0], mesh)
        one, one_info = step_sh(state_sh, first)
        diff = _max_abs_diff(jax.device_get(one.params), ref_params)
        r["max_abs_diff_vs_single"] = diff
        r["max_abs_diff"] = max(diff.values())
        r["loss_abs_diff"] = abs(float(one_info.loss) - float(ref_info.loss))
        r["counters_max_abs_diff"] = float(jnp.max(jnp.abs(one.counters - ref_state.counters)))
        if sgd_ref is not None:
            sgd_step = parallel.make_sharded_train_step(mesh, optimizer=sgd)
            sgd_one = sgd_step(parallel.replicate(sgd_state0, mesh), first)
            sgd_diff = _max_abs_diff(jax.device_get(sgd_one[0].params), sgd_ref.params)
            r["sgd_max_abs_diff_vs_single"] = sgd_diff
            r["sgd_max_abs_update"] = sgd_update
        if collectives_ and n_dev > 1:
            found = collectives(step_sh, state_sh, first)
            r["collectives"] = found
            # the global worst-quantile selection gathers the [B] scores; anything bigger
            # means a batch-sharded intermediate was replicated on every device
            r["all_gathers"] = [sh for sh in found.get("all-gather", []) if sh != f"f32[{BATCH}]"]
        print(
            f"{n_dev} device(s) K={k}: {r['step_s']:.3f} s/step, "
            f"max |params - single-device| = {r['max_abs_diff']:.3g} (Adam)"
            + (
                f", {max(r['sgd_max_abs_diff_vs_single'].values()):.3g} (SGD, max update "
                f"{r['sgd_max_abs_update']:.3g})"
                if "sgd_max_abs_update" in r
                else ""
            )
            + (f"; large all-gathers {r['all_gathers']}" if r.get("all_gathers") else ""),
            flush=True,
        )
    for r in out.values():
        r["speedup_vs_1"] = paired_ratio(out["1"], r) if "1" in out else None
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting (after warm-up)")
    p.add_argument("--sizes", default="11,21,31", help="patch widths K for the auto routing")
    p.add_argument("--direct-sizes", default="11,21,31", help="K for the direct baseline")
    p.add_argument("--direct-steps", type=int, default=3, help="timed steps for the baseline")
    p.add_argument("--devices", default="1,2,4", help="forced CPU device counts for scaling")
    p.add_argument("--scaling-sizes", default="11,21", help="K for the scaling rows")
    p.add_argument("--scaling-steps", type=int, default=3, help="timed steps per scaling row")
    p.add_argument(
        "--no-collectives",
        dest="collectives",
        action="store_false",
        help="skip listing the collectives of the compiled sharded step (one extra compile)",
    )
    p.add_argument(
        "--no-sgd-check",
        dest="sgd_check",
        action="store_false",
        help="skip the one-step sharded-vs-single comparison under plain SGD",
    )
    p.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = p.parse_args(argv)
    if min(args.steps, args.direct_steps, args.scaling_steps) < 1:
        raise SystemExit("--steps, --direct-steps and --scaling-steps must be >= 1")
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    optimizer = optax.adam(3e-3)
    state0 = _initial_state(optimizer)
    print(
        f"jax {jax.__version__}, {len(jax.devices())} CPU devices (forced), "
        f"{os.cpu_count()} cores, load average {load_start:.2f}",
        flush=True,
    )

    # 1-2. patch size with auto routing, and the direct (lax.conv) baseline, interleaved
    step_auto = train.make_train_step(optimizer=optimizer)
    step_direct = train.make_train_step(optimizer=optimizer, route="direct")
    sizes, direct = {}, {}
    auto_sizes, direct_sizes = _ints(args.sizes), _ints(args.direct_sizes)
    for k in sorted(set(auto_sizes) | set(direct_sizes)):
        rounds = args.steps if k in auto_sizes else args.direct_steps
        runners = {"auto": Runner(step_auto, state0, rounds=rounds)}
        if k in direct_sizes:
            runners["direct"] = Runner(step_direct, state0, rounds=args.direct_steps)
        res = time_interleaved(runners, _batches(k, max(rounds, args.direct_steps) + 1))
        auto = res["auto"]
        auto["routing"] = _routing(k)
        msg = f"K={k:2d} auto({auto['routing']}): {auto['step_s']:.3f} s/step"
        if k in auto_sizes:
            sizes[str(k)] = auto
        if "direct" in res:
            r = res["direct"]
            r["auto_step_s"] = auto["step_s"]
            r["ratio_direct_over_auto"] = paired_ratio(r, auto)
            r["ratio_of_minima"] = r["step_min_s"] / auto["step_min_s"]
            direct[str(k)] = r
            msg += f", direct {r['step_s']:.3f} s/step ({r['ratio_direct_over_auto']:.2f}x)"
        print(msg, flush=True)

    # 3. device scaling, with a parameter check against the single-device step
    scaling = {}
    for k in _ints(args.scaling_sizes):
        scaling[str(k)] = scale(
            k,
            args.devices,
            state0,
            optimizer,
            step_auto,
            steps=args.scaling_steps,
            sgd_check=args.sgd_check,
            collectives_=args.collectives,
        )

    def row(method, route, k_, n_, v, ratio="", adam="", sgd=""):
        times = [v["compile_s"], v["step_s"], v["step_min_s"], v["patches_per_s"]]
        return [method, route, k_, n_, *times, ratio, adam, sgd]

    rows = [row("auto", v["routing"], k_, 1, v) for k_, v in sizes.items()]
    rows += [
        row(
            "direct",
            "direct",
            k_,
            1,
            v,
            f"{v['ratio_direct_over_auto']:.2f}x",
        )
        for k_, v in direct.items()
    ]
    for k, by_dev in scaling.items():
        for n_, v in by_dev.items():
            speedup = "" if v["speedup_vs_1"] is None else f"{v['speedup_vs_1']:.2f}x"
            sgd = v.get("sgd_max_abs_diff_vs_single")
            sgd = "" if sgd is None else f"{max(sgd.values()):.2e}"
            adam = f"{v['max_abs_diff']:.2e}"
            rows.append(row("sharded", _routing(int(k)), k, n_, v, speedup, adam, sgd))
    header = ["method", "route", "K", "dev", "compile_s", "s/step", "min_s", "patches/s"]
    header += ["direct/auto|speedup", "max|dp| adam", "max|dp| sgd"]
    print()
    print(
        f"train step, N={N} L={LAYERS} C={CHANNELS} B={BATCH}, median of {args.steps} steps "
        f"({args.direct_steps} for direct, {args.scaling_steps} for sharded)"
    )
    print(format_table(header, rows, floats=".4g", align="right"))
    for k, by_dev in scaling.items():
        for n_, v in by_dev.items():
            if v.get("all_gathers"):
                print(f"K={k}, {n_} devices: compiled step all-gathers {v['all_gathers']}")

    result = {
        "benchmark": "train_throughput",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "forced_devices": len(jax.devices()),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg()[0],
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "platform": platform.platform(),
        },
        "config": {
            "N": N,
            "layers": LAYERS,
            "channels": CHANNELS,
            "batch": BATCH,
            "steps": args.steps,
            "direct_steps": args.direct_steps,
            "scaling_sizes": _ints(args.scaling_sizes),
            "scaling_steps": args.scaling_steps,
            "optimizer": "adam(3e-3)",
            "quantile": 0.25,
            "promotion": True,
            "patches": "uniform [0, 1]",
        },
        "sizes": sizes,
        "direct": direct,
        "scaling": scaling,
        "total_s": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out} ({result['total_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
