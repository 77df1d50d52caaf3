"""Dynamic batching: images of concurrent requests go through the model as one batch.

One worker thread owns the model. It takes the first waiting item, then keeps collecting until
the batch holds ``max_batch`` items or ``max_wait_s`` has passed since that first item, and runs
the whole batch with one call of ``run``. Requests wait on a ``concurrent.futures.Future`` per
item (awaitable from asyncio with ``asyncio.wrap_future``). Admission is bounded: ``reserve``
refuses work beyond ``capacity`` items instead of letting the queue, and memory, grow.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("captions")


class QueueFull(Exception):
    """``reserve`` would admit more than ``capacity`` items."""


@dataclass
class Item:
    """One unit of work (an image and its decoding settings) and where its result goes."""

    payload: Any
    future: Future = field(default_factory=Future)


_STOP = object()


class DynamicBatcher:
    """Groups submitted items into batches for ``run(payloads) -> results`` (same order, same length).

    ``run`` is only ever called from the worker thread, one batch at a time, so it may hold a model
    that is not thread-safe. An exception from ``run`` fails that batch's items only.
    """

    def __init__(self, run: Callable[[list[Any]], Sequence[Any]], max_batch: int, max_wait_s: float,
                 capacity: int) -> None:
        if max_batch < 1 or capacity < 1 or max_wait_s < 0:
            raise ValueError("max_batch and capacity must be >= 1 and max_wait_s >= 0")
        self.run, self.max_batch, self.max_wait_s, self.capacity = run, max_batch, max_wait_s, capacity
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._admitted = 0
        self.batches = 0  # batches run so far, and the images in them (for /healthz)
        self.items = 0
        self._thread = threading.Thread(target=self._work, name="captions-batcher", daemon=True)

    # ------------------------------------------------------------------------------ admission
    @property
    def admitted(self) -> int:
        """Items reserved and not yet released."""
        return self._admitted

    def reserve(self, n: int = 1) -> None:
        """Admit ``n`` more items or raise ``QueueFull`` (then nothing is reserved)."""
        with self._lock:
            if self._admitted + n > self.capacity:
                raise QueueFull(f"{self._admitted} of {self.capacity} places taken, {n} more asked for")
            self._admitted += n

    def release(self, n: int = 1) -> None:
        """Give back ``n`` places taken by ``reserve``."""
        with self._lock:
            self._admitted = max(0, self._admitted - n)

    # ---------------------------------------------------------------------------------- work
    def start(self) -> None:
        """Start the worker thread (once)."""
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (False before ``start`` and after ``stop``)."""
        return self._thread.is_alive()

    def submit(self, payload: Any) -> Future:
        """Queue one item; its future gets ``run``'s result for it (or ``run``'s exception)."""
        if not self.alive:
            raise RuntimeError("the batcher is not running")
        item = Item(payload)
        self._queue.put(item)
        return item.future

    def stop(self, timeout: float | None = None) -> None:
        """Finish the items already queued, then end the worker thread."""
        if self.alive:
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _collect(self, first: Item) -> tuple[list[Item], bool]:
        """The batch that starts with ``first``; True when a stop request was met."""
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:  # items already waiting join at once; otherwise wait until the deadline
                nxt = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if nxt is _STOP:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _work(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stopping = self._collect(first)
            self._run_batch(batch)
        while True:  # items queued after the stop request still get an answer
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                self._run_batch([item])

    def _run_batch(self, batch: list[Item]) -> None:
        # items whose request went away (client disconnected) were cancelled: skip their work;
        # once running, a future can no longer be cancelled, so setting its result cannot fail
        batch = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            results = self.run([item.payload for item in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run returned {len(results)} results for {len(batch)} items")
        except Exception as e:  # the worker must survive anything a batch raises
            log.exception("captioning a batch of %d failed", len(batch))
            for item in batch:
                item.future.set_exception(e)
            return
        self.batches += 1
        self.items += len(batch)
        for item, result in zip(batch, results, strict=True):
            item.future.set_result(result)
