"""Achieved time of one window against its arithmetic bound, rates measured in the same run.

    python -m benchmarks.window_bound [--rounds 3] [--kinds paper,full,predict] [--out PATH]
        [--cpu-devices N]

Window kinds (synthetic, deterministic inputs):

* ``paper``: ``self_epitomic_lsr`` on a 256^2 window, ``downsample=2`` (128^2 epitome), 7x7,
  ``sample_fraction=0.05`` (``P = 0.05 * 256^2 = 3277`` patches: the fraction is of the *input*
  pixels), library defaults (20 EM iterations x (3 adaptation rounds + 1));
* ``full``: the same at ``downsample=1`` (the library default; 256^2 epitome);
* ``predict``: ``predict`` with a random 64^2 4-band epitome (a trained model's size), ``K=31``
  predicting the centre 11x11 at stride 11 on a 256^2 image (``P = 24^2`` windows);
* ``predict-mesh``: the same call with ``mesh=data_mesh()``, the windows divided among the local
  devices (with ``--cpu-devices 2``: the CPU split into 2 JAX devices, one per core on the 2-core
  box, :func:`epilsr.parallel.use_cpu_devices`; one CPU device runs the posterior's block DFTs
  on about one core). Same work and bound; only the total is timed.

Work, written down per kind (``S`` positions, ``F = K^2 C`` features, ``Cc`` classes):

* self-epitomic (the unfolded matrix-product route the library takes): the cross terms
  ``2 P S F`` and the class products ``2 P S Cc`` flops, ``P S`` exponentials, and bytes: the
  unfolded windows ``[S, F]`` streamed once per chunk plus the ``[P, S]`` posteriors written
  and read once;
* prediction: the likelihood correlation (flops of the route ``"auto"`` takes,
  :func:`epilsr.correlate.route_flops`) and the label sums of the route the library takes:
  the centre block as one product ``2 P S Kl^2 n`` (or the adjoint correlation, the ``K x K``
  route's flops with ``n`` label channels), ``P S`` exponentials, bytes: the posteriors
  ``[P, S]`` written and read once.

The bound is ``flops / matmul rate + exps / exp rate`` with the rates measured here (a
2048^2 float32 matrix product at HIGHEST precision; 512 ``jnp.exp`` passes over 2^16 floats in
cache, compute-bound); the bytes are reported with the copy rate (``x + 1`` over 2^24 floats,
read + write) for scale. The matmul and exp probes are also timed *inside* each window's round
robin (medians, like the achieved time): ``achieved/interleaved bound`` holds on a busy machine,
where rates measured once at the start can be far from those the window saw. ``achieved`` is
the median of ``--rounds`` timed calls of the library
function (direct call, after a warm-up). Then the sub-steps, each jitted alone on the same
shapes, say where the time goes: the counts (Eq. 11) vs the EM for self-epitomic LSR, the
posterior vs the label correlation for prediction (the rest: what the total leaves; noisy
under load). Prints tables, writes ``benchmarks/results/window_bound.json``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import epilsr
from benchmarks import _baselines as bl
from epilsr.correlate import choose_route, plan_for, route_flops
from epilsr.data.synthetic import make_scene
from epilsr.likelihood import log_posterior
from epilsr.parallel import data_mesh, use_cpu_devices

self_epitomic = importlib.import_module("epilsr.self_epitomic")
predict_module = importlib.import_module("epilsr.predict")  # ``epilsr.predict`` is the function


@functools.cache
def _plan():
    """The correlation plan of the default device's platform (after ``--cpu-devices``)."""
    return plan_for(jnp.zeros(1))


SIZE, K, FRACTION = 256, 7, 0.05
KINDS = ("paper", "full", "predict", "predict-mesh")
PRED_K, PRED_KL, PRED_N, LABELS = 31, 11, 64, 4
EXP_REPEATS = 512


def rates(rounds: int = 5) -> dict:
    """Matmul flop/s, exp/s and copy bytes/s of this process, best of ``rounds``. The exp
    rate is compute-bound: ``EXP_REPEATS`` exps of a cache-resident 2^16-float block in one
    compiled loop (a single exp pass over a large array measures the memory instead)."""
    x = jax.random.uniform(jax.random.key(0), (1 << 24,), jnp.float32)
    small = x[: 1 << 16]
    exp = jax.jit(lambda v: jax.lax.fori_loop(0, EXP_REPEATS, lambda _, u: jnp.exp(-u), v))
    copy = jax.jit(lambda v: v + 1.0)
    t = bl.time_round_robin(
        {"exp": lambda: jax.block_until_ready(exp(small)),
         "copy": lambda: jax.block_until_ready(copy(x))}, rounds
    )
    return {
        "matmul_flops": bl.matmul_rate(None, rounds=rounds)["jax"],
        "exp_per_s": EXP_REPEATS * small.size / min(t["exp"]),
        "copy_bytes_per_s": 2 * 4 * x.size / min(t["copy"]),
    }


MATMUL = 2048  # the rate probe: a MATMUL^2 float32 product at HIGHEST precision


def rate_probes() -> dict:
    """``{name: (fn, work)}``: the matrix product and exp probes of :func:`rates`, timed in
    the windows' own round robin (:func:`interleaved_rates`) so that a busy machine's load
    weighs on the bound and the achieved time alike."""
    a = jax.random.normal(jax.random.key(0), (MATMUL, MATMUL), jnp.float32)
    mm = jax.jit(lambda x: jnp.matmul(x, x, precision=jax.lax.Precision.HIGHEST))
    small = jax.random.uniform(jax.random.key(1), (1 << 16,), jnp.float32)
    exp = jax.jit(lambda v: jax.lax.fori_loop(0, EXP_REPEATS, lambda _, u: jnp.exp(-u), v))
    return {"rate: matmul": (lambda: jax.block_until_ready(mm(a)), 2.0 * MATMUL**3),
            "rate: exp": (lambda: jax.block_until_ready(exp(small)), EXP_REPEATS * small.size)}


def interleaved_rates(times: dict, probes: dict) -> dict:
    """Median rates of the probes timed in the same round robin as a window."""
    med = {k: statistics.median(times.pop(k)) for k in probes}
    return {"matmul_flops": probes["rate: matmul"][1] / med["rate: matmul"],
            "exp_per_s": probes["rate: exp"][1] / med["rate: exp"]}


def _median_time(fn, rounds: int) -> float:
    return statistics.median(bl.time_round_robin({"f": fn}, rounds)["f"])


def self_window(downsample: int, rounds: int) -> dict:
    scene = make_scene(0, size=SIZE)
    img, cls, tab = scene.image, scene.classes, scene.label_given_class
    key = jax.random.key(0)
    n = SIZE // downsample
    s = (n - K + 1) ** 2
    f = K * K * img.shape[-1]
    p = round(FRACTION * SIZE * SIZE)
    n_rows = tab.shape[0]
    chunk = self_epitomic._balanced_chunk(p, self_epitomic._default_chunk(n * n, True, _plan()))
    n_chunks = -(-p // chunk)
    present = np.unique(cls).size
    work = {
        "P": p, "S": s, "F": f, "chunk": chunk,
        "flops": 2.0 * p * s * (f + present),
        "exps": float(p * s),
        "bytes": 4.0 * (n_chunks * s * f + 2 * p * s),
    }
    kw = dict(downsample=downsample, patch_size=K, sample_fraction=FRACTION)
    full = lambda: jax.block_until_ready(epilsr.self_epitomic_lsr(key, img, cls, tab, **kw))  # noqa: E731
    counts_fn = lambda: jax.block_until_ready(  # noqa: E731
        epilsr.self_epitomic_counts(key, img, cls, n_rows, **kw))
    counts = counts_fn()
    pixels = np.bincount(cls.ravel(), minlength=n_rows).astype(np.float32)
    table = np.asarray(tab, np.float32)
    table = table / table.sum(1, keepdims=True)
    table = np.where(table >= 0.02, table, 0.0).astype(np.float32)
    em = lambda: jax.block_until_ready(epilsr.adapt_compositions(  # noqa: E731
        counts, table, evidence=0.1 * pixels / 900, rounds=3, iters=20))
    steps = {"total": full, "counts (Eq. 11)": counts_fn, "EM (4 x 20 iterations)": em}
    probes = rate_probes()
    times = bl.time_round_robin({**steps, **{k: v[0] for k, v in probes.items()}}, rounds)
    same_run = interleaved_rates(times, probes)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["rest (table, upsample, checks)"] = (
        med["total"] - med["counts (Eq. 11)"] - med["EM (4 x 20 iterations)"])
    return {"work": work, "achieved_s": med["total"], "steps_s": med, "rates": same_run}


def predict_window(rounds: int, mesh=None) -> dict:
    rng = np.random.default_rng(0)
    img = make_scene(0, size=SIZE).image
    epi = epilsr.init_epitome(jax.random.key(1), size=PRED_N, channels=img.shape[-1])
    label_probs = rng.dirichlet(np.ones(LABELS), size=(1, PRED_N, PRED_N)).astype(np.float32)
    temp = (PRED_K / PRED_KL) ** 2
    starts = predict_module.grid_starts(SIZE, PRED_KL, PRED_KL)
    p = len(starts) ** 2
    s = PRED_N * PRED_N
    n_chunks = -(-p // 256)
    chunk = -(-p // n_chunks)  # predict's balanced chunks of at most 256 windows
    c = img.shape[-1]
    maps_shape = (1, PRED_N, PRED_N, 2 * c)
    route = choose_route(maps_shape, (chunk, PRED_K, PRED_K, 2 * c), _plan())
    like = n_chunks * route_flops(route, maps_shape, (chunk, PRED_K, PRED_K, 2 * c))
    label_route = choose_route((1, PRED_N, PRED_N, LABELS), (chunk, PRED_K, PRED_K, LABELS),
                               _plan())
    adj = n_chunks * route_flops(label_route, (1, PRED_N, PRED_N, LABELS),
                                 (chunk, PRED_K, PRED_K, LABELS))
    centre = 2.0 * n_chunks * chunk * s * PRED_KL**2 * LABELS  # the centre block as one product
    use_centre = predict_module._use_centre_windows((1, PRED_N, PRED_N, LABELS), PRED_K, PRED_KL)
    labels = centre if use_centre else adj
    work = {
        "P": p, "S": s, "chunk": chunk, "route": route,
        "labels": "centre product" if use_centre else f"adjoint ({label_route})",
        "flops_likelihood": like, "flops_labels_adjoint": adj, "flops_labels_centre": centre,
        "flops": like + labels, "exps": float(p * s), "bytes": 4.0 * 2 * p * s,
    }
    kw = dict(patch_size=PRED_K, label_size=PRED_KL, stride=PRED_KL, temperature=temp)
    if mesh is not None:  # the windows divided among the devices: the call alone
        kw["mesh"] = mesh
        work["devices"] = int(mesh.devices.size)
    full = lambda: jax.block_until_ready(epilsr.predict(epi, label_probs, img, **kw))  # noqa: E731
    if mesh is not None:
        probes = rate_probes()
        times = bl.time_round_robin({"total": full, **{k: v[0] for k, v in probes.items()}},
                                    rounds)
        same_run = interleaved_rates(times, probes)
        med = {"total": statistics.median(times["total"])}
        return {"work": work, "achieved_s": med["total"], "steps_s": med, "rates": same_run}
    o = (PRED_K - PRED_KL) // 2
    padded = jnp.pad(jnp.asarray(img), ((o, o), (o, o), (0, 0)), mode="reflect")
    st = jnp.asarray([(r, q) for r in starts for q in starts][:chunk], jnp.int32)
    patches = jax.vmap(lambda v: jax.lax.dynamic_slice(padded, (v[0], v[1], 0),
                                                       (PRED_K, PRED_K, c)))(st)
    post_fn = jax.jit(lambda e, x: jnp.exp(log_posterior(e, x, temperature=temp)))
    post = post_fn(epi, patches)
    if use_centre:
        windows = predict_module._centre_label_windows(jnp.asarray(label_probs), PRED_K, PRED_KL)
        lab_fn = jax.jit(lambda q, w: predict_module._centre_label_predictions(windows, w,
                                                                                PRED_KL))
    else:
        lab_fn = jax.jit(lambda q, w: predict_module.patch_label_predictions(
            q, w, patch_size=(PRED_K, PRED_K)))
    steps = {
        "total": full,
        f"posterior x{n_chunks} chunks": lambda: jax.block_until_ready(post_fn(epi, patches)),
        f"label correlation x{n_chunks}": lambda: jax.block_until_ready(
            lab_fn(label_probs, post)),
    }
    probes = rate_probes()
    times = bl.time_round_robin({**steps, **{k: v[0] for k, v in probes.items()}}, rounds)
    same_run = interleaved_rates(times, probes)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in list(med):
        if k != "total":
            med[k] *= n_chunks
    med["rest (patches, scatter, checks)"] = med["total"] - sum(
        v for k, v in med.items() if k != "total")
    return {"work": work, "achieved_s": med["total"], "steps_s": med, "rates": same_run}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kinds", default="paper,full,predict")
    parser.add_argument("--out", default=None)
    parser.add_argument("--cpu-devices", default=None,
                        help="split the CPU into N JAX devices first (auto: one per core)")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        parser.error(f"--kinds: unknown {bad}; expected some of {', '.join(KINDS)}")
    if args.cpu_devices is not None:
        n = args.cpu_devices
        if n != "auto" and not (n.isdigit() and int(n) >= 1):
            parser.error(f"--cpu-devices: expected a positive integer or auto, got {n!r}")
        print(f"CPU devices: {use_cpu_devices(n if n == 'auto' else int(n))}", flush=True)
    if "predict-mesh" in kinds and jax.device_count() < 2:
        parser.error("--kinds predict-mesh: needs several devices (e.g. --cpu-devices 2)")
    r = rates()
    print(f"rates: matmul {r['matmul_flops'] / 1e9:.1f} GFLOP/s, exp {r['exp_per_s'] / 1e9:.2f} "
          f"G/s, copy {r['copy_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
    results, rows, step_rows = {}, [], []
    for kind in kinds:
        res = {"paper": lambda: self_window(2, args.rounds),
               "full": lambda: self_window(1, args.rounds),
               "predict": lambda: predict_window(args.rounds),
               "predict-mesh": lambda: predict_window(args.rounds, data_mesh())}[kind]()
        w = res["work"]
        t_mm, t_exp = w["flops"] / r["matmul_flops"], w["exps"] / r["exp_per_s"]
        t_bytes = w["bytes"] / r["copy_bytes_per_s"]
        res["bound_s"] = t_mm + t_exp
        res["bound_parts_s"] = {"matmul": t_mm, "exp": t_exp, "bytes_at_copy_rate": t_bytes}
        res["achieved_over_bound"] = res["achieved_s"] / res["bound_s"]
        rr = res["rates"]  # the probes timed between the window's own calls
        res["bound_interleaved_s"] = w["flops"] / rr["matmul_flops"] + w["exps"] / rr["exp_per_s"]
        res["achieved_over_bound_interleaved"] = res["achieved_s"] / res["bound_interleaved_s"]
        results[kind] = res
        rows.append([kind, w["flops"] / 1e9, w["exps"] / 1e6, w["bytes"] / 1e6, 1e3 * t_mm,
                     1e3 * t_exp, 1e3 * t_bytes, 1e3 * res["bound_s"], 1e3 * res["achieved_s"],
                     res["achieved_over_bound"], rr["matmul_flops"] / 1e9,
                     1e3 * res["bound_interleaved_s"], res["achieved_over_bound_interleaved"]])
        step_rows += [[kind, k, 1e3 * v] for k, v in res["steps_s"].items()]
        print(f"{kind}: achieved {1e3 * res['achieved_s']:.0f} ms, bound "
              f"{1e3 * res['bound_s']:.0f} ms", flush=True)
    print(bl.table(["window", "GFLOP", "M exp", "MB", "matmul ms", "exp ms", "bytes ms",
                    "bound ms", "achieved ms", "achieved/bound", "interleaved GFLOP/s",
                    "interleaved bound ms", "achieved/interleaved bound"], rows))
    print(bl.table(["window", "step", "ms"], step_rows))
    path = bl.write_json("window_bound", {"machine": bl.machine(), "rates": r,
                                          "rounds": args.rounds, "results": results}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
