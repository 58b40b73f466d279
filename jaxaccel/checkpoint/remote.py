"""Direct chunk reads from a bucket or web server: byte ranges of the OCDBT data files.

The same plan as checkpoint.direct, over the network: the OCDBT index maps every zarr chunk
key to (data file, offset, length); each chunk a process needs is one ranged GET through
tensorstore's kvstore driver (its request concurrency and retry settings apply, see
checkpoint.storage), checked against its crc32c, and copied into the slice's buffer. A
transient corruption heals itself: a chunk whose checksum does not match is fetched again
(up to FETCH_ATTEMPTS times) before the restore fails naming the URL, array and chunk.

`prefetch` (called by restore in read order, on its own thread) starts the ranged reads of the
chunks ahead, so up to `prefetch_bytes` are on the wire while the read threads copy; chunks
adjacent in a data file share one request (up to MAX_REQUEST_BYTES), and each chunk is
fetched once however many threads want it first. With a chunk cache
(checkpoint.chunk_cache), chunks it holds are read from local disk through the local direct
reader (verified there) and never requested; fetched chunks are added to it.
"""

from __future__ import annotations

import dataclasses
import threading

import crc32c
import numpy as np

from jaxaccel.checkpoint import direct, storage
from jaxaccel.checkpoint.direct import ArrayLayout, ValueRef
from jaxaccel.checkpoint.layout import format_chunk
from jaxaccel.errors import ChunkError, StorageError

FETCH_ATTEMPTS = 3  # on a crc32c mismatch: the server or network corrupted a response
# Adjacent chunks of one data file are fetched with one ranged GET of up to this many bytes:
# fewer, larger requests, as S3 guidance (8-16 MB ranges) and s5cmd/boto3 transfers do.
MAX_REQUEST_BYTES = 16 << 20
_CRC_BYTES = 4


@dataclasses.dataclass
class FetchStats:
    """Bytes and requests of one restore: from the network, and served by the cache."""

    network_bytes: int = 0
    network_requests: int = 0
    cache_bytes: int = 0
    cache_hits: int = 0
    refetches: int = 0  # chunks fetched again after a checksum mismatch or a bad cache entry


class _Window:
    """Bytes prefetched but not yet consumed <= limit (one chunk larger than it runs alone)."""

    def __init__(self, limit: int):
        self.limit, self.used, self.cancelled = limit, 0, False
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> None:
        with self._cond:
            while self.used and self.used + nbytes > self.limit and not self.cancelled:
                self._cond.wait()
            self.used += nbytes

    def cancel(self) -> None:
        """Wake and stop every wait (the reads that would make room have stopped)."""
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()


class RemoteChunkReader:
    """direct.ChunkReader's interface (`read_chunk`, `prefetch`, `close`) over a remote
    checkpoint's `params/` prefix; safe to share across threads."""

    def __init__(self, index: dict[bytes, ValueRef], params_dir: storage.RemotePath, *,
                 verify: bool = True, cache=None, prefetch_bytes: int = 1 << 30):
        self.index, self.params_dir, self.verify, self.cache = index, params_dir, verify, cache
        self.prefetch_bytes = prefetch_bytes
        self.stats = FetchStats()
        self._store = storage.open_kvstore(params_dir)
        self._root = str(params_dir) + "/"
        self._window = _Window(prefetch_bytes)
        self._pending: dict[bytes, object] = {}  # key -> future, _RESERVED or _TAKEN
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()  # apart: _read_range runs under self._lock
        self._closed = False
        self._queued: list[tuple[bytes, ValueRef]] = []  # reserved, not yet requested
        self._queued_bytes = 0
        # Fill-valued (absent) and inline chunks need no request: the local reader serves them.
        self._local = direct.ChunkReader(index, verify=verify)

    def abort(self) -> None:
        """Stop prefetching (restore calls this when its reads end, failed or not): a prefetch
        waiting for window room would otherwise wait for reads that never come."""
        with self._lock:
            self._closed = True
        self._window.cancel()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, {}
        for key, part in pending.items():
            if isinstance(part, _Part):
                self._window.release(self.index[key].length)
        self._local.close()

    def prefetch(self, layout: ArrayLayout, box: tuple[slice, ...]) -> None:
        """Queue the ranged reads of the chunks `box` needs that are not cached."""
        for grid_index in direct.chunks_in(box, layout.chunk):
            key = direct.chunk_key(layout.name, grid_index)
            ref = self.index.get(key)
            if ref is None or ref.inline is not None or self._cached(layout, key):
                continue
            with self._lock:
                if key in self._pending or self._closed:
                    continue
                self._pending[key] = _RESERVED  # a read thread arriving first fetches it itself
            self._queued.append((key, ref))
            self._queued_bytes += ref.length
        # Gather a quarter of the window before requesting: adjacent chunks of different
        # slices then share requests (against moto, 208 single-chunk requests took 1.1-1.4 s,
        # the same bytes in 26 runs 0.3-0.5 s). Queuing is quick: reads start within ms.
        if self._queued_bytes >= max(MAX_REQUEST_BYTES, self.prefetch_bytes // 4):
            self.prefetch_flush()

    def prefetch_flush(self) -> None:
        """Start the reads of every chunk `prefetch` has queued (restore calls this last)."""
        queued, self._queued, self._queued_bytes = self._queued, [], 0
        for group in coalesce(queued, MAX_REQUEST_BYTES):
            self._start_group(group)

    def _start_group(self, group: list[tuple[bytes, ValueRef]]) -> None:
        """Ranged GETs for adjacent chunks of one data file, once the window has room."""
        self._window.acquire(sum(ref.length for _, ref in group))
        with self._lock:
            live = [] if self._closed else [
                (key, ref) for key, ref in group if self._pending.get(key) is _RESERVED]
            live_keys = {key for key, _ in live}
            for key, ref in group:
                if key not in live_keys:  # taken by a read thread meanwhile: never lands
                    self._window.release(ref.length)
            for run in coalesce(live, MAX_REQUEST_BYTES):
                start = run[0][1].offset
                stop = run[-1][1].offset + run[-1][1].length
                future = self._read_range(run[0][1].file, start, stop)
                for key, ref in run:
                    self._pending[key] = _Part(future, ref.offset - start, ref.length)

    def read_chunk(self, layout: ArrayLayout, grid_index, box: tuple[slice, ...],
                   dest: np.ndarray) -> int:
        """Copy the part of chunk `grid_index` inside global `box` into `dest`; returns the
        bytes read (from the network or the cache)."""
        key = direct.chunk_key(layout.name, grid_index)
        ref = self.index.get(key)
        if ref is None or ref.inline is not None:
            return self._local.read_chunk(layout, grid_index, box, dest)
        if self._cached(layout, key) and self._read_cached(layout, key, grid_index, box, dest):
            return ref.length
        data = self._fetch_checked(layout, key, ref, grid_index)
        if self.cache is not None and layout.checksummed:
            self.cache.put(key.decode(), data)
        _place(layout, grid_index, box, dest, data)
        return ref.length

    def _cached(self, layout: ArrayLayout, key: bytes) -> bool:
        return (self.cache is not None and layout.checksummed
                and self.cache.path(key.decode()) is not None)

    def _read_cached(self, layout, key: bytes, grid_index, box, dest) -> bool:
        """Read a chunk from its cache entry, always verified; a bad entry is evicted."""
        path = self.cache.path(key.decode())
        try:
            entry = {key: ValueRef(str(path), 0, path.stat().st_size)}
        except (AttributeError, OSError):  # evicted or pruned meanwhile (by another process)
            return False
        reader = direct.ChunkReader(entry, verify=True)
        try:
            reader.read_chunk(layout, grid_index, box, dest)
        except (ChunkError, OSError):  # corrupted, truncated or vanished: never serve it
            self.cache.evict(key.decode())
            with self._stats_lock:
                self.stats.refetches += 1
            return False
        finally:
            reader.close()
        self.cache.touch(key.decode())
        with self._stats_lock:
            self.stats.cache_bytes += entry[key].length
            self.stats.cache_hits += 1
        return True

    def _read_range(self, file: str, start: int, stop: int):
        with self._stats_lock:
            self.stats.network_requests += 1
        return self._store.read(file[len(self._root):], byte_range=slice(start, stop))

    def _start(self, ref: ValueRef) -> _Part:
        return _Part(self._read_range(ref.file, ref.offset, ref.offset + ref.length), 0,
                     ref.length)

    def _take(self, key: bytes, ref: ValueRef) -> tuple[_Part, bool]:
        """The prefetched part for `key` (its window bytes to release), else a new read."""
        with self._lock:
            part = self._pending.get(key)
            self._pending[key] = _TAKEN
        if isinstance(part, _Part):
            return part, True
        return self._start(ref), False

    def _fetch_checked(self, layout: ArrayLayout, key: bytes, ref: ValueRef,
                       grid_index) -> bytes:
        """The chunk's stored bytes, checked against its crc32c (fetched again on mismatch)."""
        part, prefetched = self._take(key, ref)
        for attempt in range(FETCH_ATTEMPTS):
            try:
                data = self._result(part, layout, ref, grid_index)
            finally:
                if prefetched:
                    self._window.release(ref.length)
                    prefetched = False
            if not layout.checksummed or _crc_ok(data):  # always: the network is untrusted
                return data
            with self._stats_lock:
                self.stats.refetches += 1
            if attempt + 1 < FETCH_ATTEMPTS:
                part = self._start(ref)
        raise ChunkError(f"{ref.file}: array {layout.name!r}, chunk {format_chunk(grid_index)}: "
                         f"corrupted in transfer {FETCH_ATTEMPTS} times (crc32c mismatch)")

    def _result(self, part: _Part, layout: ArrayLayout, ref: ValueRef, grid_index) -> bytes:
        where = f"{ref.file} [bytes {ref.offset}-{ref.offset + ref.length - 1}]"
        try:
            result = part.future.result()  # several threads may share one grouped read
        except Exception as err:  # tensorstore's status errors, after its own retries
            raise StorageError(f"{where}: array {layout.name!r}, chunk {format_chunk(grid_index)}: "
                               f"read failed ({storage.explain(err)})") from None
        value = result.value if result.state == "value" else b""
        whole = part.start == 0 and len(value) == part.length
        data = value if whole else value[part.start:part.start + part.length]
        if len(data) != ref.length:
            raise ChunkError(f"{where}: array {layout.name!r}, chunk {format_chunk(grid_index)}: got "
                             f"{len(data)} bytes, expected {ref.length} (object missing or "
                             "truncated)")
        with self._stats_lock:
            self.stats.network_bytes += len(data)
        return data


@dataclasses.dataclass(frozen=True)
class _Part:
    """A chunk's bytes inside a (possibly grouped) ranged read."""

    future: object  # tensorstore Future of a KvStore.ReadResult
    start: int  # offset of the chunk in the read's bytes
    length: int


def coalesce(refs: list[tuple[bytes, ValueRef]], max_bytes: int
             ) -> list[list[tuple[bytes, ValueRef]]]:
    """Chunks grouped into runs that are adjacent in one data file, each at most `max_bytes`
    (a single larger chunk alone), in file order: one request per run."""
    groups: list[list[tuple[bytes, ValueRef]]] = []
    for key, ref in sorted(refs, key=lambda kr: (kr[1].file, kr[1].offset)):
        last = groups[-1][-1][1] if groups else None
        if (last is not None and last.file == ref.file
                and last.offset + last.length == ref.offset
                and ref.offset + ref.length - groups[-1][0][1].offset <= max_bytes):
            groups[-1].append((key, ref))
        else:
            groups.append([(key, ref)])
    return groups


_RESERVED = object()  # prefetch waits for room in its window before starting this read
_TAKEN = object()  # a read thread has (or is fetching) this chunk: prefetch must not


def _crc_ok(data: bytes) -> bool:
    view = memoryview(data)
    return crc32c.crc32c(view[:-_CRC_BYTES]) == int.from_bytes(view[-_CRC_BYTES:], "little")


def _place(layout: ArrayLayout, grid_index, box: tuple[slice, ...], dest: np.ndarray,
           data: bytes) -> None:
    """Copy the part of a chunk (its stored bytes) inside global `box` into `dest`."""
    origin = [g * c for g, c in zip(grid_index, layout.chunk)]
    inter = [slice(max(o, s.start), min(o + c, s.stop, n))
             for o, c, s, n in zip(origin, layout.chunk, box, layout.shape)]
    body = np.frombuffer(data, np.uint8)
    body = body[:len(body) - _CRC_BYTES] if layout.checksummed else body
    values = body.view(layout.dtype).reshape(layout.chunk)
    out = dest[tuple(slice(i.start - s.start, i.stop - s.start) for i, s in zip(inter, box))]
    out[...] = values[tuple(slice(i.start - o, i.stop - o) for i, o in zip(inter, origin))]
