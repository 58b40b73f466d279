"""`jaxaccel.json`: what a checkpoint directory holds, readable without touching the arrays.

A jaxaccel checkpoint directory:
  jaxaccel.json      this manifest (written last: its presence marks a complete checkpoint)
  params/            the parameter tree, an orbax OCDBT + zarr3 checkpoint (plain orbax reads it)
  tokenizer files    copied from the source, named in the manifest
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping

import numpy as np

FORMAT_VERSION = 1
MANIFEST_NAME = "jaxaccel.json"
PARAMS_DIR = "params"
STORED_DTYPES = ("float32", "bfloat16", "float16")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class ArrayEntry:
    shape: tuple[int, ...]
    dtype: str
    axes: tuple[str | None, ...]
    checksum: str | None = None  # filled by the converter; see checkpoint.integrity

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _itemsize(self.dtype)

    def to_json(self) -> dict:
        out = {"shape": list(self.shape), "dtype": self.dtype, "axes": list(self.axes),
               "nbytes": self.nbytes}
        if self.checksum:
            out["checksum"] = self.checksum
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
            "total_bytes": self.total_bytes,
            "arrays": {name: entry.to_json() for name, entry in sorted(self.arrays.items())},
        }

    def write(self, directory: pathlib.Path) -> None:
        path = pathlib.Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, directory: str | pathlib.Path) -> "Manifest":
        directory = pathlib.Path(directory)
        path = directory / MANIFEST_NAME
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: not a directory (expected a jaxaccel checkpoint)")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; {directory} is not a complete jaxaccel "
                                  "checkpoint (was the convert interrupted?)")
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: not valid JSON ({err})") from None
        return cls.from_json(raw, path)

    @classmethod
    def from_json(cls, raw, path: pathlib.Path | str = MANIFEST_NAME) -> "Manifest":
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
        tokenizer_files = tuple(raw.get("tokenizer_files") or ())
        for name in tokenizer_files:
            check_member_name(name, path)
        return cls(family=raw["family"], config=dict(raw["config"]), dtype=raw["dtype"],
                   arrays=arrays, tokenizer_files=tokenizer_files,
                   source=dict(raw.get("source") or {}), format_version=version)


def check_member_name(name: str, manifest_path) -> None:
    """Names in a manifest must stay inside the checkpoint directory."""
    pure = pathlib.PurePosixPath(name)
    if (not isinstance(name, str) or not name or pure.is_absolute() or "\\" in name
            or any(part in ("..", "") for part in pure.parts) or name.startswith("~")):
        raise CheckpointError(f"{manifest_path}: file name {name!r} would escape the checkpoint "
                              "directory; only plain relative names are allowed")


def _array_entry(name: str, value, path) -> ArrayEntry:
    try:
        shape = tuple(int(d) for d in value["shape"])
        dtype = str(value["dtype"])
        axes = tuple(value.get("axes") or (None,) * len(shape))
        _itemsize(dtype)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: array {name!r} has a malformed entry ({err})") from None
    if any(d < 0 for d in shape) or len(axes) != len(shape):
        raise CheckpointError(f"{path}: array {name!r} has shape {shape} and axes {axes}")
    return ArrayEntry(shape, dtype, axes, value.get("checksum"))


def _itemsize(dtype: str) -> int:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    if dtype == "bfloat16":
        return 2
    return np.dtype(dtype).itemsize
