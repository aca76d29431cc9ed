"""Per-window time of the approximate self-epitomic posterior against the exact route.

    python -m benchmarks.approx_route [--rounds 5] [--settings full,paper]
        [--variants exact,r32,r32g2,g2] [--raster 1024] [--out PATH]

One 256^2 synthetic window (``make_scene(0)``), 7x7 patches, ``sample_fraction=0.05``
(``P = 3277`` patches) at the library default (``full``: ``downsample=1``, 256^2 positions) and
the paper setting (``paper``: ``downsample=2``). Variants: ``exact`` (the default route),
``r<R>`` (``rank=R``), ``g<G>`` (``position_stride=G``) and ``r<R>g<G>`` (both). For each, the
median of ``--rounds`` round-robin timed direct calls of ``self_epitomic_counts`` (Eq. 11) and
of ``self_epitomic_lsr`` (the whole window: counts, EM, upsampling) and the best of them (the
least disturbed by other jobs on a shared machine), the speed-up over ``exact`` (median of
per-round ratios, so the variants share the background load, and the ratio of the bests),
the process CPU time of the calls (in the JSON) and the largest ``|counts - exact counts|``
relative to the largest exact count. ``--raster SIZE``: also ``lsr_raster`` end to end on a
``SIZE^2`` synthetic raster per variant (Mpx/min, labels equal to the exact route's). Writes
``benchmarks/results/approx_route.json``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time

import jax
import numpy as np
import tifffile

import epilsr
from benchmarks import _baselines as bl
from epilsr.data.synthetic import make_scene
from epilsr.pipelines import raster_lsr

SIZE, K, FRACTION = 256, 7, 0.05
SETTINGS = {"full": 1, "paper": 2}


def parse_variant(name: str) -> dict:
    """``exact`` -> ``{}``; ``r32g2`` -> ``{"rank": 32, "position_stride": 2}``."""
    if name == "exact":
        return {}
    m = re.fullmatch(r"(?:r(\d+))?(?:g(\d+))?", name)
    if not name or m is None:
        raise ValueError(f"--variants: expected exact, r<R>, g<G> or r<R>g<G>, got {name!r}")
    kw = {}
    if m.group(1):
        kw["rank"] = int(m.group(1))
    if m.group(2):
        kw["position_stride"] = int(m.group(2))
    return kw


def run_setting(downsample: int, variants: list[str], rounds: int) -> dict:
    scene = make_scene(0, size=SIZE)
    img, cls, tab = scene.image, scene.classes, scene.label_given_class
    key = jax.random.key(0)
    base = dict(downsample=downsample, patch_size=K, sample_fraction=FRACTION)
    n_rows = tab.shape[0]
    fns, counts, cpu = {}, {}, {}

    def timed(name, fn):  # also the process CPU time of each call (less sensitive to load)
        def call():
            t0 = time.process_time()
            fn()
            cpu.setdefault(name, []).append(time.process_time() - t0)
        return call

    for v in variants:
        kw = {**base, **parse_variant(v)}
        fns[f"counts {v}"] = timed(f"counts {v}", lambda kw=kw: jax.block_until_ready(
            epilsr.self_epitomic_counts(key, img, cls, n_rows, **kw)))
        fns[f"window {v}"] = timed(f"window {v}", lambda kw=kw: jax.block_until_ready(
            epilsr.self_epitomic_lsr(key, img, cls, tab, **kw)))
        counts[v] = np.asarray(epilsr.self_epitomic_counts(key, img, cls, n_rows, **kw))
    times = bl.time_round_robin(fns, rounds)
    cpu = {name: c[1:] for name, c in cpu.items()}  # drop the warm-up call
    ref = counts.get("exact")
    out = {}
    for v in variants:
        row = {part: statistics.median(times[f"{part} {v}"]) for part in ("counts", "window")}
        row.update({f"{part}_cpu": statistics.median(cpu[f"{part} {v}"])
                    for part in ("counts", "window")})
        row.update({f"{part}_best": min(times[f"{part} {v}"]) for part in ("counts", "window")})
        if "exact" in counts:
            for part in ("counts", "window"):
                row[f"{part}_speedup"] = bl.paired_ratio(times[f"{part} exact"],
                                                         times[f"{part} {v}"])
                row[f"{part}_best_speedup"] = min(times[f"{part} exact"]) / row[f"{part}_best"]
            row["counts_rel_err"] = float(np.abs(counts[v] - ref).max() / ref.max())
        out[v] = row
    return out


def raster_rate(size: int, variants: list[str], rounds: int) -> dict:
    """``lsr_raster`` end to end on a ``size^2`` synthetic raster (256^2 windows, overlap 64,
    the library default ``downsample=1``): best-of-``rounds`` seconds after a warm-up run,
    Mpx/min, and the share of labels equal to the exact route's."""
    scene = make_scene(0, size=size)
    key = jax.random.key(0)
    out, labels = {}, {}
    for v in variants:
        times = []
        for _ in range(rounds + 1):
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                run = raster_lsr.lsr_raster(
                    key, raster_lsr.array_reader(scene.image),
                    raster_lsr.array_reader(scene.classes), scene.label_given_class, out_dir=d,
                    tile=256, overlap=64, lsr_kwargs=parse_variant(v), progress=False,
                    resume=False, preview=None)
                times.append(time.perf_counter() - t0)
                labels[v] = tifffile.imread(run.labels)
        best = min(times[1:])
        out[v] = {"seconds": best, "mpx_per_min": size * size / 1e6 * 60 / best,
                  "windows": run.windows}
        if "exact" in labels:
            out[v]["label_agreement"] = float((labels[v] == labels["exact"]).mean())
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settings", default="full,paper")
    parser.add_argument("--variants", default="exact,r16,r32,r48,g2,r32g2")
    parser.add_argument("--raster", type=int, default=0,
                        help="also lsr_raster on a SIZE^2 raster (full resolution), e.g. 1024")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    settings = args.settings.split(",")
    bad = sorted(set(settings) - set(SETTINGS))
    if bad:
        parser.error(f"--settings: unknown {bad}; expected some of {sorted(SETTINGS)}")
    variants = args.variants.split(",")
    for v in variants:
        try:
            parse_variant(v)
        except ValueError as err:
            parser.error(str(err))
    results, rows = {}, []
    for name in settings:
        res = run_setting(SETTINGS[name], variants, args.rounds)
        results[name] = res
        for v, r in res.items():
            nan = float("nan")
            rows.append([name, v, 1e3 * r["counts"], 1e3 * r["counts_best"],
                         r.get("counts_speedup", nan), r.get("counts_best_speedup", nan),
                         1e3 * r["window"], 1e3 * r["window_best"],
                         r.get("window_speedup", nan), r.get("window_best_speedup", nan),
                         r.get("counts_rel_err", nan)])
        print(f"{name}: done", flush=True)
    print(bl.table(["setting", "variant", "counts ms", "best", "x (paired)", "x (best)",
                    "window ms", "best", "x (paired)", "x (best)", "max rel |dcounts|"], rows))
    raster = {}
    if args.raster:
        raster = raster_rate(args.raster, variants, min(args.rounds, 2))
        print(bl.table(["variant", "raster s", "Mpx/min", "labels = exact"],
                       [[v, r["seconds"], r["mpx_per_min"], r.get("label_agreement", float("nan"))]
                        for v, r in raster.items()]))
    path = bl.write_json("approx_route", {"machine": bl.machine(), "rounds": args.rounds,
                                          "results": results, "raster": raster}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
