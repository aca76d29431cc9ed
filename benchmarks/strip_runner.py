"""What durability costs: :func:`epilsr.io.strips.run_strips` against the same strips written
without checkpoints, fingerprints or resume state.

    python -m benchmarks.strip_runner [--height 4096] [--width 1024] [--tile 256] [--repeats 3]

A pointwise fake window model (a softmax per pixel, NumPy) runs over the ``tile_grid`` of a
random float32 ``H x W x 4`` image (overlap 32), so the times are the runner's and the writers'
own. Baseline: :func:`epilsr.io.strips.iter_strips` feeding the same ``RasterWriter`` s (labels,
probs, entropy; deflate). Runner: ``run_strips`` (a durable checkpoint after every strip, input
fingerprint, NaN checks). Also times a resume after a crash halfway and the input fingerprints
(``array_reader`` over the array, ``RasterReader`` over an uncompressed GeoTIFF of it). Best of
``--repeats``; prints a table (ratios vs the baseline of the same run).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from epilsr.io.geotiff import RasterReader, RasterWriter, write_raster
from epilsr.io.strips import (
    StripPlan,
    array_reader,
    iter_strips,
    label_outputs,
    read_window,
    run_strips,
    write_outputs,
)
from epilsr.windows import blend_weights, tile_grid

N, OVERLAP = 4, 32


class _Crash(Exception):
    pass


def fake_strips(reader, height: int, width: int, tile: int, crash_strip: int | None = None):
    """The plan and a pointwise ``add_strip`` (softmax of the pixel values)."""
    windows = tile_grid(height, width, tile=tile, overlap=OVERLAP)
    th, tw = windows[0].height, windows[0].width
    weights = blend_weights((th, tw), OVERLAP)[..., None]
    rows = tuple(sorted({w.row for w in windows}))
    by_strip = [[w for w in windows if w.row == r] for r in rows]

    def add_strip(s, acc, wsum, tick):
        if s == crash_strip:
            raise _Crash
        for win in by_strip[s]:
            x = read_window("image", reader, *win)
            z = np.exp(x - x.max(-1, keepdims=True))
            acc[:, win.col : win.col + tw] += z / z.sum(-1, keepdims=True) * weights
            wsum[:, win.col : win.col + tw] += weights[..., 0]
            tick()
        return {"windows": len(by_strip[s])}

    return StripPlan(height, width, N, rows, th), add_strip, len(windows)


def baseline(out: Path, image, height, width, tile) -> None:
    plan, add_strip, _ = fake_strips(array_reader(image), height, width, tile)
    specs = label_outputs(out, "", N, probs=True, entropy=True)
    writers = {k: RasterWriter(s.path, height=height, width=width, dtype=s.dtype, bands=s.bands,
                               nodata=s.nodata) for k, s in specs.items()}
    for _, probs, nodata, _ in iter_strips(plan, add_strip):
        write_outputs(writers, probs, nodata)
    for w in writers.values():
        w.close()


def runner(out: Path, image, height, width, tile, crash_strip=None, resume=True) -> None:
    reader = array_reader(image)
    plan, add_strip, n = fake_strips(reader, height, width, tile, crash_strip)
    run_strips(plan, add_strip, who="bench", outputs=label_outputs(out, "", N, probs=True,
               entropy=True), state_dir=out / ".state", settings={"tile": tile},
               inputs={"image": reader}, total=n, progress_key="windows", resume=resume)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=4096)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    h, w, tile = args.height, args.width, args.tile
    image = np.random.default_rng(0).normal(size=(h, w, N)).astype(np.float32)
    root = Path(tempfile.mkdtemp(prefix="strip_runner_"))
    try:
        def fresh(name):
            d = root / name
            shutil.rmtree(d, ignore_errors=True)
            return d

        n_strips = len(fake_strips(None, h, w, tile)[0].row_starts)

        def crash_then_resume():
            d = fresh("resume")
            try:
                runner(d, image, h, w, tile, crash_strip=n_strips // 2)
            except _Crash:
                pass
            t = time.perf_counter()
            runner(d, image, h, w, tile)
            return time.perf_counter() - t

        base = best(lambda: baseline(fresh("base"), image, h, w, tile), args.repeats)
        run = best(lambda: runner(fresh("run"), image, h, w, tile, resume=False), args.repeats)
        resumed = min(crash_then_resume() for _ in range(args.repeats))
        fp_array = best(lambda: array_reader(image).fingerprint(), args.repeats)
        tif = write_raster(root / "image.tif", image, compression=None)
        with RasterReader(tif) as r:
            fp_tif = best(r.fingerprint, args.repeats)
        print(f"{h} x {w} x {N} float32, tile {tile}, overlap {OVERLAP}, {n_strips} strips")
        print(f"{'variant':<44}{'seconds':>10}{'ratio':>8}")
        for name, t in [("iter_strips + RasterWriters (baseline)", base),
                        ("run_strips (checkpoint every strip)", run),
                        ("run_strips resume from strip n/2", resumed),
                        ("array_reader.fingerprint()", fp_array),
                        ("RasterReader.fingerprint()", fp_tif)]:
            print(f"{name:<44}{t:>10.3f}{t / base:>8.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
