"""Read a Hugging Face-layout model directory: config.json plus safetensors weights.

Weights are read through safetensors' memory-mapped `safe_open`; pickle-based formats
(`.bin`, `.pt`, `.pth`, `.ckpt`) are refused, because loading them can execute code.
"""

from __future__ import annotations

import json
import pathlib
from contextlib import ExitStack

import numpy as np
from safetensors import safe_open

from jaxaccel.errors import ConvertError  # noqa: F401  (re-exported)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"




def read_hf_config(src: pathlib.Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise ConvertError(f"{path}: missing (a Hugging Face model directory needs config.json)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConvertError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConvertError(f"{path}: no 'model_type' field")
    return config


def read_index(src: pathlib.Path) -> dict[str, pathlib.Path] | None:
    """The index's tensor name -> shard file map, or None without an index. ConvertError for
    a malformed index, a file name outside SRC, or a shard file that does not exist."""
    index = src / INDEX_NAME
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (KeyError, TypeError, ValueError) as err:
        raise ConvertError(f"{index}: not a safetensors index ({err!r})") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) and f and "/" not in f and "\\" not in f and f not in (".", "..")
            for f in weight_map.values()):
        raise ConvertError(f"{index}: 'weight_map' must map tensor names to shard file names "
                           "in the same directory")
    missing = sorted({f for f in weight_map.values() if not (src / f).is_file()})
    if missing:
        raise ConvertError(f"{index}: names shard files that do not exist: {missing}")
    return {name: src / f for name, f in weight_map.items()}


def weight_files(src: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a model directory (single file or sharded with an index)."""
    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory")
    weight_map = read_index(src)
    if weight_map is not None:
        return sorted(set(weight_map.values()))
    files = sorted(src.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ConvertError(
            f"{src / pickles[0]}: pickle-based weights are refused (loading a pickle can run "
            "arbitrary code); convert them to safetensors first, e.g. with transformers' "
            "save_pretrained(safe_serialization=True)")
    raise ConvertError(f"{src}: no *.safetensors weights found")


class SafetensorsSource:
    """Tensor name -> memory-mapped tensor, across one or many safetensors files.

    With `weight_map` (the index), each tensor is read from the file the index names (copies
    in other files are not used) and the index must name only tensors its files hold. Without
    one, a tensor name held by two files is refused, naming both."""

    def __init__(self, files: list[pathlib.Path], weight_map: dict | None = None,
                 prefixes: dict[pathlib.Path, str] | None = None):
        """`prefixes`: a name prefix for the tensors of some files (sentence-transformers
        module weights, e.g. "st_dense." for 2_Dense/model.safetensors)."""
        self._stack = ExitStack()
        self._handles, self._keys = {}, {}
        self.file_of: dict[str, pathlib.Path] = {}
        prefixes = prefixes or {}
        try:
            for path in files:
                self._open(path, prefixes.get(path, ""), weight_map)
            if weight_map is not None:
                self._check_index(weight_map)
        except ConvertError:
            self.close()
            raise

    def _open(self, path: pathlib.Path, prefix: str, weight_map: dict | None) -> None:
        try:
            handle = self._stack.enter_context(safe_open(str(path), framework="numpy"))
        except Exception as err:  # safetensors raises its own error types
            raise ConvertError(f"{path}: not a readable safetensors file ({err})") from None
        self._handles[path] = handle
        for key in handle.keys():
            name = prefix + key
            self._keys[name] = key
            if weight_map is not None and not prefix:
                continue  # the index decides (below)
            if name in self.file_of:
                raise ConvertError(f"{path}: tensor {name!r} is also in {self.file_of[name]}; "
                                   "without an index it is ambiguous which copy to use")
            self.file_of[name] = path

    def _check_index(self, weight_map: dict) -> None:
        for name, path in weight_map.items():
            if name not in self._handles[path].keys():
                raise ConvertError(f"{path}: the index names tensor {name!r} in this file, "
                                   "which does not hold it")
            self.file_of[name] = path
    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(self._key(name)).get_shape())

    def read(self, name: str) -> np.ndarray:
        return self._handles[self.file_of[name]].get_tensor(self._key(name))

    def _key(self, name: str) -> str:
        """The name inside its file (without a module prefix)."""
        return self._keys.get(name, name)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
