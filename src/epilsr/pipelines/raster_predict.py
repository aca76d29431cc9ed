"""Epitomes as segmentation models over datasets and rasters (paper Secs. 2 and 5.1).

* **High-resolution label embedding** (Eq. 6): :func:`embed_label_maps` samples ``K x K``
  patches (31 in the paper) of a stack of tiles with their label maps and adds the centre
  ``Kl x Kl`` (11) label block of every patch, weighted by the posterior, into counts
  ``z [L, N1, N2, n]``; :func:`label_probs_from_counts` turns counts into ``p(l | m, n)``.
* **Low-resolution embedding** (Eq. 11): :func:`embed_class_maps` does the same with the class
  of each patch's centre pixel; ``super_resolve`` (Eqs. 8-9) then gives ``p(l | m, n)`` without
  any high-resolution label (:func:`all_tile_lsr`, "all-tile epitomic LSR").
* **Dense prediction over rasters** (Eq. 2): :func:`predict_raster` runs
  :func:`epilsr.predict`'s window sums tile by tile and writes finished rows as it goes.

Both embeddings are sums over patches, so a dataset is embedded batch by batch
(:func:`accumulate_labels`, :func:`accumulate_classes`: ``counts + embedding(batch)``); with a
``mesh`` the batch is sharded over the mesh axis ``"data"``, each device counts its own share
with any correlation route (``jax.shard_map``) and one ``psum`` adds them
(:func:`epilsr.embed.make_accumulate_step`). Batch ``i`` is drawn with
``jax.random.fold_in(key, i)``, so the counts do not depend on how many batches are run per
call. No-data labels/classes (``ignore``) contribute nothing: their one-hot rows are zero.

**Exact tiling.** Tiled prediction partitions the *windows* of the raster's stride grid
(not its pixels) among tiles: each window is evaluated once, in the tile that owns its
top-left corner, and its contributions (sums and counts) are added into a strip buffer. The
result equals :func:`epilsr.predict` on the whole raster up to float32 summation order, for
every stride; memory is one strip of ``tile + K`` rows plus one posterior chunk. The strips run
through :mod:`epilsr.io.strips` (:func:`predict_raster_files`: checkpointed and resumable).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh
from jax.typing import ArrayLike

from epilsr.correlate import resolve_route
from epilsr.epitome import Epitome, as_float_image
from epilsr.io.geotiff import RasterWriter
from epilsr.io.strips import (
    Reader,
    StripPlan,
    array_digest,
    array_reader,
    check_window,
    iter_strips,
    label_outputs,
    raster_size,
    read_window,
    run_strips,
    write_outputs,
)
from epilsr.pipelines.batching import MAX_STRIPS, WindowBatches
from epilsr.predict import check_predict_inputs, window_sums
from epilsr.windows import grid_starts, tile_grid

__all__ = [
    "predict_raster",
    "RasterPrediction",
    "predict_raster_files",
    "RasterFiles",
    "raster_row_writer",
]


class RasterPrediction(NamedTuple):
    """What :func:`predict_raster` did."""

    probs: np.ndarray | None  # [H, W, n] when no ``on_rows`` was given
    tiles: int  # tiles evaluated
    windows: int  # K x K windows evaluated (each once)


@functools.lru_cache(maxsize=16)
def _jitted_sums(static: tuple) -> Callable:
    return jax.jit(functools.partial(window_sums, **dict(static)))


def _reflect_read(reader, height, width, margin, row, col, h, w) -> np.ndarray:
    """Rows ``row..row+h`` / cols of the raster reflect-padded by ``margin`` (padded coords)."""
    r0, c0 = row - margin, col - margin  # raster coordinates
    a0, a1 = max(r0, 0), min(r0 + h, height)
    b0, b1 = max(c0, 0), min(c0 + w, width)
    block = read_window("image_reader", reader, a0, b0, a1 - a0, b1 - b0)
    pad = ((a0 - r0, r0 + h - a1), (b0 - c0, c0 + w - b1), (0, 0))
    return np.pad(block, pad, mode="reflect") if any(sum(p) for p in pad) else block


def _owned(grid: np.ndarray, starts: list[int], i: int) -> np.ndarray:
    """Window corners of ``grid`` owned by tile ``i`` of ``starts``, relative to its start."""
    lo = starts[i]
    hi = starts[i + 1] if i + 1 < len(starts) else grid[-1] + 1
    return grid[(grid >= lo) & (grid < hi)] - lo


@functools.lru_cache(maxsize=16)
def _tile_fn(fn: Callable, temperature: Any, mask: Any) -> Callable:
    """``(epitome, label_probs, block, starts, weights) -> (sums, counts)`` of one tile (one
    object per setting, so compiled batches are shared across rasters)."""
    return lambda epi, lp, block, st, wt: fn(epi, lp, block, st, wt, temperature=temperature,
                                             mask=mask)


class _Predictor(NamedTuple):
    plan: StripPlan
    add_strip: Callable  # run_strips' add_strip
    read_strip: Callable  # run_strips' read_strip (reader thread)
    compute_strips: Callable  # run_strips' compute_strips (a group of strips' tiles at once)
    strips_per_call: int
    n_tiles: int
    image_reader: Reader


def _predictor(epitome, label_probs, image_reader, *, patch_size, temperature, stride,
               label_size, tile, height, width, mask, chunk, route, window_batch=None,
               memory_budget=None, mesh=None, window_lanes=1,
               strips_per_call=None) -> _Predictor:
    """Validated inputs, the tile grid and the strip function (Eq. 2, exact)."""
    if not callable(image_reader):
        image_reader = array_reader(image_reader)
    height, width = raster_size(image_reader, height, width, "predict_raster")
    shape = tuple(getattr(image_reader, "shape", ()) or ())
    channels = shape[2] if len(shape) == 3 else (1 if len(shape) == 2 else epitome.channels)
    k = int(patch_size)
    label_probs, kl, o = check_predict_inputs(
        epitome, label_probs, image_shape=(height, width, channels), patch_size=k,
        label_size=label_size, stride=stride,
    )
    if int(tile) != tile or tile < 1:
        raise ValueError(f"tile: expected a positive integer, got {tile}")
    rows_g = np.asarray(grid_starts(height, kl, stride))
    cols_g = np.asarray(grid_starts(width, kl, stride))
    # tiles of the corner space [0, H - Kl] x [0, W - Kl]
    wins = tile_grid(height - kl + 1, width - kl + 1, tile=int(tile), overlap=0)
    th, tw = wins[0].height, wins[0].width
    strip_rows = sorted({w.row for w in wins})
    col_starts = sorted({w.col for w in wins})
    p_max = max(len(_owned(rows_g, strip_rows, i)) for i in range(len(strip_rows))) * max(
        len(_owned(cols_g, col_starts, j)) for j in range(len(col_starts)))
    n_chunks = -(-p_max // max(1, int(chunk)))
    chunk = -(-p_max // n_chunks)  # equal chunks: at most n_chunks - 1 padded windows
    fn = _jitted_sums((("patch_size", k), ("label_size", label_size), ("chunk", chunk),
                       ("route", route)))
    img_h, img_w = th + k - 1, tw + k - 1  # tile image window (padded coordinates)
    out_h, out_w = th + kl - 1, tw + kl - 1  # raster rows / cols touched by one tile

    try:
        per_tile = _tile_fn(fn, temperature, mask)
    except TypeError:  # an array temperature or mask: this call's own function
        per_tile = _tile_fn.__wrapped__(fn, temperature, mask)
    per_strip = len(col_starts)
    batches = WindowBatches(per_tile, mesh=mesh, window_batch=window_batch,
                            memory_budget=memory_budget, max_batch=per_strip * MAX_STRIPS,
                            lanes=window_lanes)
    if strips_per_call is None:  # the strips that fill one call (1 on CPU)
        example = (jax.ShapeDtypeStruct((img_h, img_w, epitome.channels), np.float32),
                   jax.ShapeDtypeStruct((n_chunks * chunk, 2), np.int32),
                   jax.ShapeDtypeStruct((n_chunks * chunk,), np.float32))
        strips_per_call = batches.strips_per_call((epitome, label_probs), example, per_strip)

    def read_strip(si):
        """The strip's tiles: image blocks (float32) and padded window corners."""
        r0, rs = strip_rows[si], _owned(rows_g, strip_rows, si)
        tiles = []
        for cj, c0 in enumerate(col_starts):
            rr, cc = np.meshgrid(rs, _owned(cols_g, col_starts, cj), indexing="ij")
            st = np.zeros((n_chunks * chunk, 2), np.int32)
            wt = np.zeros((n_chunks * chunk,), np.float32)
            m = rr.size
            st[:m, 0], st[:m, 1], wt[:m] = rr.ravel(), cc.ravel(), 1.0
            block = _reflect_read(image_reader, height, width, o, r0, c0, img_h, img_w)
            if block.ndim != 3 or block.shape[:2] != (img_h, img_w):
                raise ValueError(f"image_reader: window ({r0}, {c0}) gave shape "
                                 f"{block.shape}, expected ({img_h}, {img_w}, C)")
            if block.shape[-1] != epitome.channels:
                raise ValueError(f"image: expected {epitome.channels} channels to match "
                                 f"the epitome, got {block.shape[-1]}")
            tiles.append((c0, m, np.asarray(as_float_image(block)), st, wt))
        return tiles

    def compute_strips(items):
        """The tiles of a group of strips in batched calls, dispatched; ``result()`` gives per
        strip ``[(c0, m, sums, counts)]`` (the image blocks dropped)."""
        flat = [t for _, tiles in items for t in tiles]
        pending = batches.dispatch((epitome, label_probs), [t[2:] for t in flat])

        def result():
            sums = iter(pending())
            return [[(t[0], t[1], *next(sums)) for t in tiles] for _, tiles in items]

        return result

    def add_strip(si, acc, cnt, tick, results):
        r0 = strip_rows[si]
        for c0, _, a, c in results:  # in tile order
            a = check_window("predict_raster", (r0, c0, th, tw), a[o : o + out_h, o : o + out_w])
            acc[:, c0 : c0 + out_w] += a
            cnt[:, c0 : c0 + out_w] += c[o : o + out_h, o : o + out_w]
            tick()
        return {"tiles": len(col_starts), "windows": sum(r[1] for r in results)}

    plan = StripPlan(height, width, label_probs.shape[-1], tuple(strip_rows), out_h)
    return _Predictor(plan, add_strip, read_strip, compute_strips, int(strips_per_call),
                      len(wins), image_reader)


def predict_raster(
    epitome: Epitome,
    label_probs: ArrayLike,
    image_reader: Callable[[int, int, int, int], ArrayLike] | ArrayLike,
    *,
    patch_size: int,
    temperature: float,
    stride: int = 1,
    label_size: int | None = None,
    tile: int = 256,
    height: int | None = None,
    width: int | None = None,
    on_rows: Callable[[int, np.ndarray], None] | None = None,
    mask: ArrayLike | None = None,
    chunk: int = 64,
    route: str = "auto",
    method: str | None = None,
    progress: bool = False,
    window_batch: int | None = None,
    memory_budget: int | None = None,
    mesh: Mesh | None = None,
    window_lanes: int = 1,
    strips_per_call: int | None = None,
) -> RasterPrediction:
    """Dense Eq. 2 over a raster of any size, tile by tile (exact; see module doc).

    Equals :func:`epilsr.predict` with the same ``patch_size``, ``stride``, ``label_size`` on
    the whole raster. Window corners (block corners with ``label_size``) lie on the global grid
    :func:`epilsr.windows.grid_starts`; :func:`epilsr.windows.tile_grid` splits that grid into
    ``tile x tile`` pieces and each piece's windows are evaluated on an image window of
    ``tile + K - 1`` pixels. Finished rows are passed to ``on_rows(row0, probs [r, W, n])`` in
    order (e.g. :func:`raster_row_writer`), else collected and returned.

    Args:
      epitome: :class:`Epitome`; label_probs: ``[L, N1, N2, n]``.
      image_reader: ``(row, col, h, w) -> [h, w, C]`` (e.g. a
        :class:`~epilsr.io.geotiff.RasterReader`) or an ``[H, W, C]`` array; finite values.
      patch_size, temperature, stride, label_size, mask, chunk, route (``method``: its
        deprecated alias): as in
        :func:`epilsr.predict` (``chunk`` bounds memory to ``chunk * L * N1 * N2`` floats).
      tile: side of a tile of window corners (one jit compilation for all tiles).
      height, width: raster size (default ``image_reader.shape``).
      on_rows: row sink; None = return the ``[H, W, n]`` array.
      progress: tqdm bar over tiles.
      window_batch, memory_budget, mesh: the tiles run in batched calls
        (:class:`~epilsr.pipelines.batching.WindowBatches`), the tile axis sharded over
        ``mesh`` (default: the local devices); the result does not depend on them.
      strips_per_call: the tiles of this many consecutive strips are computed together (the
        reader runs as far ahead); None = the strips that fill one call
        (:meth:`~epilsr.pipelines.batching.WindowBatches.strips_per_call`): 1 on CPU (one tile
        per device per call), several on an accelerator when a strip is less than the memory
        budget's batch. The result does not depend on it.
      window_lanes: tiles vmapped together per step on a device (1 = bit-identical to
        unbatched calls; more: equal up to float32 rounding).

    Tiles are read in a reader thread ahead of the compute (:func:`iter_strips`).

    Returns:
      :class:`RasterPrediction`.
    """
    pred = _predictor(epitome, label_probs, image_reader, patch_size=patch_size,
                      temperature=temperature, stride=stride, label_size=label_size,
                      tile=tile, height=height, width=width, mask=mask, chunk=chunk,
                      route=resolve_route(route, method), window_batch=window_batch,
                      memory_budget=memory_budget, mesh=mesh, window_lanes=window_lanes,
                      strips_per_call=strips_per_call)
    plan, full, n_windows = pred.plan, None, 0
    if on_rows is None:
        full = np.zeros((plan.height, plan.width, plan.n_labels), np.float32)
    for row0, probs, _, counts in iter_strips(plan, pred.add_strip, progress=progress,
                                              total=pred.n_tiles, desc="predict_raster",
                                              read_strip=pred.read_strip,
                                              compute_strips=pred.compute_strips,
                                              strips_per_call=pred.strips_per_call):
        if full is not None:
            full[row0 : row0 + len(probs)] = probs
        else:
            on_rows(row0, probs)
        n_windows += counts["windows"]
    return RasterPrediction(full, pred.n_tiles, n_windows)


class RasterFiles(NamedTuple):
    """What :func:`predict_raster_files` wrote and did."""

    labels: Path  # [H, W] uint8 argmax, NODATA_LABEL where ``valid`` is False
    probs: Path | None  # [H, W, n] float32 (NaN where no data)
    entropy: Path | None  # [H, W] float32 nats (NaN where no data)
    tiles: int  # tiles in the grid
    windows: int  # K x K windows evaluated in this call
    resumed_from: int  # strips already done when this call started


def predict_raster_files(
    epitome: Epitome,
    label_probs: ArrayLike,
    image_reader: Callable[[int, int, int, int], ArrayLike] | ArrayLike,
    *,
    out_dir: str | os.PathLike,
    patch_size: int,
    temperature: float,
    stride: int = 1,
    label_size: int | None = None,
    tile: int = 256,
    height: int | None = None,
    width: int | None = None,
    geo: Any = None,
    prefix: str = "",
    probs: bool = False,
    entropy: bool = True,
    valid: Callable[[int, int, int, int], ArrayLike] | None = None,
    mask: ArrayLike | None = None,
    chunk: int = 64,
    route: str = "auto",
    method: str | None = None,
    resume: bool = True,
    progress: bool = False,
    window_batch: int | None = None,
    memory_budget: int | None = None,
    mesh: Mesh | None = None,
    window_lanes: int = 1,
    strips_per_call: int | None = None,
) -> RasterFiles:
    """:func:`predict_raster` into GeoTIFFs, checkpointed after every strip and resumable.

    Writes ``<prefix>labels.tif`` (and ``probs.tif`` / ``entropy.tif``) like
    :func:`raster_row_writer`, through :func:`epilsr.io.strips.run_strips`: after each strip
    of tiles the state in ``<out_dir>/.<prefix>predict_state/`` is made durable, and a rerun
    with ``resume=True`` continues from the last finished strip with an output equal to an
    uninterrupted run's; at most one strip of work is lost.

    Args:
      out_dir: output folder; geo: :class:`~epilsr.io.geotiff.GeoInfo` copied to the outputs;
        prefix, probs, entropy, valid: as for :func:`raster_row_writer`; resume: continue an
        interrupted run with the same settings (the epitome, label embedding and every
        setting are fingerprinted, and the image and ``valid`` readers when they offer
        ``fingerprint()``, as arrays and :class:`~epilsr.io.geotiff.RasterReader` s do);
        other settings or a changed input raise ``ValueError``; ``False`` starts over.
        Other arguments as for :func:`predict_raster`.
    """
    pred = _predictor(epitome, label_probs, image_reader, patch_size=patch_size,
                      temperature=temperature, stride=stride, label_size=label_size,
                      tile=tile, height=height, width=width, mask=mask, chunk=chunk,
                      route=resolve_route(route, method), window_batch=window_batch,
                      memory_budget=memory_budget, mesh=mesh, window_lanes=window_lanes,
                      strips_per_call=strips_per_call)
    out_dir = Path(out_dir)
    outputs = label_outputs(out_dir, prefix, pred.plan.n_labels, probs=probs, entropy=entropy)
    settings = dict(
        height=pred.plan.height, width=pred.plan.width, patch_size=int(patch_size),
        temperature=float(temperature), stride=int(stride), label_size=label_size,
        tile=int(tile), chunk=int(chunk), route=resolve_route(route, method),
        valid=valid is not None,
        model=array_digest(epitome.mean, epitome.log_var, epitome.prior_logits, label_probs,
                           np.zeros(0) if mask is None else mask),
    )
    run = run_strips(pred.plan, pred.add_strip, who="predict_raster_files", outputs=outputs,
                     state_dir=out_dir / f".{prefix}predict_state", settings=settings,
                     inputs={"image_reader": pred.image_reader, "valid": valid}, geo=geo,
                     valid=valid, resume=resume, progress=progress, total=pred.n_tiles,
                     progress_key="tiles", desc="predict_raster", read_strip=pred.read_strip,
                     compute_strips=pred.compute_strips, strips_per_call=pred.strips_per_call)
    return RasterFiles(outputs["labels"].path, outputs["probs"].path if probs else None,
                       outputs["entropy"].path if entropy else None, pred.n_tiles,
                       run.counts.get("windows", 0) - run.resumed.get("windows", 0),
                       run.first_strip)


def raster_row_writer(
    out_dir: str | os.PathLike,
    *,
    height: int,
    width: int,
    n_labels: int,
    geo: Any = None,
    prefix: str = "",
    probs: bool = False,
    entropy: bool = True,
    valid: Callable[[int, int, int, int], ArrayLike] | None = None,
) -> tuple[Callable[[int, np.ndarray], None], Callable[[], dict[str, Path]]]:
    """An ``on_rows`` sink writing GeoTIFFs with :class:`~epilsr.io.geotiff.RasterWriter`.

    Writes ``<prefix>labels.tif`` (uint8 argmax, :data:`epilsr.metrics.NODATA_LABEL` where
    ``valid`` is False), optionally ``<prefix>probs.tif`` (float32 ``[H, W, n]``) and
    ``<prefix>entropy.tif`` (nats). Returns ``(on_rows, close)``; ``close()`` finalises the
    files and returns their paths.
    """
    specs = label_outputs(Path(out_dir), prefix, n_labels, probs=probs, entropy=entropy)
    writers = {name: RasterWriter(s.path, height=height, width=width, dtype=s.dtype,
                                  bands=s.bands, geo=geo, nodata=s.nodata)
               for name, s in specs.items()}

    def on_rows(row0: int, p: np.ndarray) -> None:
        nodata = np.zeros(p.shape[:2], bool)
        if valid is not None:
            nodata = ~np.asarray(valid(row0, 0, p.shape[0], width), bool)
        write_outputs(writers, p, nodata)

    def close() -> dict[str, Path]:
        for w in writers.values():
            w.close()
        return {name: w.path for name, w in writers.items()}

    return on_rows, close
