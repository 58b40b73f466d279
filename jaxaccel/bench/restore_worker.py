"""One timed restore in a fresh process. Prints one JSON line: seconds (wall and
process CPU), bytes, peak RSS overhead.

    python -m jaxaccel.bench.restore_worker '{"contender": "jaxaccel", "ckpt": CKPT,
        "mesh": "data=2,model=4", "rules": "dp_tp", "dtype": "default"}'

Contenders: `jaxaccel` (restore_arrays, default engine, checking every chunk's crc32c, as
load_model runs it; `jaxaccel-crc` is the same, its name from when the check was opt-in),
`jaxaccel-noverify` (as `--no-verify`: chunk lengths checked, crc32c not),
`jaxaccel-tensorstore` (every array through tensorstore, which always checks crc32c), `orbax`
(orbax's StandardCheckpointer restoring the same params into the same shardings and dtype),
`raw` (read every byte of the params' data files into fresh memory, one thread), and
`copy-floor` (the same bytes, page cache warmed first, copied by one thread per core into
memory allocated and touched before the clock: what no restore can beat on this machine). For `orbax`, CKPT may be an orbax
checkpoint of the same tree (the `--orbax-default` copy), with `manifest_from` the jaxaccel
checkpoint. The worker needs as many (simulated) devices as MESH has.

Before the clock starts the worker plans everything, pre-touches about the checkpoint's size
of memory (these VMs hand memory that was freed and left idle back to the hypervisor, and
touching it again runs at ~0.4 GB/s instead of ~15 GB/s), then reads the checkpoint's files
once: every contender finds them in the page cache, even where other processes' memory use
evicted them since the last run.
"""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np

from jaxaccel.bench import remote_restore
from jaxaccel.bench.worker import serve

# Pre-touch this many times the checkpoint's bytes: enough for what any contender allocates
# (orbax holds a separate copy per replica: 2x on data=2).
PRETOUCH_FACTOR = float(os.environ.get("JAXACCEL_PRETOUCH", 2.2))


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        line = next(l for l in handle if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def pretouch(nbytes: int) -> None:
    block = np.ones(nbytes, np.uint8)  # allocate + write: the kernel backs every page
    del block


def data_files(ckpt: pathlib.Path) -> list[pathlib.Path]:
    if (ckpt / "config.json").is_file() and not (ckpt / "jaxaccel.json").is_file():
        return sorted(ckpt.glob("*.safetensors"))  # a Hugging Face directory's weights
    return [p for p in (ckpt / "params").rglob("*") if p.is_file()] if (
        ckpt / "params").is_dir() else [p for p in ckpt.rglob("*") if p.is_file()]


def resident_bytes(arrays) -> int:
    """Bytes the restored arrays hold on local devices (a buffer shared by replicas: once)."""
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    import jax

    buffers = {}
    for array in jax.tree.leaves(arrays):
        for shard in array.addressable_shards:
            buffers[shard.data.unsafe_buffer_pointer()] = shard.data.nbytes
    return sum(buffers.values())


def prepare(contender: str, ckpt: pathlib.Path, mesh: str, rules: str, dtype: str | None,
            manifest_dir: pathlib.Path, source: str | None = None):
    """Everything outside the clock; returns a zero-argument function doing the restore."""
    if contender == "raw":
        return raw_reader(data_files(ckpt))
    if contender == "copy-floor":
        return copy_floor(data_files(ckpt))
    plan = plan_restore(manifest_dir, mesh, rules, dtype)
    if contender.startswith("remote-"):  # from the bucket at `source` (bench restore --source)
        return remote_restore.prepare(contender, source, plan, orbax_restore)
    if contender.startswith("jaxaccel"):
        # As load_model: chunk lengths always checked, crc32c unless `--no-verify`.
        engine = "tensorstore" if contender == "jaxaccel-tensorstore" else "auto"
        return jaxaccel_restore(ckpt, plan, engine, verify=contender != "jaxaccel-noverify")
    if contender == "orbax":
        return orbax_restore(ckpt, plan)
    if contender == "orbax-safetensors":
        return orbax_safetensors_restore(ckpt, plan)
    raise SystemExit(f"unknown contender {contender!r}")


def raw_reader(files: list[pathlib.Path]):
    def read_raw():
        out = []
        for path in files:
            buf = np.empty(path.stat().st_size, np.uint8)
            with open(path, "rb", buffering=0) as handle:
                handle.readinto(buf)
            out.append(buf)
        return out
    return read_raw


COPY_PIECE = 8 << 20  # bytes per pread of the copy floor: large enough that calls are free


def warm_page_cache(files: list[pathlib.Path]) -> None:
    """Read every file once, so the timed run finds it in the page cache even where other
    processes' memory use evicted it since the last run (a shared machine)."""
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while handle.read(COPY_PIECE):
                pass


def copy_floor(files: list[pathlib.Path], threads: int | None = None):
    """Outside the clock: read every file once (page cache warm) and allocate + touch one
    destination buffer per file. The timed call preads the files into them in COPY_PIECE
    pieces from one thread per core: the kernel's page-cache copy alone, no page faults."""
    # deferred: concurrent.futures only for this contender
    import concurrent.futures

    threads = threads or os.cpu_count() or 1
    warm_page_cache(files)
    buffers = [np.ones(path.stat().st_size, np.uint8) for path in files]  # touched
    fds = [os.open(path, os.O_RDONLY) for path in files]
    pieces = [(fd, buf, start) for fd, buf in zip(fds, buffers)
              for start in range(0, len(buf), COPY_PIECE)]

    def copy_one(piece) -> None:
        fd, buf, start = piece
        view = memoryview(buf)[start:start + COPY_PIECE]
        done = 0
        while done < len(view):  # os.preadv drops the GIL for the copy
            done += os.preadv(fd, [view[done:]], start + done)

    def copy_all():
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(copy_one, pieces))
        return buffers
    return copy_all


def plan_restore(manifest_dir: pathlib.Path, mesh: str, rules: str, dtype: str | None):
    """The runtime's restore plan (kept apart: its API is the runtime's to change)."""
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    from jaxaccel.startup.loader import plan_model
    from jaxaccel.parallel.sharding import Layout

    return plan_model(manifest_dir, Layout.create(mesh, rules), dtype)


def jaxaccel_restore(ckpt: pathlib.Path, plan, engine: str, verify: bool):
    """The runtime's restore, as load_model runs it (kept apart: its API may change)."""
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    from jaxaccel.checkpoint.restore import restore_arrays

    return lambda: restore_arrays(ckpt, plan.manifest, plan.targets, engine=engine,
                                  verify_chunks=verify)


def orbax_restore(ckpt: pathlib.Path, plan):
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    import jax
    import orbax.checkpoint as ocp

    remote = not isinstance(ckpt, pathlib.Path)  # a storage.RemotePath
    directory = ckpt / "params" if remote or (ckpt / "params").is_dir() else ckpt
    abstract: dict = {}
    for name, target in plan.targets.items():
        node = abstract
        *parents, leaf = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jax.ShapeDtypeStruct(target.shape, target.dtype, sharding=target.sharding)
    checkpointer = ocp.StandardCheckpointer()
    where = str(directory) if remote else directory.absolute()
    return lambda: checkpointer.restore(where, abstract)


def orbax_safetensors_restore(hf_dir: pathlib.Path, plan):
    """orbax v1 loading a Hugging Face directory's safetensors (CheckpointLayout.SAFETENSORS)
    onto the plan's mesh: each tensor in the plan's compute dtype, its first dim divisible by
    the `model` axis cut over it (else its second, else replicated): the same bytes per
    device as jaxaccel's slices of the same weights (orbax cannot transpose or stack)."""
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    try:  # deferred: orbax loads in the worker process only
        from orbax.checkpoint import v1 as ocp  # deferred: as above
    except ImportError:  # orbax 0.12: the v1 API is still under experimental
        from orbax.checkpoint.experimental import v1 as ocp  # deferred: as above
    mesh = plan.layout.mesh
    width = mesh.shape.get("model", 1)
    files = plan.manifest.reader.files
    dtype = next(iter(plan.targets.values())).dtype
    abstract = {}
    for name in files.names():
        shape = files.shape(name)
        axis = next((i for i, d in enumerate(shape[:2]) if d % width == 0), None)
        spec = [None] * len(shape)
        if axis is not None and width > 1:
            spec[axis] = "model"
        abstract[name] = jax.ShapeDtypeStruct(shape, dtype,
                                              sharding=NamedSharding(mesh, PartitionSpec(*spec)))

    def load():
        ctx = ocp.Context()
        ctx.checkpoint_layout = "safetensors"
        with ctx:
            return ocp.load(hf_dir.absolute(), abstract)
    return load


def main(contender: str, ckpt: str, mesh: str, rules: str, dtype: str = "default",
         manifest_from: str | None = None, source: str | None = None) -> dict:
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    import jax

    ckpt = pathlib.Path(ckpt)
    restore = prepare(contender, ckpt, mesh, rules, None if dtype == "default" else dtype,
                      pathlib.Path(manifest_from or ckpt), source)
    jax.block_until_ready(jax.device_put(np.ones(8, np.float32), jax.devices()[0]))
    nbytes = sum(p.stat().st_size for p in data_files(ckpt))
    pretouch(int(nbytes * PRETOUCH_FACTOR))
    if not contender.startswith("remote-"):  # after the pretouch, which may evict it
        warm_page_cache(data_files(ckpt))
    with open("/proc/self/clear_refs", "w") as handle:  # VmHWM := VmRSS now
        handle.write("5")
    before = status_bytes("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    out = restore()
    jax.block_until_ready(out)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu  # every thread's: steadier than wall on a shared machine
    peak = status_bytes("VmHWM")
    # lists of numpy buffers, not jax arrays
    raw = contender in ("raw", "remote-raw", "copy-floor")
    resident = sum(b.nbytes for b in out) if raw else resident_bytes(out)
    return {"contender": contender, "seconds": seconds, "cpu_seconds": cpu, "bytes": nbytes,
            "peak_rss_growth": peak - before, "resident": resident,
            "overhead": peak - before - resident}


if __name__ == "__main__":
    serve(main)
