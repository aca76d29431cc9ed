"""``python -m epilsr.cli.lsr_check <run dir>``: is a multi-process LSR run complete?

Reads the run's plan and every process's manifest (``<run>/hosts/``, see
:mod:`epilsr.pipelines.partition`), prints what is missing, unfinished, changed or stale and
which processes to rerun (exit 1), or merges the processes' metrics into ``<run>/metrics.json``
and prints the pooled tables (exit 0). A raster divided into bands of strips gets its VRT
mosaics (``<run>/<raster>/labels.vrt``, entropy, probs, baselines) once all its bands are
complete, even when other inputs are not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from epilsr.cli import lsr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m epilsr.cli.lsr_check",
                                 description="completeness check and metrics merge of a run")
    ap.add_argument("run_dir", type=Path, help="the run folder (hydra.run.dir)")
    args = ap.parse_args(argv)
    try:
        lsr.finish(args.run_dir)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"wrote {args.run_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
