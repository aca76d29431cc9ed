"""Several processes (hosts) for ``experiments.lsr``: join, barrier, metrics parts, check.

The inputs (rasters, or with ``data=geotiff`` bands of one raster's window strips,
:func:`epilsr.cli.lsr_geotiff.run`) are divided among processes by
:mod:`epilsr.pipelines.partition` (balanced by pixel count). ``distributed.coordinator`` set
and ``num_processes > 1``: ``jax.distributed.initialize`` (as in training), a barrier at the
end, then process 0 checks completeness, writes the bands' VRT mosaics and merges the
per-process metrics (``<run>/hosts/metrics-<p>.json``) into ``metrics.json``. Coordinator
``null`` with ``num_processes > 1``: independent processes (a SLURM array, a rerun of one killed
process): each does its share and writes its part; ``python -m epilsr.cli.lsr_check <run>``
checks and merges afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import jax
from jax.experimental import multihost_utils
from omegaconf import DictConfig

from epilsr import parallel
from epilsr.io.atomic import write_json_atomic
from epilsr.pipelines import partition

PARTS = "metrics-{}.json"


class Hosts(NamedTuple):
    index: int  # this process
    count: int  # processes sharing the inputs
    coordinated: bool  # joined with jax.distributed (barrier + merge by process 0)


def join(dist: DictConfig | None) -> Hosts:
    """Reads the ``distributed.*`` keys; ``jax.distributed.initialize`` only when a coordinator
    is given and ``num_processes > 1``, or with ``coordinator: auto`` (JAX's cluster detection:
    SLURM, Open MPI, ...; the process count and index come from the cluster). Call it before
    any other JAX call."""
    if dist is None:
        return Hosts(0, 1, False)
    if dist.coordinator == "auto":
        if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()
        return Hosts(jax.process_index(), jax.process_count(), jax.process_count() > 1)
    count, index = int(dist.num_processes), int(dist.process_id)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"distributed.process_id: expected a value in [0, {count}) with "
                         f"num_processes >= 1, got {index} of {count}")
    if count == 1 or dist.coordinator is None:
        return Hosts(index, count, False)
    index = parallel.initialize_distributed(str(dist.coordinator), count, index)
    return Hosts(index, count, True)


def barrier(out: Path, name: str = "epilsr.lsr") -> None:
    """Waits for every process of a ``jax.distributed`` run (raises, naming the next steps,
    when one never arrives; JAX's coordination service may then abort this process)."""
    try:
        multihost_utils.sync_global_devices(name)
    except jax.errors.JaxRuntimeError as err:
        raise RuntimeError(
            f"barrier: not every process arrived ({str(err).splitlines()[0][:200]}); this "
            "process's outputs are complete: rerun the missing process(es) with "
            f"distributed.coordinator=null, then python -m epilsr.cli.lsr_check {out}"
        ) from err


def save_part(out: Path, hosts: Hosts, results: dict) -> Path:
    """This process's metrics (``<run>/hosts/metrics-<p>.json``, atomic)."""
    return write_json_atomic(out / partition.HOSTS_DIR / PARTS.format(hosts.index), results)


def load_parts(out: Path) -> tuple[dict, list[dict]]:
    """``(plan, parts)``: the plan and every process's metrics part, in process order."""
    plan = partition.read_plan(out)
    paths = [out / partition.HOSTS_DIR / PARTS.format(p) for p in range(plan["count"])]
    parts = [json.loads(p.read_text()) for p in paths if p.exists()]
    if not parts:
        raise FileNotFoundError(f"{out / partition.HOSTS_DIR}: no metrics-<p>.json parts")
    return plan, parts


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def summary(plan: dict, report: partition.Report) -> str:
    """The completeness report of ``plan`` (:func:`epilsr.pipelines.partition.check`) with
    rasters and their bands counted apart: ``3 rasters (1 in 4 bands): complete``, or
    ``2/3 rasters complete (1 in 4 bands, 3/4 bands complete); 1 not:`` followed by one line
    per unfinished unit (a raster or a band) and the processes to rerun."""
    bad = {p.name for p in report.problems}
    units: dict[str, list[str]] = {}  # raster -> its plan items (itself, or its bands)
    banded = set()
    for item in plan["items"]:
        raster = item["raster"] if "band" in item else item["name"]
        units.setdefault(raster, []).append(item["name"])
        if "band" in item:
            banded.add(raster)
    done = sum(not bad.intersection(names) for names in units.values())
    bands = [name for raster in banded for name in units[raster]]
    split = f"{len(banded)} in {len(bands)} bands" if banded else ""
    if report.ok:
        return f"{_plural(len(units), 'raster')}{f' ({split})' if split else ''}: complete"
    if split:
        split = f" ({split}, {sum(b not in bad for b in bands)}/{len(bands)} bands complete)"
    head = f"{done}/{_plural(len(units), 'raster')} complete{split}; {len(report.problems)} not:"
    return "\n".join([head, *report.text().splitlines()[1:]])  # the units' lines, the rerun


def check(out: Path) -> None:
    """Prints the completeness report of a run folder (:func:`summary`); raises
    ``RuntimeError`` with it when an input is missing, unfinished, changed or stale."""
    report = partition.check(out)
    text = summary(partition.read_plan(out), report)
    print(text)
    if not report.ok:
        raise RuntimeError(f"{out}: incomplete run: {text}")
