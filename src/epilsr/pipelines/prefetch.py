"""A bounded background-thread prefetcher that moves host batches to a device ahead of use."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

import jax

__all__ = [
    "prefetch",
]

_END = object()


class _Prefetcher:
    """Iterator fed by a daemon thread; items are ``jax.device_put`` before queuing."""

    def __init__(self, iterator: Iterable, size: int, device):
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._device = device
        self._thread = threading.Thread(
            target=self._run, args=(iter(iterator),), name="epilsr-prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it: Iterator) -> None:
        try:
            for item in it:
                if not self._put(jax.device_put(item, self._device)):
                    return
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            self._put((_END, err))
            return
        self._put((_END, None))

    def __iter__(self):
        return self

    def __next__(self):
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, tuple) and len(item) == 2 and item[0] is _END:
            self._stop.set()
            if item[1] is not None:
                raise item[1]
            raise StopIteration
        return item

    def close(self) -> None:
        """Stops the producer thread (it exits at its next put)."""
        self._stop.set()


def prefetch(iterator: Iterable, *, size: int = 2, device=None) -> Iterator:
    """Runs ``iterator`` in a background thread, keeping ``size`` items on the device ahead.

    Each item (any pytree of arrays) is transferred with ``jax.device_put(item, device)`` in
    the thread, so the training loop never waits on Python-side sampling or host-to-device
    copies. Exceptions raised by ``iterator`` are re-raised by ``next``. Call ``close()`` on the
    result to stop early.
    """
    if size < 1:
        raise ValueError(f"size: expected a queue size >= 1, got {size}")
    return _Prefetcher(iterator, size, device)
