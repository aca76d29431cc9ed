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
    with RasterReader(labels_path, cache_bytes=0) as lab:  # one pass: nothing to keep
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


class _Job(NamedTuple):
    """What every unit of a ``data=geotiff`` run shares."""

    cfg: DictConfig
    out: Path
    table: user.LabelTable
    window: int
    overlap: int
    methods: tuple[tuple[str, str, dict], ...]  # (method, output prefix, lsr kwargs)
    paint: bool
    truth: tuple[str, object] | None  # (truth raster, its values -> labels), or None


def _input_paths(data: DictConfig) -> tuple[list, str]:
    """``(imagery rasters of data.image, data.coarse)``, checked to be given and to exist."""
    images = user.find_images(_required(data, "image", "the imagery GeoTIFF (or a glob)"))
    coarse = _required(data, "coarse", "the coarse land-cover GeoTIFF")
    if not Path(coarse).exists() and "://" not in coarse and not coarse.startswith("/vsi"):
        raise FileNotFoundError(f"data.coarse: {coarse} does not exist")
    return images, coarse


def _open_scenes(data: DictConfig, images, coarse: str,
                 table: user.LabelTable) -> list[user.Scene]:
    """Every imagery raster opened against the coarse map and checked (CRS, overlap, codes,
    dtype, bands) before any work."""
    bands = None if data.get("bands") is None else [int(b) for b in data.bands]
    return [user.open_scene(p, coarse, table, bands=bands, bit_depth=data.get("bit_depth"),
                            cell_size=data.get("cell_size"),
                            coarse_nodata=data.get("coarse_nodata")) for p in images]


def _truth(data: DictConfig, table: user.LabelTable) -> tuple[str | None, tuple | None]:
    """``(how the truth values are read, (truth raster, values -> labels))``; ``(None, None)``
    without ``data.truth``."""
    if not data.get("truth"):
        return None, None
    how, to_labels = user.truth_mapping(data.truth, table, str(data.get("truth_codes") or "auto"))
    log.info("truth %s read as %s", data.truth, how)
    return how, (str(data.truth), to_labels)


def _scene_names(scenes) -> list[str]:
    """Output folder names: a raster's name, suffixed ``_<i>`` where two rasters share it."""
    names = [s.name for s in scenes]
    return [s.name if names.count(s.name) == 1 else f"{s.name}_{i}"
            for i, s in enumerate(scenes)]


def _scene_fingerprint(scene: user.Scene) -> str:
    return fingerprint(image=reader_fingerprint(scene.image),
                       classes=reader_fingerprint(scene.classes),
                       valid=reader_fingerprint(scene.valid))


def _plan(job: _Job, scenes, process: tuple[int, int]) -> list[_Unit]:
    """Writes the run's plan (every process writes the same) and returns this process's
    units, in plan order."""
    units = _units(scenes, _scene_names(scenes), [_scene_fingerprint(s) for s in scenes],
                   window=job.window, overlap=job.overlap, count=process[1],
                   band_mpx=(job.cfg.get("distributed") or {}).get("band_mpx"))
    pixels = [u.pixels for u in units]
    partition.write_plan(job.out, partition.make_plan([u.name for u in units], pixels,
                                                      [u.input for u in units], process[1],
                                                      [u.extra() for u in units]))
    mine = set(partition.owned(pixels, *process))
    return [u for k, u in enumerate(units) if k in mine]


def _unit_windows(scene, unit: _Unit, *, window: int, overlap: int) -> int:
    """LSR windows of one unit (the raster's, or those of its band's strips)."""
    per = tile_grid(scene.height, scene.width, tile=window, overlap=overlap)
    if unit.strips is None:
        return len(per)
    starts = strip_row_starts(scene.height, scene.width, tile=window, overlap=overlap)
    return sum(starts.index(w.row) in range(*unit.strips) for w in per)


def _run_methods(job: _Job, unit: _Unit, scene, key, bar) -> tuple[dict, list, dict]:
    """LSR (and the notebook baseline) over one unit: ``(labels path per method, manifest
    entries, metrics record)``."""
    folder = job.out / unit.name
    runs: dict[str, Path] = {}
    done: list[dict] = []
    record: dict = {"cell_size": scene.cell_size, "scale": scene.scale}
    for method, prefix, kwargs in job.methods:
        start = time.perf_counter()
        run = raster_lsr.lsr_raster(
            jax.random.fold_in(key, unit.scene), scene.image, scene.classes, job.table.table,
            out_dir=folder, height=scene.height, width=scene.width, tile=job.window,
            overlap=job.overlap, lsr_kwargs={**kwargs, "cell_size": scene.cell_size},
            geo=scene.geo, nodata_class=-1, valid_reader=scene.valid,
            write_probs=bool(job.cfg.output.probs) and method == "lsr",
            probs_dtype=np.float32, prefix=prefix,
            preview=1024 if job.cfg.output.png and method == "lsr" else None,
            label_names=job.table.label_names, label_colors=job.table.label_colors,
            progress=False, on_window=bar.update, strips=unit.strips,
            resume=bool(job.cfg.get("resume", True)))
        bar.update(run.resumed_from)  # done by an earlier, interrupted run
        runs[method] = run.labels
        done.append(partition.output_entry(run.labels, job.out,
                                           folder / f".{prefix}lsr_state/progress.json"))
        record[method] = {"seconds": time.perf_counter() - start, "windows": run.windows,
                          "skipped": run.skipped, "labels": str(run.labels)}
    if job.paint:
        start = time.perf_counter()
        runs["paint"] = _paint(scene, job.table, folder / "paint_labels.tif",
                               unit.rows if unit.strips is not None else None)
        done.append(partition.output_entry(runs["paint"], job.out))
        record["paint"] = {"seconds": time.perf_counter() - start,
                           "labels": str(runs["paint"])}
    return runs, done, record


def _score_runs(job: _Job, unit: _Unit, scene, runs: dict, record: dict,
                pooled: dict) -> list:
    """Scores each method's labels against the truth (adds to ``pooled`` and ``record``);
    returns the unit's accuracies (its seconds without truth), one per method."""
    if job.truth is None:
        return [f"{record[m]['seconds']:.1f}s" for m in runs]
    path, to_labels = job.truth
    n, accs = len(job.table.label_names), []
    with AlignedReader(path, crs=scene.image.reader.crs, transform=scene.image.reader.transform,
                       height=scene.height, width=scene.width, nodata=NODATA_LABEL) as truth:
        for method, labels in runs.items():
            cm, scored, total = _score(labels, truth, n, to_labels, unit.rows[0])
            pooled[method] = pooled.get(method, 0) + cm
            acc = metrics.accuracy_from_confusion(cm)
            record[method].update(accuracy=acc, scored=scored, truth_pixels=total)
            if unit.strips is not None:  # the raster's accuracy: of the bands' summed matrices
                record[method]["confusion"] = cm.tolist()
            accs.append(acc)
    return accs


def _run_unit(job: _Job, unit: _Unit, scene, key, bar, process: int,
              pooled: dict) -> tuple[list, dict]:
    """One unit end to end (LSR, baselines, scores, its manifest entry): ``(table row,
    metrics record)``."""
    banded = unit.strips is not None
    if banded and not partition.recorded(job.out, process, unit.name, unit.input):
        _drop_mosaics(job.out / unit.raster)  # its VRTs would show a band being rewritten
    log.info("%s: %dx%d%s, coarse cell %d px, imagery scale 1/%g; outputs in %s",
             unit.name, scene.height, scene.width,
             f" rows {unit.rows[0]}..{unit.rows[1] - 1}" if banded else "",
             scene.cell_size, round(1 / scene.scale), job.out / unit.name)
    runs, done, record = _run_methods(job, unit, scene, key, bar)
    row = [unit.name, *_score_runs(job, unit, scene, runs, record, pooled)]
    partition.record_done(job.out, process, unit.name, done, unit.input)
    return row, record


def run(cfg: DictConfig, out: Path, *, lsr_kwargs: dict, notebook_kwargs: dict,
        process: tuple[int, int] = (0, 1)) -> dict:
    """The ``data=geotiff`` run: returns the ``metrics.json`` content (with ``confusion``, the
    pooled confusion matrices, for merging). ``process = (index, count)``: run only the units
    (rasters, or bands of a raster's window strips, :func:`_units`) that
    :func:`epilsr.pipelines.partition.owned` gives this process; each finished unit is recorded
    in its manifest (``<out>/hosts/``). A band writes ``<out>/<raster>/band-<k>/``; one
    process alone also writes the rasters' VRT mosaics (:func:`write_mosaics`), several leave
    them to the finishing step."""
    images, coarse = _input_paths(cfg.data)
    table = user.load_label_table(cfg.data.get("table") or "nlcd")
    truth_how, truth = _truth(cfg.data, table)
    window = int(sorted(int(w) for w in cfg.raster.tile_sizes)[0])
    notebook = bool(cfg.baselines.get("notebook") or False)
    methods = (("lsr", "", lsr_kwargs),) + ((("notebook", "notebook_", notebook_kwargs),)
                                            if notebook else ())
    job = _Job(cfg, out, table, window, min(int(cfg.raster.overlap), window // 4), methods,
               bool(cfg.baselines.get("paint") or False), truth)
    key = jax.random.key(cfg.seed)
    scenes = _open_scenes(cfg.data, images, coarse, table)
    units = _plan(job, scenes, process)
    results: dict = {"tiles": {}, "table": table.source, "labels": list(table.label_names),
                     "truth_codes": truth_how}
    pooled: dict[str, np.ndarray] = {}
    rows = []
    bar = tqdm(total=len(methods) * sum(_unit_windows(scenes[u.scene], u, window=window,
                                                      overlap=job.overlap) for u in units),
               unit="window", desc="LSR windows")  # one bar: every unit's windows and methods
    try:
        for unit in units:
            row, results["tiles"][unit.name] = _run_unit(job, unit, scenes[unit.scene], key,
                                                         bar, process[0], pooled)
            rows.append(row)  # "tiles" as in the benchmark runs' metrics.json
    finally:
        bar.close()
        for s in scenes:
            s.close()
    if rows:
        shown = [m for m, _, _ in methods] + ["paint"] * job.paint
        print(format_table(["image"] + [m if m == "paint" else f"{m} W={window}"
                                        for m in shown], rows))
    if pooled:
        results["pooled"] = pooled_summary(pooled, table.label_names, window)
    results["confusion"] = {m: cm.tolist() for m, cm in pooled.items()}
    results["window"] = window
    results["config"] = OmegaConf.to_container(cfg, resolve=True)
    if process[1] == 1 and any(u.strips is not None for u in units):
        write_mosaics(out)  # alone: every band is this process's
        results["tiles"] = combine_bands(partition.read_plan(out), results["tiles"])
    return results
