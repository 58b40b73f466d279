"""Direct chunk reads: find each zarr3 chunk inside the OCDBT data files and `pread` it straight
into the memory the device will own.

Why by hand: tensorstore reads every chunk into a fresh buffer, decodes it, then copies it into
a fresh result array, so each byte lands in two new allocations. On CPU (and on these VMs in
particular) first-touching new memory dominates a restore: a perf profile of tensorstore
reading the 2.68 GB reference checkpoint spent 53% of its cycles in the kernel's page zeroing
(`clear_page_erms`) and ran at 0.6 GB/s. Here every chunk is read in L2-sized pieces through a
small scratch buffer that each thread reuses (or, where the destination is contiguous,
straight into it), its crc32c is checked on the way, and the bytes are written once, into the
64-byte-aligned shard buffer that jax then adopts without copying on CPU.

The crc32c check is on by default (`--no-verify` turns it off); it runs on the read threads
with the GIL released (the crc32c package's hardware crc). Its cost, where a checked restore's
time goes, and the alternatives measured and not taken (mapped strided reads, memfd, 4 KiB
pages, adopting a private file mapping): docs/performance.md, "Direct chunk reads".

Only arrays stored the way `layout.create_spec` writes them uncompressed qualify (codecs
`bytes` little-endian + optional `crc32c`, regular chunk grid, default chunk keys); restore
sends anything else (zstd, foreign layouts) through tensorstore.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import json
import math
import os
import pathlib
import threading

import crc32c
import ml_dtypes
import numpy as np
import tensorstore as ts

from jaxaccel.checkpoint import integrity, storage
from jaxaccel.checkpoint.layout import format_chunk
from jaxaccel.errors import ChunkError  # noqa: F401  (re-exported)

PIECE_BYTES = int(os.environ.get("JAXACCEL_PIECE", 1 << 20))  # read granularity
ALIGNMENT = 4096  # jax on CPU adopts (does not copy) buffers aligned to >= 64 bytes
_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16),
           "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn)}
_CRC_BYTES = 4




@dataclasses.dataclass(frozen=True)
class ValueRef:
    """Where one OCDBT value lives: a byte range of a data file, or inline bytes."""

    file: str | None
    offset: int = 0
    length: int = 0
    inline: bytes | None = None


@dataclasses.dataclass(frozen=True)
class ArrayLayout:
    """What a direct read needs to know about one stored array (from its zarr.json)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk: tuple[int, ...]
    fill_value: float
    checksummed: bool


_INDEX_READS = 3  # reads of a remote index whose nodes do not decode, before giving up


def ocdbt_index(params_dir) -> dict[bytes, ValueRef]:
    """Every key of the OCDBT database's newest version -> where its value lives (`file`:
    a local path, or a URL when `params_dir` is remote: see checkpoint.storage). A remote
    index that does not decode is read again (a response corrupted in transit heals)."""
    params_dir = storage.checkpoint_path(params_dir)
    if isinstance(params_dir, pathlib.Path):
        return _ocdbt_index(params_dir.absolute())
    for attempt in range(_INDEX_READS):
        try:
            return _ocdbt_index(params_dir)
        except storage.StorageError as err:
            # tensorstore words a node that does not decode as DATA_LOSS, or only as "Error
            # decoding ...": either is the response, not the database (a database that is
            # really corrupt fails every read, and the last one is raised).
            decode = any(word in str(err) for word in ("DATA_LOSS", "rror decoding"))
            if attempt == _INDEX_READS - 1 or not decode:
                raise
    raise AssertionError("unreachable")


def _ocdbt_index(params_dir) -> dict[bytes, ValueRef]:
    try:
        base = ts.KvStore.open(storage.kvstore_spec(params_dir)).result()
        manifest = ts.ocdbt.dump(base).result()
        index: dict[bytes, ValueRef] = {}
        if manifest.get("versions"):
            root = manifest["versions"][-1]["root"]
            if "location" in root:
                _walk(base, root["location"], b"", params_dir, index)
    except Exception as err:  # tensorstore raises ValueError subclasses with status text
        raise storage.StorageError(f"{params_dir}: the OCDBT database cannot be listed "
                                   f"({storage.explain(err)})") from None
    return index


def _walk(base, location: str, prefix: bytes, params_dir, index: dict) -> None:
    node = ts.ocdbt.dump(base, location).result()
    for entry in node["entries"]:
        if "location" in entry:  # interior node: child keys are relative to the common prefix
            _walk(base, entry["location"], prefix + entry["subtree_common_prefix"],
                  params_dir, index)
        elif "indirect_value" in entry:
            index[prefix + entry["key"]] = _value_ref(entry["indirect_value"], params_dir)
        else:
            index[prefix + entry["key"]] = ValueRef(None, inline=bytes(entry["inline_value"]))


def _value_ref(text: str, params_dir) -> ValueRef:
    # "value::d/<file>:<offset>:<length>"
    path, offset, length = text.removeprefix("value::").rsplit(":", 2)
    return ValueRef(str(params_dir / path), int(offset), int(length))


def array_layout(name: str, index: dict[bytes, ValueRef]) -> ArrayLayout | None:
    """The array's layout if a direct read can handle it, else None (use tensorstore)."""
    ref = index.get(f"{name}/zarr.json".encode())
    if ref is None or ref.inline is None:
        return None
    meta = json.loads(ref.inline)
    codecs = [c.get("name") for c in meta.get("codecs", [])]
    first = (meta["codecs"][0].get("configuration") or {}) if codecs else {}
    endian = first.get("endian", "little")
    grid = meta.get("chunk_grid", {})
    keys = meta.get("chunk_key_encoding", {})
    if (codecs not in (["bytes"], ["bytes", "crc32c"]) or endian != "little"
            or grid.get("name") != "regular" or keys.get("name") != "default"
            or (keys.get("configuration") or {}).get("separator", "/") != "/"
            or not isinstance(meta.get("fill_value"), (int, float))):
        return None
    try:
        dtype = numpy_dtype(meta["data_type"])
    except TypeError:
        return None
    return ArrayLayout(name, tuple(meta["shape"]), dtype,
                       tuple(grid["configuration"]["chunk_shape"]), meta["fill_value"],
                       codecs[-1] == "crc32c")


def numpy_dtype(name: str) -> np.dtype:
    """A zarr3 data type name as a little-endian numpy dtype (bfloat16 via ml_dtypes)."""
    return _DTYPES.get(name) or np.dtype(name).newbyteorder("<")


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised array whose data starts on an ALIGNMENT boundary."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def chunks_in(box: tuple[slice, ...], chunk: tuple[int, ...]):
    """Grid indices of the chunks that intersect `box` (slices with explicit start/stop)."""
    ranges = [range(s.start // c, -(-s.stop // c)) for s, c in zip(box, chunk)]
    return itertools.product(*ranges)


def chunk_key(name: str, grid_index: tuple[int, ...]) -> bytes:
    return integrity.chunk_key(name, grid_index).encode()


def _libc_preadv():
    preadv = ctypes.CDLL(None, use_errno=True).preadv
    preadv.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64)
    preadv.restype = ctypes.c_ssize_t
    return preadv


_PREADV = _libc_preadv()
_PREAD = ctypes.CDLL(None, use_errno=True).pread
_PREAD.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64)
_PREAD.restype = ctypes.c_ssize_t
_IOV_MAX = 1024


def contiguous_runs(out: np.ndarray) -> tuple[np.ndarray, int]:
    """Start addresses (C order) and byte length of the contiguous runs that make up `out`."""
    run, k = out.itemsize, out.ndim
    while k and (out.shape[k - 1] == 1 or out.strides[k - 1] == run):
        run *= out.shape[k - 1]
        k -= 1
    offsets = np.zeros(1, np.int64)
    for dim in range(k):
        steps = np.arange(out.shape[dim], dtype=np.int64) * out.strides[dim]
        offsets = (offsets[:, None] + steps).reshape(-1)
    return out.ctypes.data + offsets, run


def _scatter_read(fd: int, out: np.ndarray, offset: int, ref: ValueRef) -> None:
    """Read a chunk's bytes from `offset` straight into the (strided) view `out`: one
    preadv per 1024 contiguous runs, via ctypes so the GIL is released once per call
    rather than once per piece (a compile thread beside the restore makes each GIL hand-over
    cost up to the 5 ms switch interval)."""
    starts, run = contiguous_runs(out)
    iov = np.empty((len(starts), 2), np.uint64)
    iov[:, 0], iov[:, 1] = starts, run
    for begin in range(0, len(iov), _IOV_MAX):
        part = iov[begin:begin + _IOV_MAX]
        want = len(part) * run
        got = _PREADV(fd, part.ctypes.data, len(part), offset)
        if got < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), ref.file)
        if got != want:  # regular files read short only at their end
            raise ChunkError(f"{ref.file}: ends at byte {offset + got}, inside a chunk: "
                             "stored data is truncated or damaged")
        offset += want


def _pread_exact(fd: int, buf: np.ndarray, offset: int, ref: ValueRef) -> None:
    """Fill the contiguous `buf` from `offset`: one libc pread through ctypes, which drops
    the GIL once per call (os.preadv also needs a memoryview and a list per call)."""
    want, done = buf.nbytes, 0
    while done < want:
        got = _PREAD(fd, buf.ctypes.data + done, want - done, offset + done)
        if got < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), ref.file)
        if got == 0:
            raise ChunkError(f"{ref.file}: ends at byte {offset + done}, inside a chunk: "
                             "stored data is truncated or damaged")
        done += got


def _pieces(chunk: tuple[int, ...], itemsize: int, out: np.ndarray):
    """(view of `out`, byte offset inside the chunk) of PIECE_BYTES-sized slabs along the
    chunk's first dim longer than 1: C order, so each slab's bytes are contiguous on disk."""
    axis = next((i for i, c in enumerate(chunk) if c > 1), len(chunk))
    if axis == len(chunk):
        yield out, 0
        return
    lead = (0,) * axis
    step = math.prod(chunk[axis + 1:]) * itemsize
    rows = max(1, PIECE_BYTES // step)
    for start in range(0, chunk[axis], rows):
        yield out[lead + (slice(start, start + rows),)], start * step


class ChunkReader:
    """Reads chunks of one checkpoint into destination arrays; safe to share across threads."""

    def __init__(self, index: dict[bytes, ValueRef], verify: bool = True):
        self.index = index
        self.verify = verify
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def prefetch(self, layout: ArrayLayout, box: tuple[slice, ...]) -> None:
        """Ask the kernel to start reading the chunks `box` needs (a no-op when cached): with
        a cold page cache the disk then works ahead of the copying threads."""
        for grid_index in chunks_in(box, layout.chunk):
            ref = self.index.get(chunk_key(layout.name, grid_index))
            if ref is not None and ref.inline is None:
                os.posix_fadvise(self._fd(ref.file), ref.offset, ref.length,
                                 os.POSIX_FADV_WILLNEED)

    def read_chunk(self, layout: ArrayLayout, grid_index, box: tuple[slice, ...],
                   dest: np.ndarray) -> int:
        """Copy the part of chunk `grid_index` inside global `box` into `dest` (= box's data).

        Returns the bytes read from storage."""
        origin = [g * c for g, c in zip(grid_index, layout.chunk)]
        inter = [slice(max(o, s.start), min(o + c, s.stop, n))
                 for o, c, s, n in zip(origin, layout.chunk, box, layout.shape)]
        out = dest[tuple(slice(i.start - s.start, i.stop - s.start) for i, s in zip(inter, box))]
        ref = self.index.get(chunk_key(layout.name, grid_index))
        if ref is None:  # zarr leaves chunks equal to the fill value unwritten
            out[...] = layout.fill_value
            return 0
        whole = all(i.start == o and i.stop == o + c
                    for i, o, c in zip(inter, origin, layout.chunk))
        try:
            if whole and ref.inline is None:
                self._read_whole(layout, ref, out, grid_index)
            else:
                data = self._read_all(layout, ref, grid_index).reshape(layout.chunk)
                out[...] = data[tuple(slice(i.start - o, i.stop - o)
                                      for i, o in zip(inter, origin))]
        except ChunkError as err:  # a short file: name the array and chunk it cut into
            if str(err).startswith("array "):
                raise
            raise ChunkError(f"array {layout.name!r}, chunk {format_chunk(grid_index)}: {err}") from None
        return ref.length if ref.inline is None else 0

    def _read_whole(self, layout: ArrayLayout, ref: ValueRef, out: np.ndarray,
                    grid_index) -> None:
        """Stream a chunk that `out` receives entirely.

        Unchecked and uncast: one scatter preadv straight into `out`. Otherwise piece by
        piece along the chunk's first long dim: each piece is read (straight into `out` when
        that part of it is contiguous, else into this thread's scratch buffer), its crc32c
        taken while the piece is still in L2, then cast/copied into `out` from cache. The
        crc32c package releases the GIL for inputs >= 32 KiB (its default gil_release_mode),
        so both read threads checksum in parallel.
        """
        self._check_length(layout, ref, grid_index)
        fd = self._fd(ref.file)
        check = self.verify and layout.checksummed
        if out.dtype == layout.dtype and not check:
            _scatter_read(fd, out, ref.offset, ref)  # no cast, no checksum: bytes straight in
            return
        crc = 0
        for view, offset in _pieces(layout.chunk, layout.dtype.itemsize, out):
            nbytes = view.size * layout.dtype.itemsize
            straight = out.dtype == layout.dtype and view.flags.c_contiguous
            buf = view.reshape(-1).view(np.uint8) if straight else self._scratch(nbytes)
            _pread_exact(fd, buf, ref.offset + offset, ref)
            if check:
                crc = crc32c.crc32c(buf, crc)
            if not straight:
                view[...] = buf.view(layout.dtype).reshape(view.shape)
        if check:
            tail = np.empty(_CRC_BYTES, np.uint8)
            _pread_exact(fd, tail, ref.offset + ref.length - _CRC_BYTES, ref)
            self._compare(layout, grid_index, crc, tail)

    def _read_all(self, layout: ArrayLayout, ref: ValueRef, grid_index) -> np.ndarray:
        """A whole chunk's values as a new flat array (for chunks only partly needed)."""
        self._check_length(layout, ref, grid_index)
        if ref.inline is not None:
            raw = np.frombuffer(ref.inline, np.uint8)
        else:
            raw = np.empty(ref.length, np.uint8)
            _pread_exact(self._fd(ref.file), raw, ref.offset, ref)
        body = raw[:ref.length - _CRC_BYTES] if layout.checksummed else raw
        if layout.checksummed and self.verify:
            self._compare(layout, grid_index, crc32c.crc32c(body), raw[-_CRC_BYTES:])
        return body.view(layout.dtype)

    def _check_length(self, layout: ArrayLayout, ref: ValueRef, grid_index) -> None:
        expected = math.prod(layout.chunk) * layout.dtype.itemsize
        expected += _CRC_BYTES if layout.checksummed else 0
        length = len(ref.inline) if ref.inline is not None else ref.length
        if length != expected:
            raise ChunkError(f"array {layout.name!r}, chunk {format_chunk(grid_index)}: stored data "
                             f"is truncated or damaged ({length} bytes, expected {expected})")

    @staticmethod
    def _compare(layout: ArrayLayout, grid_index, crc: int, tail: np.ndarray) -> None:
        if crc != int.from_bytes(tail.tobytes(), "little"):
            raise ChunkError(f"array {layout.name!r}, chunk {format_chunk(grid_index)}: stored "
                             "bytes are corrupted (crc32c mismatch)")

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def _scratch(self, nbytes: int) -> np.ndarray:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            buf = self._local.buf = aligned_empty((max(nbytes, PIECE_BYTES),), np.uint8)
        return buf[:nbytes]
