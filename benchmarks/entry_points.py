"""Each documented entry point called directly vs wrapped in ``jax.jit`` by the caller.

    python -m benchmarks.entry_points [--rounds 5] [--cases paper,predict,...] [--out PATH]

A direct call runs the host-side value checks (on concrete inputs) and then one jitted body;
the caller-jitted call traces everything once and skips the value checks. Their ratio is what
the checks and dispatch cost (goal: within 10 %). Both are warmed up (compiled) first, then
``--rounds`` rounds round-robin; times are medians, ``direct / jit`` the median of per-round
ratios. Inputs (synthetic, deterministic):

* ``self_lsr_paper``: ``self_epitomic_lsr`` on a 256^2 window (``make_scene``), ``downsample=2``,
  7x7, ``sample_fraction=0.05``, library defaults otherwise (20 EM iterations, 3 adaptation
  rounds); ``self_lsr_full``: the same at ``downsample=1`` (the default);
* ``self_counts_paper``: ``self_epitomic_counts`` at the paper setting;
* ``predict``: ``predict`` with a 64^2 4-band epitome (trained size), ``K=31`` predicting the
  centre 11x11 at stride 11 on a 128^2 image;
* ``embed_labels`` / ``embed_classes``: 128 patches 31x31 (11x11 label blocks) / 11x11 against
  the 64^2 epitome;
* ``super_resolve`` / ``adapt_compositions``: counts ``[1, 128, 128, 8]``, 20 iterations
  (3 rounds).

Prints a table and writes ``benchmarks/results/entry_points.json``.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import epilsr
from benchmarks import _baselines as bl
from epilsr.data.synthetic import make_scene


def cases() -> dict:
    """``name -> (fn, args)``: ``fn(*args)`` is the documented call (keywords bound in ``fn``)."""
    scene = make_scene(0, size=256)
    key = jax.random.key(0)
    rng = np.random.default_rng(0)
    img, cls, tab = scene.image, scene.classes, scene.label_given_class
    epi = epilsr.init_epitome(jax.random.key(1), size=64, channels=4)
    label_probs = rng.dirichlet(np.ones(4), size=(1, 64, 64)).astype(np.float32)
    patches = rng.uniform(size=(128, 31, 31, 4)).astype(np.float32)
    blocks = rng.dirichlet(np.ones(4), size=(128, 11, 11)).astype(np.float32)
    counts = rng.uniform(size=(1, 128, 128, 8)).astype(np.float32)
    table = rng.uniform(size=(8, 4)).astype(np.float32)
    return {
        "self_lsr_paper": (
            lambda k, x, c, t: epilsr.self_epitomic_lsr(k, x, c, t, downsample=2),
            (key, img, cls, tab),
        ),
        "self_lsr_full": (
            lambda k, x, c, t: epilsr.self_epitomic_lsr(k, x, c, t, downsample=1),
            (key, img, cls, tab),
        ),
        "self_counts_paper": (
            lambda k, x, c: epilsr.self_epitomic_counts(k, x, c, tab.shape[0], downsample=2),
            (key, img, cls),
        ),
        "predict": (
            lambda e, q, x: epilsr.predict(e, q, x, patch_size=31, label_size=11, stride=11,
                                           temperature=(31 / 11) ** 2),
            (epi, label_probs, img[:128, :128]),
        ),
        "embed_labels": (
            lambda e, x, y: epilsr.embed_labels(e, x, y, temperature=(31 / 11) ** 2),
            (epi, patches, blocks),
        ),
        "embed_classes": (
            lambda e, x, c: epilsr.embed_classes(e, x, c, n_classes=8, temperature=1.0),
            (epi, patches[:, :11, :11], rng.integers(0, 8, 128).astype(np.int32)),
        ),
        "super_resolve": (lambda z, t: epilsr.super_resolve(z, t), (counts, table)),
        "adapt_compositions": (
            lambda z, t: epilsr.adapt_compositions(z, t, evidence=jnp.full(8, 5.0)),
            (counts, table),
        ),
    }


def measure(fn, args, rounds: int) -> dict:
    jitted = jax.jit(fn)
    times = bl.time_round_robin(
        {
            "direct": lambda: jax.block_until_ready(fn(*args)),
            "jit": lambda: jax.block_until_ready(jitted(*args)),
        },
        rounds,
    )
    same = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0)),
        fn(*args), jitted(*args),
    )
    return {
        "direct_s": statistics.median(times["direct"]),
        "jit_s": statistics.median(times["jit"]),
        "ratio": bl.paired_ratio(times["direct"], times["jit"]),
        "max_abs_diff": max(jax.tree.leaves(same)),
        "times": times,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", default=None, help="comma-separated subset")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    all_cases = cases()
    names = args.cases.split(",") if args.cases else list(all_cases)
    unknown = sorted(set(names) - set(all_cases))
    if unknown:
        parser.error(f"--cases: unknown {unknown}; expected some of {sorted(all_cases)}")
    results, rows = {}, []
    for name in names:
        fn, fargs = all_cases[name]
        r = measure(fn, fargs, args.rounds)
        results[name] = r
        rows.append([name, 1e3 * r["direct_s"], 1e3 * r["jit_s"], r["ratio"],
                     r["max_abs_diff"]])
        print(f"{name}: direct {1e3 * r['direct_s']:.1f} ms, jit {1e3 * r['jit_s']:.1f} ms",
              flush=True)
    print(bl.table(["entry point", "direct ms", "caller-jit ms", "direct/jit", "max |diff|"],
                   rows))
    path = bl.write_json("entry_points", {"machine": bl.machine(), "rounds": args.rounds,
                                          "results": results}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
