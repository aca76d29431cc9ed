"""Several processes (hosts) for ``experiments.lsr``, and the completeness check of a run.

    python -m experiments.lsr_check <run dir>      # exit 0 and metrics.json when complete

The inputs are divided among processes by :mod:`epilsr.pipelines.partition` (balanced by pixel
count). ``distributed.coordinator`` set and ``num_processes > 1``: ``jax.distributed.initialize``
(as in training), a barrier at the end, then process 0 checks completeness and merges the
per-process metrics (``<run>/hosts/metrics-<p>.json``) into ``metrics.json``. Coordinator
``null`` with ``num_processes > 1``: independent processes (a SLURM array, a rerun of one killed
process): each does its share and writes its part; this command checks and merges afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
from jax.experimental import multihost_utils
from omegaconf import DictConfig

from epilsr import parallel
from epilsr.io.atomic import write_json_atomic
from epilsr.pipelines import partition
from experiments import lsr_geotiff

PARTS = "metrics-{}.json"


class Hosts(NamedTuple):
    index: int  # this process
    count: int  # processes sharing the inputs
    coordinated: bool  # joined with jax.distributed (barrier + merge by process 0)


def join(dist: DictConfig | None) -> Hosts:
    """Reads the ``distributed.*`` keys; ``jax.distributed.initialize`` only when a coordinator
    is given and ``num_processes > 1`` (call before any other JAX call)."""
    if dist is None:
        return Hosts(0, 1, False)
    count, index = int(dist.num_processes), int(dist.process_id)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"distributed.process_id: expected a value in [0, {count}) with "
                         f"num_processes >= 1, got {index} of {count}")
    if count == 1 or dist.coordinator is None:
        return Hosts(index, count, False)
    index = parallel.initialize_distributed(str(dist.coordinator), count, index)
    return Hosts(index, count, True)


def barrier(name: str = "epilsr.lsr") -> None:
    """Waits for every process of a ``jax.distributed`` run."""
    multihost_utils.sync_global_devices(name)


def save_part(out: Path, hosts: Hosts, results: dict) -> Path:
    """This process's metrics (``<run>/hosts/metrics-<p>.json``, atomic)."""
    return write_json_atomic(out / partition.HOSTS_DIR / PARTS.format(hosts.index), results)


def merge(out: Path) -> dict:
    """The parts of every process as one ``metrics.json`` content (tiles in plan order, pooled
    confusion matrices summed); prints the pooled table."""
    plan = partition.read_plan(out)
    parts = [json.loads((out / partition.HOSTS_DIR / PARTS.format(p)).read_text())
             for p in range(plan["count"])
             if (out / partition.HOSTS_DIR / PARTS.format(p)).exists()]
    if not parts:
        raise FileNotFoundError(f"{out / partition.HOSTS_DIR}: no metrics-<p>.json parts")
    tiles = {k: v for part in parts for k, v in part["tiles"].items()}
    results = {**parts[0], "tiles": {i["name"]: tiles[i["name"]] for i in plan["items"]
                                      if i["name"] in tiles}}
    pooled: dict[str, np.ndarray] = {}
    for part in parts:
        for method, cm in part.get("confusion", {}).items():
            pooled[method] = pooled.get(method, 0) + np.asarray(cm, np.int64)
    results["confusion"] = {m: cm.tolist() for m, cm in pooled.items()}
    results.pop("pooled", None)
    if pooled:
        results["pooled"] = lsr_geotiff.pooled_summary(pooled, results["labels"],
                                                       results["window"])
    return results


def finish(out: Path) -> dict:
    """Completeness check (raises with the report when something is missing), then the merged
    metrics written to ``<run>/metrics.json``."""
    report = partition.check(out)
    print(report.text())
    if not report.ok:
        raise RuntimeError(f"{out}: incomplete run\n{report.text()}")
    results = merge(out)
    write_json_atomic(out / "metrics.json", results)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.lsr_check",
                                 description="completeness check and metrics merge of a run")
    ap.add_argument("run_dir", type=Path, help="the run folder (hydra.run.dir)")
    args = ap.parse_args(argv)
    try:
        finish(args.run_dir)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"wrote {args.run_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
