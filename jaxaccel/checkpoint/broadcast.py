"""Read once, broadcast to replicas: a multi-host restore that reads each slice from storage once.

When a mesh axis that spans processes replicates a parameter (typically `data`), every
process holds the same slices and a plain restore (restore.restore_arrays) reads them N
times from storage. Here each distinct slice gets one *owner* device, chosen the same way on
every process (largest slices first, each to the holding process that has been given the
fewest bytes so far, so the reading is spread evenly). The owner reads it (the usual reader:
direct or tensorstore engine, byte budget); the other devices holding it contribute zeros;
and one jitted sum over the replica axes, an all-reduce over the devices (gloo on CPU, NCCL /
ICI on accelerators), leaves every replica with the owner's bytes.

The trick that makes this work for any mix of `data`, `model` and `stage`: the source is an
array of shape (R, *shape) sharded P(replica_axes, *spec), where R is the product of the mesh
axes the target does *not* shard over. Each device holds one (1, *slice) block: the owner's
data or zeros. Summing axis 0 with the target's sharding as the output makes XLA emit an
all-reduce over exactly the replica groups; x + 0 is exact in every float and int dtype, so
the result is bit-identical to reading (up to the sign of a zero).

Arrays go in chunks whose source blocks on this process fit the host-memory budget (an
array larger than the budget goes alone). Before each chunk's collective every process meets
at a barrier (distributed.gather), so a process that died is named within the timeout; a
collective that fails because a peer vanished mid-transfer is reported the same way.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxaccel.parallel import distributed, watchdog
from jaxaccel.checkpoint import restore, restore_mode
from jaxaccel.checkpoint.restore import RestoreStats, Target
from jaxaccel.errors import DistributedError

Key = tuple  # ((start, stop), ...) of one slice, in the target's (padded) shape
_restores = [0]  # broadcast restores so far: the same count on every process (one watch each)


def _key(index, shape) -> Key:
    return tuple(s.indices(dim)[:2] for s, dim in zip(index, shape))


def slice_keys(target: Target) -> dict:
    """{device: key} over *all* devices of the target's sharding (every process's)."""
    return {device: _key(index, target.shape)
            for device, index in target.sharding.devices_indices_map(target.shape).items()}


def spans_processes(target: Target) -> bool:
    """Whether some slice of the target is held by devices of more than one process."""
    holders = collections.defaultdict(set)
    for device, key in slice_keys(target).items():
        holders[key].add(device.process_index)
    return any(len(procs) > 1 for procs in holders.values())


def _stored_bytes(target: Target, key: Key) -> int:
    dims = [max(0, min(b, dim) - a) for (a, b), dim in zip(key, target.checkpoint_shape)]
    return int(np.prod(dims, dtype=np.int64)) * np.dtype(target.dtype).itemsize


def assign_owners(targets: Mapping[str, Target]) -> dict[str, dict[Key, jax.Device]]:
    """{name: {key: owner device}}, identical on every process (depends only on the targets
    and the global device list). Largest slices first, each to the holding process with the
    fewest bytes so far; within it, the holding device with the lowest id."""
    holders = {}
    for name in sorted(targets):
        by_key = collections.defaultdict(list)
        for device, key in slice_keys(targets[name]).items():
            by_key[key].append(device)
        for key, devices in by_key.items():
            holders[name, key] = devices
    load = collections.Counter()
    owners = collections.defaultdict(dict)
    order = sorted(holders, key=lambda nk: (-_stored_bytes(targets[nk[0]], nk[1]), nk))
    for name, key in order:
        devices = holders[name, key]
        process = min({d.process_index for d in devices}, key=lambda p: (load[p], p))
        load[process] += _stored_bytes(targets[name], key)
        owners[name][key] = min((d for d in devices if d.process_index == process),
                                key=lambda d: d.id)
    return dict(owners)


def _replica_axes(sharding: NamedSharding) -> tuple[str, ...]:
    used = set()
    for entry in sharding.spec:
        used.update(entry if isinstance(entry, tuple) else (entry,))
    return tuple(axis for axis in sharding.mesh.axis_names
                 if axis not in used and sharding.mesh.shape[axis] > 1)


def _most_bytes_per_process(target: Target) -> int:
    """Bytes of the (1, *slice) source blocks held by the process that holds the most of the
    target: computed from the global device map, so every process gets the same number."""
    itemsize = np.dtype(target.dtype).itemsize
    held = collections.Counter()
    for device, index in target.sharding.devices_indices_map(target.shape).items():
        held[device.process_index] += int(np.prod([b - a for a, b in _key(index, target.shape)],
                                                  dtype=np.int64)) * itemsize
    return max(held.values(), default=0)


def chunks(targets: Mapping[str, Target], budget: int) -> list[dict[str, Target]]:
    """Arrays in groups whose source blocks on any one process fit `budget` bytes (a larger
    array forms its own group). Identical on every process (sorted by name, sizes from the
    global device map): each group is one collective program that all processes must run in
    the same order, so a process that cut its groups by its own share would wait forever."""
    groups, current, size = [], {}, 0
    for name in sorted(targets):
        nbytes = _most_bytes_per_process(targets[name])
        if current and size + nbytes > budget:
            groups.append(current)
            current, size = {}, 0
        current[name] = targets[name]
        size += nbytes
    return groups + [current] if current else groups


def _owned_reads(targets: Mapping[str, Target], owners) -> tuple[list, int]:
    """This process's reads (each placed on its owner device only) and the bytes it gets
    from other processes' reads instead."""
    reads, received = [], 0
    keys = {name: slice_keys(target) for name, target in targets.items()}
    for read in restore.plan_reads(targets):
        owner = owners[read.name][keys[read.name][read.devices[0]]]
        if owner.process_index == jax.process_index():
            reads.append(dataclasses.replace(read, devices=[owner]))
        else:
            received += read.nbytes
    return reads, received


def restore_checkpoint(ckpt_dir, manifest, targets: Mapping[str, Target], *,
                       mode: str | None = None, status: Callable[[str], None] = lambda m: None,
                       **options) -> dict[str, jax.Array]:
    """restore.restore_arrays or restore_broadcast, as `--restore-mode` says (restore_mode);
    `options` are restore_arrays' keyword arguments; `status` gets progress lines."""
    # A host transform (quantize on load) places pieces of what it computes: read-all only.
    if jax.process_count() == 1 or any(t.transform is not None for t in targets.values()):
        restore_mode.check(mode or restore_mode.default())
        return restore.restore_arrays(ckpt_dir, manifest, targets, **options)
    replicated = any(isinstance(t.sharding, NamedSharding) and spans_processes(t)
                     for t in targets.values())
    if restore_mode.resolve(mode, ckpt_dir, replicated) == "broadcast":
        return restore_broadcast(ckpt_dir, manifest, targets, status=status, **options)
    return restore.restore_arrays(ckpt_dir, manifest, targets, **options)


def restore_broadcast(ckpt_dir, manifest, targets: Mapping[str, Target], *,
                      host_memory_budget: int = restore.DEFAULT_HOST_MEMORY_BUDGET,
                      on_bytes: Callable[[int], None] = lambda n: None,
                      stats: RestoreStats | None = None, engine: str = "auto",
                      threads: int | None = None, verify_chunks: bool = True,
                      status: Callable[[str], None] = lambda m: None,
                      ) -> dict[str, jax.Array]:
    """Like restore.restore_arrays (same arguments, same result), but every slice replicated
    across processes is read from storage once, by its owner, and broadcast (module doc).

    `stats.bytes_read`/`bytes_from_storage` count this process's own reads only;
    `stats.bytes_broadcast` the bytes it received. Raises DistributedError naming a process
    that did not reach a chunk's collective, or vanished during it, within the timeout.
    """
    stats = stats if stats is not None else RestoreStats()
    start = time.perf_counter()
    options = {"host_memory_budget": host_memory_budget, "on_bytes": on_bytes, "stats": stats,
               "engine": engine, "threads": threads, "verify_chunks": verify_chunks}
    restore.check_against_manifest(manifest, restore.checkpoint_shapes(targets), str(ckpt_dir))
    shared = {n: t for n, t in targets.items()
              if isinstance(t.sharding, NamedSharding) and spans_processes(t)}
    plain = {n: t for n, t in targets.items() if n not in shared}
    arrays = {}
    if plain:  # slices no two processes share: each process reads its own, as always
        shards = restore.read_slices(ckpt_dir, manifest, plain, restore.plan_reads(plain),
                                     **options)
        arrays = {name: restore.assemble(t, shards[name]) for name, t in plain.items()}
    owners = assign_owners(shared)
    groups = chunks(shared, host_memory_budget)
    _restores[0] += 1
    # A peer that dies mid-restore leaves the others waiting in a collective (or a barrier):
    # the watchdog names it and ends this process, well within the distributed timeout.
    with watchdog.watch(f"restore broadcast {_restores[0]}"):
        for number, group in enumerate(groups, 1):
            reads, received = _owned_reads(group, owners)
            shards = restore.read_slices(ckpt_dir, manifest, group, reads, **options)
            arrays.update(_broadcast(group, owners, shards, f"chunk {number}/{len(groups)}"))
            stats.bytes_broadcast += received
            on_bytes(received)
            if _tenth(number, len(groups)) != _tenth(number - 1, len(groups)):  # <= ~10 lines
                status(f"restore broadcast: chunk {number}/{len(groups)} done on process "
                       f"{jax.process_index()}: {stats.bytes_from_storage / 1e6:.1f} MB read "
                       f"from storage here, {stats.bytes_broadcast / 1e6:.1f} MB received")
    stats.seconds = time.perf_counter() - start
    return {name: arrays[name] for name in targets}


def _tenth(number: int, total: int) -> int:
    return -1 if number == 0 else (10 * number) // total if total >= 10 else number


def _source(target: Target, owners: Mapping[Key, jax.Device], pieces: Mapping) -> jax.Array:
    """The (R, *shape) array whose one nonzero block per slice is its owner's read."""
    sharding = target.sharding
    spec = tuple(sharding.spec) + (None,) * (len(target.shape) - len(sharding.spec))
    replicas = _replica_axes(sharding)
    count = math.prod(sharding.mesh.shape[axis] for axis in replicas)
    source_sharding = NamedSharding(sharding.mesh, PartitionSpec(replicas, *spec))
    shape = (count, *target.shape)
    blocks = []
    for device, index in source_sharding.addressable_devices_indices_map(shape).items():
        key = _key(index[1:], target.shape)
        if owners[key] == device:
            piece = pieces[device]
            blocks.append(piece.reshape((1, *piece.shape)))
        else:
            zeros = np.zeros((1, *(b - a for a, b in key)), np.dtype(target.dtype))
            blocks.append(jax.device_put(zeros, device))
    return jax.make_array_from_single_device_arrays(shape, source_sharding, blocks)


def _sum_replicas(*sources):
    return tuple(x.sum(axis=0, dtype=x.dtype) for x in sources)


def _broadcast(group: Mapping[str, Target], owners, shards, what: str) -> dict[str, jax.Array]:
    """One jitted all-reduce over the group's replica axes (module docstring)."""
    names = list(group)
    sources = [_source(group[n], owners[n], shards.get(n, {})) for n in names]
    run = jax.jit(_sum_replicas, out_shardings=tuple(group[n].sharding for n in names))
    distributed.barrier(f"restore-broadcast-{what}")  # names a process that never got here
    try:
        results = jax.block_until_ready(run(*sources))
    except Exception as err:  # gloo/NCCL: a peer closed its connection mid-collective
        raise _peer_failure(err, what) from None
    return dict(zip(names, results))


def _peer_failure(err: Exception, what: str) -> DistributedError:
    """Name the process that vanished: the survivors meet once more, and whoever does not
    arrive within the timeout is named by distributed.gather."""
    try:
        distributed.barrier(f"restore-broadcast-failed-{what}")
    except DistributedError as missing:
        return DistributedError(f"restore broadcast, {what}: {missing}")
    cluster = distributed.active()
    where = cluster.describe() if cluster else "restore"
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return DistributedError(f"{where}: restore broadcast, {what}, failed ({first})")
