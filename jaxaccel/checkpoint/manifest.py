"""`jaxaccel.json`: what a checkpoint directory holds, readable without touching the arrays.

A jaxaccel checkpoint directory:
  jaxaccel.json      this manifest (written last: its presence marks a complete checkpoint)
  params/            the parameter tree, an orbax OCDBT + zarr3 checkpoint (plain orbax reads it)
  tokenizer files    copied from the source, named in the manifest
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np

from jaxaccel.checkpoint import layout, storage
from jaxaccel.errors import CheckpointError  # noqa: F401  (re-exported)

FORMAT_VERSION = 1
MANIFEST_NAME = "jaxaccel.json"
PARAMS_DIR = "params"
STORED_DTYPES = ("float32", "bfloat16", "float16")
# Per-array dtypes a manifest may name: the stored float types plus plain integers.
ARRAY_DTYPES = STORED_DTYPES + ("int8", "int16", "int32", "int64", "uint8", "uint32", "bool",
                                "float8_e4m3fn")




@dataclasses.dataclass(frozen=True)
class ArrayEntry:
    shape: tuple[int, ...]
    dtype: str
    axes: tuple[str | None, ...]
    checksum: str | None = None  # filled by the converter; see checkpoint.integrity
    chunk_shape: tuple[int, ...] | None = None
    chunk_checksums: tuple[str, ...] | None = None  # one per chunk, in C order of the grid

    @property
    def itemsize(self) -> int:
        return _itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.itemsize

    def to_json(self) -> dict:
        out = {"shape": list(self.shape), "dtype": self.dtype, "axes": list(self.axes),
               "nbytes": self.nbytes}
        if self.checksum:
            out["checksum"] = self.checksum
        if self.chunk_shape is not None:
            out["chunk_shape"] = list(self.chunk_shape)
        if self.chunk_checksums is not None:
            out["chunk_checksums"] = list(self.chunk_checksums)
        return out


@dataclasses.dataclass(frozen=True)
class Manifest:
    family: str
    config: dict
    dtype: str
    arrays: dict[str, ArrayEntry]
    tokenizer_files: tuple[str, ...] = ()
    source: dict = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # EOS/BOS/PAD ids and default sampling settings read at convert time from config.json and
    # generation_config.json (`generation.eos_token_ids`: every id); {} in older checkpoints.
    generation: dict = dataclasses.field(default_factory=dict)
    # A weight-only quantized checkpoint (`jaxaccel.models.quantization`): {"scheme", "head",
    # ["group_size"], "weights": {NAME: {"qtype", "tiles"}}}; NAME is stored as NAME.values and
    # NAME.scales. {} for a full-precision checkpoint.
    quantization: dict = dataclasses.field(default_factory=dict)
    # Reads the arrays of a checkpoint in another format (a Hugging Face directory:
    # `conversion.hf_checkpoint`) instead of params/: `read_into(name, index, dest) -> bytes
    # read`. None for a jaxaccel checkpoint; never written.
    reader: object = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.arrays.values())

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "family": self.family,
            "config": self.config,
            "dtype": self.dtype,
            "tokenizer_files": list(self.tokenizer_files),
            "source": self.source,
            "generation": self.generation,
            **({"quantization": self.quantization} if self.quantization else {}),
            "total_bytes": self.total_bytes,
            "arrays": {name: entry.to_json() for name, entry in sorted(self.arrays.items())},
        }

    def write(self, directory) -> None:
        """Write the manifest into a local directory or a remote prefix (storage.RemotePath)."""
        text = json.dumps(self.to_json(), indent=1) + "\n"
        storage.write_bytes(storage.checkpoint_path(directory) / MANIFEST_NAME, text.encode())

    @property
    def identity(self) -> str:
        """sha256 of the manifest's content: names the checkpoint's bytes (it records every
        chunk's crc32), e.g. as the chunk cache's key."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def load(cls, directory) -> Manifest:
        """Read DIR/jaxaccel.json from a local directory or a gs://, s3://, http(s):// prefix."""
        directory = storage.checkpoint_path(directory)
        if isinstance(directory, storage.RemotePath):
            return cls._load_remote(directory)
        path = directory / MANIFEST_NAME
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: not a directory (expected a jaxaccel checkpoint)")
        if not path.is_file():
            if (directory / "config.json").is_file():
                raise CheckpointError(
                    f"{directory}: a Hugging Face model directory (config.json, no "
                    f"{MANIFEST_NAME}), not a converted checkpoint: load, generate, embed, "
                    "inspect and plan read it as it is; this needs `jaxaccel convert` first")
            raise CheckpointError(f"{path}: missing; {directory} is not a complete jaxaccel "
                                  "checkpoint (was the convert interrupted?)")
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: not valid JSON ({err})") from None
        return cls.from_json(raw, path)

    @classmethod
    def _load_remote(cls, directory: storage.RemotePath) -> Manifest:
        path = directory / MANIFEST_NAME
        data = storage.read_bytes(path)  # raises StorageError: no bucket, credentials, network
        if data is None:
            if not directory.scheme.startswith("http"):  # names a missing bucket (StorageError)
                storage.list_keys(directory)
            raise CheckpointError(f"{path}: missing; {directory} is not a complete jaxaccel "
                                  "checkpoint (wrong path, or was the convert interrupted?)")
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: not valid JSON ({err})") from None
        return cls.from_json(raw, path)

    @classmethod
    def from_json(cls, raw, path: pathlib.Path | str = MANIFEST_NAME) -> Manifest:
        if not isinstance(raw, Mapping):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {version!r} is not supported "
                                  f"(this jaxaccel reads version {FORMAT_VERSION})")
        for key, kind in (("family", str), ("config", Mapping), ("dtype", str), ("arrays", Mapping)):
            if not isinstance(raw.get(key), kind):
                raise CheckpointError(f"{path}: field {key!r} missing or not a {kind.__name__}")
        if raw["dtype"] not in STORED_DTYPES:
            raise CheckpointError(f"{path}: dtype {raw['dtype']!r} not one of {STORED_DTYPES}")
        arrays = {name: _array_entry(name, value, path) for name, value in raw["arrays"].items()}
        tokenizer_files = raw.get("tokenizer_files") or []
        source, generation = raw.get("source") or {}, raw.get("generation") or {}
        if (not isinstance(tokenizer_files, list) or not isinstance(source, Mapping)
                or not isinstance(generation, Mapping)):
            raise CheckpointError(f"{path}: 'tokenizer_files' must be a list and 'source' and "
                                  "'generation' objects")
        for name in tokenizer_files:
            check_member_name(name, path)
        quantization = raw.get("quantization") or {}
        if not isinstance(quantization, Mapping) or not isinstance(
                quantization.get("weights", {}), Mapping):
            raise CheckpointError(f"{path}: 'quantization' must be an object with a 'weights' "
                                  "object")
        return cls(family=raw["family"], config=dict(raw["config"]), dtype=raw["dtype"],
                   arrays=arrays, tokenizer_files=tuple(tokenizer_files),
                   source=dict(source), format_version=version, generation=dict(generation),
                   quantization=dict(quantization))


def check_member_name(name: str, manifest_path) -> None:
    """Names in a manifest must stay inside the checkpoint directory."""
    if not isinstance(name, str):
        raise CheckpointError(f"{manifest_path}: file name {name!r} is not a string")
    pure = pathlib.PurePosixPath(name)
    if (not name or pure.is_absolute() or "\\" in name or "\0" in name
            or any(part in ("..", ".", "") for part in name.split("/")) or name.startswith("~")):
        raise CheckpointError(f"{manifest_path}: file name {name!r} would escape the checkpoint "
                              "directory; only plain relative names are allowed")


def _array_entry(name, value, path) -> ArrayEntry:
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{path}: array {name!r} entry is not an object")
    try:
        shape = tuple(_int(d) for d in value["shape"])
        dtype = value["dtype"]
        axes = tuple(value.get("axes") or (None,) * len(shape))
        chunk_shape = value.get("chunk_shape")
        chunk_shape = None if chunk_shape is None else tuple(_int(d) for d in chunk_shape)
        chunk_checksums = value.get("chunk_checksums")
        chunk_checksums = None if chunk_checksums is None else tuple(chunk_checksums)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: array {name!r} has a malformed entry ({err!r})") from None
    if dtype not in ARRAY_DTYPES:
        raise CheckpointError(f"{path}: array {name!r} has dtype {dtype!r}, not one of "
                              f"{ARRAY_DTYPES}")
    if (any(d < 0 for d in shape) or len(axes) != len(shape)
            or not all(a is None or isinstance(a, str) for a in axes)):
        raise CheckpointError(f"{path}: array {name!r} has shape {shape} and axes {axes}")
    if chunk_shape is not None and (len(chunk_shape) != len(shape)
                                    or any(c < 1 for c in chunk_shape)):
        raise CheckpointError(f"{path}: array {name!r} has chunk_shape {chunk_shape} for shape "
                              f"{shape}")
    if chunk_checksums is not None and (
            chunk_shape is None or not all(isinstance(c, str) for c in chunk_checksums)
            or len(chunk_checksums) != layout.chunk_count(shape, chunk_shape)):
        raise CheckpointError(f"{path}: array {name!r} has {len(chunk_checksums)} chunk "
                              f"checksums, which does not fit chunk_shape {chunk_shape}")
    checksum = value.get("checksum")
    if checksum is not None and not isinstance(checksum, str):
        raise CheckpointError(f"{path}: array {name!r} has a non-string checksum")
    return ArrayEntry(shape, dtype, axes, checksum, chunk_shape, chunk_checksums)


def _int(value) -> int:
    """A JSON integer (bools and floats are malformed, not silently truncated)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not an integer")
    return value


def _itemsize(dtype: str) -> int:
    if dtype == "bfloat16":
        return 2
    if dtype == "float8_e4m3fn":
        return 1
    return np.dtype(dtype).itemsize
