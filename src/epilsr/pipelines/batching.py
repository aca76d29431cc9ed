"""Batches of equal-shaped windows per device call, the window axis sharded over local devices.

:class:`WindowBatches` runs a per-window function ``fn(*shared, *window)`` on a list of
windows in as few compiled calls as the memory budget allows: the windows are stacked on a new
leading axis, sharded ``P("data")`` over the mesh's devices (``jax.jit`` + ``NamedSharding``;
the shared arguments replicated), and each device maps ``fn`` over its windows inside the one
compiled call (``jax.shard_map`` + ``jax.lax.map``). Batch sizes are ``D * 2^k`` (``D``
devices), so few shapes are compiled; a last partial batch is padded by repeating its last
window (results dropped).

**Exactness.** Each window runs the same program as an unbatched call, so the outputs are
bit-identical to per-window calls on any number of devices. A ``jax.vmap`` over windows is not:
XLA compiles the batched dots and reductions differently and float32 results change in the
last bits (measured on CPU for self-epitomic LSR, 48^2 windows). ``lanes > 1`` vmaps that many
windows per step of the map (``lax.map(..., batch_size=lanes)``): more parallel work per step
on an accelerator, results equal up to float32 rounding only.

**Several strips per call.** The raster pipelines hand a call the windows of
:meth:`WindowBatches.strips_per_call` consecutive strips (``compute_strips`` of
:func:`epilsr.io.strips.run_strips`): on an accelerator one strip of a small raster is too
little work for a call, so the batch that fits the memory budget is filled with whole strips
(at most :data:`MAX_STRIPS`, so the strips in flight stay bounded). On CPU the default batch is
one window per device, so a call spans one strip (several only when a strip has fewer windows
than there are devices). The windows' results do not depend on the grouping.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from epilsr.parallel import data_mesh

__all__ = ["MAX_STRIPS", "WindowBatches", "default_budget"]

#: At most this many strips per call (:meth:`WindowBatches.strips_per_call`): bounds the strips
#: read ahead and held, whatever the budget and the raster height.
MAX_STRIPS = 8
_CPU_BUDGET = 2**30  # bytes per device when the device does not report its memory
_CACHE_SIZE = 32
#: Compiled calls shared by every WindowBatches of the same per-window function object (the
#: function is part of the key, so its id is never reused while cached): a pipeline called on
#: many rasters compiles once.
_COMPILED: OrderedDict = OrderedDict()


def default_budget(device: jax.Device) -> int:
    """Bytes of one batch per device: half the device's memory limit, else 1 GiB (CPU)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices may not implement memory_stats
        stats = {}
    limit = stats.get("bytes_limit")
    return int(limit) // 2 if limit else _CPU_BUDGET


def _bytes(compiled) -> int | None:
    """Argument + output + temporary bytes of a compiled call (per device), if known."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


class WindowBatches:
    """``fn(*shared, *window) -> array`` over many windows in batched, sharded calls.

    Args:
      fn: the per-window function (traceable; its outputs depend on its window only).
      mesh: 1-D mesh with axis ``"data"``; default :func:`epilsr.parallel.data_mesh` over
        ``jax.local_devices()``.
      window_batch: windows per call (rounded up to a multiple of the device count); None =
        one window per device on CPU when no ``memory_budget`` is given (a loop of windows in
        one call ran at 0.6-0.7x the rate of separate calls there,
        ``benchmarks/raster_pipeline.py``), else the largest ``D * 2^k`` (at most
        ``max_batch``) whose compiled call fits ``memory_budget`` bytes per device.
      memory_budget: bytes per device; default :func:`default_budget` (given explicitly, it
        sizes the batch on CPU too).
      max_batch: cap of the automatic batch (e.g. the windows of a strip).
      lanes: windows vmapped together per step on a device (1 = exact, see module doc).
    """

    def __init__(self, fn: Callable, *, mesh: Mesh | None = None, window_batch: int | None = None,
                 memory_budget: int | None = None, max_batch: int = 64, lanes: int = 1):
        if window_batch is not None and (int(window_batch) != window_batch or window_batch < 1):
            raise ValueError(f"window_batch: expected a positive integer, got {window_batch!r}")
        self.mesh = data_mesh(jax.local_devices()) if mesh is None else mesh
        self.devices = int(self.mesh.devices.size)
        self.budget = (default_budget(self.mesh.devices.flat[0]) if memory_budget is None
                       else int(memory_budget))
        if (window_batch is None and memory_budget is None
                and self.mesh.devices.flat[0].platform == "cpu"):
            window_batch = 1
        self.fixed = None if window_batch is None else self._round(int(window_batch))
        self.max_batch = max(1, int(max_batch))
        self.lanes = max(1, int(lanes))
        self._per_window = fn
        self._size: dict[tuple, int] = {}
        self.calls = 0

    def _round(self, n: int) -> int:
        """``n`` rounded up to a multiple of ``D``."""
        return -(-n // self.devices) * self.devices

    def _jit(self, n_shared: int, n_window: int) -> Callable:
        def local(*args):  # this device's windows, one after the other (module doc)
            shared, window = args[:n_shared], args[n_shared:]
            if window[0].shape[0] == 1:  # one window: the plain per-window program
                out = self._per_window(*shared, *(w[0] for w in window))
                return jax.tree.map(lambda x: x[None], out)
            return jax.lax.map(lambda w: self._per_window(*shared, *w), window,
                               batch_size=self.lanes if self.lanes > 1 else None)

        rep, split = PartitionSpec(), PartitionSpec("data")
        mapped = jax.shard_map(local, mesh=self.mesh, in_specs=(rep,) * n_shared
                               + (split,) * n_window, out_specs=split, check_vma=False)
        return jax.jit(mapped, in_shardings=tuple(NamedSharding(self.mesh, p) for p in
                                                  (rep,) * n_shared + (split,) * n_window),
                       out_shardings=NamedSharding(self.mesh, split))

    def _compile(self, shared: Sequence, window: Sequence[np.ndarray], size: int):
        sig = (self._per_window, tuple(d.id for d in self.mesh.devices.flat), self.lanes, size,
               len(shared), tuple((w.shape, w.dtype.str) for w in window),
               tuple(_spec(a) for a in shared))
        if sig in _COMPILED:
            _COMPILED.move_to_end(sig)
        else:
            jitted = self._jit(len(shared), len(window))
            stacked = [jax.ShapeDtypeStruct((size, *w.shape), w.dtype) for w in window]
            _COMPILED[sig] = jitted.lower(*shared, *stacked).compile()
            while len(_COMPILED) > _CACHE_SIZE:
                _COMPILED.popitem(last=False)
        return _COMPILED[sig]

    def _batch_size(self, shared: Sequence, window: Sequence[np.ndarray], n: int) -> int:
        """Windows per call for ``n`` windows of this shape (``D * 2^k``, fitting the budget)."""
        if self.fixed is not None:
            return self.fixed
        key = tuple((w.shape, w.dtype.str) for w in window)
        if key not in self._size:  # the largest size that fits, found once per shape
            size = self.devices
            while size * 2 <= self._round(self.max_batch):
                size *= 2
            while size > self.devices:
                used = _bytes(self._compile(shared, window, size))
                if used is None or used <= self.budget:
                    break
                size //= 2
            self._size[key] = size
        size = self.devices  # no larger than needed for n windows
        while size < min(n, self._size[key]):
            size *= 2
        return min(size, self._size[key])

    def windows_per_call(self, shared: Sequence, window: Sequence) -> int:
        """Windows per call for a long run of windows shaped like ``window`` (arrays or
        ``jax.ShapeDtypeStruct`` s): ``window_batch``, or the budget's choice (compiles)."""
        return self._batch_size(shared, window, 1 << 62)

    def strips_per_call(self, shared: Sequence, window: Sequence, per_strip: int,
                        max_strips: int = MAX_STRIPS) -> int:
        """Whole strips of ``per_strip`` windows per call: ``windows_per_call // per_strip``,
        at least 1, at most ``max_strips``. One on CPU by default (one window per device),
        unless a strip has fewer windows than devices; several on an accelerator when the
        budget's batch holds several strips."""
        if int(per_strip) < 1 or int(max_strips) < 1:
            raise ValueError(f"strips_per_call: expected per_strip >= 1 and max_strips >= 1, "
                             f"got {per_strip} and {max_strips}")
        fit = self.windows_per_call(shared, window)
        return max(1, min(int(max_strips), fit // int(per_strip)))

    def __call__(self, shared: Sequence, windows: Sequence[Sequence[np.ndarray]]) -> list:
        """Results of ``fn(*shared, *w)`` for each ``w`` of ``windows`` (equal shapes), as
        NumPy (pytrees of NumPy arrays when ``fn`` returns several)."""
        return self.dispatch(shared, windows)()

    def dispatch(self, shared: Sequence, windows: Sequence[Sequence[np.ndarray]]
                 ) -> Callable[[], list]:
        """Starts every call of :meth:`__call__` without waiting for one (JAX dispatches
        asynchronously) and returns ``result() -> list`` (NumPy, blocking). The host can do
        other work, e.g. add the previous strips, while the device computes these."""
        if not windows:
            return list
        first = [np.asarray(a) for a in windows[0]]
        size = self._batch_size(shared, first, len(windows))
        pending: list = []
        for a in range(0, len(windows), size):
            part = list(windows[a : a + size])
            part += [part[-1]] * (size - len(part))  # pad: repeat the last window
            stacked = [np.stack([np.asarray(w[j]) for w in part]) for j in range(len(first))]
            pending.append((self._compile(shared, first, size)(*shared, *stacked),
                            min(size, len(windows) - a)))
            self.calls += 1

        def result() -> list:
            out: list = []
            for res, n in pending:
                res = jax.tree.map(np.asarray, res)
                out.extend(jax.tree.map(lambda x, j=j: x[j], res) for j in range(n))
            return out

        return result


def _spec(a: Any) -> tuple:
    """Shape/dtype signature of a shared argument (a pytree)."""
    return tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x))))
                 for x in jax.tree.leaves(a))
