"""Subprocess entry point of ``test_peak_memory_does_not_grow_with_height`` (not collected).

Usage::

    python tests/pipelines/_peak_memory_lsr.py --out DIR --heights 256,2048,4096 [--group G]

Runs :func:`epilsr.pipelines.raster_lsr.lsr_raster` with a pixelwise stand-in for the LSR
(only the pipeline's own buffers, queues and writers allocate) on periodic rasters of width
256 and each height in turn, and prints one JSON line: the ``tracemalloc`` peak of each run.

Why a fresh process: ``tracemalloc`` counts every allocation of the process. In a test worker
that already ran hundreds of tests, CPython's own tables (e.g. the interned-strings dict, which
``pathlib`` grows) resize during the measured run (one 3.8 MB table on CI, which read as the
pipeline growing with the raster); a fresh process has only this run's history.
"""

from __future__ import annotations

import argparse
import json
import tracemalloc

import jax
import numpy as np

from epilsr.pipelines import raster_lsr

WIDTH = 256


def pointwise(key, image, classes, table):
    """A fake 'LSR' that depends on each pixel only."""
    logits = image.astype(np.float32)[..., :3] / 40.0 + table[classes][..., :3]
    return jax.nn.softmax(logits, axis=-1)


def periodic(arr: np.ndarray):
    """A reader of a raster of any height (``arr`` repeated down) without materialising it."""
    period = arr.shape[0]
    return lambda r, c, h, w: np.take(arr, np.arange(r, r + h) % period, axis=0)[:, c : c + w]


def peaks(out: str, heights: list[int], group: int | None) -> list[int]:
    raster_lsr._lsr_fn = lambda kw: pointwise
    rng = np.random.default_rng(0)
    table = rng.dirichlet(np.ones(3), size=5).astype(np.float32)
    image = rng.integers(0, 255, (256, WIDTH, 4), dtype=np.uint8)
    classes = rng.integers(0, 5, (256, WIDTH)).astype(np.int32)
    found = []
    for height in heights:
        tracemalloc.start()
        raster_lsr.lsr_raster(
            jax.random.key(0), periodic(image), periodic(classes), table,
            out_dir=f"{out}/{height}", height=height, width=WIDTH, tile=128, overlap=32,
            write_probs=True, progress=False, preview=256, strips_per_call=group)
        found.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return found


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--heights", required=True)
    parser.add_argument("--group", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(peaks(args.out, [int(h) for h in args.heights.split(",")], args.group)))
