"""Keep the devices fed: decode on host threads, transfer one step ahead, compute, in order.

    host batches  -- a pool of worker threads decodes items (Pillow releases the GIL); one
                     producer thread assembles them, in input order, into a bounded queue
    device steps  -- batch k+1 is `put` on the devices (jax.device_put onto the batch
                     sharding) right after batch k's program is dispatched, so host decode,
                     host->device transfer and device compute overlap (double buffering)

Host memory is bounded: at most `depth` finished batches wait in the queue and at most two
batches are being decoded. An error in a worker (unless skipped) stops the producer and is
raised in the consumer; closing the consumer early (an error of its own, Ctrl-C, `break`)
stops the producer and cancels pending decodes. `workers=0` decodes inline on the
consumer's thread, and `prefetch=False` also waits for each step before starting the next:
the same work without any overlap, the baseline the benchmark compares against.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from jaxaccel.errors import InputError

_POLL_S = 0.1  # how often a blocked producer checks whether the consumer has gone


@dataclasses.dataclass
class HostBatch:
    indices: list[int]  # input positions of the rows of `rows`
    rows: np.ndarray  # [len(indices), ...], stacked `load` results
    failed: list[tuple[int, str]]  # (input position, one-line reason) of skipped items


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1)))


def _assemble(start: int, results: list, skip_bad: bool) -> HostBatch:
    """Stack one batch's decoded items; a failed item raises unless `skip_bad`."""
    indices, rows, failed = [], [], []
    for offset, result in enumerate(results):
        if isinstance(result, InputError):
            if not skip_bad:
                raise result
            failed.append((start + offset, str(result)))
        else:
            indices.append(start + offset)
            rows.append(result)
    stacked = np.stack(rows) if rows else np.zeros((0,), np.float32)
    return HostBatch(indices, stacked, failed)


def _load_or_error(load: Callable, item):
    try:
        return load(item)
    except InputError as err:
        return err


class HostBatches:
    """Iterate `HostBatch`es of `items` decoded by `load`, in input order."""

    def __init__(self, items: Sequence, load: Callable, batch_size: int, *,
                 workers: int | None = None, depth: int = 2, skip_bad: bool = False):
        self.items, self.load, self.batch_size = items, load, batch_size
        self.workers = default_workers() if workers is None else workers
        self.depth, self.skip_bad = depth, skip_bad
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._thread: threading.Thread | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _starts(self) -> range:
        return range(0, len(self.items), self.batch_size)

    def __iter__(self) -> Iterator[HostBatch]:
        if self.workers == 0:
            yield from self._inline()
            return
        self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, "jaxaccel-decode")
        self._thread = threading.Thread(target=self._produce, name="jaxaccel-batches",
                                        daemon=True)
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def _inline(self) -> Iterator[HostBatch]:
        for start in self._starts():
            chunk = self.items[start:start + self.batch_size]
            yield _assemble(start, [_load_or_error(self.load, x) for x in chunk], self.skip_bad)

    def _submit(self, start: int) -> list:
        chunk = self.items[start:start + self.batch_size]
        return [self._pool.submit(_load_or_error, self.load, x) for x in chunk]

    def _produce(self) -> None:
        """Producer thread: keep two batches decoding, hand finished ones over in order."""
        try:
            pending = collections.deque()
            starts = iter(self._starts())
            for start in starts:
                pending.append((start, self._submit(start)))
                if len(pending) < 2:
                    continue
                self._hand_over(*pending.popleft())
                if self._stop.is_set():
                    return
            while pending and not self._stop.is_set():
                self._hand_over(*pending.popleft())
            self._offer(None)
        except BaseException as err:  # noqa: BLE001  (re-raised in the consumer)
            self._offer(err)

    def _hand_over(self, start: int, futures: list) -> None:
        self._offer(_assemble(start, [f.result() for f in futures], self.skip_bad))

    def _offer(self, item) -> None:
        """Put into the bounded queue, giving up once the consumer has closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Stop the producer, cancel pending decodes, free the queued batches."""
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def device_steps(batches: Iterator[HostBatch], put: Callable, run: Callable,
                 fetch: Callable, *, prefetch: bool = True) -> Iterator[tuple[HostBatch, np.ndarray]]:
    """(host batch, fetched result) per batch, in order. With `prefetch`, batch k+1 is put
    on the devices while batch k computes (`run` must dispatch asynchronously, as jitted
    calls do); without, each step finishes before the next transfer starts."""
    batches = iter(batches)
    if not prefetch:
        for batch in batches:
            yield batch, _step(batch, put, run, fetch)
        return
    current = next(batches, None)
    placed = _put(current, put)
    while current is not None:
        out = run(placed) if placed is not None else None
        following = next(batches, None)
        placed = _put(following, put)  # transfer overlaps the step dispatched above
        yield current, (fetch(out) if out is not None else None)
        current = following


def _put(batch: HostBatch | None, put: Callable):
    return put(batch.rows) if batch is not None and batch.indices else None


def _step(batch: HostBatch, put: Callable, run: Callable, fetch: Callable):
    return fetch(run(put(batch.rows))) if batch.indices else None
