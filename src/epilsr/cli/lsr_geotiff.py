"""``python -m experiments.lsr data=geotiff``: self-epitomic LSR of your own rasters.

    python -m experiments.lsr data=geotiff data.image='naip/*.tif' data.coarse=nlcd_2021.tif \
        data.table=nlcd [data.truth=labels.tif] [output.probs=true] [baselines.paint=true]

Per imagery raster (``data.image``: a path or a glob), the coarse map (``data.coarse``: any
resolution, CRS and grid; e.g. NLCD as distributed, 30 m EPSG:5070) is reprojected onto the
imagery's grid by nearest neighbour window by window (:class:`epilsr.io.align.AlignedReader`),
its codes mapped to rows of ``data.table`` (``nlcd`` or a CSV, :mod:`epilsr.data.user`), and
:func:`epilsr.pipelines.raster_lsr.lsr_raster` runs windowed. Outputs, one folder per image in
the run directory: ``labels.tif`` (uint8, 255 = no data, colour table and label names),
``entropy.tif``, ``probs.tif`` with ``output.probs=true``, ``preview.png``; the baselines
(``paint_labels.tif``, ``notebook_labels.tif``) only with ``baselines.paint=true`` /
``baselines.notebook=true``. With ``data.truth`` (labels ``0..n-1``, or Chesapeake land-cover
codes, on any grid: ``data.truth_codes``; other values ignored) accuracy and IoU are printed and
saved in ``metrics.json``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from epilsr import metrics
from epilsr.cli.common import format_table
from epilsr.data import user
from epilsr.io.align import AlignedReader
from epilsr.io.atomic import fingerprint
from epilsr.io.geotiff import RasterReader, RasterWriter
from epilsr.io.strips import reader_fingerprint
from epilsr.metrics import NODATA_LABEL
from epilsr.pipelines import partition, raster_lsr
from epilsr.pipelines.raster_bands import band_rows, split_strips, strip_row_starts, write_band_vrts
from epilsr.windows import tile_grid

log = logging.getLogger("epilsr.lsr")

_BLOCK = 256  # rows per block when painting / scoring


def _required(data: DictConfig, key: str, what: str) -> str:
    if OmegaConf.is_missing(data, key) or data.get(key) in (None, ""):
        raise ValueError(f"data.{key}: give {what} (data.{key}=...)")
    return str(data[key])


def _paint(scene: user.Scene, table: user.LabelTable, path: Path,
           rows: tuple[int, int] | None = None) -> Path:
    """Baseline: every pixel gets its coarse cell's most likely label, written block by block
    (raster rows ``rows = (r0, r1)`` only, for a band; default all)."""
    best = np.argmax(table.table, axis=1).astype(np.uint8)
    r0, r1 = rows or (0, scene.height)
    path.parent.mkdir(parents=True, exist_ok=True)
    with RasterWriter(path, height=r1 - r0, width=scene.width, dtype=np.uint8,
                      geo=scene.geo.window(r0, 0), nodata=NODATA_LABEL,
                      label_names=table.label_names, label_colors=table.label_colors) as w:
        for r in range(r0, r1, _BLOCK):
            h = min(_BLOCK, r1 - r)
            cls = scene.classes(r, 0, h, scene.width)
            lab = np.where(cls >= 0, best[np.maximum(cls, 0)], NODATA_LABEL).astype(np.uint8)
            if scene.valid is not None:
                lab[~scene.valid(r, 0, h, scene.width)] = NODATA_LABEL
            w.write(lab)
    return path


def _score(labels_path: Path, truth: AlignedReader, n: int, to_labels,
           row0: int = 0) -> tuple[np.ndarray, int, int]:
    """``(confusion [n, n], scored pixels, truth pixels)`` of a label raster against the truth
    (``to_labels`` maps truth values; labels outside ``0..n-1`` ignored; predicted no-data
    counted as unscored); the labels' row 0 is the truth's row ``row0`` (a band)."""
    cm, scored, total = np.zeros((n, n), np.int64), 0, 0
    with RasterReader(labels_path) as lab:
        for r in range(0, lab.height, _BLOCK):
            h = min(_BLOCK, lab.height - r)
            pred = lab(r, 0, h, lab.width).astype(np.int64)
            t = to_labels(np.asarray(truth(row0 + r, 0, h, lab.width)))
            ok = (t >= 0) & (t < n)
            total += int(ok.sum())
            ok &= pred < n
            scored += int(ok.sum())
            cm += metrics.confusion_matrix(t[ok], pred[ok], n_classes=n)
    return cm, scored, total


def pooled_summary(pooled: dict[str, np.ndarray], label_names, window: int) -> list[dict]:
    """Prints the pooled table of ``{method: confusion [n, n]}``; returns its JSON rows."""
    summary, entries = [], []
    for method, cm in pooled.items():
        per_class, miou = metrics.iou_from_confusion(cm)
        acc = metrics.accuracy_from_confusion(cm)
        summary.append([method, acc, float(miou)] + [float(v) for v in per_class])
        entries.append({"method": method, "window": None if method == "paint" else window,
                        "accuracy": acc, "miou": float(miou),
                        "iou": [None if np.isnan(v) else float(v) for v in per_class]})
    print("\npooled over all images (pixels with a prediction and a truth label)")
    print(format_table(["method", "acc", "mIoU"] + [f"IoU {x}" for x in label_names], summary))
    return entries


def merge(plan: dict, parts: list[dict]) -> dict:
    """The ``metrics.json`` of several processes' :func:`run` results (``parts``): images in
    plan order (the bands of a raster combined, :func:`combine_bands`), pooled confusion
    matrices summed; prints the pooled table."""
    tiles = {k: v for part in parts for k, v in part["tiles"].items()}
    results = {**parts[0], "tiles": combine_bands(plan, tiles)}
    pooled: dict[str, np.ndarray] = {}
    for part in parts:
        for method, cm in part["confusion"].items():
            pooled[method] = pooled.get(method, 0) + np.asarray(cm, np.int64)
    results["confusion"] = {m: cm.tolist() for m, cm in pooled.items()}
    results.pop("pooled", None)
    if pooled:
        results["pooled"] = pooled_summary(pooled, results["labels"], results["window"])
    return results


def combine_bands(plan: dict, tiles: dict[str, dict]) -> dict[str, dict]:
    """Per-unit records (a raster, or a band ``<raster>/band-<k>``) as per-raster records, in
    plan order: a raster's bands under ``"bands"``; per method the seconds and windows add and,
    with truth, the confusion matrices add (accuracy of the sum, as one process computes it)."""
    out: dict[str, dict] = {}
    for item in plan["items"]:
        record = tiles.get(item["name"])
        if record is None:
            continue
        if "band" not in item:
            out[item["name"]] = record
            continue
        whole = out.setdefault(item["raster"], {"bands": {}})
        whole["bands"][item["name"]] = record
        for key, value in record.items():
            if not isinstance(value, dict):
                whole.setdefault(key, value)  # cell_size, scale: equal over bands
                continue
            m = whole.setdefault(key, {"seconds": 0.0})
            m["seconds"] += value["seconds"]
            if "labels" in value:  # <raster>/band-<k>/<prefix>labels.tif -> the raster's VRT
                band_file = Path(value["labels"])
                m["labels"] = str(band_file.parent.parent / band_file.with_suffix(".vrt").name)
            for k in ("windows", "skipped", "scored", "truth_pixels"):
                if k in value:
                    m[k] = m.get(k, 0) + value[k]
            if "confusion" in value:
                cm = np.asarray(m.get("confusion", 0)) + np.asarray(value["confusion"], np.int64)
                m["confusion"] = cm.tolist()
                m["accuracy"] = metrics.accuracy_from_confusion(cm)
    return out


_MOSAICKED = ("", "notebook_", "paint_")  # output prefixes that get a VRT per raster


def write_mosaics(out: Path) -> list[Path]:
    """For every raster of the run divided into bands whose bands are all complete
    (:func:`epilsr.pipelines.partition.check`): ``<out>/<raster>/<prefix>{labels,probs,
    entropy}.vrt`` mosaicking the band GeoTIFFs (georeferencing of band 0 = the raster's)."""
    plan = partition.read_plan(out)
    made = []
    for raster, items in partition.complete_bands(plan, partition.check(out)).items():
        dirs = [out / item["name"] for item in items]
        for prefix in _MOSAICKED:
            first = dirs[0] / f"{prefix}labels.tif"
            if not first.exists():
                continue
            with RasterReader(first) as r:
                geo = r.geo
            made += write_band_vrts(f"{out / raster}/{prefix}", dirs, prefix=prefix,
                                    geo=geo).values()
    for path in made:
        log.info("wrote %s", path)
    return made


def _drop_mosaics(folder: Path) -> None:
    """Removes a raster's VRTs (one of its bands is about to be rewritten)."""
    for prefix in _MOSAICKED:
        for name in ("labels", "probs", "entropy"):
            (folder / f"{prefix}{name}.vrt").unlink(missing_ok=True)


class _Unit(NamedTuple):
    """One unit of work: a whole raster, or a band of its window strips."""

    scene: int  # index into the scenes
    name: str  # plan item name: the raster's, or "<raster>/band-<k>"
    raster: str
    pixels: int
    input: str  # fingerprint (a band's includes its strips)
    strips: tuple[int, int] | None
    rows: tuple[int, int]
    band: int
    bands: int

    def extra(self) -> dict:
        if self.strips is None:
            return {"raster": self.raster}
        return {"raster": self.raster, "band": self.band, "bands": self.bands,
                "strips": list(self.strips), "rows": list(self.rows)}


def _units(scenes, names, fps, *, window: int, overlap: int, count: int,
           band_mpx: float | None) -> list[_Unit]:
    """The units of work of a run: rasters divided into bands of window strips by
    :func:`epilsr.pipelines.partition.bands_per_input` (``band_mpx`` Mpx per band, or None:
    automatic, only when there are fewer rasters than processes)."""
    starts = [strip_row_starts(s.height, s.width, tile=window, overlap=overlap) for s in scenes]
    pixels = [s.height * s.width for s in scenes]
    try:
        band_px = None if band_mpx is None else max(1, round(float(band_mpx) * 1e6))
    except (TypeError, ValueError):
        raise ValueError(f"distributed.band_mpx: expected megapixels per band (a number) or "
                         f"null, got {band_mpx!r}") from None
    if band_mpx is not None and not float(band_mpx) > 0:
        raise ValueError(f"distributed.band_mpx: expected a positive size, got {band_mpx!r}")
    k = partition.bands_per_input(pixels, [len(r) for r in starts], count, band_px)
    units = []
    for i, (s, name, fp) in enumerate(zip(scenes, names, fps, strict=True)):
        if k[i] == 1:
            units.append(_Unit(i, name, name, pixels[i], fp, None, (0, s.height), 0, 1))
            continue
        for b, strips in enumerate(split_strips(len(starts[i]), k[i])):
            r0, r1 = band_rows(starts[i], s.height, strips)
            units.append(_Unit(i, f"{name}/band-{b}", name, (r1 - r0) * s.width,
                               fingerprint(raster=fp, strips=list(strips)), strips, (r0, r1),
                               b, k[i]))
    return units


def run(cfg: DictConfig, out: Path, *, lsr_kwargs: dict, notebook_kwargs: dict,
        process: tuple[int, int] = (0, 1)) -> dict:
    """The ``data=geotiff`` run: returns the ``metrics.json`` content (with ``confusion``, the
    pooled confusion matrices, for merging). ``process = (index, count)``: run only the units
    (rasters, or bands of a raster's window strips, :func:`_units`) that
    :func:`epilsr.pipelines.partition.owned` gives this process; each finished unit is recorded
    in its manifest (``<out>/hosts/``). A band writes ``<out>/<raster>/band-<k>/``; one
    process alone also writes the rasters' VRT mosaics (:func:`write_mosaics`), several leave
    them to the finishing step."""
    data = cfg.data
    images = user.find_images(_required(data, "image", "the imagery GeoTIFF (or a glob)"))
    coarse = _required(data, "coarse", "the coarse land-cover GeoTIFF")
    if not Path(coarse).exists() and "://" not in coarse and not coarse.startswith("/vsi"):
        raise FileNotFoundError(f"data.coarse: {coarse} does not exist")
    table = user.load_label_table(data.get("table") or "nlcd")
    n = len(table.label_names)
    bands = None if data.get("bands") is None else [int(b) for b in data.bands]
    window = int(sorted(int(w) for w in cfg.raster.tile_sizes)[0])
    paint = bool(cfg.baselines.get("paint") or False)
    notebook = bool(cfg.baselines.get("notebook") or False)
    key = jax.random.key(cfg.seed)
    truth_how, to_labels = None, None
    if data.get("truth"):
        truth_how, to_labels = user.truth_mapping(data.truth, table,
                                                  str(data.get("truth_codes") or "auto"))
        log.info("truth %s read as %s", data.truth, truth_how)
    # Open and check every input before any work (CRS, overlap, codes, dtype, bands).
    scenes = [user.open_scene(p, coarse, table, bands=bands, bit_depth=data.get("bit_depth"),
                              cell_size=data.get("cell_size"),
                              coarse_nodata=data.get("coarse_nodata")) for p in images]
    names = [s.name if [t.name for t in scenes].count(s.name) == 1 else f"{s.name}_{i}"
             for i, s in enumerate(scenes)]
    fps = [fingerprint(image=reader_fingerprint(s.image), classes=reader_fingerprint(s.classes),
                       valid=reader_fingerprint(s.valid)) for s in scenes]
    overlap = min(int(cfg.raster.overlap), window // 4)
    units = _units(scenes, names, fps, window=window, overlap=overlap, count=process[1],
                   band_mpx=(cfg.get("distributed") or {}).get("band_mpx"))
    pixels = [u.pixels for u in units]
    partition.write_plan(out, partition.make_plan([u.name for u in units], pixels,
                                                  [u.input for u in units], process[1],
                                                  [u.extra() for u in units]))
    mine = set(partition.owned(pixels, *process))
    results: dict = {"tiles": {}, "table": table.source, "labels": list(table.label_names),
                     "truth_codes": truth_how}
    pooled: dict[str, np.ndarray] = {}
    rows = []

    def windows_of(u: _Unit) -> int:
        per = tile_grid(scenes[u.scene].height, scenes[u.scene].width, tile=window,
                        overlap=overlap)
        if u.strips is None:
            return len(per)
        starts = strip_row_starts(scenes[u.scene].height, scenes[u.scene].width, tile=window,
                                  overlap=overlap)
        return sum(starts.index(w.row) in range(*u.strips) for w in per)

    bar = tqdm(total=(1 + notebook) * sum(windows_of(u) for k, u in enumerate(units)
                                          if k in mine),
               unit="window", desc="LSR windows")  # one bar: every unit's windows and methods
    try:
        for k, unit in enumerate(units):
            if k not in mine:
                continue
            i, scene, name = unit.scene, scenes[unit.scene], unit.name
            folder = out / name
            banded = unit.strips is not None
            if banded and not partition.recorded(out, process[0], name, unit.input):
                _drop_mosaics(out / unit.raster)  # its VRTs would show a band being rewritten
            log.info("%s: %dx%d%s, coarse cell %d px, imagery scale 1/%g; outputs in %s",
                     name, scene.height, scene.width,
                     f" rows {unit.rows[0]}..{unit.rows[1] - 1}" if banded else "",
                     scene.cell_size, round(1 / scene.scale), folder)
            runs: dict[str, Path] = {}
            done: list[dict] = []
            record: dict = {"cell_size": scene.cell_size, "scale": scene.scale}
            methods = [("lsr", "", {**lsr_kwargs, "cell_size": scene.cell_size})]
            if notebook:
                methods.append(("notebook", "notebook_",
                                {**notebook_kwargs, "cell_size": scene.cell_size}))
            for method, prefix, kwargs in methods:
                start = time.perf_counter()
                run = raster_lsr.lsr_raster(
                    jax.random.fold_in(key, i), scene.image, scene.classes, table.table,
                    out_dir=folder, height=scene.height, width=scene.width, tile=window,
                    overlap=overlap, lsr_kwargs=kwargs,
                    geo=scene.geo, nodata_class=-1, valid_reader=scene.valid,
                    write_probs=bool(cfg.output.probs) and method == "lsr",
                    probs_dtype=np.float32, prefix=prefix,
                    preview=1024 if cfg.output.png and method == "lsr" else None,
                    label_names=table.label_names, label_colors=table.label_colors,
                    progress=False, on_window=bar.update, strips=unit.strips,
                    resume=bool(cfg.get("resume", True)))
                bar.update(run.resumed_from)  # done by an earlier, interrupted run
                runs[method] = run.labels
                done.append(partition.output_entry(run.labels, out,
                                                   folder / f".{prefix}lsr_state/progress.json"))
                record[method] = {"seconds": time.perf_counter() - start,
                                  "windows": run.windows, "skipped": run.skipped,
                                  "labels": str(run.labels)}
            if paint:
                start = time.perf_counter()
                runs["paint"] = _paint(scene, table, folder / "paint_labels.tif",
                                       unit.rows if banded else None)
                done.append(partition.output_entry(runs["paint"], out))
                record["paint"] = {"seconds": time.perf_counter() - start,
                                   "labels": str(runs["paint"])}
            row = [name]
            if data.get("truth"):
                with AlignedReader(data.truth, crs=scene.image.reader.crs,
                                   transform=scene.image.reader.transform, height=scene.height,
                                   width=scene.width, nodata=NODATA_LABEL) as truth:
                    for method, path in runs.items():
                        cm, scored, total = _score(path, truth, n, to_labels, unit.rows[0])
                        pooled[method] = pooled.get(method, 0) + cm
                        acc = metrics.accuracy_from_confusion(cm)
                        record[method].update(accuracy=acc, scored=scored, truth_pixels=total)
                        if banded:  # the raster's accuracy: of the bands' summed matrices
                            record[method]["confusion"] = cm.tolist()
                        row.append(acc)
            else:
                row += [f"{record[m]['seconds']:.1f}s" for m in runs]
            rows.append(row)
            results["tiles"][name] = record  # "tiles" as in the benchmark runs' metrics.json
            partition.record_done(out, process[0], name, done, unit.input)
    finally:
        bar.close()
        for s in scenes:
            s.close()
    if rows:
        print(format_table(["image"] + [m if m == "paint" else f"{m} W={window}"
                                        for m in ("lsr", "notebook", "paint") if m in record],
                           rows))
    if pooled:
        results["pooled"] = pooled_summary(pooled, table.label_names, window)
    results["confusion"] = {m: cm.tolist() for m, cm in pooled.items()}
    results["window"] = window
    results["config"] = OmegaConf.to_container(cfg, resolve=True)
    if process[1] == 1 and any(u.strips is not None for u in units):
        write_mosaics(out)  # alone: every band is this process's
        results["tiles"] = combine_bands(partition.read_plan(out), results["tiles"])
    return results
