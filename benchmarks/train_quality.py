"""Training quality on the real imagery: location promotion and self-diversification on / off.

    python -m benchmarks.train_quality [--steps 1500] [--batch 64] [--settings a,b,...]

Runs the training driver (``python -m experiments.train +exp=chesapeake_wv``, 128 x 128
epitome, patch widths 11..31, ``--seed``, default 0) on the eight West-Virginia NAIP tiles
(``$EPILSR_DATA/chesapeake_wv``, default ``../shared/data/chesapeake_wv``) in four settings:

* ``default``: location promotion on, self-diversification over the worst quarter (q = 0.25);
* ``no_promotion``: ``train.promotion=false``;
* ``no_diversification``: ``train.quantile=1.0``;
* ``neither``: both off.

All runs use the same seed, hence the same initial epitome and the same patch sequence. Each
run writes into ``benchmarks/results/train_quality/<setting>/`` (``hydra.run.dir``; the folder
is emptied first because the driver appends to ``metrics.jsonl``). From each run we report:

* the driver's held-out numbers (``results.json``): coverage, the fraction of positions whose
  mean tempered posterior over 512 held-out 11 x 11 patches exceeds ``1 / (10 L N^2)``, and the
  mean log-likelihood per pixel of those patches; and the coverage curve from
  ``metrics.jsonl`` (every ``eval.every`` steps);
* from ``epitome.npz``: the log-likelihood per pixel ``log sum_s p(x|s) p(s) / K^2``
  (:func:`epilsr.log_likelihood` + :func:`epilsr.log_prior` + ``logsumexp``) of a fixed set of
  ``--eval-patches`` patches per width in ``--eval-sizes``, drawn with a fixed key (not the
  driver's) from the tiles, averaged over all of them and over the worst quarter (the
  patches that self-diversification trains on);
* die-off read from the parameters: the fraction of positions whose variance is still above
  half its initial value (``undertrained``, i.e. never or barely trained), and the effective
  fraction of positions under the prior.

"Held-out" patches are a separate random draw from the same eight tiles the driver trains on
(the driver has no tile split), so they measure fit to the imagery, not generalisation to
unseen tiles. Prints a table and writes JSON (default
``benchmarks/results/train_quality.json``) with the run folders and their PNGs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from epilsr.cli.tables import format_table

REPO = Path(__file__).resolve().parents[1]

SETTINGS: dict[str, list[str]] = {
    "default": [],
    "no_promotion": ["train.promotion=false"],
    "no_diversification": ["train.quantile=1.0"],
    "neither": ["train.promotion=false", "train.quantile=1.0"],
}


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def data_root() -> Path:
    base = os.environ.get("EPILSR_DATA") or str(REPO.parent / "shared" / "data")
    return (Path(base) / "chesapeake_wv").resolve()


def run_driver(
    setting: str, out: Path, *, steps: int, batch: int, seed: int, extra: list[str]
) -> dict:
    """One driver run in a subprocess (one CPU device); returns timing and the command."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "experiments.train",
        "+exp=chesapeake_wv",
        f"data.root={data_root()}",
        f"train.steps={steps}",
        f"train.batch={batch}",
        f"seed={seed}",
        "train.devices=1",
        *SETTINGS[setting],
        *extra,
        f"hydra.run.dir={out}",
    ]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # no forced host devices in the driver
    print(f"[{setting}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    (out / "driver_stdout.txt").write_text(proc.stdout)
    (out / "driver_stderr.txt").write_text(proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"[{setting}] driver failed (exit {proc.returncode}):\n{tail}")
    print(f"[{setting}] done in {seconds:.0f} s", flush=True)
    return {"command": " ".join(["python", *cmd[1:]]), "seconds": seconds}


def read_run(out: Path) -> dict:
    """``results.json`` held-out stats and the held-out coverage curve of ``metrics.jsonl``."""
    results = json.loads((out / "results.json").read_text())
    stats = results["heldout"]["E"]
    curve, step_seconds, resets, masked = [], 0.0, 0, []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        step_seconds += rec["seconds"]
        resets += int(rec["reset"])
        masked.append(rec["masked_fraction"])
        if "heldout_coverage" in rec:
            curve.append(
                {
                    "step": rec["step"],
                    "coverage": rec["heldout_coverage"],
                    "loglik_per_pixel": rec["heldout_loglik_per_pixel"],
                }
            )
    return {
        "coverage": stats["coverage"],
        "loglik_per_pixel": stats["loglik_per_pixel"],
        "steps": len(masked),
        "step_seconds_total": step_seconds,
        "counter_resets": resets,
        "mean_masked_fraction": sum(masked) / max(1, len(masked)),
        "curve": curve,
        "eval_patch_size": results["config"]["eval"]["patch_size"],
        "eval_patches": results["config"]["eval"]["patches"],
        "init_var": results["config"]["model"]["init_var"],
    }


def fixed_patches(*, sizes: list[int], count: int, seed: int) -> dict:
    """``{K: [count, K, K, C]}`` drawn from the tiles with ``fold_in(key(seed), K)``."""
    import jax
    from omegaconf import OmegaConf

    from epilsr import samplers
    from experiments.common import load_training_images

    cfg = OmegaConf.create({"kind": "chesapeake", "root": str(data_root()), "cell_size": 30})
    images, _, _ = load_training_images(cfg)
    key = jax.random.key(seed)
    return {
        k: samplers.sample_patches(jax.random.fold_in(key, k), images, size=k, batch=count)
        for k in sizes
    }


def patch_loglik(epitome, patches, *, chunk: int = 128):
    """``[B]`` ``log sum_s p(x|s) p(s)`` (untempered, all positions), in chunks of patches."""
    import jax
    import jax.numpy as jnp

    import epilsr

    @jax.jit
    def marginal(e, x):
        return jax.nn.logsumexp(epilsr.log_likelihood(e, x) + epilsr.log_prior(e), axis=(1, 2, 3))

    parts = [marginal(epitome, patches[i : i + chunk]) for i in range(0, patches.shape[0], chunk)]
    return jnp.concatenate(parts)


def die_off(epitome, init_var: float) -> dict:
    """Positions left (nearly) untrained, read from the parameters alone.

    ``undertrained``: fraction of positions whose channel-mean variance is still above half
    the initial variance (trained positions shrink to ~0.01-0.03 on this imagery);
    ``prior_mass_undertrained``: the prior mass on them; ``prior_effective``:
    ``exp(H(p(s))) / (L N^2)``, the effective fraction of positions under the prior.
    """
    import numpy as np

    from epilsr.metrics import entropy

    var = np.exp(np.asarray(epitome.log_var)).mean(axis=-1)
    logits = np.asarray(epitome.prior_logits, np.float64)
    prior = np.exp(logits - logits.max())
    prior /= prior.sum()
    dead = var > 0.5 * init_var
    prior_entropy = float(entropy(prior.ravel()))
    return {
        "undertrained": float(dead.mean()),
        "prior_mass_undertrained": float(prior[dead].sum()),
        "prior_effective": math.exp(prior_entropy) / prior.size,
    }


def quality(epitome_path: Path, patches: dict) -> dict:
    """Mean and worst-quarter log-likelihood per pixel for each patch width."""
    import numpy as np

    from epilsr.io.checkpoint import load_epitome

    epitome = load_epitome(epitome_path)
    out = {}
    for k, x in patches.items():
        ll = np.sort(np.asarray(patch_loglik(epitome, x))) / (k * k)
        worst = ll[: math.ceil(0.25 * ll.size)]
        out[str(k)] = {
            "loglik_per_pixel": float(ll.mean()),
            "worst_quarter_loglik_per_pixel": float(worst.mean()),
            "worst_patch_loglik_per_pixel": float(ll[0]),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500, help="train.steps of every run")
    p.add_argument("--batch", type=int, default=64, help="train.batch of every run")
    p.add_argument("--seed", type=int, default=0, help="driver seed (init and patch sequence)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset")
    p.add_argument("--eval-sizes", default="11,21,31", help="patch widths of the fixed set")
    p.add_argument("--eval-patches", type=int, default=512, help="fixed patches per width")
    p.add_argument("--eval-seed", type=int, default=12345, help="key of the fixed patch set")
    p.add_argument(
        "--skip-train", action="store_true", help="reuse existing run folders (metrics only)"
    )
    p.add_argument("--runs", default="benchmarks/results/train_quality", help="run folders root")
    p.add_argument("--out", default="benchmarks/results/train_quality.json")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; expected a subset of {list(SETTINGS)}")
    if not data_root().is_dir():
        raise SystemExit(f"no imagery at {data_root()} (set EPILSR_DATA)")
    runs_root = (REPO / args.runs) if not Path(args.runs).is_absolute() else Path(args.runs)

    runs = {}
    for setting in settings:
        out = runs_root / setting
        if args.skip_train:
            prev = {}
            if Path(args.out).exists():
                prev = json.loads(Path(args.out).read_text()).get("runs", {}).get(setting, {})
            info = {"command": prev.get("command"), "seconds": prev.get("seconds")}
        else:
            info = run_driver(
                setting,
                out,
                steps=args.steps,
                batch=args.batch,
                seed=args.seed,
                extra=list(args.overrides),
            )
        rel = out.relative_to(REPO) if out.is_relative_to(REPO) else out
        runs[setting] = {
            **info,
            "overrides": SETTINGS[setting],
            "dir": str(rel),
            "pngs": {
                "epitome": str(rel / "epitome.png"),
                "epitome_and_counters": str(rel / "E_epitome.png"),
            },
            **read_run(out),
        }

    from epilsr.io.checkpoint import load_epitome

    patches = fixed_patches(
        sizes=_ints(args.eval_sizes), count=args.eval_patches, seed=args.eval_seed
    )
    for setting in settings:
        path = runs_root / setting / "epitome.npz"
        runs[setting]["fixed_set"] = quality(path, patches)
        runs[setting]["die_off"] = die_off(load_epitome(path), runs[setting]["init_var"])

    sizes = [str(k) for k in _ints(args.eval_sizes)]
    header = ["setting", "coverage", "undertrained", "LL/px@11(driver)"]
    header += [f"worstQ@{k}" for k in sizes] + [f"LL/px@{k}" for k in sizes]
    header += ["steps", "seconds"]
    rows = []
    for setting, r in runs.items():
        fixed = r["fixed_set"]
        seconds = r["seconds"]
        rows.append(
            [setting, r["coverage"], r["die_off"]["undertrained"], r["loglik_per_pixel"]]
            + [fixed[k]["worst_quarter_loglik_per_pixel"] for k in sizes]
            + [fixed[k]["loglik_per_pixel"] for k in sizes]
            + [r["steps"], "?" if seconds is None else f"{seconds:.0f}"]
        )
    print()
    print(
        f"128x128 epitome, patches 11..31, batch {args.batch}, seed {args.seed}; coverage and "
        f"LL/px@11 from the driver's results.json; worstQ / LL/px on {args.eval_patches} fixed "
        "patches per width"
    )
    print(format_table(header, rows, floats=".4f", align="right"))
    print("\nheld-out coverage curve (driver, every eval.every steps):")
    for setting, r in runs.items():
        pts = r["curve"]
        stride = max(1, len(pts) // 10)
        shown = pts[::stride] + ([pts[-1]] if (len(pts) - 1) % stride else [])
        print(f"  {setting:>18}: " + " ".join(f"{c['step']}:{c['coverage']:.3f}" for c in shown))

    import jax

    result = {
        "benchmark": "train_quality",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "data_root": str(data_root()),
        "config": {
            "exp": "chesapeake_wv",
            "epitome": 128,
            "patch_sizes": "11..31 (driver default)",
            "steps": args.steps,
            "batch": args.batch,
            "seed": args.seed,
            "extra_overrides": list(args.overrides),
            "fixed_set": {
                "sizes": _ints(args.eval_sizes),
                "patches_per_size": args.eval_patches,
                "key": f"fold_in(key({args.eval_seed}), K)",
                "note": "same tiles as training (no tile split in the driver)",
            },
        },
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
