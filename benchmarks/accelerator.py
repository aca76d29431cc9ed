"""One accelerator command: every benchmark that matters, against PyTorch, in one time budget.

    python -m benchmarks.accelerator [--quick] [--budget-s S] [--sections a,b] [--rounds R]
                                     [--no-torch] [--out PATH] [--append-results]

Sections (in this order; each runs in its own process, so a section's memory peak is its own
and one that overruns its share of the budget is stopped without losing the others):

* ``lsr``: self-epitomic LSR of 256^2 windows at the paper setting (``downsample=2``, 7 x 7,
  ``sample_fraction=0.05``) and at the library default (``downsample=1``): one library call per
  window, ``W`` windows per compiled call (:class:`~epilsr.pipelines.batching.WindowBatches`,
  the pipeline's batching) and ``W`` windows vmapped (``lanes=W``), against the PyTorch
  pipeline (:func:`benchmarks._baselines.torch_self_lsr`) on the same windows; achieved time
  against the window's arithmetic bound (:func:`benchmarks.window_bound.self_window`).
* ``posterior``: :func:`epilsr.log_posterior` at a few shapes against the ``conv2d`` baseline
  (:func:`benchmarks.posterior.bench_one`).
* ``train``: the training step against :class:`benchmarks._baselines.TorchTrainer`
  (:func:`benchmarks.train_step.main`, one call per patch size).
* ``predict``: dense prediction, one ``predict`` window against its bound
  (:func:`benchmarks.window_bound.predict_window`) and ``predict_raster`` Mpx/min
  (:func:`benchmarks.predict_throughput.run_one`); no PyTorch baseline exists.
* ``raster``: ``lsr_raster`` on a synthetic GeoTIFF scene, end to end vs window compute only
  (:func:`benchmarks.raster_pipeline.main`), Mpx/min and peak memory.

Sizes are chosen for one GPU (an H200: the whole run within 8 minutes; never run on one yet, so
the budget, not the sizes, guarantees the 8 minutes); ``--quick`` picks small ones that run on a
2-core CPU in 1.5-3.5 minutes, depending on its load (a smoke test). ``--budget-s`` bounds the
whole run: each section gets a share of what is left (unused time rolls over), skips the cases
that would not fit its share with a printed reason, and is stopped at its share; sections that no
longer fit are skipped with a reason. Times are medians over ``--rounds`` rounds after a warm-up
call, blocking until done (``block_until_ready`` / ``torch.cuda.synchronize``); ratios ``torch /
ours`` are medians of per-round ratios (> 1: we are faster). Memory: the JAX device allocator's
peak (``device.memory_stats()``) where the device reports it, else the peak RSS of the section's
process. Prints the device, versions, the :class:`~epilsr.correlate.CorrelationPlan` in use (on a
GPU the CPU-only chunking must be off: checked, and a failed check fails the command) and a table;
writes JSON (``--out``); with ``--append-results`` appends a dated Markdown table to
``benchmarks/RESULTS.md``. ``benchmarks/device_run.sh`` runs it on a lent GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import epilsr
from benchmarks import _baselines as bl
from benchmarks import posterior as posterior_bench
from benchmarks import predict_throughput, raster_pipeline, train_step, window_bound
from benchmarks.raster_8192 import _peak_rss_mb
from epilsr.correlate import CorrelationPlan, plan_for
from epilsr.data.synthetic import make_scene
from epilsr.pipelines import raster_lsr
from epilsr.pipelines.batching import WindowBatches

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
WINDOW = 256  # side of one LSR window (the pipeline's default tile)
LSR_SETTINGS = {
    "paper": {"downsample": 2, "patch_size": 7, "sample_fraction": 0.05},
    "default": {},  # the library's defaults: downsample=1, 7 x 7, sample_fraction=0.05
}
LSR_VAR, LSR_ITERS = 0.01, 20  # the library defaults, given to the PyTorch pipeline too


# --------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class Section:
    """A benchmark section: ``run(ctx, size)`` with ``size`` from ``sizes[mode]``
    (mode ``"gpu"`` or ``"quick"``); ``weight[mode]`` its share of the budget (the seconds it
    was estimated to take), ``min_s`` the share below which it is not started."""

    name: str
    title: str
    run: Callable
    sizes: dict
    weight: dict
    min_s: float


class Context:
    """What a section worker shares: torch (or None and why), the plan, rounds, the deadline
    (``time.time()``), and the rows and skips it records (written after every case)."""

    def __init__(self, *, section: str, rounds: int, deadline: float, no_torch: bool,
                 result: Path | None):
        self.section, self.rounds, self.deadline, self.result = section, rounds, deadline, result
        self.torch = None if no_torch else bl.torch_or_none()
        self.torch_note = ("--no-torch" if no_torch else "torch not installed"
                           if self.torch is None else None)
        self.plan = plan_for(jnp.zeros(1))
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.cases_done: list[float] = []
        self.complete = False  # every case run or skipped
        self.meta = bl.machine(self.torch)
        self.t0 = time.time()

    def fits(self, case: str, scale: float = 1.0) -> bool:
        """Whether ``case`` may start: ``scale`` times the last case's duration (its expected
        cost relative to that case) must fit what is left (the first case always starts);
        else records the skip with its reason."""
        if not self.cases_done:
            return True
        left = self.deadline - time.time()
        need = scale * self.cases_done[-1]
        if left > need:
            return True
        reason = (f"budget: {left:.0f} s left of the section's share, ~{need:.0f} s needed "
                  f"(the last case took {self.cases_done[-1]:.0f} s)")
        print(f"[{self.section}] skip {case}: {reason}", flush=True)
        self.skipped.append({"case": case, "reason": reason})
        self.save()
        return False

    def case_done(self, started: float) -> None:
        self.cases_done.append(time.time() - started)
        self.save()

    def add(self, case: str, unit: str, ours: float, *, torch: float | str | None = None,
            ratio: float | None = None, bound: float | None = None, note: str = "",
            detail: dict | None = None, peak: dict | None = None) -> None:
        """One table row: ``ours`` and ``torch`` in ``unit``; ``ratio`` = torch / ours time
        (> 1: we are faster); ``bound`` = achieved time / arithmetic bound; ``peak``: memory
        (:func:`peak_memory`'s keys) when it was measured elsewhere (another process)."""
        if torch is None:
            torch = self.torch_note or "no baseline"
        self.rows.append({"section": self.section, "case": case, "unit": unit, "ours": ours,
                          "torch": torch, "torch_over_ours": ratio, "achieved_over_bound": bound,
                          "peak": peak or peak_memory(), "note": note, "detail": detail or {}})
        self.save()

    def record(self) -> dict:
        return {"section": self.section, "meta": self.meta, "plan": dataclasses.asdict(self.plan),
                "rows": self.rows, "skipped": self.skipped, "complete": self.complete,
                "seconds": time.time() - self.t0}

    def save(self) -> None:
        if self.result is not None:
            tmp = self.result.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.record(), default=_jsonable) + "\n")
            tmp.replace(self.result)


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return float(x)


def peak_memory() -> dict:
    """Peak memory of this process so far: the JAX device allocator's (bytes, where the
    device reports it), torch's CUDA allocator's, and the peak RSS (MiB)."""
    out = {"rss_mib": _peak_rss_mb()}
    dev = bl.device_peak()
    if dev is not None:
        out["device_mib"] = dev / 2**20
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["torch_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _lsr(ctx: Context, size: dict) -> None:
    """Self-epitomic LSR per 256^2 window: one call per window, batched, vmapped, PyTorch."""
    rates = window_bound.rates()
    w = size["windows"]
    grid = math.ceil(math.sqrt(w))
    scene = make_scene(0, size=WINDOW * grid)
    table = np.asarray(scene.label_given_class, np.float32)
    tiles = [(scene.image[r : r + WINDOW, c : c + WINDOW], scene.classes[r : r + WINDOW,
                                                                          c : c + WINDOW])
             for r in range(0, WINDOW * grid, WINDOW) for c in range(0, WINDOW * grid, WINDOW)][:w]
    key = jax.random.key(0)
    for name in size["settings"]:
        if not ctx.fits(name, scale=3.0 if name == "default" else 1.0):  # ~4x the flops
            continue
        started = time.time()
        kw = LSR_SETTINGS[name]
        d = kw.get("downsample", 1)
        fns = _lsr_variants(ctx, key, kw, tiles, table, lanes=size["lanes"])
        times = bl.time_round_robin(fns, ctx.rounds)
        res = window_bound.self_window(d, ctx.rounds)
        work = res["work"]
        bound_s = work["flops"] / rates["matmul_flops"] + work["exps"] / rates["exp_per_s"]
        agree = None
        if ctx.torch is not None:
            img, cls = tiles[0]
            a = np.asarray(epilsr.self_epitomic_lsr(jax.random.fold_in(key, 0), img, cls, table,
                                                    **kw)).argmax(-1)
            b = _torch_lsr(ctx.torch, img, cls, table, kw, 0).cpu().numpy().argmax(-1)
            agree = float(np.mean(a == b))
        for var, label in (("single", "one call per window"),
                           ("batched", f"{w} windows per call"),
                           ("vmapped", f"{w} windows vmapped (lanes={min(size['lanes'], w)})")):
            if var not in times:
                continue
            per = statistics.median(times[var]) / w
            ratio = bl.paired_ratio(times["torch"], times[var]) if "torch" in times else None
            torch_per = statistics.median(times["torch"]) / w if "torch" in times else None
            note = (f"{work['flops'] / 1e9:.1f} GFLOP/window" +
                    (f", argmax agreement {agree:.3f}" if agree is not None and var == "single"
                     else ""))
            ctx.add(f"{name}: {label}", "ms/window", 1e3 * per,
                    torch=None if torch_per is None else 1e3 * torch_per, ratio=ratio,
                    bound=per / bound_s, note=note,
                    detail={"times_s": times[var], "torch_times_s": times.get("torch"),
                            "windows": w, "lsr_kwargs": kw, "bound_s": bound_s, "work": work,
                            "rates": rates, "steps_s": res["steps_s"]})
        ctx.case_done(started)


def _torch_lsr(torch, img, cls, table, kw, seed):
    d, k = kw.get("downsample", 1), kw.get("patch_size", 7)
    n_patches = max(1, round(kw.get("sample_fraction", 0.05) * img.shape[0] * img.shape[1]))
    return bl.torch_self_lsr(torch, img, cls, table, patch_size=k, var=LSR_VAR, downsample=d,
                             n_patches=n_patches, iters=LSR_ITERS, seed=seed)


def _lsr_variants(ctx: Context, key, kw: dict, tiles: list, table: np.ndarray, *,
                  lanes: int) -> dict:
    """The timed callables of one setting, each running every window of ``tiles`` once."""
    w = len(tiles)
    group = [(np.int32(i), img, cls.astype(np.int32), table) for i, (img, cls) in
             enumerate(tiles)]
    per_window = raster_lsr._window_fn(raster_lsr._lsr_fn(kw))
    batched = WindowBatches(per_window, max_batch=w, window_batch=w)

    def single():
        for i, (img, cls) in enumerate(tiles):
            jax.block_until_ready(epilsr.self_epitomic_lsr(jax.random.fold_in(key, i), img, cls,
                                                           table, **kw))

    fns = {"single": single, "batched": lambda: batched((key,), group)}
    if lanes > 1 and w > 1:
        vmapped = WindowBatches(per_window, max_batch=w, window_batch=w, lanes=min(lanes, w))
        fns["vmapped"] = lambda: vmapped((key,), group)
    if ctx.torch is not None:
        def torch_all():
            for i, (img, cls) in enumerate(tiles):
                _torch_lsr(ctx.torch, img, cls, table, kw, i)

        fns["torch"] = torch_all
    return fns


def _posterior(ctx: Context, size: dict) -> None:
    """``log_posterior`` at a few shapes against the torch ``conv2d`` route."""
    rate = bl.matmul_rate(ctx.torch)["jax"]
    for n, b, k in size["shapes"]:
        case = f"N={n} B={b} K={k}"
        if not ctx.fits(case):
            continue
        started = time.time()
        r = posterior_bench.bench_one(n, b, k, rounds=ctx.rounds, torch=ctx.torch,
                                      direct_gflop=0.0, key=jax.random.key(n * 1000 + k),
                                      plan=ctx.plan)
        m = r["median_s"]
        bound_s = r["flops"] / rate
        note = f"route {r['route']}, {r['flops'] / 1e9:.2f} GFLOP"
        if r["max_rel_diff_vs_torch"] is not None:
            note += f", rel diff vs torch {r['max_rel_diff_vs_torch']:.1e}"
        ctx.add(f"{case} ({r['route']})", "ms/call", 1e3 * m["jax_lp"],
                torch=1e3 * m["torch_lp"] if "torch_lp" in m else None,
                ratio=r.get("torch_over_jax_lp"), bound=m["jax_lp"] / bound_s, note=note,
                detail={**r, "matmul_flops_per_s": rate})
        ctx.case_done(started)


def _train(ctx: Context, size: dict) -> None:
    """The training step (N=299, B=256) against the PyTorch step, one patch size at a time."""
    for k in size["sizes"]:
        case = f"K={k}"
        if not ctx.fits(case):
            continue
        started = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            argv = ["--sizes", str(k), "--rounds", str(ctx.rounds), "--no-direct",
                    "--out", str(Path(tmp) / "train_step.json")]
            out = train_step.main(argv + (["--no-torch"] if ctx.torch is None else []))
        r = out["rows"][0]
        m = r["median_s"]
        ctx.add(f"{case} ({r['route']}), N={train_step.N} B={train_step.B}", "ms/step",
                1e3 * m["jax"], torch=1e3 * m["torch"] if "torch" in m else None,
                ratio=r.get("torch_over_jax"), bound=1.0 / r["roofline"]["fraction_of_matmul"],
                note=f"{r['flops'] / 1e9:.1f} GFLOP (forward + backward)", detail=r)
        ctx.case_done(started)


def _predict(ctx: Context, size: dict) -> None:
    """Dense prediction: one ``predict`` window against its bound; ``predict_raster``."""
    if ctx.fits("predict window"):
        started = time.time()
        rates = window_bound.rates()
        res = window_bound.predict_window(ctx.rounds)
        w = res["work"]
        bound_s = w["flops"] / rates["matmul_flops"] + w["exps"] / rates["exp_per_s"]
        ctx.add(f"predict {window_bound.SIZE}^2, K={window_bound.PRED_K} centre "
                f"{window_bound.PRED_KL} stride {window_bound.PRED_KL}, "
                f"{window_bound.PRED_N}^2 epitome", "ms/call", 1e3 * res["achieved_s"],
                torch="no baseline", bound=res["achieved_s"] / bound_s,
                note=f"{w['flops'] / 1e9:.2f} GFLOP, route {w['route']}, labels {w['labels']}",
                detail={**res, "rates": rates, "bound_s": bound_s})
        ctx.case_done(started)
    last = None  # the last raster case's setting and side
    for n, k, kl, stride, side, chunk, tile in size["rasters"]:
        case = (f"predict_raster {side}^2, N={n} K={k} " +
                (f"centre {kl} " if kl else "whole window ") + f"stride {stride}")
        same = last is not None and last[0] == (n, k, kl, stride)
        if not ctx.fits(case, scale=(side / last[1]) ** 2 if same else 1.0):
            continue
        started, last = time.time(), ((n, k, kl, stride), side)
        rec = predict_throughput.run_one(n, k, kl, stride, side, chunk, tile, 1)
        ctx.add(case, "Mpx/min", rec["mpx_per_min"], torch="no baseline",
                note=f"{rec['windows_per_s']:.0f} windows/s, chunk {chunk}, tile {tile}",
                detail=rec)
        ctx.case_done(started)


RASTER_COST = {"paper": 1.0, "default": 3.0}  # window compute per pixel, relative (~4x flops)


def _raster(ctx: Context, size: dict) -> None:
    """``lsr_raster`` end to end vs window compute only, per raster size and setting (each in
    its own process, :func:`benchmarks.raster_pipeline.main`)."""
    last = None
    for side in size["sizes"]:
        for setting in size["settings"]:
            work = side * side * RASTER_COST[setting]
            if not ctx.fits(f"{side}^2 {setting}", scale=work / last if last else 1.0):
                continue
            started, last = time.time(), work
            with tempfile.TemporaryDirectory() as tmp:
                argv = ["--sizes", str(side), "--settings", setting, "--compute-strips",
                        str(size["compute_strips"]), "--out", str(Path(tmp) / "raster.json")]
                (r,) = raster_pipeline.main(argv)
            _raster_rows(ctx, side, r)
            ctx.case_done(started)


def _raster_rows(ctx: Context, side: int, r: dict) -> None:
    peak = {"rss_mib": r["peak_rss_mb"]}  # of the raster worker's process
    if r.get("device_peak_mb"):
        peak["device_mib"] = r["device_peak_mb"]
    common = {"torch": "no baseline", "detail": r, "peak": peak}
    ctx.add(f"{side}^2 {r['setting']}: lsr_raster end to end", "Mpx/min", r["pipeline_mpx_min"],
            note=f"{r['windows']} windows, RSS peak {r['peak_rss_mb']:.0f} MiB (after compile "
                 f"{r['peak_rss_mb_before']:.0f}), pipeline/compute "
                 f"{r['pipeline_over_compute']:.2f}", **common)
    ctx.add(f"{side}^2 {r['setting']}: window compute only", "Mpx/min", r["compute_mpx_min"],
            note=f"{r['windows_per_call']} windows per call; batched/unbatched "
                 f"{r['batched_over_unbatched']:.2f}x", **common)


SECTIONS = {
    s.name: s for s in [
        Section("lsr", "self-epitomic LSR per window", _lsr,
                {"gpu": {"settings": ["paper", "default"], "windows": 8, "lanes": 8},
                 "quick": {"settings": ["paper"], "windows": 2, "lanes": 2}},
                weight={"gpu": 120, "quick": 60}, min_s=20.0),
        Section("posterior", "log_posterior", _posterior,
                {"gpu": {"shapes": [(299, 64, 7), (299, 64, 31), (499, 256, 11),
                                    (499, 256, 31)]},
                 "quick": {"shapes": [(128, 64, 7)]}},
                weight={"gpu": 50, "quick": 25}, min_s=10.0),
        Section("train", "training step", _train,
                {"gpu": {"sizes": [11, 21, 31]}, "quick": {"sizes": [11]}},
                weight={"gpu": 50, "quick": 45}, min_s=15.0),
        Section("predict", "dense prediction", _predict,
                # (N, K, Kl, stride, image side, chunk, tile)
                {"gpu": {"rasters": [(499, 31, 11, 11, 1024, 256, 512),
                                     (499, 31, 11, 11, 2048, 256, 512),
                                     (499, 11, None, 2, 512, 256, 256)]},
                 "quick": {"rasters": [(128, 31, 11, 11, 96, 32, 64)]}},
                weight={"gpu": 70, "quick": 45}, min_s=15.0),
        Section("raster", "lsr_raster Mpx/min", _raster,
                {"gpu": {"sizes": [2048, 4096], "settings": ["paper", "default"],
                         "compute_strips": 0},
                 "quick": {"sizes": [512], "settings": ["paper"], "compute_strips": 0}},
                weight={"gpu": 160, "quick": 50}, min_s=30.0),
    ]
}
DEFAULT_BUDGET_S = {"gpu": 450.0, "quick": 300.0}


# --------------------------------------------------------------------------- the plan


def cpu_chunking(plan: CorrelationPlan) -> list[str]:
    """The CPU-only memory rules a plan applies (column groups, small 2-D DFT batches)."""
    return [f"{f}={getattr(plan, f)}" for f in ("column_group_bytes", "dft_2d_batch")
            if getattr(plan, f) is not None]


def plan_line(plan: CorrelationPlan) -> str:
    """One line naming the plan in use and whether the CPU-only chunking applies."""
    rules = cpu_chunking(plan)
    return (f"CorrelationPlan: platform={plan.platform}, chunk_bytes={plan.chunk_bytes >> 20} "
            f"MiB, unfold_bytes={plan.unfold_bytes >> 20} MiB, CPU-only chunking: "
            + (f"on ({', '.join(rules)})" if rules else "off"))


def check_plan(plan: CorrelationPlan) -> str:
    """``"plan check: OK ..."``; raises ``ValueError`` when a non-CPU plan applies the CPU-only
    chunking (which on an accelerator only serialises work)."""
    rules = cpu_chunking(plan)
    if plan.platform != "cpu" and rules:
        raise ValueError(f"plan check FAILED: the {plan.platform} plan applies the CPU-only "
                         f"chunking ({', '.join(rules)})")
    what = "CPU plan, CPU chunking expected" if plan.platform == "cpu" else "no CPU-only chunking"
    return f"plan check: OK ({plan.platform}: {what})"


# --------------------------------------------------------------------------- tables


HEADER = ["section", "case", "ours", "torch", "torch/ours", "unit", "achieved/bound", "peak MiB",
          "note"]


def summary_rows(records: list[dict]) -> list[list]:
    """Table rows of the sections' records (``-`` where a value does not apply); the peak is the
    device allocator's where reported (``dev``), else the process's RSS (``rss``)."""
    rows = []
    for rec in records:
        for r in rec.get("rows", []):
            peak = r.get("peak", {})
            mem = (f"{peak['device_mib']:.0f} dev" if "device_mib" in peak else
                   f"{peak['rss_mib']:.0f} rss" if "rss_mib" in peak else "-")
            rows.append([r["section"], r["case"], _num(r["ours"]), _num(r["torch"]),
                         _num(r["torch_over_ours"]), r["unit"], _num(r["achieved_over_bound"]),
                         mem, r["note"]])
    return rows


def _num(v):
    if v is None:
        return "-"
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    return str(v)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (floats to 3 significant digits, like :func:`bl.table`)."""
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def results_section(payload: dict) -> str:
    """The dated Markdown section ``--append-results`` appends to ``benchmarks/RESULTS.md``."""
    meta = payload["meta"]
    gpu = meta["backend"] != "cpu"
    kind = "accelerator run" if gpu else "CPU smoke run (not an accelerator result)"
    lines = [f"## benchmarks.accelerator, {kind}: {meta['device']}, {meta['date'][:10]}", "",
             f"Command: `{payload['command']}` (budget {payload['budget_s']:.0f} s, took "
             f"{payload['total_s']:.0f} s). Commit {meta['commit']} (working tree modified: "
             f"{meta['working_tree_modified']}). Machine: {meta['device']} "
             f"({meta['backend']}), {meta['processor']}, {meta['cpu_affinity']} cores; jax "
             f"{meta['jax']}, torch {payload['torch_version']} on "
             f"{payload.get('torch_device') or '-'}; load average "
             f"{meta['load_average']:.2f}.", "",
             f"{payload['plan_line']}; {payload['plan_check']}.", "",
             "`torch/ours` is the PyTorch time over ours (median of per-round ratios, > 1: we "
             "are faster); `achieved/bound` our time over the arithmetic bound (flops at the "
             "matmul rate + exponentials at the exp rate, both measured in the same run); peak "
             "MiB: the device allocator's peak of the section's process (`dev`), else its RSS "
             "(`rss`).", "", markdown_table(HEADER, summary_rows(payload["sections"]))]
    skipped = [f"- {s['section']}: {s['case']}: {s['reason']}" for s in payload["skipped"]]
    if skipped:
        lines += ["", "Skipped:", *skipped]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a 2-core CPU smoke test)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="time budget of the whole run (default: 450 s, --quick 300 s)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated, in order, of {', '.join(SECTIONS)}")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, quick 1)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baselines")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--append-results", action="store_true",
                   help="append a dated Markdown table to benchmarks/RESULTS.md")
    p.add_argument("--results-md", default=str(RESULTS_MD), help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad or not args.sections:
        p.error(f"--sections: expected some of {', '.join(SECTIONS)}, got {bad or 'none'}")
    if args.budget_s is None:
        args.budget_s = DEFAULT_BUDGET_S["quick" if args.quick else "gpu"]
    if not args.budget_s > 0:
        p.error(f"--budget-s: expected a positive number of seconds, got {args.budget_s}")
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.rounds < 1:
        p.error(f"--rounds: expected at least 1, got {args.rounds}")
    return args


def shares(names: list[str], left: float, mode: str) -> dict[str, float]:
    """Each section's share of ``left`` seconds, by weight (the first's is what it may use;
    what a section leaves unused goes to the later ones)."""
    total = sum(SECTIONS[n].weight[mode] for n in names)
    return {n: left * SECTIONS[n].weight[mode] / total for n in names}


def run_worker(args: argparse.Namespace) -> None:
    """Child process: one section; its record goes to ``--result`` after every case."""
    section = SECTIONS[args.worker]
    ctx = Context(section=section.name, rounds=args.rounds, no_torch=args.no_torch,
                  deadline=args.deadline or time.time() + args.budget_s,
                  result=Path(args.result) if args.result else None)
    print(f"[{section.name}] {section.title}: {plan_line(ctx.plan)}", flush=True)
    ctx.save()
    section.run(ctx, section.sizes["quick" if args.quick else "gpu"])
    ctx.complete = True
    ctx.save()


def _run_section(name: str, args: argparse.Namespace, timeout: float, workdir: Path) -> dict:
    """One section in its own process group, stopped at ``timeout`` s; its record (partial if
    stopped) with ``status``."""
    result = workdir / f"{name}.json"
    deadline = time.time() + max(1.0, timeout - 5.0)  # cases stop starting before the kill
    cmd = [sys.executable, "-m", "benchmarks.accelerator", "--worker", name, "--result",
           str(result), "--deadline", f"{deadline:.3f}", "--rounds", str(args.rounds)]
    cmd += ["--quick"] * args.quick + ["--no-torch"] * args.no_torch
    # The child imports this benchmarks package and the same epilsr, wherever it was started.
    paths = [str(ROOT), str(Path(epilsr.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(p for p in paths if p))
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
    _ACTIVE.append(proc)
    try:
        rc = proc.wait(timeout=timeout)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        _stop(proc)
        status = f"stopped at its budget share ({timeout:.0f} s)"
    finally:
        _ACTIVE.remove(proc)
    rec = json.loads(result.read_text()) if result.exists() else {"section": name, "rows": []}
    if status.startswith("stopped") and rec.get("complete"):
        status = "ok"  # stopped while exiting, every case done
    rec.update(status=status, wall_s=time.time() - t0)
    return rec


_ACTIVE: list[subprocess.Popen] = []  # the running section (its own process group)


def _stop(proc: subprocess.Popen) -> None:
    """Kill a section's process group: the section and its children (raster workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _terminate(signum, frame) -> None:
    """SIGTERM/SIGINT (e.g. ``timeout``): stop the running section too (it is in its own
    session, out of reach of the signal), then exit."""
    for proc in list(_ACTIVE):
        _stop(proc)
    sys.exit(128 + signum)


def run_sections(args: argparse.Namespace, t_start: float) -> tuple[list, list, list]:
    """Each section in turn within the budget: ``(records, skipped, failures)``."""
    records, skipped, failures = [], [], []
    mode = "quick" if args.quick else "gpu"
    with tempfile.TemporaryDirectory(prefix="accelerator_") as tmp:
        for i, name in enumerate(args.sections):
            left = args.budget_s - (time.time() - t_start)
            share = shares(args.sections[i:], left, mode)[name]
            if share < SECTIONS[name].min_s:
                reason = (f"budget: {left:.0f} s left, its share {share:.0f} s < the "
                          f"{SECTIONS[name].min_s:.0f} s it needs")
                print(f"== {name}: skipped ({reason})", flush=True)
                skipped.append({"section": name, "case": "(all)", "reason": reason})
                continue
            print(f"== {name}: {SECTIONS[name].title} (share {share:.0f} s)", flush=True)
            rec = _run_section(name, args, share, Path(tmp))
            records.append(rec)
            skipped += [{"section": name, **s} for s in rec.get("skipped", [])]
            if rec["status"] != "ok":
                skipped.append({"section": name, "case": "(rest)", "reason": rec["status"]})
                if not rec["status"].startswith("stopped"):
                    failures.append(f"{name}: {rec['status']}")
            if rec.get("plan") is not None:  # the plan the section's process used
                try:
                    check_plan(CorrelationPlan(**rec["plan"]))
                except ValueError as e:
                    failures.append(f"{name}: {e}")
            print(f"== {name}: {rec['status']} in {rec['wall_s']:.0f} s", flush=True)
    return records, skipped, failures


def report(payload: dict, args: argparse.Namespace) -> None:
    """Print the table and the skips, write the JSON, append to RESULTS.md if asked."""
    print()
    print(bl.table(HEADER, summary_rows(payload["sections"])))
    for s in payload["skipped"]:
        print(f"skipped {s['section']}: {s['case']}: {s['reason']}")
    path = bl.write_json("accelerator_quick" if args.quick else "accelerator", payload, args.out)
    print(f"{payload['plan_line']}\n{payload['plan_check']}\nwrote {path} "
          f"({payload['total_s']:.0f} s)")
    if args.append_results:
        section = results_section(payload)
        with open(args.results_md, "a") as f:
            f.write("\n" + section)
        path.with_suffix(".md").write_text(section)
        print(f"appended to {args.results_md} (also {path.with_suffix('.md')})")


def main(argv: list[str] | None = None) -> dict | None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return None
    t_start = time.time()
    meta = bl.machine(None)
    meta["commit"] = meta["commit"] or os.environ.get("EPILSR_COMMIT") or None  # no .git there
    torch_version = _version("torch")
    plan = plan_for(jnp.zeros(1))
    print(f"device {meta['device']} ({meta['backend']}, {len(jax.devices())} device(s)), "
          f"{meta['processor']}, {meta['cpu_affinity']} cores; jax {meta['jax']}, torch "
          f"{torch_version}; load {meta['load_average']:.2f}; budget {args.budget_s:.0f} s",
          flush=True)
    print(plan_line(plan), flush=True)
    failures = []
    try:
        check = check_plan(plan)
    except ValueError as e:
        check = str(e)
        failures.append(check)
    print(check, flush=True)
    old = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        records, skipped, section_failures = run_sections(args, t_start)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    command = sys.argv[1:] if argv is None else argv
    payload = {
        "benchmark": "accelerator",
        "command": " ".join(["python -m benchmarks.accelerator", *map(shlex.quote, command)]),
        "meta": meta, "torch_version": torch_version, "quick": args.quick,
        # where the baselines ran (cuda or cpu), as the sections' processes saw it
        "torch_device": next((r["meta"].get("torch_device") for r in records
                              if r.get("meta", {}).get("torch_device")), None),
        "budget_s": args.budget_s, "rounds": args.rounds, "plan": dataclasses.asdict(plan),
        "plan_line": plan_line(plan), "plan_check": check, "sections": records,
        "skipped": skipped, "failures": failures + section_failures,
        "total_s": time.time() - t_start,
    }
    report(payload, args)
    if payload["failures"]:
        print("FAILED: " + "; ".join(payload["failures"]), file=sys.stderr)
        sys.exit(1)
    return payload


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
