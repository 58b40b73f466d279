"""A Hugging Face model directory as a checkpoint: restored as it is, without a convert.

`open_checkpoint(PATH)` is what every command and `jaxaccel.load` open a checkpoint with: a
jaxaccel checkpoint (`jaxaccel.json`) reads its manifest; a Hugging Face directory
(`config.json` + safetensors, local or under gs:// s3:// https://) gets a manifest built the
way `convert` would write it, after the checks `convert` makes up front (config.json and the
family, the index's authority over the shard files, every tensor present, used and of the
shape config.json implies, every dtype readable), and a `reader` that restore asks for the
slices its devices hold (`HfSliceReader.read_into`).

Reading: each slice of a jaxaccel parameter is the family's weight rule (transpose, heads
split, layers stacked) applied to views of the source tensors and cut to the slice, so only
the bytes under the slice are touched: locally through a memory map of each file; remotely
by ranged reads of the rows of each tensor that the slice covers (a weight cut over its
output rows reads those rows; a cut that runs across every row reads the whole tensor).
A linear weight's slice is a transposed view ([out, in] stored, [in, out] held): it is copied
into the slice's buffer by `checkpoint.transpose` (a C++ kernel, finite check included).

What is verified: safetensors carries no checksums, so nothing can detect a flipped byte that
stays a finite number. Each file's header is checked (offsets inside the file, shapes and
dtypes consistent), and every value read is checked finite after the cast to the dtype it is
held in (the range check of `convert`: NaN/inf in the source, or a value the held dtype turns
into inf, fails the restore naming the tensor). No per-file sha256 is checked: a directory
carries none of its own (a hub cache names blobs by theirs, but a hash needs every byte of a
file, and each process reads only its slices). `convert` stays the way to make a verified
(per-chunk crc32c), re-chunked, optionally quantized copy.

A pre-quantized directory (config.json's `quantization_config`: compressed-tensors, AWQ,
GPTQ) is read through `conversion.prequantized`: its quantized layers are held as stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import mmap
import os
import pathlib
import re
import struct
import threading

import crc32c
import numpy as np

from jaxaccel.checkpoint import chunk_cache, storage, transpose
from jaxaccel.checkpoint.manifest import MANIFEST_NAME, ArrayEntry, CheckpointError, Manifest
from jaxaccel.conversion import hf, prequantized
from jaxaccel.conversion.safetensors_source import (
    DTYPES,
    INDEX_NAME,
    PICKLE_SUFFIXES,
    ConvertError,
    choose_weight_files,
    read_hf_config,
    read_index,
)
from jaxaccel.models import family_spec, known_families
from jaxaccel.models.state import abstract_model
from jaxaccel.models.weights import identity
from jaxaccel.parallel.params import param_specs
from jaxaccel.utils.files import writable_cache_dir

CONFIG_NAME = "config.json"
# Held dtypes a Hugging Face directory's manifest names (as `convert --dtype` would).
_STORED = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# Small files a remote directory is mirrored with (https has no listing to find them).
_METADATA = ("config.json", "generation_config.json", INDEX_NAME, "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "modules.json",
             "config_sentence_transformers.json", "1_Pooling/config.json")
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def is_hf_directory(path) -> bool:
    """Whether `path` (local or remote) is a Hugging Face directory: config.json, no
    jaxaccel.json."""
    path = storage.checkpoint_path(path)
    if isinstance(path, pathlib.Path):
        return (path / CONFIG_NAME).is_file() and not (path / MANIFEST_NAME).is_file()
    return (storage.read_bytes(path / MANIFEST_NAME) is None
            and storage.read_bytes(path / CONFIG_NAME) is not None)


def open_checkpoint(path) -> Manifest:
    """The manifest of a jaxaccel checkpoint, or of a Hugging Face directory (with its
    `reader`). Raises CheckpointError saying what was found and what to do."""
    path = storage.checkpoint_path(path)
    if isinstance(path, pathlib.Path):
        if path.is_dir() and not (path / MANIFEST_NAME).is_file():
            _refuse_unknown_directory(path)
            return hf_manifest(path)
        return Manifest.load(path)
    if storage.read_bytes(path / MANIFEST_NAME) is None and storage.read_bytes(
            path / CONFIG_NAME) is not None:
        return hf_manifest(path)
    return Manifest.load(path)


def _refuse_unknown_directory(path: pathlib.Path) -> None:
    """A local directory that is neither kind: say what is there and what is expected."""
    if (path / CONFIG_NAME).is_file():
        return
    names = sorted(p.name for p in path.iterdir())
    if (path / "params").is_dir():
        raise CheckpointError(f"{path / MANIFEST_NAME}: missing; {path} holds params/ but no "
                              "manifest: an interrupted convert (convert it again)")
    if any(n.endswith(".safetensors") or n.endswith(PICKLE_SUFFIXES) for n in names):
        raise CheckpointError(f"{path}: holds weights ({', '.join(names[:6])}) but no "
                              "config.json; a Hugging Face model directory needs its "
                              "config.json, a jaxaccel checkpoint its jaxaccel.json")
    raise CheckpointError(f"{path / MANIFEST_NAME}: missing; {path} is neither a jaxaccel "
                          "checkpoint nor a Hugging Face model directory (no config.json); "
                          f"found {names[:8] or 'nothing'}")


def hf_manifest(path) -> Manifest:
    """The manifest `convert` would write for the Hugging Face directory `path`, at the
    source's own dtype, with a reader of its slices. Raises CheckpointError (ConvertError's
    messages: the file, tensor or config key) before any weight is read."""
    path = storage.checkpoint_path(path)
    local = path if isinstance(path, pathlib.Path) else _mirror_metadata(path)
    try:
        return _build(path, local)
    except ConvertError as err:
        raise CheckpointError(f"{err} (read as a Hugging Face model directory)") from None


def _build(path, local: pathlib.Path) -> Manifest:
    hf_config = read_hf_config(local)
    quantized = prequantized.format_of(hf_config, local / CONFIG_NAME)  # None: full precision
    spec = family_spec(hf.resolve_family(hf_config, "auto", local / CONFIG_NAME))
    extras, extra_files = spec.read_extra_sources(local)
    files = TensorFiles.open(path, local, extra_files)
    # A pre-quantized directory: its quantized layers seen as the float weights they stand for.
    seen = prequantized.QuantizedSource(files, quantized) if quantized else files
    cfg = hf._family_config(spec, {**hf_config, **extras}, local)
    dtype = seen.held_dtype()
    _, abstract = abstract_model(spec.name, cfg, hf.DTYPES[dtype])
    specs = param_specs(abstract)
    plan = hf.plan_arrays(spec, cfg, seen, specs)
    arrays = {item.rule.target: ArrayEntry(tuple(specs[item.rule.target].shape), dtype,
                                           tuple(item.axes)) for item in plan.arrays}
    tokenizer = tuple(n for n in spec.preprocessing_files if (local / n).is_file())
    source = {"path": str(path if not isinstance(path, pathlib.Path) else path.absolute()),
              "model_type": hf_config["model_type"], "layout": "hf", "format": "huggingface",
              "files": [f.name for f in files.weight_files],
              "ignored_tensors": plan.ignored, **hf._sentence_settings(spec, local),
              **spec.conversion_notes}
    by_target = {item.rule.target: item for item in plan.arrays}
    reader, quant_info = HfSliceReader(files, by_target), {}
    if quantized:
        arrays, quant_info, held = prequantized.quantized_arrays(seen, spec, plan, specs,
                                                                 arrays)
        reader = prequantized.PrequantizedReader(reader, quantized, by_target, held)
        source["quantization_format"] = quantized.label
    # As a converted manifest holds it after its JSON round trip (tuples become lists).
    config = json.loads(json.dumps(dataclasses.asdict(cfg)))
    return Manifest(family=spec.name, config=config, dtype=dtype,
                    arrays=arrays, tokenizer_files=tokenizer, source=source,
                    generation=hf._generation(spec, local, hf_config), reader=reader,
                    quantization=quant_info)


def _mirror_metadata(path: storage.RemotePath) -> pathlib.Path:
    """A local copy of a remote directory's small files (config, index, tokenizer,
    sentence-transformers modules), in the file cache under a hash of the URL and config."""
    config = storage.read_bytes(path / CONFIG_NAME)
    if config is None:
        raise CheckpointError(f"{path / CONFIG_NAME}: missing; {path} is neither a jaxaccel "
                              "checkpoint (no jaxaccel.json) nor a Hugging Face model directory")
    key = hashlib.sha256(str(path).encode() + b"\0" + config).hexdigest()[:32]
    root = writable_cache_dir(chunk_cache.default_dir().parent / "files", "file cache",
                              "$JAXACCEL_CACHE_DIR (or $XDG_CACHE_HOME)") / "hf" / key
    names = [*_METADATA, *(n for family in known_families()
                           for n in family_spec(family).metadata_files)]
    if not path.scheme.startswith("http"):
        names = [n for n in storage.list_keys(path)
                 if n.endswith((".json", ".txt", ".model"))
                 or ("/" in n and n.endswith(".safetensors"))]  # a module's own weights
    for name in names:
        dest = root / name
        if dest.is_file():
            continue
        data = storage.read_bytes(path / name)
        if data is not None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".tmp-{dest.name}-{threading.get_ident()}")
            tmp.write_bytes(data)
            tmp.replace(dest)
    return root


@dataclasses.dataclass(frozen=True)
class _Tensor:
    file: object  # pathlib.Path or storage.RemotePath
    dtype: str  # safetensors dtype ("BF16", ...)
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    stop: int
    generation: bytes = b""  # a remote file's storage generation (ETag), as read


class TensorFiles:
    """The safetensors files of a Hugging Face directory: headers parsed, tensors read as
    views (local: a memory map per file) or by row range (remote: ranged reads). Offers the
    interface `hf.plan_arrays` checks a source through (names, shape, file_of, check_dtype,
    read, dropped)."""

    def __init__(self, tensors: dict[str, _Tensor], weight_files: list, remote: bool):
        self.tensors, self.weight_files, self.remote = tensors, weight_files, remote
        self.file_of = {name: t.file for name, t in tensors.items()}
        self.dropped: list[str] = []
        self._fds: dict = {}
        self._stores: dict = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self.network_bytes = 0
        self.network_requests = 0
        self.cache_bytes = 0
        self.cache = _cache_for(tensors) if remote else None

    @classmethod
    def open(cls, path, local: pathlib.Path, extra_files: dict) -> TensorFiles:
        """Every tensor of the weight files transformers would load (the index's authority
        checked), plus a family's extra module files (local copies, with their prefixes)."""
        remote = not isinstance(path, pathlib.Path)
        weight_map = read_index(local) if not remote else _remote_index(path, local)
        files = _local_weight_files(local) if not remote else (
            _remote_weight_files(path, weight_map), [])
        tensors = {}
        for file in files[0]:
            for name, tensor in _header(file).items():
                if weight_map is None and name in tensors:
                    raise ConvertError(f"{file}: tensor {name!r} is also in "
                                       f"{tensors[name].file}; without an index it is "
                                       "ambiguous which copy to use")
                if weight_map is None or weight_map.get(name) == file:
                    tensors[name] = tensor
        if weight_map is not None:
            missing = sorted(n for n in weight_map if n not in tensors)
            if missing:
                raise ConvertError(f"{weight_map[missing[0]]}: the index names tensor "
                                   f"{missing[0]!r} in this file, which does not hold it")
        for file, prefix in extra_files.items():
            tensors.update({prefix + n: t for n, t in _header(pathlib.Path(file)).items()})
        return cls(tensors, list(files[0]), remote)

    # -- the interface hf.plan_arrays checks through ------------------------------------
    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def check_dtype(self, name: str) -> None:
        tensor = self.tensors[name]
        if tensor.dtype not in DTYPES:
            raise ConvertError(f"{tensor.file}: tensor {name!r} is stored as {tensor.dtype}, "
                               f"which jaxaccel cannot read (readable: {', '.join(DTYPES)})")
        if tensor.dtype not in _STORED:
            raise ConvertError(
                f"{tensor.file}: tensor {name!r} is stored as {tensor.dtype}; a Hugging Face "
                "directory loads directly only in float32/bfloat16/float16 (convert it: "
                "jaxaccel convert SRC DEST)")

    def read(self, name: str) -> np.ndarray:
        """The whole tensor (the tied-head check)."""
        return np.array(self.view(name, slot=-1))

    # -- reading ------------------------------------------------------------------------
    def held_dtype(self) -> str:
        """The dtype the manifest names: the source dtype holding most of the bytes."""
        weight = collections_counter(
            (_STORED.get(t.dtype, "float32"), t.stop - t.start) for t in self.tensors.values())
        return max(weight, key=weight.get) if weight else "float32"

    def view(self, name: str, rows: tuple[int, int] | None = None, slot: int = 0) -> np.ndarray:
        """The tensor as an array of its shape whose rows [a, b) (default: all) hold its
        bytes, read (pread locally, one ranged read remotely) into this thread's scratch
        mapping `slot`; the other rows hold whatever was there (a slice of rows [a, b) never
        reads them, `_rows_needed`). Valid until this thread's next view of the same slot."""
        tensor = self.tensors[name]
        dtype = np.dtype(DTYPES[tensor.dtype])
        shape = tensor.shape or (1,)
        a, b = rows or (0, shape[0])
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        if isinstance(tensor.file, pathlib.Path):
            # A private map of the tensor's bytes: pages are read when touched (only those
            # under the slice), and unmapped when the view goes.
            if tensor.stop == tensor.start:
                return np.zeros(tensor.shape, dtype)
            mapped = np.memmap(tensor.file, np.uint8, "r", tensor.start,
                               (tensor.stop - tensor.start,))
            return mapped.view(dtype).reshape(tensor.shape)
        full = self._scratch(slot, tensor.stop - tensor.start)
        buf = full[a * row_bytes:b * row_bytes]
        if buf.nbytes:
            start = tensor.start + a * row_bytes
            buf[...] = self._fetch(tensor, start, start + buf.nbytes)
        return full.view(dtype).reshape(tensor.shape)

    def read_rows_into(self, name: str, rows: tuple[int, int], dest: np.ndarray) -> bool:
        """pread rows [a, b) of a local tensor straight into the C-contiguous `dest` of the
        same dtype (the slice is whole rows: an embedding's vocab rows, a norm); False where
        that does not apply."""
        tensor = self.tensors[name]
        if (not isinstance(tensor.file, pathlib.Path) or not dest.flags.c_contiguous
                or dest.dtype != np.dtype(DTYPES[tensor.dtype])):
            return False
        shape = tensor.shape or (1,)
        row_bytes = math.prod(shape[1:]) * dest.itemsize
        if dest.nbytes != (rows[1] - rows[0]) * row_bytes:
            return False
        self._pread(tensor.file, dest.reshape(-1).view(np.uint8),
                    tensor.start + rows[0] * row_bytes)
        return True

    def _scratch(self, slot: int, nbytes: int) -> np.ndarray:
        """This thread's reusable buffer `slot` of `nbytes`: an anonymous mapping, so rows
        never read cost address space only, and reused so the rows read page-fault once."""
        local = self._local.__dict__.setdefault("maps", {})
        mapping = local.get(slot)
        if mapping is None or len(mapping) < nbytes:
            mapping = local[slot] = mmap.mmap(-1, max(nbytes, 1 << 20))
        return np.frombuffer(mapping, np.uint8, nbytes)

    def _pread(self, file: pathlib.Path, buf: np.ndarray, offset: int) -> None:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
        view, done = memoryview(buf), 0
        while done < len(view):  # os.preadv releases the GIL for the copy
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{file}: ends before byte {offset + len(view)} (the "
                                      "file is shorter than its header says)")
            done += got

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (at interpreter exit os may be gone)
            pass

    def _fetch(self, tensor: _Tensor, start: int, stop: int) -> np.ndarray:
        """Bytes [start, stop) of a remote file: from the chunk cache (each entry checked
        against its crc32c; a bad one is dropped and fetched again), else one ranged read,
        then cached."""
        key = f"{tensor.file.name}@{start}-{stop}"
        if self.cache is not None and (path := self.cache.path(key)) is not None:
            try:
                entry = path.read_bytes()
            except OSError:  # pruned meanwhile by another process
                entry = b""
            if len(entry) == stop - start + 4 and crc32c.crc32c(
                    entry[:-4]) == int.from_bytes(entry[-4:], "little"):
                self.cache.touch(key)
                with self._lock:
                    self.cache_bytes += stop - start
                return np.frombuffer(entry, np.uint8, stop - start)
            self.cache.evict(key)
        data = self._fetch_network(tensor, start, stop)
        if self.cache is not None:
            self.cache.put(key, data.tobytes() + crc32c.crc32c(data).to_bytes(4, "little"))
        return data

    def _fetch_network(self, tensor: _Tensor, start: int, stop: int) -> np.ndarray:
        file = tensor.file
        with self._lock:
            if file.parent not in self._stores:
                self._stores[file.parent] = storage.open_kvstore(file.parent)
            store = self._stores[file.parent]
            self.network_requests += 1
        try:
            data = store.read(file.name, byte_range=slice(start, stop)).result().value
        except Exception as err:  # tensorstore's status errors (after its retries)
            raise CheckpointError(f"{file}: bytes {start}-{stop} cannot be read "
                                  f"({storage.explain(err)})") from None
        if len(data) != stop - start:
            raise CheckpointError(f"{file}: bytes {start}-{stop} came back as {len(data)} "
                                  "bytes (the file is shorter than its header says)")
        with self._lock:
            self.network_bytes += stop - start
        return np.frombuffer(data, np.uint8)


def _cache_for(tensors: dict[str, _Tensor]):
    """The chunk cache's view for a remote directory, keyed by its files' URLs and storage
    generations (a re-uploaded file is another checkpoint); None when caching is off."""
    if not chunk_cache.enabled():
        return None
    files = sorted({(str(t.file), t.generation) for t in tensors.values()
                    if not isinstance(t.file, pathlib.Path)})
    if not files:
        return None
    identity = hashlib.sha256(json.dumps([[u, g.hex()] for u, g in files]).encode()).hexdigest()
    return chunk_cache.ChunkCache().for_checkpoint(identity, str(pathlib.PurePosixPath(
        files[0][0]).parent))


def collections_counter(pairs) -> dict:
    out: dict = {}
    for key, value in pairs:
        out[key] = out.get(key, 0) + value
    return out


def _header(file) -> dict[str, _Tensor]:
    """A safetensors file's tensors, from its header (8-byte little-endian length, JSON),
    checked: dtypes known, offsets consistent with shapes, inside the file."""
    if isinstance(file, pathlib.Path):
        try:
            with open(file, "rb") as handle:
                head = handle.read(8)
                length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
                raw = handle.read(length) if length is not None and length < 100 << 20 else b""
            size = file.stat().st_size
        except OSError as err:
            raise ConvertError(f"{file}: cannot be read ({err.strerror})") from None
    else:
        head, generation = _remote_range(file, 0, 8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        raw = (_remote_range(file, 8, 8 + length)[0] if length and length < 100 << 20
               else b"")
        size = None
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except (ValueError, AssertionError):
        raise ConvertError(f"{file}: not a readable safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    base, tensors = 8 + length, {}
    for name, entry in header.items():
        try:
            dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            start, stop = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{file}: tensor {name!r} has a malformed header entry") from None
        itemsize = np.dtype(DTYPES[dtype]).itemsize if dtype in DTYPES else None
        if itemsize is not None and stop - start != math.prod(shape) * itemsize:
            raise ConvertError(f"{file}: tensor {name!r} spans {stop - start} bytes, but "
                               f"{dtype} {list(shape)} needs {math.prod(shape) * itemsize}")
        if size is not None and base + stop > size:
            raise ConvertError(f"{file}: tensor {name!r} ends at byte {base + stop}, past the "
                               f"file's end ({size} bytes; a truncated download?)")
        tensors[name] = _Tensor(file, dtype, shape, base + start, base + stop,
                                generation if size is None else b"")
    return tensors


def _remote_range(file: storage.RemotePath, start: int, stop: int) -> tuple[bytes, bytes]:
    """(bytes [start, stop) of a remote file, the file's storage generation)."""
    store = storage.open_kvstore(file.parent)
    try:
        result = store.read(file.name, byte_range=slice(start, stop)).result()
    except Exception as err:  # tensorstore's status errors
        raise ConvertError(f"{file}: cannot be read ({storage.explain(err)})") from None
    if result.state != "value":
        raise ConvertError(f"{file}: missing (named by the index or listed, but not there)")
    return bytes(result.value), bytes(result.stamp.generation)


def _local_weight_files(src: pathlib.Path):
    try:
        return choose_weight_files(src)
    except ConvertError as err:
        raise ConvertError(f"this is a Hugging Face checkpoint (config.json) with no usable "
                           f"safetensors weights: {err}") from None


def _remote_index(path: storage.RemotePath, local: pathlib.Path):
    """The index's tensor -> remote shard map (the mirrored copy parsed), or None."""
    if not (local / INDEX_NAME).is_file():
        return None
    try:
        weight_map = json.loads((local / INDEX_NAME).read_text())["weight_map"]
    except (KeyError, TypeError, ValueError) as err:
        raise ConvertError(f"{path / INDEX_NAME}: not a safetensors index ({err!r})") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) and f and "/" not in f and f not in (".", "..")
            for f in weight_map.values()):
        raise ConvertError(f"{path / INDEX_NAME}: 'weight_map' must map tensor names to shard "
                           "file names in the same directory")
    return {name: path / f for name, f in weight_map.items()}


def _remote_weight_files(path: storage.RemotePath, weight_map) -> list:
    """As `choose_weight_files`, for a bucket prefix or web server."""
    if weight_map is not None:
        return sorted(set(weight_map.values()), key=str)
    if path.scheme.startswith("http"):
        return [path / "model.safetensors"]
    keys = [k for k in storage.list_keys(path) if "/" not in k]
    if "model.safetensors" in keys:
        return [path / "model.safetensors"]
    shards = sorted(k for k in keys if _SHARD.fullmatch(k))
    if shards:
        return [path / k for k in shards]
    pickles = sorted(k for k in keys if k.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ConvertError(f"{path}: this is a Hugging Face checkpoint with no safetensors "
                           f"(found {pickles[:4]}); pickle-based weights are refused (loading "
                           "a pickle can run arbitrary code): save it with "
                           "save_pretrained(safe_serialization=True)")
    raise ConvertError(f"{path}: this is a Hugging Face checkpoint with no *.safetensors "
                       "weights (expected model.safetensors or model.safetensors.index.json)")


class HfSliceReader:
    """Reads slices of jaxaccel parameters out of a Hugging Face directory's tensors; the
    `reader` of its manifest, called by `checkpoint.restore` from its read threads."""

    def __init__(self, files: TensorFiles, plan: dict):
        self.files, self.plan = files, plan
        self._rows: dict = {}

    @property
    def network_bytes(self) -> int:
        return self.files.network_bytes

    @property
    def network_requests(self) -> int:
        return self.files.network_requests

    @property
    def cache_bytes(self) -> int:
        return self.files.cache_bytes

    def finish(self) -> None:
        """After a restore: close the files (a later restore opens them again) and keep the
        chunk cache under its size (least recently used go)."""
        self.files.close()
        if self.files.cache is not None:
            chunk_cache.ChunkCache().prune()

    def read_into(self, name: str, index: tuple[slice, ...], dest: np.ndarray) -> int:
        """Fill `dest` (shape of `index`, any float dtype) with parameter `name`'s slice
        `index`; returns the source bytes touched. CheckpointError naming the tensor when a
        value is NaN/inf or beyond `dest`'s dtype."""
        item = self.plan[name]
        rule, touched = item.rule, 0
        if rule.per_layer:
            for j, layer in enumerate(range(index[0].start, index[0].stop)):
                touched += self._one(rule, item.sources[layer], index[1:], dest[j])
        else:
            touched += self._one(rule, item.sources[0], index, dest)
        return touched

    def _one(self, rule, group: tuple[str, ...], index, dest: np.ndarray) -> int:
        rows = self._rows_of(rule, group, index)
        if rule.transform is identity and rows is not None and self.files.read_rows_into(
                group[0], rows, dest):
            self._refuse_nonfinite(group[0], dest, transpose.finite(dest))
            return dest.nbytes
        parts = [self.files.view(group[0], rows)] + [
            self.files.view(n, slot=k) for k, n in enumerate(group[1:], 1)]
        value = rule.transform(*parts)[index]
        # A linear weight's slice is a transposed view of the page cache: copied (and
        # checked) by transpose's kernel straight into the slice's buffer.
        self._refuse_nonfinite(group[0], dest, transpose.copy_finite(dest, value))
        itemsize = np.dtype(DTYPES[self.files.tensors[group[0]].dtype]).itemsize
        return value.size * itemsize

    def _refuse_nonfinite(self, name: str, dest: np.ndarray, finite: bool) -> None:
        if not finite:
            raise CheckpointError(
                f"{self.files.tensors[name].file}: tensor {name!r} holds NaN or inf, or values "
                f"beyond {dest.dtype.name}'s range (load it in float32 with --dtype float32, "
                "or convert it with --allow-overflow)")

    def _rows_of(self, rule, group, index) -> tuple[int, int] | None:
        """The rows [a, b) of the group's first tensor that a slice reads (None: all), found
        by sending row numbers through the rule's transform (cached per slice)."""
        key = (group[0], tuple((s.start, s.stop) for s in index))
        if key not in self._rows:
            self._rows[key] = _rows_needed(rule.transform,
                                           [self.files.shape(n) for n in group], index)
        return self._rows[key]


def _rows_needed(transform, shapes, index) -> tuple[int, int] | None:
    """Rows [a, b) of the first tensor that `transform(...)[index]` reads, when the transform
    is a view of it (transposes, reshapes: its values are then the row numbers themselves);
    None (read all) otherwise."""
    shape = shapes[0]
    if len(shapes) > 1 or len(shape) < 1 or shape[0] == 0:  # extras: computed, read whole
        return None
    rows = np.arange(shape[0], dtype=np.int64)
    ids = np.lib.stride_tricks.as_strided(rows, shape, (8,) + (0,) * (len(shape) - 1))
    try:
        out = transform(ids)[index]
    except (ValueError, IndexError, TypeError):
        return None
    if out.dtype != np.int64 or out.size == 0 or not np.shares_memory(out, rows):
        return None
    return int(out.min()), int(out.max()) + 1
