"""Checksums that make a damaged checkpoint fail loudly, naming the array and the chunk.

Three layers, cheapest first:
  1. Every zarr3 chunk carries a crc32c (its last codec), checked on every restore read (by
     tensorstore, and by the direct reader unless `--no-verify`): flipped or truncated bytes
     fail the read itself, naming the array and chunk.
  2. Restore lists the OCDBT keys once (milliseconds) and refuses when a chunk is missing:
     zarr would otherwise hand back the fill value (zeros) for it, a silent wrong answer.
  3. The manifest records a crc32 of every chunk as written. `jaxaccel verify` re-reads
     every chunk and compares: a second full read plus a crc pass (~1.6 GB/s per core), so
     it is a command of its own, not part of restore.

A chunk is named by its index in the chunk grid, e.g. `blocks.wi_df` chunk (3, 0, 5), and by
its key inside the OCDBT database (`blocks.wi_df/c/3/0/5`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pathlib
import re
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import tensorstore as ts

from jaxaccel.checkpoint import layout, storage
from jaxaccel.checkpoint.manifest import PARAMS_DIR, Manifest
from jaxaccel.errors import IntegrityError  # noqa: F401  (re-exported)

VERIFY_BYTES_IN_FLIGHT = 512 << 20
MAX_PROBLEMS_SHOWN = 5
_KEY_IN_ERROR = re.compile(r'"([^"]+)/c((?:/\d+)*)"')




def crc32(data: np.ndarray) -> str:
    """crc32 of an array's little-endian bytes in C order, as `crc32:xxxxxxxx`."""
    data = np.ascontiguousarray(data)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    data = data.reshape(-1).view(np.uint8)  # bfloat16 has no buffer format of its own
    return f"crc32:{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def chunk_key(name: str, index: Sequence[int]) -> str:
    """The chunk's key in the OCDBT database (zarr3 default key encoding, '/' separator)."""
    return f"{name}/c" + "".join(f"/{i}" for i in index)


def chunk_checksums(array: np.ndarray, chunk: Sequence[int]) -> tuple[str, ...]:
    """crc32 of every chunk of `array`, in `layout.chunk_grid` order (what the writer records)."""
    return tuple(crc32(array[slices]) for _, slices in layout.chunk_grid(array.shape, chunk))


def list_keys(params_dir: pathlib.Path) -> set[str]:
    """Every key in the params OCDBT database (reads only its b-tree nodes)."""
    try:
        store = ts.KvStore.open(layout.kvstore_spec(str(params_dir))).result()
        return {key.decode() for key in store.list().result()}
    except Exception as err:  # tensorstore raises ValueError subclasses with status text
        raise IntegrityError(f"{params_dir}: the OCDBT database cannot be listed "
                             f"({_first_line(err)})") from None


def check_chunks_present(params_dir: pathlib.Path, manifest: Manifest,
                         names: Iterable[str] | None = None, keys: set[str] | None = None) -> None:
    """Refuse, naming the array and chunk, when an array or a chunk the writer stored is gone.

    Chunks are checked only for arrays with recorded chunk checksums: their writer stored every
    chunk, fill-valued ones included, so an absent key can only mean damage.
    """
    _raise_problems(params_dir.parent, missing_chunks(params_dir, manifest, names, keys))


def missing_chunks(params_dir: pathlib.Path, manifest: Manifest,
                   names: Iterable[str] | None = None, keys: set[str] | None = None) -> list[str]:
    """Problems with absent arrays/chunks; `keys` is the database's key listing, if at hand."""
    keys = keys if keys is not None else list_keys(params_dir)
    problems = []
    for name in sorted(names if names is not None else manifest.arrays):
        entry = manifest.arrays[name]
        if f"{name}/zarr.json" not in keys:
            problems.append(f"array {name!r}: missing from {params_dir} (no {name}/zarr.json)")
            continue
        if entry.chunk_shape is None or entry.chunk_checksums is None:
            continue
        missing = [index for index, _ in layout.chunk_grid(entry.shape, entry.chunk_shape)
                   if chunk_key(name, index) not in keys]
        if missing:
            problems.append(f"array {name!r}: {len(missing)} chunk(s) missing, first "
                            f"{layout.format_chunk(missing[0])} (key {chunk_key(name, missing[0])})")
    return problems


def read_error(name: str, err: Exception, where: str = "") -> IntegrityError:
    """Translate a tensorstore read failure into an error naming the array and chunk."""
    text = _first_line(err)
    match = _KEY_IN_ERROR.search(text)
    chunk = ""
    if match and match.group(1) == name:
        chunk = f", chunk {layout.format_chunk(tuple(int(i) for i in match.group(2).split('/')[1:]))}"
    where = f" {where}" if where else ""
    if "Digest mismatch" in text:
        return IntegrityError(f"array {name!r}{chunk}{where}: stored bytes are corrupted "
                              "(crc32c mismatch)")
    damaged = "DATA_LOSS" in text or "OUT_OF_RANGE" in text
    reason = "stored data is truncated or damaged" if damaged else "read failed"
    return IntegrityError(f"array {name!r}{chunk}{where}: {reason} ({text[:240]})")


@dataclasses.dataclass
class VerifyReport:
    arrays: int = 0
    chunks: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    unchecked: list = dataclasses.field(default_factory=list)  # arrays without chunk checksums

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds else 0.0


@dataclasses.dataclass
class _ChunkRead:
    name: str
    index: tuple[int, ...]
    expected: str
    nbytes: int
    future: object


def verify_checkpoint(path: str | pathlib.Path, names: Iterable[str] | None = None, *,
                      on_bytes: Callable[[int], None] = lambda n: None,
                      bytes_in_flight: int = VERIFY_BYTES_IN_FLIGHT) -> VerifyReport:
    """Re-read every chunk (of `names`, default all arrays) and compare with the manifest.

    Raises IntegrityError listing every damaged, missing or mis-shaped array and chunk.
    """
    path = storage.checkpoint_path(path)
    manifest = Manifest.load(path)
    params_dir = path / PARAMS_DIR
    names = sorted(names if names is not None else manifest.arrays)
    report = VerifyReport(arrays=len(names))
    start = time.perf_counter()
    problems = _check_files(path, manifest)
    if isinstance(params_dir, pathlib.Path) and not params_dir.is_dir():
        _raise_problems(path, problems + [f"{params_dir}: missing"])
    problems += missing_chunks(params_dir, manifest, names)
    _raise_problems(path, problems)  # reading would only repeat these as read errors
    stores, open_problems = _open_stores(params_dir, manifest, names)
    problems += open_problems
    problems += _read_and_compare(manifest, stores, report, on_bytes, bytes_in_flight)
    report.seconds = time.perf_counter() - start
    _raise_problems(path, problems)
    return report


def _check_files(path, manifest: Manifest) -> list[str]:
    if isinstance(path, storage.RemotePath):
        present = lambda name: storage.read_bytes(path / name) is not None  # noqa: E731
    else:
        present = lambda name: (path / name).is_file()  # noqa: E731
    return [f"{path / name}: listed in the manifest but missing"
            for name in manifest.tokenizer_files if not present(name)]


def _open_stores(params_dir, manifest: Manifest, names) -> tuple[dict, list[str]]:
    context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    futures = {name: ts.open(layout.array_spec(str(params_dir), name), read=True,
                             context=context) for name in names}
    stores, problems = {}, []
    for name, future in futures.items():
        entry = manifest.arrays[name]
        try:
            store = future.result()
        except Exception as err:  # tensorstore's own error types
            problems.append(f"array {name!r}: cannot be opened ({_first_line(err)[:200]})")
            continue
        stored_dtype = store.dtype.numpy_dtype.name
        if tuple(store.shape) != entry.shape or stored_dtype != entry.dtype:
            problems.append(f"array {name!r}: stored as {tuple(store.shape)} {stored_dtype}, "
                            f"manifest says {entry.shape} {entry.dtype}")
            continue
        stores[name] = store
    return stores, problems


def _read_and_compare(manifest: Manifest, stores: Mapping, report: VerifyReport, on_bytes,
                      bytes_in_flight: int) -> list[str]:
    """Stream chunk reads (bounded bytes in flight) and compare each chunk's crc32."""
    problems, pending, in_flight = [], collections.deque(), 0

    def finish(read: _ChunkRead) -> None:
        nonlocal in_flight
        try:
            data = read.future.result()
        except Exception as err:  # tensorstore's own error types
            problems.append(str(read_error(read.name, err)))
        else:
            actual = crc32(data) if read.expected else ""
            if read.expected and actual != read.expected:
                problems.append(f"array {read.name!r}, chunk {layout.format_chunk(read.index)}: checksum "
                                f"{actual} does not match the manifest's {read.expected}")
            del data
        in_flight -= read.nbytes
        report.bytes_read += read.nbytes
        report.chunks += 1
        on_bytes(read.nbytes)

    for name, store in stores.items():
        entry = manifest.arrays[name]
        for index, slices, expected in _chunks_of(name, entry, report):
            nbytes = _slices_bytes(slices, entry)
            while pending and in_flight + nbytes > bytes_in_flight:
                finish(pending.popleft())
            in_flight += nbytes
            pending.append(_ChunkRead(name, index, expected, nbytes, store[slices].read()))
    while pending:
        finish(pending.popleft())
    return problems


def _chunks_of(name: str, entry, report: VerifyReport):
    """Chunk reads for one array; a whole-array read checked against the array crc when the
    manifest predates per-chunk checksums."""
    if entry.chunk_shape is not None and entry.chunk_checksums is not None:
        grid = layout.chunk_grid(entry.shape, entry.chunk_shape)
        for (index, slices), expected in zip(grid, entry.chunk_checksums):
            yield index, slices, expected
        return
    if entry.checksum is None:
        report.unchecked.append(name)
    yield (), tuple(slice(0, d) for d in entry.shape), entry.checksum or ""


def _slices_bytes(slices, entry) -> int:
    return math.prod(s.stop - s.start for s in slices) * entry.itemsize


def _raise_problems(path, problems: list[str]) -> None:
    if not problems:
        return
    shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
    more = f" (and {len(problems) - MAX_PROBLEMS_SHOWN} more)" if len(problems) > MAX_PROBLEMS_SHOWN else ""
    raise IntegrityError(f"{path}: {len(problems)} integrity problem(s): {shown}{more}")


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__
