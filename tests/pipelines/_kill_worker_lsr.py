"""Subprocess entry point of ``tests/test_kill_resume.py`` (not collected by pytest).

Usage::

    python tests/_kill_worker_lsr.py --out DIR [--sleep S] [--strips-per-call G]

Runs :func:`epilsr.pipelines.raster_lsr.lsr_raster` (resume on) over the synthetic scene of
:func:`scene`, writing into ``DIR``; every window read sleeps ``S`` seconds so that a parent
can SIGKILL the run between checkpoints; ``G`` strips are computed per call (default: the
library's). Neither changes the output. Prints one JSON line
with the :class:`~epilsr.pipelines.raster_lsr.RasterRun` counters when done.
"""

from __future__ import annotations

import argparse
import json
import time

SIZE, BLOCK, TILE, OVERLAP = 320, 32, 128, 32
LSR_KWARGS = {"patch_size": 5, "downsample": 2}


def scene():
    from epilsr.data.synthetic import make_scene

    return make_scene(0, size=SIZE, block=BLOCK)


def run(out: str, sleep: float, strips_per_call: int | None = None) -> dict:
    import jax

    from epilsr.pipelines.raster_lsr import array_reader, lsr_raster

    sc = scene()
    image = array_reader(sc.image)

    def slow_image(*window):
        time.sleep(sleep)
        return image(*window)

    slow_image.shape = image.shape
    result = lsr_raster(
        jax.random.key(0),
        slow_image,
        array_reader(sc.classes),
        sc.label_given_class,
        out_dir=out,
        tile=TILE,
        overlap=OVERLAP,
        lsr_kwargs=LSR_KWARGS,
        write_probs=True,
        write_entropy=True,
        preview=None,
        progress=False,
        strips_per_call=strips_per_call,
    )
    return {
        "windows": result.windows,
        "computed": result.computed,
        "resumed_from": result.resumed_from,
        "skipped": result.skipped,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--strips-per-call", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(run(args.out, args.sleep, args.strips_per_call)), flush=True)


if __name__ == "__main__":
    main()
