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
``mesh`` the batch is sharded over the mesh axis ``"data"`` and the compiler inserts the
all-reduce (GSPMD, as for :func:`epilsr.make_sharded_train_step`). Batch ``i`` is drawn with
``jax.random.fold_in(key, i)``, so the counts do not depend on how many batches are run per
call. No-data labels/classes (``ignore``) contribute nothing: their one-hot rows are zero.

**Exact tiling.** Tiled prediction partitions the *windows* of the raster's stride grid
(not its pixels) among tiles: each window is evaluated once, in the tile that owns its
top-left corner, and its contributions (sums and counts) are added into a strip buffer. The
result equals :func:`epilsr.predict` on the whole raster up to float32 summation order, for
every stride; memory is one strip of ``tile + K`` rows plus one posterior chunk.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from epilsr._validate import check_finite
from epilsr.epitome import Epitome, as_float_image
from epilsr.metrics import NODATA_LABEL
from epilsr.predict import check_predict_inputs, grid_starts, window_sums
from epilsr.windows import tile_grid

__all__ = [
    "predict_raster",
    "RasterPrediction",
    "predict_raster_files",
    "RasterFiles",
    "raster_row_writer",
]

#: Label / class value of no-data pixels (skipped, never embedded).


# --------------------------------------------------------------------------- inputs


# --------------------------------------------------------------------------- accumulation


# --------------------------------------------------------------------------- rasters


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
    block = np.asarray(reader(a0, b0, a1 - a0, b1 - b0))
    pad = ((a0 - r0, r0 + h - a1), (b0 - c0, c0 + w - b1), (0, 0))
    return np.pad(block, pad, mode="reflect") if any(sum(p) for p in pad) else block


class _Strip(NamedTuple):
    """One finished strip of :func:`_PredictPlan.strips`: rows ``row0 ..`` are final."""

    row0: int
    probs: np.ndarray  # [r, W, n]
    next_strip: int
    acc: np.ndarray  # [keep, W, n] carry: sums already added to the rows below
    cnt: np.ndarray  # [keep, W]
    windows: int  # windows evaluated in this strip


class _PredictPlan(NamedTuple):
    height: int
    width: int
    n_labels: int
    n_strips: int
    n_tiles: int
    strips: Callable[..., Any]  # (first_strip, carry, bar) -> iterator of _Strip


def _predict_plan(epitome, label_probs, image_reader, *, patch_size, temperature, stride,
                  label_size, tile, height, width, mask, chunk, method) -> _PredictPlan:
    """Validated inputs, the tile grid and a generator over finished strips (Eq. 2, exact)."""
    if not callable(image_reader):
        from epilsr.pipelines.raster_lsr import array_reader

        image_reader = array_reader(image_reader)
    if height is None or width is None:
        shape = getattr(image_reader, "shape", None)
        if shape is None:
            raise ValueError("predict_raster: pass height= and width= (reader has no .shape)")
        height, width = int(shape[0]), int(shape[1])
    shape = tuple(getattr(image_reader, "shape", ()) or ())
    channels = shape[2] if len(shape) == 3 else (1 if len(shape) == 2 else epitome.channels)
    k = int(patch_size)
    label_probs, kl, o = check_predict_inputs(
        epitome, label_probs, image_shape=(height, width, channels), patch_size=k,
        label_size=label_size, stride=stride,
    )
    if int(tile) != tile or tile < 1:
        raise ValueError(f"tile: expected a positive integer, got {tile}")
    n = label_probs.shape[-1]
    rows_g = np.asarray(grid_starts(height, kl, stride))
    cols_g = np.asarray(grid_starts(width, kl, stride))
    # tiles of the corner space [0, H - Kl] x [0, W - Kl]
    wins = tile_grid(height - kl + 1, width - kl + 1, tile=int(tile), overlap=0)
    th, tw = wins[0].height, wins[0].width
    strip_rows = sorted({w.row for w in wins})
    col_starts = sorted({w.col for w in wins})

    def owned(grid, starts, i):
        lo = starts[i]
        hi = starts[i + 1] if i + 1 < len(starts) else grid[-1] + 1
        return grid[(grid >= lo) & (grid < hi)] - lo

    p_max = max(len(owned(rows_g, strip_rows, i)) for i in range(len(strip_rows))) * max(
        len(owned(cols_g, col_starts, j)) for j in range(len(col_starts)))
    n_chunks = -(-p_max // max(1, int(chunk)))
    chunk = -(-p_max // n_chunks)  # equal chunks: at most n_chunks - 1 padded windows
    p_pad = n_chunks * chunk
    static = (("patch_size", k), ("label_size", label_size), ("chunk", chunk),
              ("method", method))
    fn = _jitted_sums(static)
    img_h, img_w = th + k - 1, tw + k - 1  # tile image window (padded coordinates)
    out_h = th + kl - 1  # raster rows touched by one strip

    def strips(first_strip: int = 0, carry=None, bar=None):
        acc = np.zeros((out_h, width, n), np.float32)
        cnt = np.zeros((out_h, width), np.float32)
        if carry is not None:
            kc = carry[0].shape[0]
            acc[:kc], cnt[:kc] = carry
        for si in range(first_strip, len(strip_rows)):
            r0 = strip_rows[si]
            rs = owned(rows_g, strip_rows, si)
            n_windows = 0
            for cj, c0 in enumerate(col_starts):
                cs = owned(cols_g, col_starts, cj)
                rr, cc = np.meshgrid(rs, cs, indexing="ij")
                st = np.zeros((p_pad, 2), np.int32)
                wt = np.zeros((p_pad,), np.float32)
                m = rr.size
                st[:m, 0], st[:m, 1], wt[:m] = rr.ravel(), cc.ravel(), 1.0
                block = _reflect_read(image_reader, height, width, o, r0, c0, img_h, img_w)
                if block.ndim != 3 or block.shape[:2] != (img_h, img_w):
                    raise ValueError(f"image_reader: window ({r0}, {c0}) gave shape "
                                     f"{block.shape}, expected ({img_h}, {img_w}, C)")
                if block.shape[-1] != epitome.channels:
                    raise ValueError(f"image: expected {epitome.channels} channels to match "
                                     f"the epitome, got {block.shape[-1]}")
                image = as_float_image(block)
                check_finite("image", image)
                a, c = fn(epitome, label_probs, image, jnp.asarray(st),
                          jnp.asarray(wt), temperature=temperature, mask=mask)
                a = np.asarray(a)[o : o + out_h, o : o + tw + kl - 1]
                c = np.asarray(c)[o : o + out_h, o : o + tw + kl - 1]
                acc[:, c0 : c0 + tw + kl - 1] += a
                cnt[:, c0 : c0 + tw + kl - 1] += c
                n_windows += m
                if bar is not None:
                    bar.update(1)
            end = strip_rows[si + 1] if si + 1 < len(strip_rows) else height
            n_out = end - r0
            done = acc[:n_out] / np.maximum(cnt[:n_out], 1e-30)[..., None]
            keep = out_h - n_out if si + 1 < len(strip_rows) else 0
            acc[: out_h - n_out], cnt[: out_h - n_out] = acc[n_out:], cnt[n_out:]
            acc[out_h - n_out :], cnt[out_h - n_out :] = 0.0, 0.0
            yield _Strip(r0, done, si + 1, acc[:keep].copy(), cnt[:keep].copy(), n_windows)

    return _PredictPlan(height, width, n, len(strip_rows), len(wins), strips)


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
    method: str = "auto",
    progress: bool = False,
) -> RasterPrediction:
    """Dense Eq. 2 over a raster of any size, tile by tile (exact; see module doc).

    Equals :func:`epilsr.predict` with the same ``patch_size``, ``stride``, ``label_size`` on
    the whole raster. Window corners (block corners with ``label_size``) lie on the global grid
    :func:`epilsr.predict.grid_starts`; :func:`epilsr.windows.tile_grid` splits that grid into
    ``tile x tile`` pieces and each piece's windows are evaluated on an image window of
    ``tile + K - 1`` pixels. Finished rows are passed to ``on_rows(row0, probs [r, W, n])`` in
    order (e.g. :func:`raster_row_writer`), else collected and returned.

    Args:
      epitome: :class:`Epitome`; label_probs: ``[L, N1, N2, n]``.
      image_reader: ``(row, col, h, w) -> [h, w, C]`` (e.g. a
        :class:`~epilsr.io.geotiff.RasterReader`) or an ``[H, W, C]`` array.
      patch_size, temperature, stride, label_size, mask, chunk, method: as in
        :func:`epilsr.predict` (``chunk`` bounds memory to ``chunk * L * N1 * N2`` floats).
      tile: side of a tile of window corners (one jit compilation for all tiles).
      height, width: raster size (default ``image_reader.shape``).
      on_rows: row sink; None = return the ``[H, W, n]`` array.
      progress: tqdm bar over tiles.

    Returns:
      :class:`RasterPrediction`.
    """
    plan = _predict_plan(epitome, label_probs, image_reader, patch_size=patch_size,
                         temperature=temperature, stride=stride, label_size=label_size,
                         tile=tile, height=height, width=width, mask=mask, chunk=chunk,
                         method=method)
    full = None
    if on_rows is None:
        full = np.zeros((plan.height, plan.width, plan.n_labels), np.float32)
    from tqdm.auto import tqdm

    n_windows = 0
    with tqdm(total=plan.n_tiles, disable=not progress, unit="tile",
              desc="predict_raster") as bar:
        for strip in plan.strips(bar=bar):
            if full is not None:
                full[strip.row0 : strip.row0 + len(strip.probs)] = strip.probs
            else:
                on_rows(strip.row0, strip.probs)
            n_windows += strip.windows
    return RasterPrediction(full, plan.n_tiles, n_windows)


class RasterFiles(NamedTuple):
    """What :func:`predict_raster_files` wrote and did."""

    labels: Path  # [H, W] uint8 argmax, NODATA_LABEL where ``valid`` is False
    probs: Path | None  # [H, W, n] float32 (NaN where no data)
    entropy: Path | None  # [H, W] float32 nats (NaN where no data)
    tiles: int  # tiles in the grid
    windows: int  # K x K windows evaluated in this call
    resumed_from: int  # strips already done when this call started


def _digest(*arrays) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


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
    method: str = "auto",
    resume: bool = True,
    progress: bool = False,
) -> RasterFiles:
    """:func:`predict_raster` into GeoTIFFs, checkpointed after every strip and resumable.

    Writes ``<prefix>labels.tif`` (and ``probs.tif`` / ``entropy.tif``) like
    :func:`raster_row_writer`. After each strip of tiles the writers are made durable and the
    strip buffer's carry rows and ``progress.json`` (next strip, writer states, a fingerprint of
    the epitome, label embedding and settings) are saved atomically in
    ``<out_dir>/.<prefix>predict_state/`` (the scheme of
    :func:`epilsr.pipelines.raster_lsr.lsr_raster`). A rerun with ``resume=True`` continues
    from the last finished strip, and its output equals an uninterrupted run's; at most one
    strip of work is lost. The reader is not fingerprinted: the imagery
    must not change between the crash and the rerun.

    Args:
      out_dir: output folder; geo: :class:`~epilsr.io.geotiff.GeoInfo` copied to the outputs
        (the fingerprint covers the model, every setting and an array image, not a reader's
        data nor what ``valid`` returns);
        prefix, probs, entropy, valid: as for :func:`raster_row_writer`; resume: continue an
        interrupted run with the same settings (a different one raises ``ValueError``);
        ``False`` starts over. Other arguments as for :func:`predict_raster`.
    """
    from tqdm.auto import tqdm

    from epilsr.io.atomic import _fingerprint, _save_npz_atomic, _write_json_atomic
    from epilsr.io.geotiff import RasterWriter
    from epilsr.pipelines.raster_lsr import _Outputs, _resume_writers

    plan = _predict_plan(epitome, label_probs, image_reader, patch_size=patch_size,
                         temperature=temperature, stride=stride, label_size=label_size,
                         tile=tile, height=height, width=width, mask=mask, chunk=chunk,
                         method=method)
    h, w, n = plan.height, plan.width, plan.n_labels
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir = out_dir / f".{prefix}predict_state"
    state_path = state_dir / "progress.json"
    specs: dict[str, dict[str, Any]] = {"labels": dict(dtype=np.uint8, bands=None,
                                                       nodata=NODATA_LABEL)}
    if probs:
        specs["probs"] = dict(dtype=np.float32, bands=n, nodata=float("nan"))
    if entropy:
        specs["entropy"] = dict(dtype=np.float32, bands=None, nodata=float("nan"))
    paths = {name: out_dir / f"{prefix}{name}.tif" for name in specs}
    fingerprint = _fingerprint(
        version=1, height=h, width=w, patch_size=int(patch_size),
        temperature=float(temperature), stride=int(stride), label_size=label_size,
        tile=int(tile), chunk=int(chunk), method=method, outputs=sorted(specs),
        valid=valid is not None,
        model=_digest(epitome.mean, epitome.log_var, epitome.prior_logits, label_probs,
                      np.zeros(0) if mask is None else mask),
        image=None if callable(image_reader) else _digest(image_reader),
    )

    def writer_kwargs(name):
        sp = specs[name]
        return dict(height=h, width=w, dtype=sp["dtype"], bands=sp["bands"], geo=geo,
                    nodata=sp["nodata"])

    def result(windows, resumed):
        return RasterFiles(paths["labels"], paths.get("probs"), paths.get("entropy"),
                           plan.n_tiles, windows, resumed)

    state = None
    if resume and state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("fingerprint") != fingerprint:
            raise ValueError(f"predict_raster_files: {state_dir} holds a run with different "
                             "settings; pass resume=False to start over (or another prefix)")
        if state.get("complete") and all(p.exists() for p in paths.values()):
            return result(0, state["next_strip"])
    first, carry, writers = 0, None, {}
    if state is not None and not state.get("complete"):
        first = state["next_strip"]
        writers = _resume_writers(state, state_dir, paths, writer_kwargs,
                                  finished=first == plan.n_strips, who="predict_raster_files")
        if state.get("carry"):
            with np.load(state_dir / state["carry"]) as z:
                carry = (z["acc"], z["cnt"])
    else:
        if state_dir.exists():
            for f in state_dir.iterdir():
                f.unlink()
        state_dir.mkdir(exist_ok=True)
        writers = {name: RasterWriter(paths[name], **writer_kwargs(name)) for name in specs}
    outputs = _Outputs(writers)
    tiles_per_strip = plan.n_tiles // plan.n_strips
    n_windows = 0
    try:
        with tqdm(total=plan.n_tiles, initial=first * tiles_per_strip, disable=not progress,
                  unit="tile", desc="predict_raster") as bar:
            for strip in plan.strips(first, carry, bar):
                r = len(strip.probs)
                nodata = np.zeros((r, w), bool)
                if valid is not None:
                    nodata = ~np.asarray(valid(strip.row0, 0, r, w), bool)
                outputs.write(strip.probs, nodata)
                n_windows += strip.windows
                step = strip.next_strip
                states = {}
                for name, wr in writers.items():
                    st = wr.checkpoint(state_dir / f"{name}.pending.{step}.npy")
                    st["pending"] = Path(st["pending"]).name if st["pending"] else None
                    states[name] = st
                carry_name = None
                if len(strip.acc):
                    carry_name = f"carry.{step}.npz"
                    _save_npz_atomic(state_dir / carry_name, acc=strip.acc, cnt=strip.cnt)
                _write_json_atomic(state_path, dict(
                    fingerprint=fingerprint, next_strip=step, writers=states,
                    carry=carry_name, complete=False))
                keep = {state_path.name, carry_name} | {
                    st["pending"] for st in states.values() if st["pending"]}
                for f in state_dir.iterdir():
                    if f.name not in keep:
                        f.unlink(missing_ok=True)
        for wr in writers.values():
            wr.close()
    except BaseException:
        outputs.abort()
        raise
    _write_json_atomic(state_path, dict(fingerprint=fingerprint, next_strip=plan.n_strips,
                                        complete=True))
    for f in state_dir.iterdir():
        if f.name != state_path.name:
            f.unlink(missing_ok=True)
    return result(n_windows, first)


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
    from epilsr.io.geotiff import RasterWriter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = dict(height=height, width=width, geo=geo)
    writers = {"labels": RasterWriter(out_dir / f"{prefix}labels.tif", dtype=np.uint8,
                                      nodata=NODATA_LABEL, **common)}
    if probs:
        writers["probs"] = RasterWriter(out_dir / f"{prefix}probs.tif", dtype=np.float32,
                                        bands=n_labels, nodata=float("nan"), **common)
    if entropy:
        writers["entropy"] = RasterWriter(out_dir / f"{prefix}entropy.tif", dtype=np.float32,
                                          nodata=float("nan"), **common)

    def on_rows(row0: int, p: np.ndarray) -> None:
        nodata = np.zeros(p.shape[:2], bool)
        if valid is not None:
            nodata = ~np.asarray(valid(row0, 0, p.shape[0], width), bool)
        lab = np.argmax(p, axis=-1).astype(np.uint8)
        lab[nodata] = NODATA_LABEL
        writers["labels"].write(lab)
        if "probs" in writers:
            writers["probs"].write(np.where(nodata[..., None], np.nan, p))
        if "entropy" in writers:
            with np.errstate(divide="ignore", invalid="ignore"):
                ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)
            writers["entropy"].write(np.where(nodata, np.nan, ent).astype(np.float32))

    def close() -> dict[str, Path]:
        for w in writers.values():
            w.close()
        return {name: w.path for name, w in writers.items()}

    return on_rows, close
