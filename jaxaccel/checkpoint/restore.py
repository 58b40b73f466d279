"""Streaming restore: checkpoint arrays -> sharded jax.Arrays on their target devices.

For every array, the target sharding says which slice each *local* device holds; one
asynchronous tensorstore read is issued per distinct slice (replicas share it), optionally
cast to the compute dtype inside tensorstore, and placed straight onto its device(s). Nothing
reads a slice that no local device holds, so each process of a multi-host run reads only its
own part. A byte budget bounds the host memory held by reads in flight.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import threading
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np
import tensorstore as ts

from jaxaccel.checkpoint import layout
from jaxaccel.checkpoint.manifest import PARAMS_DIR, CheckpointError, Manifest

DEFAULT_HOST_MEMORY_BUDGET = 2 << 30


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one array goes: its global shape, the dtype to hold it in, and its sharding."""

    shape: tuple[int, ...]
    dtype: np.dtype
    sharding: jax.sharding.Sharding


@dataclasses.dataclass
class RestoreStats:
    bytes_read: int = 0
    seconds: float = 0.0
    reads: int = 0
    peak_bytes_in_flight: int = 0
    bytes_per_device: dict = dataclasses.field(default_factory=collections.Counter)
    bytes_per_array: dict = dataclasses.field(default_factory=collections.Counter)

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


def _open_stores(params_dir: pathlib.Path, targets, manifest, context) -> dict:
    """Open every array (metadata only) concurrently; check stored shape against manifest."""
    futures = {}
    for name in targets:
        spec = layout.array_spec(str(params_dir), name)
        futures[name] = ts.open(spec, read=True, context=context)
    stores = {}
    for name, future in futures.items():
        try:
            store = future.result()
        except Exception as err:  # tensorstore raises ValueError / its own types
            raise CheckpointError(f"{params_dir}: array {name!r} cannot be opened "
                                  f"({_short(err)})") from None
        if tuple(store.shape) != tuple(manifest.arrays[name].shape):
            raise CheckpointError(f"{params_dir}: array {name!r} is stored with shape "
                                  f"{tuple(store.shape)} but the manifest says "
                                  f"{manifest.arrays[name].shape}")
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
        by_index = collections.defaultdict(list)
        for device, index in target.sharding.addressable_devices_indices_map(target.shape).items():
            key = tuple((s.start, s.stop) for s in _full_index(index, target.shape))
            by_index[key].append(device)
        itemsize = np.dtype(target.dtype).itemsize
        for key, devices in by_index.items():
            index = tuple(slice(a, b) for a, b in key)
            nbytes = int(np.prod([b - a for a, b in key], dtype=np.int64)) * itemsize
            reads.append(_Read(name, index, devices, nbytes))
    # Largest first: small arrays then fill the gaps while big reads are in flight.
    return sorted(reads, key=lambda r: -r.nbytes)


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
                   stats: RestoreStats | None = None) -> dict[str, jax.Array]:
    """Read every target array from the checkpoint onto its sharding's local devices."""
    ckpt_dir = pathlib.Path(ckpt_dir)
    stats = stats if stats is not None else RestoreStats()
    check_against_manifest(manifest, {n: t.shape for n, t in targets.items()}, str(ckpt_dir))
    start = time.perf_counter()
    context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    stores = _open_stores(ckpt_dir / PARAMS_DIR, targets, manifest, context)
    shards = collections.defaultdict(dict)
    budget = ByteBudget(host_memory_budget)
    pending = collections.deque()
    for read in plan_reads(targets):
        _admit(budget, read, pending, shards, stats, on_bytes)
        read.future = stores[read.name][read.index].read()
        pending.append(read)
    while pending:
        _finish(pending.popleft(), budget, shards, stats, on_bytes)
    arrays = {name: _assemble(target, shards[name]) for name, target in targets.items()}
    stats.seconds = time.perf_counter() - start
    stats.peak_bytes_in_flight = budget.peak
    return arrays


def _admit(budget: ByteBudget, read: _Read, pending, shards, stats, on_bytes) -> None:
    """Wait for the oldest reads to land until `read` fits in the budget."""
    while pending and budget.in_flight + read.nbytes > budget.budget:
        _finish(pending.popleft(), budget, shards, stats, on_bytes)
    budget.acquire(read.nbytes)


def _finish(read: _Read, budget: ByteBudget, shards, stats: RestoreStats, on_bytes) -> None:
    try:
        host = read.future.result()
    except Exception as err:
        raise CheckpointError(f"array {read.name!r}, slice {_fmt_index(read.index)}: read failed "
                              f"({_short(err)})") from None
    placed = [jax.device_put(host, device) for device in read.devices]
    for array, device in zip(placed, read.devices):
        array.block_until_ready()  # the host buffer may be released only once copied
        shards[read.name][device] = array
        stats.bytes_per_device[device.id] += read.nbytes
    del host
    budget.release(read.nbytes)
    stats.bytes_read += read.nbytes
    stats.bytes_per_array[read.name] += read.nbytes
    stats.reads += 1
    on_bytes(read.nbytes)


def _fmt_index(index) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in index) + "]"


def _assemble(target: Target, by_device: dict) -> jax.Array:
    devices = list(target.sharding.addressable_devices_indices_map(target.shape))
    return jax.make_array_from_single_device_arrays(
        target.shape, target.sharding, [by_device[d] for d in devices])
