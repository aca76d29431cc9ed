"""Training patches streamed from every tile of a region (windowed reads, bounded cache).

Each tile is cut into aligned blocks of ``block x block`` *top-left positions*; a block's
window (the pixels its patches can touch) is rows ``[i B, (i + 1) B + Kmax - 1)`` and the same
for columns, clipped to the tile. Per step, :meth:`PatchStream.sample` draws ``windows`` blocks
with probability proportional to ``n_b`` (the number of allowed top-left positions of the
step's patch width ``K`` inside block ``b``: every position for plain sampling, those whose
``K x K`` window holds label ``l`` for label-conditioned sampling) and gives each of the
``batch`` patches one of those blocks uniformly and a position uniformly among the block's
allowed ones. Every patch is thus *exactly* uniform over the allowed windows of the whole
region (tiles weighted by their area), like :func:`epilsr.samplers.sample_patches` /
``sample_labelled_patches`` over an in-memory stack; patches of one step share ``windows``
blocks, so a step reads at most ``windows`` windows (never a whole tile).

Windows are read through :class:`epilsr.io.geotiff.RasterReader` and kept in an LRU cache
limited in bytes (``cache_bytes``). The label index (``n_b`` for every label and patch width,
and each label's pixel count over the region) is built once, on first use, from the label
rasters read one block row (strip) at a time. Randomness comes from the JAX key only (a NumPy
Philox generator seeded with its key data), so a step's patches are the same on a rerun and on
resume, whatever the cache held.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np

from epilsr.io.atomic import atomic_write_path
from epilsr.io.geotiff import RasterReader

__all__ = ["PatchStream", "WindowCache", "numpy_rng", "forward_distance"]

log = logging.getLogger("epilsr.stream")


def numpy_rng(key) -> np.random.Generator:
    """A NumPy generator determined by a JAX PRNG key (typed or raw ``uint32``)."""
    key = jax.numpy.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = [int(w) for w in np.asarray(key, np.uint32).ravel()]
    seed = 0
    for w in words:
        seed = (seed << 32) | w
    return np.random.Generator(np.random.Philox(key=seed % (1 << 128)))


def forward_distance(ind: np.ndarray, rows: int, cap: int) -> np.ndarray:
    """``d[.., r, c] = min k`` such that the ``(k+1) x (k+1)`` window at ``(r, c)`` holds a
    ``True`` of ``ind`` ``[.., S, W]`` (capped at ``cap``), for its first ``rows`` rows.

    The window of width ``K`` at ``(r, c)`` contains a ``True`` iff ``d[r, c] < K`` (rows past
    ``S`` count as empty, so ``S >= rows + cap - 1`` gives exact values). One bottom-up pass:
    ``d(r, c) = 0`` on a ``True``, else ``1 + min(d(r+1, c), d(r+1, c+1), d(r, c+1))`` (the
    ``k``-windows at those three corners cover the ``(k+1)``-window at ``(r, c)``); along a
    row that is ``min_{j >= c} (f_j + j) - c`` with ``f_j = 0`` on a ``True`` else
    ``1 + min(d(r+1, j), d(r+1, j+1))``: a reversed running minimum. Returns
    ``[.., rows, W]`` uint8.
    """
    *lead, s, w = ind.shape
    out = np.empty((*lead, rows, w), np.uint8)
    j = np.arange(w, dtype=np.int32)
    below = np.full((*lead, w + 1), cap, np.int32)  # d of the row below (+ one past the end)
    for r in range(s - 1, -1, -1):
        f = np.where(ind[..., r, :], 0, 1 + np.minimum(below[..., :-1], below[..., 1:]))
        g = np.minimum.accumulate((f + j)[..., ::-1], axis=-1)[..., ::-1] - j
        np.minimum(g, cap, out=below[..., :-1])
        if r < rows:
            out[..., r, :] = below[..., :-1]
    return out


def _box_any(ind: np.ndarray, k: int) -> np.ndarray:
    """``[S - k + 1, W - k + 1]`` bool: the ``k x k`` window at each corner holds a True
    (exact integer summed-area table)."""
    sat = np.pad(np.cumsum(np.cumsum(ind, axis=0, dtype=np.int32), axis=1), ((1, 0), (1, 0)))
    return (sat[k:, k:] - sat[:-k, k:] - sat[k:, :-k] + sat[:-k, :-k]) > 0


def _edge_counts(d, fits, cols, block: int, nb: int, kmax: int) -> np.ndarray:
    """:func:`_block_counts` of arbitrary corners: ``d`` ``[L, R, C]``, ``fits`` ``[R, C]``,
    ``cols`` ``[C]`` their column indices; one histogram over ``(block, label, d, fit)``."""
    n_lab = d.shape[0]
    n = kmax + 1
    out = np.zeros((nb, n_lab, n), np.int64)
    if d.size == 0:
        return out
    cell = (cols // block)[None, None, :] * n_lab + np.arange(n_lab)[:, None, None]
    code = ((cell * n + d) * n + np.clip(fits, 0, kmax)[None]).astype(np.int64)
    hist = np.bincount(code.ravel(), minlength=nb * n_lab * n * n).reshape(nb, n_lab, n, n)
    below = np.cumsum(hist, axis=2)  # [.., a, f]: d <= a
    both = np.cumsum(below[..., ::-1], axis=3)[..., ::-1]  # [.., a, b]: d <= a, fit >= b
    k = np.arange(1, n)
    out[..., 1:] = both[..., k - 1, k]
    return out


def _block_counts(d: np.ndarray, fit_rows: np.ndarray, width: int, block: int,
                  kmax: int) -> np.ndarray:
    """``[ceil(W / block), L, kmax + 1]``: per column block, label and width ``K``, the corners
    with ``d < K`` whose ``K``-window lies inside the tile.

    ``d``: ``[L, R, W]`` from :func:`forward_distance`; ``fit_rows``: ``[R]`` rows left below
    each corner row (``H - r``, decreasing). Corners where every width fits (a rectangle) are
    counted by one small histogram of ``d`` per block and label; the rest (the last ``kmax - 1``
    rows and columns of the tile) by :func:`_edge_counts`."""
    n_lab, rows, w = d.shape
    n, nb = kmax + 1, -(-width // block)
    ri = int((fit_rows >= kmax).sum())  # interior rows: a prefix
    wi = max(0, width - kmax + 1)  # interior columns: a prefix
    out = np.zeros((nb, n_lab, n), np.int64)
    if ri:
        for jb in range(nb):
            c0, c1 = jb * block, min((jb + 1) * block, wi)
            for lab in range(n_lab):
                if c1 > c0:
                    hist = np.bincount(d[lab, :ri, c0:c1].ravel(), minlength=n)
                    out[jb, lab, 1:] = np.cumsum(hist)[: n - 1]
    cols = np.arange(w)
    fit_cols = width - cols
    out += _edge_counts(d[:, ri:], np.minimum.outer(fit_rows[ri:], fit_cols), cols, block, nb,
                        kmax)
    out += _edge_counts(d[:, :ri, wi:], np.minimum.outer(fit_rows[:ri], fit_cols[wi:]),
                        cols[wi:], block, nb, kmax)
    return out


class WindowCache:
    """An LRU of decoded windows bounded in bytes (an entry larger than the bound is returned
    but not kept). Counts hits, misses and the bytes it decoded."""

    def __init__(self, max_bytes: int):
        if int(max_bytes) < 0:
            raise ValueError(f"cache_bytes: expected a byte count >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict = OrderedDict()

    def get(self, key, load: Callable[[], np.ndarray]) -> np.ndarray:
        value = self.lookup(key)
        if value is None:
            value = load()
            self.put(key, value)
        return value

    def lookup(self, key) -> np.ndarray | None:
        """The cached value (now the most recent) or None (a miss)."""
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        return None

    def put(self, key, value: np.ndarray) -> None:
        size = value.nbytes
        if key not in self._items and size <= self.max_bytes:
            self._items[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.nbytes


class PatchStream:
    """Patches of every tile of a region, read window by window (see the module docstring).

    Args:
      tiles: ``(imagery path, label path or None)`` per tile; imagery ``[H, W, C]`` uint8,
        uint16 or float, labels ``[H, W]`` of the same size.
      max_size: the largest patch width ``Kmax`` that will be asked for.
      block: side of a block of top-left positions (windows are ``block + Kmax - 1``).
      windows: blocks read per step (patches of a step come from these).
      cache_bytes: bound of the decoded-window cache.
      label_map: applied to every label window read (e.g. Chesapeake codes -> 0..3).
      n_labels: labels ``0..n_labels-1`` indexed for label-conditioned sampling.
      max_open: open readers kept per thread (files are reopened when evicted).
      threads: windows of a step read (decoded) in parallel.
      index_file: where the label index is saved once built (``.npz``) and loaded from when it
        was built from the same label files (path, size, mtime) and grid (e.g. on resume).

    Attributes:
      channels, dtype: of the imagery; ``shapes``: ``[T, 2]`` tile sizes; ``has_labels``.
      reads, bytes_read, largest_read: windows decoded, their bytes, the largest ``(h, w)``.
    """

    def __init__(
        self,
        tiles: Sequence[tuple[str | Path, str | Path | None]],
        *,
        max_size: int,
        block: int = 512,
        windows: int = 16,
        cache_bytes: int = 2**30,
        label_map: Callable[[np.ndarray], np.ndarray] | None = None,
        n_labels: int = 4,
        max_open: int = 64,
        threads: int = 4,
        index_file: str | Path | None = None,
    ):
        if not tiles:
            raise ValueError("tiles: expected at least one (imagery, labels) pair, got none")
        for name, v in (("max_size", max_size), ("block", block), ("windows", windows)):
            if int(v) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v}")
        self.tiles = [(Path(i), None if lab is None else Path(lab)) for i, lab in tiles]
        self.max_size, self.block, self.windows = int(max_size), int(block), int(windows)
        self.label_map = label_map
        self.n_labels = int(n_labels)
        self.cache = WindowCache(cache_bytes)
        self._max_open = int(max_open)  # per thread
        self.threads = int(threads)
        self.index_file = None if index_file is None else Path(index_file)
        self._pool: ThreadPoolExecutor | None = None
        self._readers: dict[int, OrderedDict] = {}  # thread -> its LRU of open readers
        self._lock = threading.RLock()
        self.reads = self.bytes_read = 0
        self.largest_read = (0, 0)
        shapes, self.channels, self.dtype = [], None, None
        for img, lab in self.tiles:
            r = self._reader(img)
            if len(r.shape) != 3:
                raise ValueError(f"{img}: expected [H, W, C] imagery, got shape {r.shape}")
            if r.dtype not in (np.uint8, np.uint16) and r.dtype.kind != "f":
                raise ValueError(f"{img}: expected uint8, uint16 or float imagery, got {r.dtype}")
            if self.channels is None:
                self.channels, self.dtype = r.shape[2], r.dtype
            elif (r.shape[2], r.dtype) != (self.channels, self.dtype):
                raise ValueError(f"{img}: {r.shape[2]} bands of {r.dtype}; expected "
                                 f"{self.channels} bands of {self.dtype} like {self.tiles[0][0]}")
            if lab is not None:
                lr = self._reader(lab)
                if lr.shape != r.shape[:2]:
                    raise ValueError(f"{lab}: label shape {lr.shape} != imagery {r.shape[:2]} of "
                                     f"{img.name}; expected rasters of the same size")
            shapes.append(r.shape[:2])
        self.shapes = np.array(shapes, np.int64)
        self.has_labels = all(lab is not None for _, lab in self.tiles)
        # blocks: (tile, block row, block col) in tile-major order
        grid = [(-(-h // self.block), -(-w // self.block)) for h, w in shapes]
        self._blocks = np.array([(t, i, j) for t, (nr, nc) in enumerate(grid)
                                 for i in range(nr) for j in range(nc)], np.int64)
        self._valid: np.ndarray | None = None  # [n_blocks, n_labels, Kmax + 1] counts
        self._pixels: np.ndarray | None = None  # [n_labels] label pixels of the region
        self._plain: dict[int, np.ndarray] = {}  # width -> [n_blocks] positions

    # ---- reading -------------------------------------------------------------------------

    def _reader(self, path: Path) -> RasterReader:
        """This thread's open reader of ``path`` (a file handle is not shared by threads)."""
        with self._lock:
            mine = self._readers.setdefault(threading.get_ident(), OrderedDict())
            r = mine.pop(path, None)
            if r is None:
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: no such raster")
                try:
                    r = RasterReader(path, cache_bytes=0)  # windows cached above
                except Exception as err:  # tifffile parse errors of every kind
                    raise ValueError(f"{path}: not a readable TIFF ({type(err).__name__}: "
                                     f"{err})") from err
            mine[path] = r
            while len(mine) > self._max_open:
                mine.popitem(last=False)[1].close()
            return r

    def _read(self, path: Path, row: int, col: int, h: int, w: int) -> np.ndarray:
        reader = self._reader(path)
        try:
            out = reader(row, col, h, w)  # outside the lock: several read threads
        except (ValueError, MemoryError):
            raise
        except Exception as err:  # imagecodecs/zlib errors of a corrupted strip or tile
            raise ValueError(f"{path}: cannot decode rows {row}:{row + h}, cols {col}:{col + w} "
                             f"({type(err).__name__}: {err}); the file is corrupted") from err
        with self._lock:
            self.reads += 1
            self.bytes_read += out.nbytes
            self.largest_read = max(self.largest_read, (h, w), key=lambda s: s[0] * s[1])
            return out

    def _imagery(self, path: Path, row: int, col: int, h: int, w: int) -> np.ndarray:
        image = self._read(path, row, col, h, w)
        if image.dtype.kind == "f" and not np.isfinite(image).all():
            raise ValueError(f"{path}: NaN/inf imagery in rows {row}:{row + h}, cols "
                             f"{col}:{col + w}; expected finite reflectance")
        return image

    def _labels(self, path: Path, row: int, col: int, h: int, w: int) -> np.ndarray:
        lab = self._read(path, row, col, h, w)
        return lab if self.label_map is None else self.label_map(lab)

    def _span(self, t: int, i: int, j: int) -> tuple[int, int, int, int]:
        """Pixels ``(row, col, h, w)`` that the patches of block ``(i, j)`` of tile ``t`` touch."""
        h, w = self.shapes[t]
        r0, c0 = i * self.block, j * self.block
        extra = self.block + self.max_size - 1
        return r0, c0, int(min(h, r0 + extra) - r0), int(min(w, c0 + extra) - c0)

    def window(self, b: int, *, labels: bool = False) -> np.ndarray:
        """Imagery ``[h, w, C]`` (or, with ``labels``, the labels ``[h, w]``) that block ``b``'s
        patches touch (cached; label windows are read only for label-conditioned draws)."""
        t, i, j = (int(v) for v in self._blocks[b])
        path = self.tiles[t][1 if labels else 0]
        span = self._span(t, i, j)
        read = self._labels if labels else self._imagery
        key = (labels, t, i, j)
        with self._lock:
            value = self.cache.lookup(key)
        if value is None:
            value = read(path, *span)
            with self._lock:
                self.cache.put(key, value)
        return value

    def _windows(self, blocks, labels: bool) -> dict:
        """``{block: (imagery, labels or None)}`` read on ``threads`` threads."""

        def one(b):
            return self.window(b), self.window(b, labels=True) if labels else None

        if self.threads <= 1 or len(blocks) <= 1:
            return {b: one(b) for b in blocks}
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="epilsr-read")
        return dict(zip(blocks, self._pool.map(one, blocks), strict=True))

    # ---- the label index -----------------------------------------------------------------

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        """``valid[b, l, K]``: top-left positions of block ``b`` whose ``K x K`` window holds
        label ``l``; ``pixels[l]``: pixels of ``l`` in the region. One pass over the labels,
        one block row (strip) at a time."""
        with self._lock:  # built once, whichever thread asks first
            if self._valid is None:
                self._valid, self._pixels = self._saved_index() or self._build_index()
            return self._valid, self._pixels

    def _index_identity(self) -> str:
        """What the index depends on: the label files (path, size, mtime) and the grid."""
        files = [(str(lab.resolve()), st.st_size, st.st_mtime_ns)
                 for _, lab in self.tiles for st in [lab.stat()]]
        return json.dumps({"files": files, "block": self.block, "max_size": self.max_size,
                           "n_labels": self.n_labels, "version": 1})

    def _saved_index(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The index saved in ``index_file`` when it was built from the same files and grid."""
        if self.index_file is None or not self.index_file.is_file() or not self.has_labels:
            return None
        try:
            with np.load(self.index_file) as z:
                if str(z["identity"]) != self._index_identity():
                    log.info("%s: built from other label files or settings; rebuilding it",
                             self.index_file)
                    return None
                return z["valid"], z["pixels"]
        except (OSError, ValueError, KeyError) as err:
            log.warning("%s: unreadable (%s); rebuilding the label index", self.index_file, err)
            return None

    def _build_index(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.has_labels:
            missing = next(img for img, lab in self.tiles if lab is None)
            raise ValueError(f"label-conditioned sampling needs a label raster for every tile; "
                             f"{missing} has none")
        t0 = time.perf_counter()
        kmax, n_lab = self.max_size, self.n_labels
        valid = np.zeros((len(self._blocks), n_lab, kmax + 1), np.int64)
        pixels = np.zeros(n_lab, np.int64)
        first = 0
        for t, (h, w) in enumerate(self.shapes):
            h, w = int(h), int(w)
            nr, nc = -(-h // self.block), -(-w // self.block)
            for i in range(nr):
                r0, _, sh, _ = self._span(t, i, 0)
                strip = self._labels(self.tiles[t][1], r0, 0, sh, w)
                rows = min(self.block, h - r0)
                pixels += np.bincount(strip[:rows].ravel(), minlength=256)[:n_lab]
                ind = strip[None] == np.arange(n_lab, dtype=strip.dtype)[:, None, None]
                d = forward_distance(ind, rows, kmax)
                at = first + i * nc
                valid[at : at + nc] = _block_counts(d, h - r0 - np.arange(rows), w, self.block,
                                                    kmax)
            first += nr * nc
        log.info("label index of %d tiles built in %.1f s", len(self.tiles),
                 time.perf_counter() - t0)
        if self.index_file is not None:
            identity = np.array(self._index_identity())

            def save(path):
                with open(path, "wb") as f:  # a file object: no ".npz" added to the name
                    np.savez(f, valid=valid, pixels=pixels, identity=identity)

            atomic_write_path(self.index_file, save)
        return valid, pixels

    def label_pixels(self) -> np.ndarray:
        """``[n_labels]`` pixel count of each label over the whole region (builds the index)."""
        return self._index()[1].copy()

    def has_label(self, label: int) -> bool:
        """Whether ``label`` occurs anywhere in the region (not only in a crop)."""
        return bool(self.label_pixels()[int(label)] > 0)

    # ---- sampling ------------------------------------------------------------------------

    def _rows(self, t: int, i: int, k: int, axis: int) -> int:
        """Top-left rows (axis 0) or columns (axis 1) of block index ``i`` for width ``k``."""
        n = int(self.shapes[t][axis]) - k + 1
        return max(0, min((i + 1) * self.block, n) - i * self.block)

    def weights(self, size: int, label: int | None = None) -> np.ndarray:
        """``[n_blocks]`` allowed top-left positions of each block for width ``size``."""
        if label is None:
            if size not in self._plain:
                t, i, j = self._blocks.T
                n = self.shapes[t] - size + 1  # [n_blocks, 2] top-left rows, columns
                lo = np.stack([i, j], axis=1) * self.block
                span = np.clip(np.minimum(lo + self.block, n) - lo, 0, None)
                self._plain[size] = span[:, 0] * span[:, 1]
            return self._plain[size]
        if not 0 <= int(label) < self.n_labels:
            raise ValueError(f"label: expected 0..{self.n_labels - 1}, got {label}")
        return self._index()[0][:, int(label), size]

    def _draw(self, rng, b: int, size: int, label, labels, n: int, expected: int) -> np.ndarray:
        """``[n, 2]`` top-left corners (window coordinates) drawn uniformly among the allowed
        ones of block ``b`` (``expected`` of them, per the index)."""
        t, i, j = (int(v) for v in self._blocks[b])
        nr, nc = self._rows(t, i, size, 0), self._rows(t, j, size, 1)
        if label is None:
            found = nr * nc
        else:
            allowed = np.argwhere(_box_any(labels == label, size)[:nr, :nc])
            found = len(allowed)
        if found != expected:  # the index and the window disagree: never a silent bias
            raise RuntimeError(f"{self.tiles[t][0]}: block ({i}, {j}) has {found} allowed "
                               f"{size}x{size} windows, the index says {expected}")
        picks = rng.integers(0, found, size=n)
        if label is None:
            return np.stack(np.divmod(picks, nc), axis=1)
        return allowed[picks]

    def sample(self, key, *, size: int, batch: int, label: int | None = None) -> np.ndarray:
        """``[batch, size, size, C]`` float32 patches (uint8 / 255, uint16 / 65535), each
        uniform over the region's windows (holding ``label`` when given)."""
        size, batch = int(size), int(batch)
        if not 1 <= size <= self.max_size:
            raise ValueError(f"size: expected a patch width in 1..{self.max_size} (the stream's "
                             f"max_size), got {size}")
        w = self.weights(size, label)
        total = int(w.sum())
        if total == 0:
            what = f" containing label {label}" if label is not None else ""
            raise ValueError(f"no {size}x{size} window{what} in the {len(self.tiles)} tile(s) "
                             f"of the region (first {self.tiles[0][0]})")
        rng = numpy_rng(key)
        picks = rng.choice(len(w), size=self.windows, p=w / total)
        which = rng.integers(0, self.windows, size=batch)
        out = np.empty((batch, size, size, self.channels), self.dtype)
        used = sorted({int(picks[g]) for g in np.unique(which)})
        got = self._windows(used, label is not None)
        for g in range(self.windows):
            slots = np.flatnonzero(which == g)
            if slots.size == 0:
                continue
            b = int(picks[g])
            image, labels = got[b]
            corners = self._draw(rng, b, size, label, labels, slots.size, int(w[b]))
            for s, (r, c) in zip(slots, corners, strict=True):
                out[s] = image[r : r + size, c : c + size]
        return _to_float(out)

    def mean(self, key, *, batch: int = 256) -> np.ndarray:
        """``[C]`` mean of ``batch`` uniform ``max_size`` patches (an estimate of the region's
        mean, e.g. to initialise an epitome)."""
        size = int(min(self.max_size, self.shapes.min()))
        return self.sample(key, size=size, batch=batch).mean(axis=(0, 1, 2))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        with self._lock:
            for mine in self._readers.values():
                while mine:
                    mine.popitem()[1].close()
            self._readers.clear()


def _to_float(x: np.ndarray) -> np.ndarray:
    """Like :func:`epilsr.epitome.as_float_image`: uint8 / 255, uint16 / 65535, floats cast."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if x.dtype == np.uint16:
        return x.astype(np.float32) / np.float32(65535.0)
    return x.astype(np.float32)
