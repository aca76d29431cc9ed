"""End-to-end raster LSR benchmark: an 8192 x 8192 synthetic scene through GeoTIFFs.

    python -m benchmarks.raster_8192 [--size 8192] [--tile 256] [--overlap 32]

1. Renders ``make_scene(seed, size=S, block=32)`` and writes it as GeoTIFFs with made-up UTM
   georeferencing (EPSG 32617, 1 m pixels): imagery (uint8, 4 bands, LZW, tiled), coarse classes
   and the true labels (for scoring only).
2. Runs :func:`epilsr.pipelines.raster_lsr.lsr_raster` from those GeoTIFFs (windowed reads) in
   a *separate process*, so its peak RSS (``ru_maxrss``) measures the tiled LSR alone, not the scene
   generator.
3. Scores the label GeoTIFF against the truth and the paint baseline (every pixel gets its coarse
   class's most likely label), computes the seam metric (label disagreement across window edges
   vs elsewhere) and, as the no-seam reference, the same metric on control lines: the window
   grid shifted by odd multiples of the 32 px class block, so they lie on the coarse-class grid
   (where LSR labels legitimately change more often, and where the default windows' edges also
   lie) but are not window edges. Prints a table and writes JSON (default
   ``benchmarks/results/raster_8192.json``).

Not a test. At 8192 with the defaults (windows of 256 with 32 px overlap, 2x downsampling) it takes
4.3 minutes on 2 idle CPU cores (15.6 Mpx/min, peak RSS of the LSR process 576 MiB); ``--size
2048`` checks the pipeline in half a minute and prints the extrapolation to 8192.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

UTM17N_KEYS = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32617)


def _peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    On Linux this is ``VmHWM`` of ``/proc/self/status``, which ``exec`` resets. ``ru_maxrss`` is
    not: a child started after the parent rendered the 8192² scene reports the *parent's* peak
    (3 GB), not its own. Elsewhere ``ru_maxrss`` (macOS reports bytes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def make_inputs(work: Path, *, size: int, seed: int) -> dict:
    """Scene -> ``naip.tif``, ``classes.tif``, ``truth.tif``, ``table.npy`` in ``work``."""
    from epilsr.data.synthetic import make_scene
    from epilsr.io.geotiff import GeoInfo, write_raster

    t0 = time.perf_counter()
    scene = make_scene(seed, size=size, block=32)
    t_scene = time.perf_counter() - t0
    geo = GeoInfo(pixel_scale=(1.0, 1.0, 0.0),
                  tiepoints=(0.0, 0.0, 0.0, 550000.0, 4300000.0, 0.0),
                  geokeys=UTM17N_KEYS, geo_ascii="WGS 84 / UTM zone 17N|")
    t0 = time.perf_counter()
    image = np.empty(scene.image.shape, np.uint8)
    for r in range(0, size, 1024):  # float32 -> uint8 in blocks (no second float copy)
        image[r : r + 1024] = np.round(scene.image[r : r + 1024] * 255)
    write_raster(work / "naip.tif", image, geo=geo, compression="lzw")
    del image
    write_raster(work / "classes.tif", scene.classes.astype(np.uint8), geo=geo)
    write_raster(work / "truth.tif", scene.labels.astype(np.uint8), geo=geo)
    np.save(work / "table.npy", np.asarray(scene.label_given_class, np.float32))
    return {"scene_s": t_scene, "write_inputs_s": time.perf_counter() - t0}


def worker(args: argparse.Namespace) -> None:
    """Child process: run lsr_raster from the GeoTIFFs, print one JSON line."""
    import jax

    from epilsr.io.geotiff import RasterReader
    from epilsr.pipelines.raster_lsr import lsr_raster

    work = Path(args.work)
    table = np.load(work / "table.npy")
    with RasterReader(work / "naip.tif") as img, RasterReader(work / "classes.tif") as cls:
        run = lsr_raster(
            jax.random.key(args.seed), img, cls, table, out_dir=work / "out",
            tile=args.tile, overlap=args.overlap,
            lsr_kwargs=dict(patch_size=args.patch_size, downsample=args.downsample),
            write_entropy=True, write_probs=False, progress=not args.quiet, resume=False,
            preview=1024,
        )
    print(json.dumps({
        "lsr_s": run.seconds, "windows": run.windows, "computed": run.computed,
        "peak_rss_mb": _peak_rss_mb(), "labels": str(run.labels), "preview": str(run.preview),
        "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
    }))


def evaluate(work: Path, *, size: int, tile: int, overlap: int) -> dict:
    """Accuracy vs truth and the paint baseline; seam metric of output, truth and paint."""
    import tifffile

    from epilsr.windows import seam_disagreement, tile_grid

    labels = tifffile.imread(work / "out" / "labels.tif")
    truth = tifffile.imread(work / "truth.tif")
    classes = tifffile.imread(work / "classes.tif")
    table = np.load(work / "table.npy")
    paint = table.argmax(-1).astype(np.uint8)[classes]
    windows = tile_grid(size, size, tile=tile, overlap=overlap)
    controls = _control_grids(windows, size)
    seams = {}
    for name, arr in (("lsr", labels), ("truth", truth), ("paint", paint)):
        seams[name] = seam_disagreement(arr, windows)._asdict()
        ratios = [seam_disagreement(arr, g).ratio for g in controls]
        seams[name]["control_ratio"] = float(np.mean(ratios)) if ratios else float("nan")
    n = int(table.shape[1])
    iou = []
    for k in range(n):
        inter = np.sum((labels == k) & (truth == k))
        union = np.sum((labels == k) | (truth == k))
        iou.append(float(inter / union) if union else float("nan"))
    return {
        "accuracy": float(np.mean(labels == truth)),
        "paint_accuracy": float(np.mean(paint == truth)),
        "iou": iou,
        "miou": float(np.nanmean(iou)),
        "nodata_pixels": int(np.sum(labels == 255)),
        "seams": seams,
    }


def _control_grids(windows, size: int, block: int = 32, n: int = 4) -> list:
    """The window grid shifted by odd multiples of ``block``: lines on the coarse-class block
    grid (where LSR labels legitimately change more often) that are not window edges."""
    from epilsr.windows import Window

    def lines(ws):
        return {v for w in ws for v in (w.row, w.row + w.height, w.col, w.col + w.width)
                if 0 < v < size}

    real, grids = lines(windows), []
    for k in range(1, 64, 2):
        shifted = [Window(w.row + k * block, w.col + k * block, w.height, w.width)
                   for w in windows if w.row + k * block < size and w.col + k * block < size]
        if shifted and not lines(shifted) & real:
            grids.append(shifted)
        if len(grids) == n:
            break
    return grids


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=7)
    p.add_argument("--downsample", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="work folder (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the GeoTIFFs and outputs")
    p.add_argument("--out", default="benchmarks/results/raster_8192.json")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--score-only", action="store_true",
                   help="re-score the outputs kept in --work by an earlier run (with --keep)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return None

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="raster_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.score_only:
            saved = json.loads((work / "run.json").read_text())
            timing, wall, child = saved["timing"], saved["wall"], saved["child"]
        else:
            print(f"[1/3] scene {args.size}x{args.size} -> GeoTIFFs in {work}", flush=True)
            timing = make_inputs(work, size=args.size, seed=args.seed)
            print(f"[2/3] lsr_raster (tile {args.tile}, overlap {args.overlap}) in a subprocess",
                  flush=True)
            cmd = [sys.executable, "-m", "benchmarks.raster_8192", "--worker", "--work",
                   str(work), "--tile", str(args.tile), "--overlap", str(args.overlap),
                   "--seed", str(args.seed), "--patch-size", str(args.patch_size),
                   "--downsample", str(args.downsample)] + (["--quiet"] if args.quiet else [])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            wall = time.perf_counter() - t0
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            (work / "run.json").write_text(json.dumps(
                {"timing": timing, "wall": wall, "child": child}))
        print("[3/3] scoring", flush=True)
        scores = evaluate(work, size=args.size, tile=args.tile, overlap=args.overlap)
        if args.keep and child.get("preview"):
            print(f"preview: {child['preview']}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    mpix = args.size**2 / 1e6
    per_window = child["lsr_s"] / max(child["computed"], 1)
    n8192 = len(_grid(8192, args.tile, args.overlap))
    result = {
        "size": args.size, "tile": args.tile, "overlap": args.overlap,
        "patch_size": args.patch_size, "downsample": args.downsample, "seed": args.seed,
        "windows": child["windows"], "lsr_s": child["lsr_s"], "subprocess_wall_s": wall,
        "seconds_per_window": per_window, "megapixels_per_minute": mpix / (child["lsr_s"] / 60),
        "peak_rss_mb": child["peak_rss_mb"], **timing, **scores,
        "extrapolated_8192": {"windows": n8192, "lsr_s": n8192 * per_window},
        "backend": child["backend"], "devices": child["devices"],
        "machine": {"python": platform.python_version(), "processor": platform.machine(),
                    "cpus": _cpus()},
    }
    _print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def _grid(size, tile, overlap):
    from epilsr.windows import tile_grid

    return tile_grid(size, size, tile=tile, overlap=overlap)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _print_table(r: dict) -> None:
    s = r["seams"]
    rows = [
        ("raster", f"{r['size']} x {r['size']} ({r['size'] ** 2 / 1e6:.1f} Mpx)"),
        ("windows (tile/overlap)", f"{r['windows']} ({r['tile']}/{r['overlap']})"),
        ("lsr_raster time", f"{r['lsr_s']:.1f} s ({r['seconds_per_window']:.2f} s/window)"),
        ("throughput", f"{r['megapixels_per_minute']:.2f} Mpx/min"),
        ("peak RSS (LSR process)", f"{r['peak_rss_mb']:.0f} MiB"),
        ("accuracy LSR / paint", f"{r['accuracy']:.4f} / {r['paint_accuracy']:.4f} "
                                 f"(x{r['accuracy'] / r['paint_accuracy']:.3f})"),
        ("mIoU LSR", f"{r['miou']:.4f}"),
        ("seam border/interior LSR", f"{s['lsr']['border']:.4f} / {s['lsr']['interior']:.4f} "
                                     f"= {s['lsr']['ratio']:.2f}"),
        ("seam ratio at control lines", f"{s['lsr']['control_ratio']:.2f} (LSR, block-aligned "
                                        "lines that are not window edges)"),
        ("seam ratio truth / paint", f"{s['truth']['ratio']:.2f} / {s['paint']['ratio']:.2f}"),
        ("8192^2 extrapolated", f"{r['extrapolated_8192']['windows']} windows, "
                                f"{r['extrapolated_8192']['lsr_s'] / 3600:.2f} h"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if math.isnan(s["lsr"]["ratio"]):
        print("(no window edges inside the raster: seam metric undefined)")


if __name__ == "__main__":
    main()
