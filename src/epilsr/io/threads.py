"""Overlap of I/O with compute: a reader thread ahead and a writer thread behind.

Both queues are bounded, so memory stays ``O(depth)`` items. An exception raised in a thread is
re-raised, with its message and traceback, in the caller; ``close`` always joins the thread, so
no thread outlives the call that started it (also on errors).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["ReadAhead", "WriteBehind"]

_POLL = 0.05  # seconds between checks of the stop flag while a queue is full / empty


class ReadAhead:
    """``read(s)`` for ``s`` in ``range(first, n)``, in a thread, up to ``depth`` items ahead.

    :meth:`get` returns the items in order (``get(s)`` must ask for the next ``s``) and re-raises
    the reader's exception at the item where it happened.
    """

    def __init__(self, read: Callable[[int], Any], first: int, n: int, *, depth: int = 2,
                 name: str = "epilsr-read"):
        if depth < 1:
            raise ValueError(f"depth: expected a queue size >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._next = first
        self._thread = threading.Thread(target=self._run, args=(read, first, n), name=name,
                                        daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, read, first, n) -> None:
        for s in range(first, n):
            try:
                item = (s, read(s), None)
            except BaseException as err:  # noqa: BLE001 - re-raised by get()
                self._put((s, None, err))
                return
            if not self._put(item):
                return

    def get(self, s: int) -> Any:
        """The item of ``s`` (the next one); the reader's exception for it is re-raised."""
        if s != self._next:
            raise ValueError(f"ReadAhead.get: expected item {self._next}, asked for {s}")
        while True:
            try:
                got, data, err = self._queue.get(timeout=_POLL)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"ReadAhead: the reader thread ended before item "
                                       f"{s}") from None
        self._next = s + 1
        if err is not None:
            raise err
        return data

    def close(self) -> None:
        """Stops the reader (after its current item) and joins it."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=_POLL)
            except queue.Empty:
                pass
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WriteBehind:
    """Runs submitted jobs in order in one thread, at most ``depth`` waiting.

    After a job fails, later jobs are skipped and :meth:`submit` / :meth:`finish` re-raise its
    exception. :meth:`finish` runs every job already submitted (e.g. a checkpoint after its
    writes) and joins the thread.
    """

    def __init__(self, *, depth: int = 2, name: str = "epilsr-write"):
        if depth < 1:
            raise ValueError(f"depth: expected a queue size >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self.error is None:
                try:
                    job()
                except BaseException as err:  # noqa: BLE001 - re-raised by submit/finish
                    self.error = err

    def submit(self, job: Callable[[], Any]) -> None:
        """Queues ``job()``; blocks while ``depth`` jobs wait; re-raises an earlier failure."""
        if self.error is not None:
            raise self.error
        self._queue.put(job)  # the thread always drains: never blocks forever

    def finish(self, *, reraise: bool = True) -> None:
        """Runs the queued jobs, joins the thread, re-raises a job's exception (``reraise``)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if reraise and self.error is not None:
            raise self.error
