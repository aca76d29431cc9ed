"""One resumable strip runner for the raster pipelines (bounded memory, bit-identical resume).

A pipeline describes *strips*: strip ``s`` adds weighted label sums ``acc [B, W, n]`` and
weights ``wsum [B, W]`` into a buffer of ``B`` raster rows starting at row ``R_s``
(:class:`StripPlan`); afterwards rows ``R_s .. R_{s+1} - 1`` can no longer change.
:func:`run_strips` does the rest:

* **Flush.** Finished rows are normalised, ``p = acc / wsum`` (no data where ``wsum == 0`` or
  an optional ``valid`` reader says False), and written in chunks of 64 rows by
  :class:`~epilsr.io.geotiff.RasterWriter` s: labels (``uint8`` argmax,
  :data:`~epilsr.metrics.NODATA_LABEL` = no data), optional probabilities and entropy (NaN =
  no data). The buffer then shifts up by those rows; the rest is the *carry*. Memory:
  ``O(B * W * n)`` plus one tile row per writer, whatever the raster height.
* **Checkpoint.** After every strip, in ``state_dir``: each writer fsyncs its ``.partial``
  file (encoded tile rows) and saves its incomplete tile row, the carry rows are saved
  (``.npz``), then ``progress.json`` (next strip, counters, writer states, a fingerprint of
  the settings and one per input) is written atomically (:mod:`epilsr.io.atomic`), so it always
  describes a consistent checkpoint. Files of older checkpoints are deleted after it.
* **Threads.** An optional ``read_strip(s)`` (window reads, class alignment) runs in a reader
  thread up to two strips (``strips_per_call`` with groups) ahead of ``add_strip``; the
  finished rows (copied) are normalised, encoded and written, and the checkpoint taken, in a
  writer thread behind it
  (:mod:`epilsr.io.threads`, bounded queues), in strip order, so each checkpoint follows its
  strip's writes. The accumulation order is unchanged: outputs are byte-identical to a
  single-threaded run. An exception in a thread is re-raised by the caller with its message;
  on any error the strips already handed to the writer are finished, both threads joined.
* **Groups of strips.** With ``compute_strips`` the work of a strip is split into a pure,
  batched part and its accumulation: ``compute_strips([(s, inputs_s), ...])`` runs on up to
  ``strips_per_call`` consecutive strips at once (one device call can span several strips; the
  reader thread then runs that many strips ahead) and returns one result per strip, which
  ``add_strip`` adds into the buffer strip by strip, in strip order, as without groups. A
  ``compute_strips`` that returns a deferred result (a callable: device calls dispatched, not
  awaited) gets the next group dispatched before this one is resolved and added, so the device
  never waits for the host's accumulation. At most ``2 g + max(2, g) + 1`` strips are read and
  not yet added (``g = strips_per_call``: the group being added, the next one computing, the
  queue, the one being read), whatever the raster height. Groups start
  at the first strip not yet done, so a crash after a group was computed but before all its
  strips were written loses at most that group: the rerun recomputes it (window results must
  not depend on the grouping; checkpoints still follow every strip).
* **Resume.** A rerun with the same settings truncates each ``.partial`` to its recorded
  length, restores the carry and continues with the next strip. Window randomness must
  depend on the window index only (``fold_in(key, i)``) and the accumulation order is the
  same, so the outputs are bit-identical to an uninterrupted run; at most one strip is lost.
* **Inputs.** A reader may offer ``fingerprint() -> str`` (:func:`array_reader` hashes its
  array, :meth:`~epilsr.io.geotiff.RasterReader.fingerprint` hashes path, size, mtime and
  sampled bytes). An input that changed since the checkpoint raises ``ValueError``: stale
  work is never reused.
* **No silent NaN.** :func:`read_window` refuses non-finite imagery (naming the window and
  file) and :func:`check_window` non-finite probabilities, before anything of the strip is
  committed; writers are opened only when the first strip is done.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from jax.typing import ArrayLike

from epilsr.io.atomic import fingerprint, save_npz_atomic, write_json_atomic
from epilsr.io.geotiff import GeoInfo, RasterWriter
from epilsr.io.threads import ReadAhead, WriteBehind
from epilsr.metrics import NODATA_LABEL, entropy

__all__ = [
    "Reader",
    "StripPlan",
    "OutputSpec",
    "StripRun",
    "strip_groups",
    "resolved",
    "array_digest",
    "array_reader",
    "raster_size",
    "reader_fingerprint",
    "read_window",
    "check_window",
    "label_outputs",
    "write_outputs",
    "iter_strips",
    "run_strips",
]

_STATE_VERSION = 2
_FLUSH_ROWS = 64  # rows normalised and written at a time

_DEPTH = 2  # strips read ahead / waiting to be written

Reader = Callable[[int, int, int, int], ArrayLike]
#: ``add_strip(s, acc [B, W, n], wsum [B, W], tick[, inputs]) -> counters``; ``tick()`` per
#: unit of work; ``inputs = read_strip(s)`` when a ``read_strip`` is given.
AddStrip = Callable[..., Mapping[str, int]]
#: ``read_strip(s) -> inputs`` of strip ``s``, run in the reader thread ahead of ``add_strip``.
ReadStrip = Callable[[int], Any]
#: ``compute_strips([(s, inputs), ...]) -> [result, ...]``: a group of consecutive strips at once;
#: or a deferred ``() -> [result, ...]`` (work dispatched, e.g. asynchronous device calls), which
#: lets the runner start the next group before adding this one.
ComputeStrips = Callable[[Sequence[tuple[int, Any]]], Sequence[Any] | Callable[[], Sequence[Any]]]


def resolved(results: Sequence[Any] | Callable[[], Sequence[Any]]) -> list:
    """The results of ``compute_strips``: called when deferred (a callable), as a list."""
    return list(results() if callable(results) else results)


# ------------------------------------------------------------------------------ readers


def array_digest(*arrays: ArrayLike) -> str:
    """A short sha256 of the arrays' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def array_reader(array: ArrayLike) -> Reader:
    """A window reader ``(row, col, h, w) -> array[row:row+h, col:col+w]`` over an array.

    It has ``.shape`` and ``.fingerprint()`` (a sha256 of the array's bytes).
    """
    array = array if isinstance(array, np.ndarray) else np.asarray(array)

    def read(row: int, col: int, height: int, width: int) -> np.ndarray:
        return array[row : row + height, col : col + width]

    read.shape = array.shape  # type: ignore[attr-defined]
    read.fingerprint = lambda: array_digest(array)  # type: ignore[attr-defined]
    return read


def raster_size(reader: Reader, height: int | None, width: int | None,
                who: str) -> tuple[int, int]:
    """``(height, width)`` as given, else from ``reader.shape``."""
    if height is not None and width is not None:
        return int(height), int(width)
    shape = getattr(reader, "shape", None)
    if shape is None:
        raise ValueError(f"{who}: pass height= and width= (the reader has no .shape)")
    return int(shape[0]), int(shape[1])


def reader_fingerprint(reader: Any) -> str | None:
    """``reader.fingerprint()`` when the reader offers one, else None (not checked)."""
    fp = getattr(reader, "fingerprint", None)
    return None if reader is None or not callable(fp) else str(fp())


def _source(name: str, reader: Any) -> str:
    path = getattr(reader, "path", None)
    return f"{name} ({path})" if path is not None else name


def read_window(name: str, reader: Reader, row: int, col: int, height: int,
                width: int) -> np.ndarray:
    """``reader(row, col, height, width)`` as NumPy; float data must be finite."""
    block = np.asarray(reader(row, col, height, width))
    if block.dtype.kind in "fc" and not np.isfinite(block).all():
        bad = int(block.size - np.count_nonzero(np.isfinite(block)))
        raise ValueError(f"{_source(name, reader)}: window rows {row}:{row + height}, cols "
                         f"{col}:{col + width} holds {bad} NaN/inf values; expected finite "
                         "imagery")
    return block


def check_window(who: str, window: Any, probs: np.ndarray) -> np.ndarray:
    """Refuse a window's non-finite probabilities before they are committed."""
    probs = np.asarray(probs)
    if not np.isfinite(probs).all():
        bad = int(probs.size - np.count_nonzero(np.isfinite(probs)))
        raise ValueError(f"{who}: window {tuple(int(v) for v in window)} gave {bad} non-finite "
                         "probabilities; nothing of its strip was written")
    return probs


# ------------------------------------------------------------------------------ outputs


class StripPlan(NamedTuple):
    """Strip geometry: strip ``s`` touches rows ``row_starts[s] .. + buffer_rows - 1``."""

    height: int
    width: int
    n_labels: int
    row_starts: tuple[int, ...]  # R_s, increasing, R_0 = 0
    buffer_rows: int  # B

    def finished_rows(self, s: int) -> int:
        """Rows final after strip ``s``: ``R_{s+1} - R_s`` (the rest of the raster at the end)."""
        end = self.row_starts[s + 1] if s + 1 < len(self.row_starts) else self.height
        return end - self.row_starts[s]


class OutputSpec(NamedTuple):
    """One output raster."""

    path: Path
    dtype: Any
    bands: int | None
    nodata: float | int
    describe: Mapping[str, Any] = {}  # RasterWriter's label_names/colors, band_names, description


def label_outputs(out_dir: Path, prefix: str, n_labels: int, *, probs: bool,
                  entropy: bool, probs_dtype: Any = np.float32,
                  label_names: Sequence[str] | None = None,
                  label_colors: ArrayLike | None = None) -> dict[str, OutputSpec]:
    """``labels`` (uint8; colour table and names), optional ``probs`` ``[H, W, n]`` (bands named
    by label) and ``entropy`` (nats) GeoTIFFs."""
    names = None if label_names is None else list(label_names)
    colors = None if label_colors is None else np.asarray(label_colors, np.uint8)
    specs = {"labels": OutputSpec(out_dir / f"{prefix}labels.tif", np.dtype(np.uint8), None,
                                  NODATA_LABEL, dict(label_names=names, label_colors=colors,
                                                     description="labels"))}
    if probs:
        specs["probs"] = OutputSpec(out_dir / f"{prefix}probs.tif", np.dtype(probs_dtype),
                                    n_labels, float("nan"), dict(band_names=names))
    if entropy:
        specs["entropy"] = OutputSpec(out_dir / f"{prefix}entropy.tif", np.dtype(np.float32),
                                      None, float("nan"), dict(description="entropy (nats)"))
    return specs


def write_outputs(writers: Mapping[str, RasterWriter], probs: np.ndarray,
                  nodata: np.ndarray) -> None:
    """Next rows of each output from ``probs [r, W, n]`` (normalised) and ``nodata [r, W]``."""
    labels = np.argmax(probs, axis=-1).astype(np.uint8)
    labels[nodata] = NODATA_LABEL
    writers["labels"].write(labels)
    if "probs" in writers:
        writers["probs"].write(np.where(nodata[..., None], np.nan, probs))
    if "entropy" in writers:
        writers["entropy"].write(np.where(nodata, np.nan, entropy(probs).astype(np.float32)))


# ------------------------------------------------------------------------------ buffer


class _Buffer:
    """The strip buffer: ``acc [B, W, n]`` weighted sums and ``wsum [B, W]`` weights."""

    def __init__(self, plan: StripPlan, carry: tuple[np.ndarray, np.ndarray] | None = None):
        rows = [plan.finished_rows(s) for s in range(len(plan.row_starts))]
        if not plan.row_starts or plan.row_starts[0] != 0 or min(rows) < 1:
            raise ValueError(f"StripPlan: row_starts must increase from 0 below the height "
                             f"{plan.height}, got {plan.row_starts}")
        if max(rows) > plan.buffer_rows:
            raise ValueError(f"StripPlan: a strip finishes {max(rows)} rows, more than "
                             f"buffer_rows={plan.buffer_rows}")
        self.acc = np.zeros((plan.buffer_rows, plan.width, plan.n_labels), np.float32)
        self.wsum = np.zeros((plan.buffer_rows, plan.width), np.float32)
        if carry is not None:
            k = carry[0].shape[0]
            self.acc[:k], self.wsum[:k] = carry

    def finished(self, row0: int, rows: int, valid: Reader | None,
                 chunk: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(row, probs [r, W, n], nodata [r, W])`` over the first ``rows`` rows."""
        return _normalised(self.acc[:rows], self.wsum[:rows], row0, valid, chunk)

    def take(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the first ``rows`` rows ``(acc, wsum)``."""
        return self.acc[:rows].copy(), self.wsum[:rows].copy()

    def shift(self, rows: int) -> None:
        """Drop the first ``rows`` rows (flushed); the rest moves up, zeros come in."""
        keep = self.acc.shape[0] - rows
        self.acc[:keep], self.wsum[:keep] = self.acc[rows:], self.wsum[rows:]
        self.acc[keep:], self.wsum[keep:] = 0.0, 0.0


def _normalised(acc: np.ndarray, wsum: np.ndarray, row0: int, valid: Reader | None,
                chunk: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(row, probs = acc / wsum [r, W, n], nodata [r, W])`` in chunks of ``chunk`` rows."""
    width = wsum.shape[1]
    for a in range(0, acc.shape[0], chunk):
        b = min(a + chunk, acc.shape[0])
        nodata = wsum[a:b] <= 0
        probs = acc[a:b] / np.where(nodata, 1.0, wsum[a:b])[..., None]
        if valid is not None:
            nodata = nodata | ~np.asarray(valid(row0 + a, 0, b - a, width), bool)
        yield row0 + a, probs, nodata


_RESERVED = {"version", "fingerprint", "inputs", "next_strip", "counters", "complete", "writers",
             "carry"}


def _add_counts(total: Mapping[str, int], new: Mapping[str, int]) -> dict[str, int]:
    out = dict(total)
    for k, v in new.items():
        if k in _RESERVED:
            raise ValueError(f"add_strip: counter name {k!r} is reserved by progress.json")
        out[k] = out.get(k, 0) + int(v)
    return out


def _bar(progress: bool, total: int, initial: int, desc: str, unit: str):
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm  # optional dependency (the "experiments" extra)

    return tqdm(total=total, initial=initial, unit=unit, desc=desc)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _adder(add_strip: AddStrip, reader: ReadAhead | None) -> AddStrip:
    """``add_strip`` fed by the reader thread's ``read_strip(s)`` when there is one."""
    if reader is None:
        return add_strip
    return lambda s, acc, wsum, tick: add_strip(s, acc, wsum, tick, reader.get(s))


def strip_groups(first: int, n: int, size: int) -> list[range]:
    """Consecutive groups of at most ``size`` strips covering ``first .. n - 1``."""
    return [range(a, min(a + size, n)) for a in range(first, n, size)]


class _Grouped:
    """``add_strip`` fed one strip at a time from groups computed together: at the first strip
    of a group, its inputs are taken from the reader, ``compute_strips`` runs on the whole
    group and the results wait (at most one group) until their strip is added. A deferred
    result (``compute_strips`` returned a callable: work dispatched, not awaited) makes the
    runner dispatch the next group before resolving and adding this one, so the device
    computes group ``g + 1`` while the host adds group ``g`` (at most two groups in flight)."""

    def __init__(self, add_strip: AddStrip, read: Callable[[int], Any],
                 compute: ComputeStrips, first: int, n: int, size: int):
        self._add, self._read, self._compute = add_strip, read, compute
        self._groups = strip_groups(first, n, size)
        self._starts = {g.start: k for k, g in enumerate(self._groups)}
        self._ahead: tuple[int, Any] | None = None  # (group number, dispatched results)
        self._ready: dict[int, Any] = {}

    def _dispatch(self, k: int) -> Any:
        return self._compute([(t, self._read(t)) for t in self._groups[k]])

    def __call__(self, s: int, acc: np.ndarray, wsum: np.ndarray, tick: Callable) -> Any:
        if s in self._starts:
            k = self._starts[s]
            group = self._groups[k]
            out = self._ahead[1] if self._ahead and self._ahead[0] == k else self._dispatch(k)
            self._ahead = None
            if isinstance(out, Exception):  # reading or dispatching it failed, one group ago
                raise out
            if callable(out) and k + 1 < len(self._groups):
                try:  # the device stays busy; a failure surfaces at its own group, as before
                    self._ahead = (k + 1, self._dispatch(k + 1))
                except Exception as err:  # noqa: BLE001 - re-raised at group k + 1
                    self._ahead = (k + 1, err)
            results = resolved(out)
            if len(results) != len(group):
                raise ValueError(f"compute_strips: expected {len(group)} results (one per "
                                 f"strip), got {len(results)}")
            self._ready = dict(zip(group, results, strict=True))
        return self._add(s, acc, wsum, tick, self._ready.pop(s))


def _strip_adder(add_strip: AddStrip, reader: ReadAhead | None,
                 read_strip: ReadStrip | None, compute: ComputeStrips | None, first: int,
                 n: int, size: int) -> AddStrip:
    """The per-strip adder of the runners: plain, fed by the reader, or by groups."""
    if compute is None:
        return _adder(add_strip, reader)
    read = reader.get if reader is not None else (
        read_strip if read_strip is not None else lambda s: None)
    return _Grouped(add_strip, read, compute, first, n, size)


def _check_group(strips_per_call: int) -> int:
    if int(strips_per_call) != strips_per_call or strips_per_call < 1:
        raise ValueError(f"strips_per_call: expected a positive integer, got "
                         f"{strips_per_call!r}")
    return int(strips_per_call)


def _read_ahead(read_strip: ReadStrip | None, first: int, n: int,
                group: int) -> ReadAhead | None:
    """The reader thread: ``max(2, group)`` strips ahead (the next group while one computes)."""
    if read_strip is None:
        return None
    return ReadAhead(read_strip, first, n, depth=max(_DEPTH, group))


def iter_strips(plan: StripPlan, add_strip: AddStrip, *, progress: bool = False,
                total: int = 0, desc: str = "", unit: str = "tile",
                valid: Reader | None = None,
                read_strip: ReadStrip | None = None,
                compute_strips: ComputeStrips | None = None,
                strips_per_call: int = 1) -> Iterator[tuple[int, np.ndarray, np.ndarray,
                                                             dict]]:
    """Without files: ``(row0, probs [r, W, n], nodata [r, W], counters)`` per strip, in
    raster order (``probs`` is a fresh array). ``read_strip`` runs in a thread ahead;
    ``compute_strips`` / ``strips_per_call`` as for :func:`run_strips`."""
    group = _check_group(strips_per_call)
    buf, bar = _Buffer(plan), _bar(progress, total, 0, desc, unit)
    n = len(plan.row_starts)
    reader = _read_ahead(read_strip, 0, n, group)
    add = _strip_adder(add_strip, reader, read_strip, compute_strips, 0, n, group)
    try:
        for s, row0 in enumerate(plan.row_starts):
            counts = dict(add(s, buf.acc, buf.wsum, bar.update))
            rows = plan.finished_rows(s)
            yield (*next(buf.finished(row0, rows, valid, rows)), counts)
            buf.shift(rows)
    finally:
        if reader is not None:
            reader.close()
        bar.close()


# ------------------------------------------------------------------------------ runner


class StripRun(NamedTuple):
    """What :func:`run_strips` did."""

    counts: dict[str, int]  # counters of ``add_strip`` summed over the whole run
    resumed: dict[str, int]  # the same when this call started
    first_strip: int  # strips already done when this call started


class _State(NamedTuple):
    path: Path
    settings: str
    inputs: dict[str, str | None]


def _check_resumable(who: str, saved: dict, state: _State, readers: Mapping[str, Any]) -> None:
    if saved.get("version") != _STATE_VERSION or saved.get("fingerprint") != state.settings:
        raise ValueError(f"{who}: {state.path.parent} holds a run with different settings; "
                         "pass resume=False to start over (or use another out_dir/prefix)")
    for name, fp in state.inputs.items():
        if saved["inputs"].get(name) != fp:
            raise ValueError(f"{who}: input {_source(name, readers[name])} changed since the "
                             f"run checkpointed in {state.path.parent}; its outputs would be "
                             "stale: pass resume=False to recompute")


def _open_writers(outputs: Mapping[str, OutputSpec], plan: StripPlan, geo: GeoInfo | None,
                  compression: str | None, saved: dict | None = None,
                  state_dir: Path | None = None) -> dict[str, RasterWriter]:
    """New writers, or (with ``saved``) the checkpointed ones; outputs already closed when a
    finished run was interrupted while closing are skipped. On failure those opened so far are
    released (their ``.partial`` kept)."""
    writers: dict[str, RasterWriter] = {}
    try:
        for name, spec in outputs.items():
            kw = dict(height=plan.height, width=plan.width, dtype=spec.dtype, bands=spec.bands,
                      geo=geo, nodata=spec.nodata, compression=compression, **spec.describe)
            if saved is None:
                writers[name] = RasterWriter(spec.path, **kw)
                continue
            ws = dict(saved["writers"][name])
            if ws["pending"]:
                ws["pending"] = os.fspath(state_dir / ws["pending"])
            if not spec.path.with_name(spec.path.name + ".partial").exists():
                if saved["next_strip"] == len(plan.row_starts) and spec.path.exists():
                    continue  # closed before the interruption
                raise FileNotFoundError(f"{spec.path}.partial is missing; pass resume=False")
            writers[name] = RasterWriter.resume(spec.path, ws, **kw)
    except BaseException:
        _abort(writers)
        raise
    return writers


def _abort(writers: Mapping[str, RasterWriter]) -> None:
    for w in writers.values():
        if not w.closed:
            w.abort(keep_partial=True)


def _checkpoint(state: _State, step: int, writers: Mapping[str, RasterWriter],
                carry: tuple[np.ndarray, np.ndarray] | None, counts: Mapping[str, int]) -> None:
    """Writers durable, carry saved, then ``progress.json`` renamed over the old one."""
    folder = state.path.parent
    states = {}
    for name, w in writers.items():
        st = w.checkpoint(folder / f"{name}.pending.{step}.npy")
        st["pending"] = Path(st["pending"]).name if st["pending"] else None
        states[name] = st
    name = None
    if carry is not None:
        name = f"carry.{step}.npz"
        save_npz_atomic(folder / name, acc=carry[0], wsum=carry[1])
    _write_state(state, step, counts, complete=False, writers=states, carry=name)
    _clean(folder, {name} | {st["pending"] for st in states.values()})


def _strip_job(state: _State, step: int, writers: Mapping[str, RasterWriter],
               rows: tuple[np.ndarray, np.ndarray], row0: int, valid: Reader | None,
               carry: tuple[np.ndarray, np.ndarray] | None,
               counts: Mapping[str, int]) -> Callable[[], None]:
    """The writer thread's work for one strip: normalise and write its finished ``rows``
    (copies of ``acc``, ``wsum``), then checkpoint (after those writes)."""

    def job() -> None:
        for _, probs, nodata in _normalised(*rows, row0, valid, _FLUSH_ROWS):
            write_outputs(writers, probs, nodata)
        _checkpoint(state, step, writers, carry, counts)

    return job


def _write_state(state: _State, step: int, counts: Mapping[str, int], **extra) -> None:
    write_json_atomic(state.path, dict(version=_STATE_VERSION, fingerprint=state.settings,
                                       inputs=state.inputs, next_strip=step, counters=sorted(
                                           counts), **counts, **extra))


def _clean(folder: Path, keep: set) -> None:
    for f in folder.iterdir():
        if f.name != "progress.json" and f.name not in keep:
            f.unlink(missing_ok=True)


def _load_state(state: _State, resume: bool) -> dict | None:
    if not (resume and state.path.exists()):
        return None
    return json.loads(state.path.read_text())


def _start(plan: StripPlan, state: _State, saved: dict | None,
           outputs: Mapping[str, OutputSpec], geo: GeoInfo | None, compression: str | None,
           initial_carry: Callable[[], tuple[np.ndarray, np.ndarray]] | None
           ) -> tuple[int, dict, dict | None, _Buffer]:
    """``(first strip, counters, writers or None, buffer)`` where :func:`run_strips` starts: a
    fresh run (state folder cleared, writers opened later) or the checkpoint ``saved`` (its
    writers reopened, its carried rows restored)."""
    if saved is None or saved["complete"]:
        state.path.parent.mkdir(parents=True, exist_ok=True)
        _clean(state.path.parent, set())
        state.path.unlink(missing_ok=True)
        return 0, {}, None, _Buffer(plan, None if initial_carry is None else initial_carry())
    writers = _open_writers(outputs, plan, geo, compression, saved, state.path.parent)
    carry = None
    if saved["carry"]:
        with np.load(state.path.parent / saved["carry"]) as z:
            carry = (z["acc"], z["wsum"])
    counts = {k: saved[k] for k in saved["counters"]}
    return saved["next_strip"], counts, writers, _Buffer(plan, carry)


def run_strips(
    plan: StripPlan,
    add_strip: AddStrip,
    *,
    who: str,
    outputs: Mapping[str, OutputSpec],
    state_dir: Path,
    settings: Mapping[str, Any],
    inputs: Mapping[str, Any],
    geo: GeoInfo | None = None,
    compression: str | None = "deflate",
    valid: Reader | None = None,
    resume: bool = True,
    progress: bool = False,
    total: int = 0,
    progress_key: str = "",
    unit: str = "tile",
    desc: str | None = None,
    finish: Callable[[], Any] | None = None,
    read_strip: ReadStrip | None = None,
    initial_carry: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
    compute_strips: ComputeStrips | None = None,
    strips_per_call: int = 1,
) -> StripRun:
    """Run (or resume) every strip of ``plan`` into ``outputs`` (see module doc).

    Args:
      plan, add_strip: the strips and the function that fills one (returns its counters).
      who: the pipeline's name, for errors and the progress bar.
      outputs: by name (``labels`` required, ``probs``, ``entropy``), e.g.
        :func:`label_outputs`.
      state_dir: the resume state folder.
      settings: everything (JSON-able) that determines the outputs besides the inputs.
      inputs: readers by name (None allowed); those with ``fingerprint()`` are checked.
      geo, compression: of the output GeoTIFFs.
      valid: ``(row, col, h, w) -> bool`` output mask (False = no data).
      resume: continue a checkpointed run; ``False`` starts over.
      progress, total, progress_key, unit, desc: tqdm bar of ``total`` units (default label
        ``who``); ``add_strip`` ticks once per unit, counter ``progress_key`` holds the units
        done.
      finish: called once all outputs are closed, before the run is marked complete.
      read_strip: ``read_strip(s) -> inputs`` (window reads, alignment), run in a reader thread
        up to two strips ahead; ``add_strip`` then gets ``inputs`` as a fifth argument
        (without ``compute_strips``).
      initial_carry: ``() -> (acc [k, W, n], wsum [k, W])``, the buffer's first rows before strip 0
        of a fresh run (a band of a larger raster, rebuilt from the strips above it); a
        resumed run restores its checkpointed carry instead.
      compute_strips, strips_per_call: ``compute_strips([(s, inputs_s), ...]) -> [result_s,
        ...]`` on groups of up to ``strips_per_call`` consecutive strips (e.g. one batched
        device call over all their windows; ``inputs_s = read_strip(s)``, None without a
        ``read_strip``); ``add_strip`` then gets ``result_s`` as its fifth argument. The reader
        runs ``max(2, strips_per_call)`` strips ahead (see module doc).

    Normalising, writing and checkpointing run in a writer thread behind ``add_strip`` (a
    strip's checkpoint follows its writes, in order), so reads and writes overlap the
    compute. An exception in either thread is re-raised here; on any error the strips already
    handed to the writer are written and checkpointed, the threads are joined and the writers
    released.
    """
    group = _check_group(strips_per_call)
    current = {name: reader_fingerprint(r) for name, r in inputs.items()}
    state = _State(Path(state_dir) / "progress.json", fingerprint(
        settings=dict(settings), checked={k: v is not None for k, v in current.items()},
        outputs={k: (str(np.dtype(s.dtype)), s.bands) for k, s in outputs.items()}), current)
    saved = _load_state(state, resume)
    n = len(plan.row_starts)
    if saved is not None:
        _check_resumable(who, saved, state, inputs)
        counts = {k: saved[k] for k in saved["counters"]}
        if saved["complete"] and all(s.path.exists() for s in outputs.values()):
            return StripRun(counts, counts, n)
    first, counts, writers, buf = _start(plan, state, saved, outputs, geo, compression,
                                         initial_carry)
    resumed = dict(counts)
    bar = _bar(progress, total, counts.get(progress_key, 0), desc or who, unit)
    reader = _read_ahead(read_strip, first, n, group)
    add = _strip_adder(add_strip, reader, read_strip, compute_strips, first, n, group)
    behind = WriteBehind(depth=_DEPTH)
    try:
        for s in range(first, n):
            counts = _add_counts(counts, add(s, buf.acc, buf.wsum, bar.update))
            if writers is None:  # opened once a strip is done: a bad input leaves no file
                writers = _open_writers(outputs, plan, geo, compression)
            rows = plan.finished_rows(s)
            done = buf.take(rows)
            buf.shift(rows)
            keep = plan.buffer_rows - rows if s + 1 < n else 0
            carry = buf.take(keep) if keep else None
            behind.submit(_strip_job(state, s + 1, writers, done, plan.row_starts[s], valid,
                                     carry, dict(counts)))
        behind.finish()
        for w in (writers or {}).values():
            w.close()
    except BaseException:
        behind.finish(reraise=False)
        _abort(writers or {})
        raise
    finally:
        if reader is not None:
            reader.close()
        bar.close()
    if finish is not None:
        finish()
    _write_state(state, n, counts, complete=True)
    _clean(state.path.parent, set())
    return StripRun(counts, resumed, first)
