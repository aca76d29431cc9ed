"""Self-epitomic LSR over rasters of any size, tile by tile, with bounded memory and resume.

:func:`lsr_raster` runs :func:`epilsr.self_epitomic_lsr` on overlapping, equal-sized windows
(:func:`~epilsr.windows.tile_grid`) in raster order, window ``i`` with
``jax.random.fold_in(key, i)``, and stitches the per-window label distributions with a
separable cosine taper (:func:`~epilsr.windows.blend_weights`), normalised by the summed
weights. The windows of one row of the grid form a *strip*; :func:`epilsr.io.strips.run_strips`
holds the ``[tile, W, n]`` strip buffer, writes the finished rows (labels, probabilities,
entropy), checkpoints after every strip in ``<out_dir>/.<prefix>lsr_state/`` and resumes an
interrupted run bit-identically. Peak memory is ``O(tile * W * n)``, whatever the raster
height. Inputs that offer ``fingerprint()`` (:class:`~epilsr.io.geotiff.RasterReader`,
:func:`array_reader`) are checked on resume; NaN/inf imagery or probabilities raise.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh
from jax.typing import ArrayLike

from epilsr import viz
from epilsr._validate import check_same_grid
from epilsr.data.chesapeake import LABEL_COLORS, LABEL_NAMES
from epilsr.io.geotiff import GeoInfo, RasterReader
from epilsr.io.strips import (
    OutputSpec,
    Reader,
    StripPlan,
    array_reader,
    check_window,
    label_outputs,
    raster_size,
    read_window,
    resolved,
    run_strips,
)
from epilsr.metrics import NODATA_LABEL
from epilsr.pipelines.batching import MAX_STRIPS, WindowBatches
from epilsr.self_epitomic import self_epitomic_lsr
from epilsr.windows import Window, blend_weights, tile_grid

__all__ = [
    "RasterRun",
    "array_reader",
    "lsr_raster",
    "write_preview",
]


class RasterRun(NamedTuple):
    """What :func:`lsr_raster` wrote and did."""

    labels: Path  # [H, W] uint8 argmax labels, NODATA_LABEL where no data
    probs: Path | None  # [H, W, n] probabilities (NaN where no data)
    entropy: Path | None  # [H, W] float32 entropy in nats (NaN where no data)
    preview: Path | None  # PNG
    windows: int  # windows in the grid (of the band with strips=)
    computed: int  # windows run in this call
    skipped: int  # all-no-data windows (over the whole run)
    resumed_from: int  # windows already done when this call started
    seconds: float  # wall time of this call


@functools.lru_cache(maxsize=8)
def _jitted_lsr(items: tuple) -> Callable:
    return jax.jit(functools.partial(self_epitomic_lsr, **dict(items)))


def _lsr_fn(lsr_kwargs: Mapping[str, Any]) -> Callable:
    items = tuple(sorted(lsr_kwargs.items()))
    try:
        hash(items)
    except TypeError:  # e.g. an array-valued concentration: compile per call
        return jax.jit(functools.partial(self_epitomic_lsr, **lsr_kwargs))
    return _jitted_lsr(items)


def _default_palette(n: int) -> tuple[list[str], np.ndarray]:
    if n == 4:
        return list(LABEL_NAMES), LABEL_COLORS
    base = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40],
                     [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127],
                     [188, 189, 34], [23, 190, 207]], np.uint8)
    return [f"label {i}" for i in range(n)], base[np.arange(n) % len(base)]


def _check_table(label_given_class: ArrayLike) -> np.ndarray:
    table = np.asarray(label_given_class, np.float32)
    if table.ndim != 2 or not np.all(np.isfinite(table)) or np.any(table < 0):
        raise ValueError(f"label_given_class: expected a finite non-negative [Cc, n] table, "
                         f"got shape {table.shape}")
    if table.shape[1] > NODATA_LABEL:
        raise ValueError(f"label_given_class: at most {NODATA_LABEL} labels fit the uint8 label "
                         f"raster (255 = no data), got {table.shape[1]}")
    return table


class _Classes(NamedTuple):
    """The coarse classes of a window, checked, with the no-data class appended."""

    reader: Reader
    valid_reader: Reader | None
    table: np.ndarray  # [Cc, n]
    nodata_values: np.ndarray
    use_nodata: bool

    def window(self, win: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """``(classes [th, tw] int32, table [Cc(+1), n], valid [th, tw] | None)``; None when
        the window holds no valid pixel. No-data pixels get an extra class whose composition is
        the window's pixel-weighted mean of the valid classes' compositions (neutral)."""
        table, n_classes = self.table, self.table.shape[0]
        cls = np.asarray(self.reader(*win))
        if cls.shape != (win.height, win.width):
            raise ValueError(f"classes_reader: window {win} gave shape {cls.shape}")
        if not np.issubdtype(cls.dtype, np.integer):
            raise ValueError(f"classes_reader: expected integer classes, got {cls.dtype}")
        valid = None
        if self.use_nodata:
            valid = ~np.isin(cls, self.nodata_values)
            if self.valid_reader is not None:
                valid &= np.asarray(self.valid_reader(*win), bool)
            if not valid.any():
                return None
        bad = (cls < 0) | (cls >= n_classes)
        if valid is not None:
            bad &= valid
        if bad.any():
            raise ValueError(f"classes_reader: window {win} has class values "
                             f"{np.unique(cls[bad])[:8].tolist()} outside [0, {n_classes}) that "
                             "are not nodata_class")
        used = np.unique(cls if valid is None else cls[valid])
        empty = used[table[used].sum(axis=1) <= 0]
        if empty.size:
            raise ValueError(f"label_given_class: rows {empty.tolist()} sum to zero but those "
                             f"classes occur in window {win}")
        if valid is None:
            return cls.astype(np.int32), table, None
        counts = np.bincount(cls[valid], minlength=n_classes)[:n_classes]
        neutral = counts @ (table / np.maximum(table.sum(1, keepdims=True), 1e-30))
        neutral = neutral / neutral.sum() if neutral.sum() > 0 else np.full(
            table.shape[1], 1.0 / table.shape[1])
        tab = np.concatenate([table, neutral[None].astype(np.float32)])
        return np.where(valid, cls, n_classes).astype(np.int32), tab, valid


@functools.lru_cache(maxsize=8)
def _window_fn(fn: Callable) -> Callable:
    """``(key, i, image, classes, table) -> fn(fold_in(key, i), image, classes, table)``."""
    return lambda key, i, img, cls, tab: fn(jax.random.fold_in(key, i), img, cls, tab)


def _lsr_strips(key, batches: WindowBatches, image_reader: Reader, classes: _Classes,
                windows: list[Window], overlap: int, height: int, width: int):
    """The strip plan, ``read_strip``, ``compute_strips`` and ``add_strip`` of
    :func:`epilsr.io.strips.run_strips`.

    ``read_strip`` (reader thread) reads and aligns a strip's windows; ``compute_strips`` runs
    the windows of a group of strips in batched calls (windows with equal table shapes
    together, across strips) and returns per strip ``[(i, window, aligned, probs | None)]``;
    ``add_strip`` adds one strip's results in window order.
    """
    th, tw = windows[0].height, windows[0].width
    weights = blend_weights((th, tw), overlap)
    row_starts = tuple(sorted({w.row for w in windows}))
    strips = [[(i, w) for i, w in enumerate(windows) if w.row == r] for r in row_starts]

    def read_strip(s):
        out = []
        for i, win in strips[s]:
            got = classes.window(win)
            img = None
            if got is not None:
                img = read_window("image_reader", image_reader, *win)
                if img.shape[:2] != (th, tw) or img.ndim != 3:
                    raise ValueError(f"image_reader: window {win} gave shape {img.shape}, "
                                     f"expected ({th}, {tw}, C)")
            out.append((i, win, got, img))
        return out

    def compute_strips(items):
        """Dispatches the group's batched calls; returns ``result()`` (see ``run_strips``)."""
        groups: dict[tuple, list] = {}  # windows by table shape: one batched program each
        for _, inputs in items:
            for i, _, got, img in inputs:
                if got is not None:
                    groups.setdefault(got[1].shape, []).append((np.int32(i), img, got[0],
                                                                 got[1]))
        pending = [(group, batches.dispatch((key,), group)) for group in groups.values()]

        def result():
            probs = {}
            for group, got_probs in pending:
                for w, p in zip(group, got_probs(), strict=True):
                    probs[int(w[0])] = p
            return [[(i, win, got, probs.get(i)) for i, win, got, _ in inputs]
                    for _, inputs in items]

        return result

    def add_strip(s, acc, wsum, tick, results):
        computed = 0
        for _, win, got, p in results:  # accumulation in window order, as unbatched
            if got is not None:
                p = check_window("lsr_raster", win, p).astype(np.float32)
                wgt = weights if got[2] is None else weights * got[2]
                acc[:, win.col : win.col + tw] += p * wgt[..., None]
                wsum[:, win.col : win.col + tw] += wgt
                computed += 1
            tick()
        n = len(results)
        return {"windows_done": n, "skipped": n - computed, "computed": computed}

    plan = StripPlan(height, width, classes.table.shape[1], row_starts, th)
    return plan, read_strip, compute_strips, add_strip


def _example_window(image_reader: Reader, classes: _Classes, th: int, tw: int) -> tuple:
    """Shapes of one LSR window's arguments (for the budget's batch size): one pixel read."""
    px = read_window("image_reader", image_reader, 0, 0, 1, 1)
    channels = px.shape[-1] if px.ndim == 3 else 1
    rows = classes.table.shape[0] + int(classes.use_nodata)  # the no-data class, if any
    return (jax.ShapeDtypeStruct((), np.int32),
            jax.ShapeDtypeStruct((th, tw, channels), px.dtype),
            jax.ShapeDtypeStruct((th, tw), np.int32),
            jax.ShapeDtypeStruct((rows, classes.table.shape[1]), np.float32))


def _also_ticking(add_strip: Callable, on_window: Callable[[], Any]) -> Callable:
    """``add_strip`` whose per-window tick also calls ``on_window()``."""

    def add(s, acc, wsum, tick, *results):
        def both():
            tick()
            on_window()

        return add_strip(s, acc, wsum, both, *results)

    return add


def _band(plan: StripPlan, read_strip: Callable, compute_strips: Callable, add_strip: Callable,
          strips: tuple[int, int]) -> tuple[StripPlan, Callable, Callable, Callable | None]:
    """The band of strips ``a .. b - 1`` of ``plan``: its plan (rows from ``R_a``), reader and
    adder with global strip numbers, and the carry rebuilt from the strips above that reach
    row ``R_a`` (their rows dropped; None when there are none)."""
    n = len(plan.row_starts)
    a, b = (int(v) for v in strips)
    if not 0 <= a < b <= n:
        raise ValueError(f"lsr_raster: strips must be (a, b) with 0 <= a < b <= {n} (the "
                         f"strip count), got {strips}")
    r0 = plan.row_starts[a]
    r1 = plan.row_starts[b] if b < n else plan.height
    band = plan._replace(height=r1 - r0,
                         row_starts=tuple(r - r0 for r in plan.row_starts[a:b]))
    warm = [s for s in range(a) if plan.row_starts[s] + plan.buffer_rows > r0]

    def initial_carry():
        acc = np.zeros((plan.buffer_rows, plan.width, plan.n_labels), np.float32)
        wsum = np.zeros((plan.buffer_rows, plan.width), np.float32)
        results = resolved(compute_strips([(s, read_strip(s)) for s in warm]))
        for s, res in zip(warm, results, strict=True):  # as run_strips: add, shift rows out
            add_strip(s, acc, wsum, lambda: None, res)
            rows = plan.finished_rows(s)
            acc[:-rows], wsum[:-rows] = acc[rows:].copy(), wsum[rows:].copy()
            acc[-rows:], wsum[-rows:] = 0.0, 0.0
        return acc, wsum

    return (band, lambda s: read_strip(a + s),
            lambda s, acc, wsum, tick, inputs: add_strip(a + s, acc, wsum, tick, inputs),
            initial_carry if warm else None)


def _preview(path: Path, outputs: Mapping[str, OutputSpec], image_reader: Reader, *,
             height: int, width: int, n_labels: int, max_size: int,
             label_names: Sequence[str], label_colors: np.ndarray) -> None:
    # one pass over each raster: a decoded-segment cache would only grow with the raster
    with RasterReader(outputs["labels"].path, cache_bytes=0) as lab:
        ent = (RasterReader(outputs["entropy"].path, cache_bytes=0) if "entropy" in outputs
               else None)
        try:
            write_preview(path, lab, height=height, width=width, image_reader=image_reader,
                          entropy_reader=ent, label_names=label_names,
                          label_colors=label_colors, max_size=max_size, n_labels=n_labels)
        finally:
            if ent is not None:
                ent.close()


def _outputs(out_dir: Path, prefix: str, n_labels: int, image_reader: Reader, height: int,
             width: int, *, write_probs: bool, write_entropy: bool, probs_dtype: Any,
             preview: int | None, label_names: Sequence[str] | None,
             label_colors: ArrayLike | None) -> tuple[dict, Path | None, Callable | None]:
    """The output rasters of :func:`lsr_raster` (labels, optional probabilities and entropy,
    named and coloured: the Chesapeake palette for 4 labels by default), the preview's path
    (None without one) and ``finish()`` that draws it once the rasters are closed."""
    names, colors = _default_palette(n_labels)
    names = names if label_names is None else list(label_names)
    colors = colors if label_colors is None else np.asarray(label_colors, np.uint8)
    outputs = label_outputs(out_dir, prefix, n_labels, probs=write_probs, entropy=write_entropy,
                            probs_dtype=probs_dtype, label_names=names, label_colors=colors)
    preview_path = out_dir / f"{prefix}preview.png" if preview else None
    finish = None if preview_path is None else functools.partial(
        _preview, preview_path, outputs, image_reader, height=height, width=width,
        n_labels=n_labels, max_size=preview, label_names=names, label_colors=colors)
    return outputs, preview_path, finish


def lsr_raster(
    key: ArrayLike,
    image_reader: Reader,
    classes_reader: Reader,
    label_given_class: ArrayLike,
    *,
    out_dir: str | os.PathLike,
    height: int | None = None,
    width: int | None = None,
    tile: int = 512,
    overlap: int = 64,
    lsr_kwargs: Mapping[str, Any] | None = None,
    geo: GeoInfo | None = None,
    nodata_class: int | Sequence[int] | None = None,
    valid_reader: Reader | None = None,
    write_probs: bool = False,
    probs_dtype: Any = np.float32,
    write_entropy: bool = True,
    compression: str | None = "deflate",
    prefix: str = "",
    preview: int | None = 1024,
    label_names: Sequence[str] | None = None,
    label_colors: ArrayLike | None = None,
    progress: bool = True,
    on_window: Callable[[], Any] | None = None,
    resume: bool = True,
    window_batch: int | None = None,
    memory_budget: int | None = None,
    mesh: Mesh | None = None,
    window_lanes: int = 1,
    strips: tuple[int, int] | None = None,
    strips_per_call: int | None = None,
) -> RasterRun:
    """Self-epitomic LSR (Sec. 5.1) over a raster of any size, tile by tile (see module doc).

    Args:
      key: PRNG key; window ``i`` of :func:`tile_grid` uses ``jax.random.fold_in(key, i)``.
      image_reader: ``(row, col, h, w) -> [h, w, C]`` finite imagery (e.g. a
        :class:`~epilsr.io.geotiff.RasterReader` or :func:`array_reader`).
      classes_reader: ``(row, col, h, w) -> [h, w]`` int coarse class indices (rows of
        ``label_given_class``; ``nodata_class`` values allowed).
      label_given_class: ``[Cc, n]`` ``p(l | c)``.
      out_dir: folder for ``<prefix>labels.tif``, ``<prefix>probs.tif``,
        ``<prefix>entropy.tif``, ``<prefix>preview.png`` and the resume state.
      height, width: raster size; default ``image_reader.shape[:2]``.
      tile, overlap: window side and overlap (:func:`tile_grid`, :func:`blend_weights`).
      lsr_kwargs: keyword arguments of :func:`epilsr.self_epitomic_lsr` (``patch_size``,
        ``downsample``, ...); the function is jitted once per window shape.
      geo: georeferencing copied to the outputs; default ``image_reader.geo`` if present.
      nodata_class: class value(s) meaning "no data". Windows with no valid pixel are skipped;
        in other windows, no-data pixels get an extra class whose composition is the window's
        pixel-weighted mean of the valid classes' compositions (a neutral constraint). Their
        outputs are no data: label 255, probabilities and entropy NaN.
      valid_reader: optional ``(row, col, h, w) -> [h, w]`` bool, False = no data (e.g. imagery
        no-data); combined with ``nodata_class``.
      write_probs: also write ``[H, W, n]`` probabilities of dtype ``probs_dtype``.
      write_entropy: also write the per-pixel entropy (nats), an uncertainty map.
      compression: ``"deflate"``, ``"lzw"`` or ``None``.
      prefix: file name prefix (several runs in one folder).
      preview: longest side of the PNG preview (imagery | labels | entropy, with a legend);
        ``None`` = no preview.
      label_names, label_colors: legend of the preview, label names and colour table of the
        label raster, band names of the probabilities; default the Chesapeake 4 classes when
        ``n == 4``.
      progress: tqdm bar over windows.
      on_window: called once per window computed or skipped by this call (not for windows
        done before a resume), e.g. to tick one bar shared by several rasters.
      resume: continue from the last checkpoint of an interrupted run with the same settings
        and unchanged inputs (or return at once when that run completed); ``False`` starts
        over. Other settings or a changed input raise ``ValueError``.
      window_batch, memory_budget, mesh: the windows run in batched calls
        (:class:`~epilsr.pipelines.batching.WindowBatches`), ``window_batch`` per call (None =
        one per device on CPU unless ``memory_budget`` is given, else as many as fit
        ``memory_budget`` bytes per device, at most
        :data:`~epilsr.pipelines.batching.MAX_STRIPS` strips), the window axis sharded over
        ``mesh`` (default: the local devices). The outputs do not depend on these.
      strips_per_call: the windows of this many consecutive strips are computed together
        (the reader runs as far ahead; see :func:`~epilsr.io.strips.run_strips`); None =
        :meth:`~epilsr.pipelines.batching.WindowBatches.strips_per_call`: the strips that fill
        one call, so 1 on CPU (one window per device per call) and several on an accelerator
        when a strip is less than the memory budget's batch. The outputs do not depend on it.
      window_lanes: windows vmapped together per step on a device (accelerators); 1 keeps the
        outputs bit-identical to unbatched calls, more changes them by float32 rounding only.
      strips: ``(a, b)``: only the band of window strips ``a .. b - 1`` (one process's share,
        :func:`epilsr.pipelines.raster_bands.split_strips`): raster rows ``R_a .. R_b - 1``
        (to ``H`` when ``b`` is the strip count) are written, with ``geo`` shifted by ``R_a``
        rows; the strips above that overlap row ``R_a`` are computed first, unwritten, to
        rebuild the carry. Global window indices, so the bands equal the rows of a
        single-process run exactly. No preview. ``None`` = the whole raster.

    Windows are read and aligned in a reader thread ahead of the compute; normalising,
    compression and writing run in a writer thread behind it (:func:`run_strips`).

    Returns:
      :class:`RasterRun`.
    """
    t_start = time.perf_counter()
    height, width = raster_size(image_reader, height, width, "lsr_raster")
    for name, reader in (("classes_reader", classes_reader), ("valid_reader", valid_reader)):
        check_same_grid(name, getattr(reader, "shape", None), height, width, "image_reader")
    geo = geo if geo is not None else getattr(image_reader, "geo", None) or GeoInfo()
    table = _check_table(label_given_class)
    nodata_values = np.atleast_1d(np.asarray([] if nodata_class is None else nodata_class))
    classes = _Classes(classes_reader, valid_reader, table, nodata_values,
                       nodata_class is not None or valid_reader is not None)
    lsr_kwargs = dict(lsr_kwargs or {})
    windows = tile_grid(height, width, tile=tile, overlap=overlap)
    per_strip = max(sum(1 for w in windows if w.row == windows[0].row), 1)
    batches = WindowBatches(_window_fn(_lsr_fn(lsr_kwargs)), mesh=mesh,
                            window_batch=window_batch, memory_budget=memory_budget,
                            max_batch=per_strip * MAX_STRIPS, lanes=window_lanes)
    plan, read_strip, compute_strips, add_strip = _lsr_strips(
        key, batches, image_reader, classes, windows, overlap, height, width)
    if strips_per_call is None:
        example = None if batches.fixed is not None else _example_window(
            image_reader, classes, windows[0].height, windows[0].width)
        strips_per_call = batches.strips_per_call((key,), example, per_strip)
    initial_carry, n_windows = None, len(windows)
    if strips is not None:
        row0 = plan.row_starts[strips[0]] if 0 <= strips[0] < len(plan.row_starts) else 0
        plan, read_strip, add_strip, initial_carry = _band(plan, read_strip, compute_strips,
                                                           add_strip, strips)
        geo, preview, n_windows = geo.window(row0, 0), None, per_strip * len(plan.row_starts)
    if on_window is not None:
        add_strip = _also_ticking(add_strip, on_window)
    out_dir = Path(out_dir)
    outputs, preview_path, finish = _outputs(
        out_dir, prefix, table.shape[1], image_reader, height, width, write_probs=write_probs,
        write_entropy=write_entropy, probs_dtype=probs_dtype, preview=preview,
        label_names=label_names, label_colors=label_colors)
    settings = dict(height=height, width=width, tile=tile, overlap=overlap, lsr=lsr_kwargs,
                    key=np.asarray(jax.random.key_data(key)), table=table,
                    nodata=nodata_values, valid=valid_reader is not None, compression=compression)
    if strips is not None:  # only then: the fingerprint of a whole-raster run is unchanged
        settings["strips"] = [int(strips[0]), int(strips[1])]
    run = run_strips(
        plan, add_strip, who="lsr_raster", outputs=outputs, state_dir=out_dir /
        f".{prefix}lsr_state", settings=settings, geo=geo, compression=compression,
        inputs={"image_reader": image_reader, "classes_reader": classes_reader,
                "valid_reader": valid_reader},
        resume=resume, progress=progress, total=n_windows, progress_key="windows_done",
        finish=finish, read_strip=read_strip, initial_carry=initial_carry,
        compute_strips=compute_strips, strips_per_call=strips_per_call)
    done, before = run.counts, run.resumed
    return RasterRun(
        outputs["labels"].path, outputs["probs"].path if write_probs else None,
        outputs["entropy"].path if write_entropy else None,
        preview_path if preview_path is not None and preview_path.exists() else None,
        n_windows, done.get("computed", 0) - before.get("computed", 0),
        done.get("skipped", 0), before.get("windows_done", 0), time.perf_counter() - t_start)


# --------------------------------------------------------------------------------------------
# Preview


def _sampled_rows(reader: Reader, height: int, width: int, step: int) -> np.ndarray:
    """Every ``step``-th row and column of a raster, read in blocks of ~256 rows."""
    block = step * max(1, round(256 / step))
    out = []
    for r in range(0, height, block):
        h = min(block, height - r)
        out.append(np.asarray(reader(r, 0, h, width))[::step, ::step].copy())  # drop the block
    return np.concatenate(out)


def write_preview(
    path: str | os.PathLike,
    labels_reader: Reader,
    *,
    height: int,
    width: int,
    label_names: Sequence[str],
    label_colors: ArrayLike,
    image_reader: Reader | None = None,
    entropy_reader: Reader | None = None,
    max_size: int = 1024,
    n_labels: int | None = None,
) -> Path:
    """PNG panel ``imagery | labels | entropy`` (those given) with a legend, nearest-neighbour
    downsampled so the longest side is at most ``max_size``; read in row blocks (bounded memory).
    """
    step = max(1, math.ceil(max(height, width) / max_size))
    tiles, titles = [], []
    if image_reader is not None:
        tiles.append(viz.rgb_preview(_sampled_rows(image_reader, height, width, step)))
        titles.append("imagery")
    labels = _sampled_rows(labels_reader, height, width, step)
    tiles.append(viz.colorize(labels, label_colors, ignore=NODATA_LABEL))
    titles.append(f"labels (1:{step})" if step > 1 else "labels")
    if entropy_reader is not None:
        ent = _sampled_rows(entropy_reader, height, width, step).astype(np.float32)
        scale = math.log(n_labels or len(label_names))
        grey = np.clip(np.nan_to_num(ent / scale, nan=0.0), 0, 1)
        tiles.append(np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1))
        titles.append("entropy")
    colors = np.asarray(label_colors, np.uint8)
    legend = [(name, tuple(int(c) for c in colors[i])) for i, name in enumerate(label_names)]
    legend.append(("no data", (0, 0, 0)))
    viz.save_png(path, viz.panel(tiles, titles, legend=legend))
    return Path(path)
