"""Self-epitomic LSR of a 512^2 tile against the plain PyTorch route doing the same work.

    python -m benchmarks.lsr [--rounds 2] [--settings notebook,paper] [--profile] [--out PATH]

Tile: the deterministic synthetic scene ``epilsr.data.synthetic.make_scene(0, size=512)``
(4 bands, 8 coarse classes, 4 labels; the West-Virginia crops in ``data/chesapeake_wv`` are
256^2 only, and the synthetic tile also runs on a bare GPU machine). Settings:

* ``notebook``: the published notebook's: full resolution, 7x7 patches, 20 000 sampled
  patches, 20 EM iterations — ``self_epitomic_lsr(key, image, classes, table, downsample=1,
  patch_size=7, sample_fraction=20000/512**2, iters=20)``;
* ``paper``: 2x block-averaged, ``sample_fraction=0.05`` (0.05 W^2 = 13 107 patches), 7x7.

``jax`` is the library call (jitted inside; library defaults otherwise, i.e. it also runs the
composition adaptation, more EM than the baseline). ``torch`` is
:func:`benchmarks._baselines.torch_self_lsr`: a ``conv2d`` of each sampled patch over the
tile, softmax over the windows, the patch class spread over its window (Eq. 11), 20 EM
iterations, on CUDA when present. Warm-up call then ``--rounds`` timed calls, round-robin;
``torch / jax`` is the median of per-round ratios. The roofline line counts the posterior's
correlation flops ``2 P h w K^2 C`` (what the baseline's conv does) against the matmul rate
measured in the same run. ``--profile`` adds a per-stage breakdown of the JAX call (the
correlation, the softmax, the embedding, the EM) from jitted pieces. Prints a table, writes
``benchmarks/results/lsr.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import epilsr
from benchmarks import _baselines as bl
from epilsr.data.synthetic import make_scene

SIZE, K = 512, 7
SETTINGS = {
    "notebook": {"downsample": 1, "sample_fraction": 20000 / SIZE**2},
    "paper": {"downsample": 2, "sample_fraction": 0.05},
}


def profile_stages(image, setting, rounds: int = 2) -> dict:
    """Seconds of the stages of the self-epitomic posterior work, each jitted alone, on the
    same shapes as the library call (chunks of the library's default size)."""
    from epilsr.correlate import box_sum, circular_correlate

    d = setting["downsample"]
    epi = image.reshape(SIZE // d, d, SIZE // d, d, -1).mean(axis=(1, 3)) if d > 1 else image
    n = epi.shape[0]
    n_patches = round(setting["sample_fraction"] * SIZE * SIZE)
    chunk = max(1, min(2048, (1 << 24) // (n * n)))
    n_chunks = -(-n_patches // chunk)
    key = jax.random.key(0)
    pos = jax.random.randint(key, (chunk, 2), 0, n - K + 1)
    patches = jax.vmap(lambda p: jax.lax.dynamic_slice(epi, (p[0], p[1], 0), (K, K, 4)))(pos)
    maps = epi[None]
    half = 0.5 * box_sum(jnp.sum(epi * epi, -1), (K, K))
    corr = jax.jit(lambda m, x: circular_correlate(m, x)[:, 0])
    logits = corr(maps, patches)
    soft = jax.jit(lambda lg: jax.nn.softmax((lg - half) * 2.0, axis=(1, 2)))
    post = soft(logits)
    onehot = jax.nn.one_hot(jnp.arange(chunk) % 8, 8)
    emb = jax.jit(lambda o, p: jnp.einsum("bc,bxy->xyc", o, p, precision="highest"))
    stages = {
        "correlate": (corr, (maps, patches)),
        "softmax": (soft, (logits,)),
        "embed": (emb, (onehot, post)),
    }
    out = {}
    for name, (fn, args) in stages.items():
        times = bl.time_round_robin(
            {name: lambda fn=fn, args=args: jax.block_until_ready(fn(*args))}, rounds
        )[name]
        out[name] = {"per_chunk_s": min(times), "total_s": min(times) * n_chunks}
    counts = jax.random.uniform(key, (n, n, 8))
    table = jnp.full((8, 4), 0.25)
    em = jax.jit(lambda c, t: epilsr.super_resolve(c, t, iters=20))
    times = bl.time_round_robin({"em": lambda: jax.block_until_ready(em(counts, table))}, rounds)
    out["em_20_iters"] = {"total_s": min(times["em"])}
    out["chunk"], out["n_chunks"] = chunk, n_chunks
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--settings", default="notebook,paper")
    p.add_argument("--profile", action="store_true", help="per-stage breakdown of the JAX call")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch, t_start, meta, rate = bl.start(args.no_torch)
    scene = make_scene(0, size=SIZE)
    image = jnp.asarray(scene.image)
    classes = jnp.asarray(scene.classes)
    table = jnp.asarray(scene.label_given_class)
    print(
        f"{meta['device']}, load {meta['load_average']:.2f}, matmul {rate['jax'] / 1e9:.0f} "
        f"GFLOP/s; tile: synthetic make_scene(0, size={SIZE})",
        flush=True,
    )
    rows = []
    for name in args.settings.split(","):
        setting = SETTINGS[name]
        n_patches = max(1, round(setting["sample_fraction"] * SIZE * SIZE))
        d = setting["downsample"]

        def run_jax(setting=setting):
            out = epilsr.self_epitomic_lsr(
                jax.random.key(0), image, classes, table, patch_size=K, iters=20, **setting
            )
            return jax.block_until_ready(out)

        fns = {"jax": run_jax}
        if torch is not None:
            img_np, cls_np, tab_np = np.asarray(image), np.asarray(classes), np.asarray(table)

            def run_torch(d=d, n_patches=n_patches, img_np=img_np, cls_np=cls_np, tab_np=tab_np):
                return bl.torch_self_lsr(
                    torch,
                    img_np,
                    cls_np,
                    tab_np,
                    patch_size=K,
                    var=0.01,
                    downsample=d,
                    n_patches=n_patches,
                    iters=20,
                )

            fns["torch"] = run_torch
        times = bl.time_round_robin(fns, args.rounds)
        med = {k_: statistics.median(t) for k_, t in times.items()}
        h = SIZE // d
        flops = 2.0 * n_patches * (h - K + 1) ** 2 * K * K * 4
        row = {
            "setting": name,
            **setting,
            "n_patches": n_patches,
            "patch_size": K,
            "times_s": times,
            "median_s": med,
            "flops_direct": flops,
            "device_peak_bytes": bl.device_peak(),
            "roofline": {
                "matmul_flops_per_s": rate["jax"],
                "direct_equivalent_fraction": flops / med["jax"] / rate["jax"],
            },
        }
        if "torch" in times:
            row["torch_over_jax"] = bl.paired_ratio(times["torch"], times["jax"])
            a = np.asarray(run_jax()).argmax(-1)
            b = fns["torch"]().cpu().numpy().argmax(-1)
            row["argmax_agreement"] = float(np.mean(a == b))
            row["accuracy"] = {
                "jax": float(np.mean(a == scene.labels)),
                "torch": float(np.mean(b == scene.labels)),
            }
        if args.profile:
            row["profile"] = profile_stages(image, setting)
            print(f"  profile: {row['profile']}", flush=True)
        rows.append(row)
        print(
            f"{name}: jax {med['jax']:.2f} s/tile"
            + (f", torch {med['torch']:.2f} s ({row['torch_over_jax']:.2f}x)" if torch else ""),
            flush=True,
        )
    header = [
        "setting",
        "down",
        "patches",
        "jax_s",
        "torch_s",
        "torch/jax",
        "argmax_agree",
        "GFLOP(direct)",
        "equiv_of_mm",
    ]
    print(
        f"\nself-epitomic LSR, {SIZE}^2 synthetic tile, K={K}, 20 EM iterations; median of "
        f"{args.rounds}; matmul {rate['jax'] / 1e9:.0f} GFLOP/s"
    )
    print(
        bl.table(
            header,
            [
                [
                    r["setting"],
                    r["downsample"],
                    r["n_patches"],
                    r["median_s"]["jax"],
                    r["median_s"].get("torch", "-"),
                    r.get("torch_over_jax", "-"),
                    r.get("argmax_agreement", "-"),
                    r["flops_direct"] / 1e9,
                    r["roofline"]["direct_equivalent_fraction"],
                ]
                for r in rows
            ],
        )
    )
    meta["load_average_end"] = __import__("os").getloadavg()[0]
    path = bl.write_json(
        "lsr",
        {
            "benchmark": "lsr",
            "meta": meta,
            "matmul_rate": rate,
            "tile": f"synthetic make_scene(0, size={SIZE})",
            "rows": rows,
            "total_s": time.perf_counter() - t_start,
        },
        args.out,
    )
    print(f"wrote {path} ({time.perf_counter() - t_start:.0f} s)")
    return {"rows": rows}


if __name__ == "__main__":
    main()
