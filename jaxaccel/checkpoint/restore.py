"""Streaming restore: checkpoint arrays -> sharded jax.Arrays on their target devices.

For every array, the target sharding says which slice each *local* device holds; one read is
issued per distinct slice (replicas share it and, on CPU, share its memory), cast to the
compute dtype while reading, and placed straight onto its device(s). Nothing reads a slice
that no local device holds, so each process of a multi-host run reads only its own part.

Two engines read a slice. `direct` (checkpoint.direct) preads the chunks' raw bytes from the
OCDBT data files into the slice's final, aligned buffer, which jax on CPU adopts without a
copy; it serves arrays written uncompressed by jaxaccel. `tensorstore` serves everything else
(zstd, foreign layouts). A pool of threads runs the reads; a byte budget bounds the host
memory held by slices read but not yet handed to their devices. A checkpoint in another
format (a Hugging Face directory) brings its own reader on its manifest (`Manifest.reader`,
see `jaxaccel.conversion.hf_checkpoint`), which fills each slice's buffer instead of params/.

Host transforms (`Target.transform`, a `HostTransform` the caller supplies): an array is read
in blocks of whole tiles, each block is turned into one or more arrays on the host, and each
device receives only its part of each. This module knows nothing of what a transform computes;
the start-up code uses it for quantize on load (a full-precision array lands on its devices as
weight-only quantized values + scales, full-precision weights never reaching a device; see
`jaxaccel.startup.loader`). Each read is the smallest block that covers a device's slice in
whole tiles (a tile as wide as its dim, as per-channel scales span the contraction axis, widens
the block to the whole dim). `RestoreStats.bytes_placed_per_device` accounts what each device
received. A target may read another checkpoint array (`Target.source`): a tied LM head's
quantized copy is the token embedding read a second time.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import gc
import os
import pathlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tensorstore as ts

from jaxaccel.checkpoint import chunk_cache, direct, integrity, layout, remote, storage
from jaxaccel.checkpoint.manifest import PARAMS_DIR, CheckpointError, Manifest

DEFAULT_HOST_MEMORY_BUDGET = 2 << 30
ENGINES = ("auto", "direct", "tensorstore")


def default_threads() -> int:
    """Reads are memcpy- and page-fault-bound: one thread per core (on 2 cores, 4 threads
    measured 1.5-3x slower than 2, from contention in the page-fault path)."""
    return max(1, min(16, os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True)
class Output:
    """One array a `HostTransform` makes: its name, global shape, dtype and sharding, and
    `step`, how many input elements one of its elements stands for along each dim (1: one to
    one; a tile: one per tile, as a quantization scale)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    sharding: jax.sharding.Sharding
    step: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class HostTransform:
    """A per-array transform run on the host between reading and placing (quantize on load).

    The array is read (as its Target's dtype) in blocks of whole `tiles`, chosen from the
    Target's sharding; `apply(block)` returns one host array per entry of `outputs`, each
    `step`-times smaller than the block along each dim, and every local device receives its
    part of each output (by the output's own sharding)."""

    apply: Callable[[np.ndarray], Sequence[np.ndarray]]
    tiles: tuple[int, ...]
    outputs: tuple[Output, ...]


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one array goes: its global shape, the dtype to hold it in, and its sharding."""

    shape: tuple[int, ...]
    dtype: np.dtype
    sharding: jax.sharding.Sharding
    # The checkpoint's shape when `shape` is larger (a layer stack padded to a multiple of
    # the pipeline stages): the extra rows are zeros and are never read.
    stored_shape: tuple[int, ...] | None = None
    # Cast on the host to this dtype after reading `dtype` (int4 values stored one per byte).
    held_dtype: np.dtype | None = None
    # Turned on the host into the transform's outputs, which are restored instead of it.
    transform: HostTransform | None = None
    # The checkpoint array to read when it is not the target's own name (a tied head's copy).
    source: str | None = None

    @property
    def checkpoint_shape(self) -> tuple[int, ...]:
        return self.stored_shape or self.shape


def source_name(name: str, target: Target) -> str:
    """The checkpoint array target `name` reads."""
    return target.source or name


def checkpoint_shapes(targets: Mapping[str, Target]) -> dict[str, tuple[int, ...]]:
    """{checkpoint array: shape} that `targets` read (each array once)."""
    return {source_name(n, t): t.checkpoint_shape for n, t in targets.items()}


@dataclasses.dataclass
class RestoreStats:
    """What a restore did. `bytes_per_device` counts the bytes each device's reads requested;
    a slice that several local devices hold is read once, by the first of them."""

    bytes_read: int = 0  # requested slice bytes, in the checkpoint's dtype
    bytes_from_storage: int = 0  # chunk bytes read from files (whole chunks, checksums)
    bytes_broadcast: int = 0  # slice bytes received from another process (checkpoint.broadcast)
    seconds: float = 0.0
    reads: int = 0
    peak_bytes_in_flight: int = 0
    bytes_per_device: dict = dataclasses.field(default_factory=collections.Counter)
    bytes_per_array: dict = dataclasses.field(default_factory=collections.Counter)
    bytes_per_array_device: dict = dataclasses.field(default_factory=collections.Counter)
    # Bytes handed to each device (device id -> bytes), after any host transform.
    bytes_placed_per_device: dict = dataclasses.field(default_factory=collections.Counter)
    largest_read: int = 0  # bytes of the largest single slice read (in the read dtype)
    engines: dict = dataclasses.field(default_factory=dict)  # array name -> engine used
    # Remote checkpoints: chunk bytes that came over the network / from the local chunk cache.
    bytes_from_network: int = 0
    network_requests: int = 0
    bytes_from_cache: int = 0

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds else 0.0


@dataclasses.dataclass
class _Read:
    name: str
    index: tuple[slice, ...]
    devices: list
    nbytes: int
    future: object = None
    padded_shape: tuple[int, ...] | None = None  # zero-fill the read up to this shape
    dtype: np.dtype = np.dtype("float32")  # the compute dtype the slice is held in
    held_dtype: np.dtype | None = None  # cast to this on the host after reading
    # A host transform: (HostTransform, [(device, (index within each output's block))]).
    transform: tuple | None = None
    source: str = ""  # the checkpoint array read (`Target.source`; default: `name`)


def check_against_manifest(manifest: Manifest, expected: Mapping[str, tuple[int, ...]],
                           where: str) -> None:
    """Fail, naming every missing, extra or mis-shaped array, before reading any data."""
    missing = sorted(set(expected) - set(manifest.arrays))
    extra = sorted(set(manifest.arrays) - set(expected))
    misshaped = sorted(f"{name} (checkpoint {manifest.arrays[name].shape}, model {shape})"
                       for name, shape in expected.items()
                       if name in manifest.arrays and manifest.arrays[name].shape != tuple(shape))
    problems = [f"missing arrays: {missing}" if missing else "",
                f"unexpected arrays: {extra}" if extra else "",
                f"mis-shaped arrays: {misshaped}" if misshaped else ""]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"{where}: checkpoint does not match the model: " + "; ".join(problems))


def _open_stores(params_dir, targets, manifest, context) -> dict:
    """Open every array (metadata only) concurrently; check stored shape against manifest."""
    futures = {}
    for name, target in targets.items():
        spec = layout.array_spec(str(params_dir), source_name(name, target))
        futures[name] = ts.open(spec, read=True, context=context)
    stores = {}
    for name, future in futures.items():
        source = source_name(name, targets[name])
        try:
            store = future.result()
        except Exception as err:  # tensorstore raises ValueError / its own types
            raise CheckpointError(f"{params_dir}: array {source!r} cannot be opened "
                                  f"({_short(err)})") from None
        if tuple(store.shape) != tuple(manifest.arrays[source].shape):
            raise CheckpointError(f"{params_dir}: array {source!r} is stored with shape "
                                  f"{tuple(store.shape)} but the manifest says "
                                  f"{manifest.arrays[source].shape}")
        target_dtype = np.dtype(targets[name].dtype)
        stores[name] = store if store.dtype.numpy_dtype == target_dtype else ts.cast(
            store, ts.dtype(target_dtype.name))
    return stores


def _short(err: Exception) -> str:
    return str(err).splitlines()[0][:300]


def plan_reads(targets: Mapping[str, Target]) -> list[_Read]:
    """One read per distinct local slice; devices holding the same slice share it."""
    reads = []
    for name, target in targets.items():
        if target.transform is not None:
            reads += _transformed_reads(name, target)
            continue
        by_index = collections.defaultdict(list)
        for device, index in target.sharding.addressable_devices_indices_map(target.shape).items():
            key = tuple((s.start, s.stop) for s in _full_index(index, target.shape))
            by_index[key].append(device)
        for key, devices in by_index.items():
            reads.append(_make_read(name, target, key, devices))
    # Largest first: small arrays then fill the gaps while big reads are in flight.
    return sorted(reads, key=lambda r: -r.nbytes)


def _make_read(name: str, target: Target, key, devices, transform=None) -> _Read:
    """A read of the global box `key` ((start, stop) per dim), clipped to the stored shape."""
    stored = [(min(a, dim), min(b, dim)) for (a, b), dim in zip(key, target.checkpoint_shape)]
    index = tuple(slice(a, b) for a, b in stored)
    nbytes = int(np.prod([b - a for a, b in stored], dtype=np.int64)) * np.dtype(target.dtype).itemsize
    padded = tuple(b - a for a, b in key) if stored != list(key) else None
    return _Read(name, index, devices, nbytes, padded_shape=padded, dtype=np.dtype(target.dtype),
                 held_dtype=target.held_dtype, transform=transform,
                 source=source_name(name, target))


def _transformed_reads(name: str, target: Target) -> list[_Read]:
    """A host transform: one read per distinct block of whole tiles that covers local slices
    (a tile spanning a whole axis, as per-channel scales span k, widens the block to it)."""
    transform, shape = target.transform, target.shape
    maps = [out.sharding.addressable_devices_indices_map(out.shape)
            for out in transform.outputs]
    by_block = collections.defaultdict(list)
    for device, index in target.sharding.addressable_devices_indices_map(shape).items():
        block = tuple((0, dim) if tile == dim else (s.start, s.stop)
                      for s, dim, tile in zip(_full_index(index, shape), shape, transform.tiles))
        by_block[block].append(device)
    reads = []
    for block, devices in by_block.items():
        parts = [(device, tuple(_within_block(_full_index(index_map[device], out.shape), block,
                                              out.step)
                                for out, index_map in zip(transform.outputs, maps)))
                 for device in devices]
        reads.append(_make_read(name, target, block, devices, transform=(transform, parts)))
    return reads


def _within_block(index: tuple[slice, ...], block, step) -> tuple[slice, ...]:
    """An output's global `index` relative to the output of the input `block`."""
    return tuple(slice(s.start - a // t, s.stop - a // t)
                 for s, (a, _), t in zip(index, block, step))


def _full_index(index, shape) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(dim)[:2]) for s, dim in zip(index, shape))


class ByteBudget:
    """Bytes in flight <= budget; one read larger than the budget runs alone."""

    def __init__(self, budget: int):
        self.budget, self.in_flight, self.peak = budget, 0, 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> None:
        with self._cond:
            while self.in_flight and self.in_flight + nbytes > self.budget:
                self._cond.wait()
            self.in_flight += nbytes
            self.peak = max(self.peak, self.in_flight)

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.in_flight -= nbytes
            self._cond.notify_all()


def restore_arrays(ckpt_dir: str | pathlib.Path, manifest: Manifest,
                   targets: Mapping[str, Target], *,
                   host_memory_budget: int = DEFAULT_HOST_MEMORY_BUDGET,
                   on_bytes: Callable[[int], None] = lambda n: None,
                   stats: RestoreStats | None = None, engine: str = "auto",
                   threads: int | None = None, verify_chunks: bool = True,
                   ) -> dict[str, jax.Array]:
    """Read every target array from the checkpoint onto its sharding's local devices.

    `engine`: auto (direct where the array's layout allows, else tensorstore), direct or
    tensorstore. `verify_chunks` checks each chunk's crc32c (tensorstore always does).
    """
    stats = stats if stats is not None else RestoreStats()
    check_against_manifest(manifest, checkpoint_shapes(targets), str(ckpt_dir))
    start = time.perf_counter()
    shards = read_slices(ckpt_dir, manifest, targets, plan_reads(targets),
                         host_memory_budget=host_memory_budget, on_bytes=on_bytes, stats=stats,
                         engine=engine, threads=threads, verify_chunks=verify_chunks)
    arrays = assemble_all(targets, shards)
    stats.seconds = time.perf_counter() - start
    return arrays


def assemble_all(targets: Mapping[str, Target], shards: Mapping[str, dict]) -> dict[str, jax.Array]:
    """Every target's global array; a target with a host transform gives its outputs
    (by their names) instead."""
    arrays = {}
    for name, target in targets.items():
        if target.transform is None:
            arrays[name] = assemble(target, shards[name])
            continue
        for out in target.transform.outputs:
            arrays[out.name] = assemble(Target(out.shape, out.dtype, out.sharding),
                                        shards[out.name])
    return arrays


def read_slices(ckpt_dir: str | pathlib.Path, manifest: Manifest,
                targets: Mapping[str, Target], reads: list[_Read], *,
                host_memory_budget: int = DEFAULT_HOST_MEMORY_BUDGET,
                on_bytes: Callable[[int], None] = lambda n: None,
                stats: RestoreStats | None = None, engine: str = "auto",
                threads: int | None = None, verify_chunks: bool = True,
                ) -> dict[str, dict]:
    """Run `reads` (slices of `targets`, e.g. from `plan_reads`): {name: {device: jax.Array}}
    for every device a read names. The engine of restore_arrays and checkpoint.broadcast;
    `targets` may be a subset of the checkpoint (callers check the whole against the
    manifest first, with check_against_manifest)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    ckpt_dir = storage.checkpoint_path(ckpt_dir)
    params_dir = ckpt_dir / PARAMS_DIR
    stats = stats if stats is not None else RestoreStats()
    if manifest.reader is not None:  # another format (a Hugging Face directory)
        return _read_foreign(manifest.reader, reads, host_memory_budget, on_bytes, stats,
                             threads)
    # One walk of the OCDBT b-tree serves both the presence check and the direct reader.
    index = direct.ocdbt_index(params_dir) if engine != "tensorstore" else None
    # A missing array or chunk would read as zeros: refuse it (milliseconds).
    integrity.check_chunks_present(params_dir, manifest, set(checkpoint_shapes(targets)),
                                   keys=None if index is None else {k.decode() for k in index})
    layouts = _direct_layouts(params_dir, manifest, targets, engine, index or {})
    stores = _open_stores(params_dir, {n: t for n, t in targets.items() if n not in layouts},
                          manifest, ts.Context({"cache_pool": {"total_bytes_limit": 0}}))
    stats.engines.update({name: "direct" if name in layouts else "tensorstore"
                          for name in targets})
    reader = (_chunk_reader(index, params_dir, manifest, verify_chunks, host_memory_budget)
              if layouts else None)
    # A remote reader's prefetch window holds part of the budget; slices get the rest.
    window = getattr(reader, "prefetch_bytes", 0)
    run = _Run(layouts, stores, stats, on_bytes, ByteBudget(host_memory_budget - window), reader)
    prefetch = None
    if run.reader is not None:  # queue the disk reads ahead, in read order, off this thread
        prefetch = threading.Thread(target=_prefetch, args=(run.reader, layouts, reads),
                                    name="jaxaccel-prefetch", daemon=True)
        prefetch.start()
    try:
        run.all(reads, threads or default_threads())
    finally:
        if prefetch is not None:
            if hasattr(run.reader, "abort"):  # a remote prefetch may wait for window room
                run.reader.abort()
            prefetch.join()
            run.reader.close()
            _network_stats(run.reader, stats)
    stats.peak_bytes_in_flight = max(stats.peak_bytes_in_flight, run.budget.peak)
    stats.largest_read = max([stats.largest_read] + [r.nbytes for r in reads])
    return run.shards


def _read_foreign(reader, reads: list[_Read], host_memory_budget: int, on_bytes,
                  stats: RestoreStats, threads: int | None) -> dict[str, dict]:
    """`read_slices` through a manifest's own reader: each slice read by
    `reader.read_into`, with the same threads, byte budget and placement."""
    run = _Run({}, {}, stats, on_bytes, ByteBudget(host_memory_budget), None, source=reader)
    stats.engines.update({read.name: "foreign" for read in reads})
    counters = ("network_bytes", "network_requests", "cache_bytes")
    before = [getattr(reader, name, 0) for name in counters]
    try:
        run.all(reads, threads or default_threads())
    finally:
        if hasattr(reader, "finish"):  # close its files, prune its cache
            reader.finish()
    after = [getattr(reader, name, 0) for name in counters]
    stats.bytes_from_network += after[0] - before[0]
    stats.network_requests += after[1] - before[1]
    stats.bytes_from_cache += after[2] - before[2]
    stats.peak_bytes_in_flight = max(stats.peak_bytes_in_flight, run.budget.peak)
    stats.largest_read = max([stats.largest_read] + [r.nbytes for r in reads])
    return run.shards


def _chunk_reader(index: dict, params_dir, manifest: Manifest, verify: bool, budget: int):
    """The local direct reader, or for a bucket/web server the remote one (with the chunk
    cache unless disabled; its prefetch window takes half the host-memory budget)."""
    if not isinstance(params_dir, storage.RemotePath):
        return direct.ChunkReader(index, verify=verify)
    cache = None
    if chunk_cache.enabled():
        cache = chunk_cache.ChunkCache().for_checkpoint(manifest.identity, str(params_dir.parent))
    return remote.RemoteChunkReader(index, params_dir, verify=verify, cache=cache,
                                    prefetch_bytes=max(budget // 2, 1))


def _network_stats(reader, stats: RestoreStats) -> None:
    if isinstance(reader, remote.RemoteChunkReader):
        stats.bytes_from_network += reader.stats.network_bytes
        stats.network_requests += reader.stats.network_requests
        stats.bytes_from_cache += reader.stats.cache_bytes
        if reader.cache is not None:  # keep the cache under its size (LRU)
            chunk_cache.ChunkCache().prune()


def _prefetch(reader: direct.ChunkReader, layouts: dict, reads: list[_Read]) -> None:
    try:
        for read in reads:
            if read.name in layouts:
                reader.prefetch(layouts[read.name], read.index)
        if hasattr(reader, "prefetch_flush"):  # a remote reader gathers chunks into requests
            reader.prefetch_flush()
    except OSError:  # advice only: the reads themselves report real I/O errors
        pass


def _direct_layouts(params_dir, manifest: Manifest, targets, engine: str,
                    index: dict) -> dict:
    """{name: direct.ArrayLayout} for every array the direct engine reads."""
    if engine == "tensorstore":
        return {}
    layouts = {}
    for name, target in targets.items():
        found = direct.array_layout(source_name(name, target), index)
        entry = manifest.arrays[source_name(name, target)]
        if found is None or found.shape != entry.shape or found.dtype != direct.numpy_dtype(
                entry.dtype):
            if engine == "direct":
                raise CheckpointError(f"{params_dir}: array {source_name(name, target)!r} is not "
                                      "stored in a layout "
                                      "the direct engine reads (uncompressed zarr3); use "
                                      "engine='auto' or 'tensorstore'")
            continue
        layouts[name] = found
    return layouts


class _Run:
    """One restore in progress: a thread pool reading slices, admitted under the budget."""

    def __init__(self, layouts, stores, stats: RestoreStats, on_bytes, budget: ByteBudget, reader,
                 source=None):
        self.layouts, self.stores, self.stats, self.on_bytes = layouts, stores, stats, on_bytes
        self.budget, self.reader, self.source = budget, reader, source
        self.shards = collections.defaultdict(dict)
        self._lock = threading.Lock()

    def all(self, reads: list[_Read], threads: int) -> None:
        # The reads allocate many short-lived small objects (slices, views) and no cycles:
        # with the collector on, it ran for ~6% of a restore's cycles.
        pool = concurrent.futures.ThreadPoolExecutor(threads, "jaxaccel-restore")
        with _gc_paused(), pool:
            futures = []
            for read in reads:
                self.budget.acquire(read.nbytes)  # blocks while too much is in flight
                futures.append(pool.submit(self.one, read))
                if futures[0].done():  # surface a failure early instead of reading on
                    futures.pop(0).result()
            for future in futures:
                future.result()

    def one(self, read: _Read) -> None:
        try:
            host, from_storage = self._read(read)
            pieces = self._pieces(read, host)
            placed = [_device_put(piece, device) for _, device, piece in pieces]
            # Until copied, the host buffer must live; on CPU jax adopts it and this is instant.
            jax.block_until_ready(placed)
            del host
        finally:
            self.budget.release(read.nbytes)
        with self._lock:
            for array, (name, device, piece) in zip(placed, pieces):
                self.shards[name][device] = array
                self.stats.bytes_placed_per_device[device.id] += piece.nbytes
            stats = self.stats
            stats.bytes_per_device[read.devices[0].id] += read.nbytes
            stats.bytes_per_array_device[read.name, read.devices[0].id] += read.nbytes
            stats.bytes_read += read.nbytes
            stats.bytes_from_storage += from_storage
            stats.bytes_per_array[read.name] += read.nbytes
            stats.reads += 1
        self.on_bytes(read.nbytes)

    @staticmethod
    def _pieces(read: _Read, host: np.ndarray) -> list[tuple[str, object, np.ndarray]]:
        """(array name, device, host array) for every device of the read."""
        if read.transform is None:
            if read.held_dtype is not None:
                host = host.astype(read.held_dtype)
            return [(read.name, device, host) for device in read.devices]
        transform, parts = read.transform
        results = transform.apply(host)
        return [(out.name, device, np.ascontiguousarray(result[index]))
                for device, indices in parts
                for out, result, index in zip(transform.outputs, results, indices)]

    def _read(self, read: _Read) -> tuple[np.ndarray, int]:
        shape = read.padded_shape or tuple(s.stop - s.start for s in read.index)
        if self.source is not None:
            return self._read_source(read, shape)
        if read.name not in self.layouts:
            return self._read_tensorstore(read, shape)
        dest = direct.aligned_empty(shape, read.dtype)
        if read.padded_shape is not None:  # rows past the stored shape are padding: zeros
            dest[...] = 0
        inner = dest[tuple(slice(0, s.stop - s.start) for s in read.index)]
        layout_ = self.layouts[read.name]
        from_storage = sum(self.reader.read_chunk(layout_, grid, read.index, inner)
                           for grid in direct.chunks_in(read.index, layout_.chunk))
        return dest, from_storage

    def _read_source(self, read: _Read, shape) -> tuple[np.ndarray, int]:
        dest = direct.aligned_empty(shape, read.dtype)
        if read.padded_shape is not None:
            dest[...] = 0
        inner = dest[tuple(slice(0, s.stop - s.start) for s in read.index)]
        return dest, self.source.read_into(read.source, read.index, inner)

    def _read_tensorstore(self, read: _Read, shape) -> tuple[np.ndarray, int]:
        try:
            host = self.stores[read.name][read.index].read().result()
        except Exception as err:
            raise integrity.read_error(read.source, err, f"slice {_fmt_index(read.index)}") from None
        if read.padded_shape is not None:
            host = np.pad(host, [(0, p - h) for p, h in zip(shape, host.shape)])
        return host, host.nbytes


def _device_put(host: np.ndarray, device) -> jax.Array:
    """`host` onto `device`; int4 goes as int8 and narrows there, so the array has the packed
    layout compiled programs expect (a device_put of numpy int4 keeps one value per byte)."""
    if host.dtype != ml_dtypes.int4:
        return jax.device_put(host, device)
    return _narrow_int4(jax.device_put(host.astype(np.int8), device))


@jax.jit
def _narrow_int4(values):
    return values.astype(jnp.int4)


@contextlib.contextmanager
def _gc_paused():
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _fmt_index(index) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in index) + "]"


def assemble(target: Target, by_device: dict) -> jax.Array:
    """The global array from its local devices' shards ({device: single-device array})."""
    devices = list(target.sharding.addressable_devices_indices_map(target.shape))
    return jax.make_array_from_single_device_arrays(
        target.shape, target.sharding, [by_device[d] for d in devices])
