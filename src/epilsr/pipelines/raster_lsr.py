"""Self-epitomic LSR over rasters of any size, tile by tile, with bounded memory and resume.

:func:`lsr_raster` runs :func:`epilsr.self_epitomic_lsr` on overlapping, equal-sized windows
(:func:`tile_grid`) in raster order and stitches the per-window label distributions with a
separable cosine taper (:func:`blend_weights`), normalised by the summed weights.

**Strip buffer.** Windows come in rows of windows ("strips") starting at raster rows
``R_0 < R_1 < ...``. While strip ``i`` runs, a buffer of exactly ``tile`` raster rows
(``[tile, W, n]`` weighted probability sums and ``[tile, W]`` weight sums) starting at row
``R_i`` receives its contributions. When the strip is done, rows ``R_i .. R_{i+1}-1`` can no
longer change: they are normalised and flushed to the writers (labels ``uint8`` argmax, optional
probabilities, entropy) and the buffer is shifted up, keeping the overlap rows as the carry.
Peak memory is ``O(tile * W * n)`` plus one tile row per writer; it does not grow with the
raster height (nor with the number of windows).

**Resume.** After every strip the run is checkpointed in ``<out_dir>/.<prefix>lsr_state/``:
each :class:`~epilsr.io.geotiff.RasterWriter` fsyncs its ``<output>.partial`` (encoded tiles
of the finished rows) and saves its incomplete tile row; the carry rows of the buffer are saved
(``.npz``); then ``progress.json`` (next strip, windows done, writer states and a fingerprint
of the settings) is written to a temporary file and renamed over the old one, so it always
describes a consistent checkpoint. A rerun with ``resume=True`` truncates the ``.partial``
files to the recorded length, restores the carry and continues with the next strip; since
window ``i`` always uses ``jax.random.fold_in(key, i)`` and the accumulation order is the same,
the result is identical to an uninterrupted run. At most one strip of work is lost. The readers
are not fingerprinted: inputs must not change between the crash and the rerun.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.typing import ArrayLike

from epilsr.io.atomic import _fingerprint, _save_npz_atomic, _write_json_atomic
from epilsr.io.geotiff import GeoInfo, RasterReader, RasterWriter
from epilsr.metrics import NODATA_LABEL, entropy
from epilsr.windows import blend_weights, tile_grid

__all__ = [
    "RasterRun",
    "array_reader",
    "lsr_raster",
    "write_preview",
]

_STATE_VERSION = 1
_FLUSH_ROWS = 64  # rows normalised and written at a time

Reader = Callable[[int, int, int, int], ArrayLike]


def array_reader(array: ArrayLike) -> Reader:
    """A window reader ``(row, col, h, w) -> array[row:row+h, col:col+w]`` over an array."""
    array = np.asarray(array) if not isinstance(array, np.ndarray) else array

    def read(row: int, col: int, height: int, width: int) -> np.ndarray:
        return array[row : row + height, col : col + width]

    read.shape = array.shape  # type: ignore[attr-defined]
    return read


# --------------------------------------------------------------------------------------------
# The driver


class RasterRun(NamedTuple):
    """What :func:`lsr_raster` wrote and did."""

    labels: Path  # [H, W] uint8 argmax labels, NODATA_LABEL where no data
    probs: Path | None  # [H, W, n] probabilities (NaN where no data)
    entropy: Path | None  # [H, W] float32 entropy in nats (NaN where no data)
    preview: Path | None  # PNG
    windows: int  # windows in the grid
    computed: int  # windows run in this call
    skipped: int  # all-no-data windows (over the whole run)
    resumed_from: int  # windows already done when this call started
    seconds: float  # wall time of this call


@functools.lru_cache(maxsize=8)
def _jitted_lsr(items: tuple) -> Callable:
    return jax.jit(functools.partial(_lsr_entry(), **dict(items)))


def _lsr_entry() -> Callable:
    from epilsr.self_epitomic import self_epitomic_lsr

    return self_epitomic_lsr


def _lsr_fn(lsr_kwargs: Mapping[str, Any]) -> Callable:
    items = tuple(sorted(lsr_kwargs.items()))
    try:
        hash(items)
    except TypeError:  # e.g. an array-valued concentration: compile per call
        return jax.jit(functools.partial(_lsr_entry(), **lsr_kwargs))
    return _jitted_lsr(items)


def _default_palette(n: int) -> tuple[list[str], np.ndarray]:
    if n == 4:
        from epilsr.data.chesapeake import LABEL_COLORS, LABEL_NAMES

        return list(LABEL_NAMES), LABEL_COLORS
    base = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40],
                     [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127],
                     [188, 189, 34], [23, 190, 207]], np.uint8)
    return [f"label {i}" for i in range(n)], base[np.arange(n) % len(base)]


def _resume_writers(state: dict, state_dir: Path, paths: Mapping[str, Path],
                    writer_kwargs: Callable[[str], dict], *, finished: bool,
                    who: str) -> dict[str, RasterWriter]:
    """Reopen the checkpointed writers of ``state["writers"]``. With ``finished`` (every strip
    done, interrupted while closing) outputs already closed are skipped; on failure the writers
    reopened so far are released (their ``.partial`` kept)."""
    writers: dict[str, RasterWriter] = {}
    try:
        for name, path in paths.items():
            ws = dict(state["writers"][name])
            if ws["pending"]:
                ws["pending"] = os.fspath(state_dir / ws["pending"])
            spool = path.with_name(path.name + ".partial")
            if not spool.exists():
                if finished and path.exists():
                    continue  # closed before the interruption
                raise FileNotFoundError(f"{who}: {spool} is missing; pass resume=False")
            writers[name] = RasterWriter.resume(path, ws, **writer_kwargs(name))
    except BaseException:
        _Outputs(writers).abort()
        raise
    return writers


@dataclasses.dataclass
class _Outputs:
    """The run's writers by name ("labels", "probs", "entropy")."""

    writers: dict[str, RasterWriter]

    def write(self, probs: np.ndarray, nodata: np.ndarray) -> None:
        """``probs [r, W, n]`` normalised, ``nodata [r, W]`` bool."""
        labels = np.argmax(probs, axis=-1).astype(np.uint8)
        labels[nodata] = NODATA_LABEL
        self.writers["labels"].write(labels)
        if "probs" in self.writers:
            self.writers["probs"].write(np.where(nodata[..., None], np.nan, probs))
        if "entropy" in self.writers:
            ent = entropy(probs).astype(np.float32)
            self.writers["entropy"].write(np.where(nodata, np.nan, ent))

    def abort(self) -> None:
        for w in self.writers.values():
            if not w.closed:
                w.abort(keep_partial=True)


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
    resume: bool = True,
) -> RasterRun:
    """Self-epitomic LSR (Sec. 5.1) over a raster of any size, tile by tile (see module doc).

    Args:
      key: PRNG key; window ``i`` of :func:`tile_grid` uses ``jax.random.fold_in(key, i)``.
      image_reader: ``(row, col, h, w) -> [h, w, C]`` imagery (e.g. a
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
      resume: continue from the last checkpoint of an interrupted run with the same settings
        (or return at once when that run completed); ``False`` starts over.

    Returns:
      :class:`RasterRun`.
    """
    t_start = time.perf_counter()
    if height is None or width is None:
        shape = getattr(image_reader, "shape", None)
        if shape is None:
            raise ValueError("lsr_raster: pass height= and width= (image_reader has no .shape)")
        height, width = (int(s) for s in shape[:2])
    if geo is None:
        geo = getattr(image_reader, "geo", None) or GeoInfo()
    table = np.asarray(label_given_class, np.float32)
    if table.ndim != 2 or not np.all(np.isfinite(table)) or np.any(table < 0):
        raise ValueError(f"label_given_class: expected a finite non-negative [Cc, n] table, "
                         f"got shape {table.shape}")
    n_classes, n_labels = table.shape
    if n_labels > NODATA_LABEL:
        raise ValueError(f"label_given_class: at most {NODATA_LABEL} labels fit the uint8 label "
                         f"raster (255 = no data), got {n_labels}")
    nodata_values = np.atleast_1d(np.asarray([] if nodata_class is None else nodata_class))
    use_nodata = nodata_class is not None or valid_reader is not None
    lsr_kwargs = dict(lsr_kwargs or {})
    windows = tile_grid(height, width, tile=tile, overlap=overlap)
    th, tw = windows[0].height, windows[0].width
    weights = blend_weights((th, tw), overlap)
    row_starts = sorted({w.row for w in windows})
    strips = [[(i, w) for i, w in enumerate(windows) if w.row == r] for r in row_starts]
    fn = _lsr_fn(lsr_kwargs)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir = out_dir / f".{prefix}lsr_state"
    state_path = state_dir / "progress.json"
    specs: dict[str, dict[str, Any]] = {
        "labels": dict(dtype=np.uint8, bands=None, nodata=NODATA_LABEL)}
    if write_probs:
        specs["probs"] = dict(dtype=np.dtype(probs_dtype), bands=n_labels, nodata=float("nan"))
    if write_entropy:
        specs["entropy"] = dict(dtype=np.float32, bands=None, nodata=float("nan"))
    paths = {name: out_dir / f"{prefix}{name}.tif" for name in specs}
    preview_path = out_dir / f"{prefix}preview.png" if preview else None
    fingerprint = _fingerprint(
        version=_STATE_VERSION, height=height, width=width, tile=tile, overlap=overlap,
        key=np.asarray(jax.random.key_data(key)), lsr=lsr_kwargs,
        table=hashlib.sha256(table.tobytes()).hexdigest(), nodata=nodata_values,
        valid=valid_reader is not None, outputs={k: str(v["dtype"]) for k, v in specs.items()},
        compression=compression,
    )

    names, colors = _default_palette(n_labels)
    names = list(label_names) if label_names is not None else names
    colors = np.asarray(label_colors, np.uint8) if label_colors is not None else colors
    describe = {"labels": dict(label_names=names, label_colors=colors, description="labels"),
                "probs": dict(band_names=names), "entropy": dict(description="entropy (nats)")}

    def writer_kwargs(name):
        s = specs[name]
        return dict(height=height, width=width, dtype=s["dtype"], bands=s["bands"], geo=geo,
                    nodata=s["nodata"], compression=compression, **describe[name])

    def result(computed, skipped, done):
        return RasterRun(
            paths["labels"], paths.get("probs"), paths.get("entropy"),
            preview_path if preview_path is not None and preview_path.exists() else None,
            len(windows), computed, skipped, done, time.perf_counter() - t_start)

    # ---- restore or start over --------------------------------------------------------
    acc = np.zeros((th, width, n_labels), np.float32)
    wsum = np.zeros((th, width), np.float32)
    state = None
    if resume and state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("fingerprint") != fingerprint:
            raise ValueError(
                f"lsr_raster: {state_dir} holds a run with different settings; pass resume=False "
                "to start over (or use another out_dir/prefix)"
            )
        if state.get("complete") and all(p.exists() for p in paths.values()):
            return result(0, state["skipped"], state["windows_done"])
    first_strip, done, skipped = 0, 0, 0
    writers: dict[str, RasterWriter] = {}
    if state is not None and not state.get("complete"):
        first_strip, done, skipped = state["next_strip"], state["windows_done"], state["skipped"]
        writers = _resume_writers(state, state_dir, paths, writer_kwargs,
                                  finished=first_strip == len(strips), who="lsr_raster")
        if state.get("carry"):
            carry = np.load(state_dir / state["carry"])
            k = carry["acc"].shape[0]
            acc[:k], wsum[:k] = carry["acc"], carry["wsum"]
    else:
        if state_dir.exists():
            for f in state_dir.iterdir():
                f.unlink()
        state_dir.mkdir(exist_ok=True)
        for name in specs:
            writers[name] = RasterWriter(paths[name], **writer_kwargs(name))
    outputs = _Outputs(writers)
    resumed_from = done

    # ---- strips -------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=len(windows), initial=done, disable=not progress, unit="tile",
               desc="lsr_raster")
    computed = 0
    try:
        for s in range(first_strip, len(strips)):
            r0 = row_starts[s]
            for i, win in strips[s]:
                valid, cls = None, np.asarray(classes_reader(*win))
                if cls.shape != (th, tw):
                    raise ValueError(f"classes_reader: window {win} gave shape {cls.shape}")
                if not np.issubdtype(cls.dtype, np.integer):
                    raise ValueError(f"classes_reader: expected integer classes, got {cls.dtype}")
                if use_nodata:
                    valid = ~np.isin(cls, nodata_values)
                    if valid_reader is not None:
                        valid &= np.asarray(valid_reader(*win), bool)
                    if not valid.any():
                        skipped += 1
                        done += 1
                        bar.update(1)
                        continue
                bad = (cls < 0) | (cls >= n_classes)
                if valid is not None:
                    bad &= valid
                if bad.any():
                    raise ValueError(
                        f"classes_reader: window {win} has class values "
                        f"{np.unique(cls[bad])[:8].tolist()} outside [0, {n_classes}) that are "
                        "not nodata_class"
                    )
                used = np.unique(cls if valid is None else cls[valid])
                empty = used[table[used].sum(axis=1) <= 0]
                if empty.size:
                    raise ValueError(f"label_given_class: rows {empty.tolist()} sum to zero but "
                                     f"those classes occur in window {win}")
                img = np.asarray(image_reader(*win))
                if img.shape[:2] != (th, tw) or img.ndim != 3:
                    raise ValueError(f"image_reader: window {win} gave shape {img.shape}, "
                                     f"expected ({th}, {tw}, C)")
                if use_nodata:
                    counts = np.bincount(cls[valid], minlength=n_classes)[:n_classes]
                    rows = table / np.maximum(table.sum(1, keepdims=True), 1e-30)
                    neutral = counts @ rows
                    neutral = neutral / neutral.sum() if neutral.sum() > 0 else np.full(
                        n_labels, 1.0 / n_labels)
                    tab = np.concatenate([table, neutral[None].astype(np.float32)])
                    cls_in = np.where(valid, cls, n_classes).astype(np.int32)
                else:
                    tab, cls_in = table, cls.astype(np.int32)
                probs = np.asarray(fn(jax.random.fold_in(key, i), img, cls_in, tab), np.float32)
                wgt = weights if valid is None else weights * valid
                acc[:, win.col : win.col + tw] += probs * wgt[..., None]
                wsum[:, win.col : win.col + tw] += wgt
                computed += 1
                done += 1
                bar.update(1)
            # rows r0 .. next start are final
            n_out = (row_starts[s + 1] if s + 1 < len(strips) else height) - r0
            for a in range(0, n_out, _FLUSH_ROWS):  # in row chunks: small temporaries
                b = min(a + _FLUSH_ROWS, n_out)
                nodata = wsum[a:b] <= 0
                outputs.write(acc[a:b] / np.where(nodata, 1.0, wsum[a:b])[..., None], nodata)
            acc[: th - n_out] = acc[n_out:]
            acc[th - n_out :] = 0
            wsum[: th - n_out] = wsum[n_out:]
            wsum[th - n_out :] = 0
            # checkpoint
            step = s + 1
            states = {}
            for name, w in writers.items():
                st = w.checkpoint(state_dir / f"{name}.pending.{step}.npy")
                st["pending"] = Path(st["pending"]).name if st["pending"] else None
                states[name] = st
            carry_rows = th - n_out if s + 1 < len(strips) else 0
            carry_name = None
            if carry_rows:
                carry_name = f"carry.{step}.npz"
                _save_npz_atomic(state_dir / carry_name, acc=acc[:carry_rows],
                                 wsum=wsum[:carry_rows])
            _write_json_atomic(state_path, dict(
                version=_STATE_VERSION, fingerprint=fingerprint, next_strip=step,
                windows_done=done, skipped=skipped, writers=states, carry=carry_name,
                complete=False, height=height, width=width, windows=len(windows)))
            keep = {state_path.name, carry_name} | {
                st["pending"] for st in states.values() if st["pending"]}
            for f in state_dir.iterdir():
                if f.name not in keep:
                    f.unlink(missing_ok=True)
        bar.close()
        for w in writers.values():
            w.close()
    except BaseException:
        bar.close()
        outputs.abort()
        raise

    if preview_path is not None:
        with RasterReader(paths["labels"]) as lab:
            ent = RasterReader(paths["entropy"]) if "entropy" in paths else None
            try:
                write_preview(preview_path, lab, height=height, width=width,
                              image_reader=image_reader, entropy_reader=ent,
                              label_names=names, label_colors=colors, max_size=preview,
                              n_labels=n_labels)
            finally:
                if ent is not None:
                    ent.close()
    _write_json_atomic(state_path, dict(
        version=_STATE_VERSION, fingerprint=fingerprint, next_strip=len(strips),
        windows_done=done, skipped=skipped, complete=True, height=height, width=width,
        windows=len(windows)))
    for f in state_dir.iterdir():
        if f.name != state_path.name:
            f.unlink(missing_ok=True)
    return result(computed, skipped, resumed_from)


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
    from epilsr import viz

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
