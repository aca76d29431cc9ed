"""Where the FFT route of `circular_correlate` beats the direct route, and what "auto" picks.

    python -m benchmarks.correlate_crossover [--quick]

Times both routes (jitted, after warm-up, median of repeats) on the likelihood's shapes
(F = 2C features) and on the self-epitomic LSR shapes (F = C), prints a table with the ratio
direct/fft and whether the shape model in `epilsr.correlate._prefers_fft` chose the faster route,
and writes benchmarks/results/correlate_crossover.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from epilsr.correlate import _prefers_fft, circular_correlate


def best_time(fn, *args, repeats: int = 3) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args()
    shapes = [  # (L, N, F, B, K)
        (1, 64, 8, 64, 3), (1, 64, 8, 64, 7), (1, 64, 8, 64, 11), (1, 64, 8, 64, 21),
        (1, 128, 4, 512, 5), (1, 128, 4, 512, 7), (1, 128, 4, 512, 11),
        (1, 256, 4, 512, 7), (1, 128, 8, 64, 11), (1, 128, 8, 64, 21), (1, 128, 8, 64, 31),
        (1, 299, 8, 64, 7), (1, 299, 8, 64, 11), (1, 299, 8, 64, 21), (1, 299, 8, 64, 31),
    ]
    if args.quick:
        shapes = shapes[::3]
    rows = []
    key = jax.random.key(0)
    for lyr, n, f, b, k in shapes:
        maps = jax.random.uniform(key, (lyr, n, n, f))
        kernels = jax.random.uniform(jax.random.fold_in(key, 1), (b, k, k, f))
        t = {}
        for method in ("direct", "fft"):
            fn = jax.jit(lambda m, x, method=method: circular_correlate(m, x, method=method))
            t[method] = best_time(fn, maps, kernels)
        picks_fft = _prefers_fft(maps.shape, kernels.shape)
        faster = "fft" if t["fft"] < t["direct"] else "direct"
        rows.append({"L": lyr, "N": n, "F": f, "B": b, "K": k, "direct_s": t["direct"],
                     "fft_s": t["fft"], "ratio_direct_over_fft": t["direct"] / t["fft"],
                     "auto": "fft" if picks_fft else "direct", "faster": faster})
        r = rows[-1]
        print(f"L={lyr} N={n:3d} F={f} B={b:3d} K={k:2d}  direct {t['direct']*1e3:8.1f} ms  "
              f"fft {t['fft']*1e3:8.1f} ms  direct/fft {r['ratio_direct_over_fft']:6.2f}  "
              f"auto={r['auto']:6s} {'ok' if r['auto'] == faster else 'WRONG'}", flush=True)
    out = Path(__file__).parent / "results" / "correlate_crossover.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"jax": jax.__version__, "cpu": platform.processor(), "devices": str(jax.devices())}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    right = sum(r["auto"] == r["faster"] for r in rows)
    print(f"auto picked the faster route in {right}/{len(rows)} shapes; wrote {out}")


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before timing
    main()
