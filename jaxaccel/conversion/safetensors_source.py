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


def weight_files(src: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a model directory (single file or sharded with an index)."""
    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory")
    index = src / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (KeyError, TypeError, ValueError) as err:
            raise ConvertError(f"{index}: not a safetensors index ({err})") from None
        files = sorted({src / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConvertError(f"{index}: names shard files that do not exist: {missing}")
        return files
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
    """Tensor name -> memory-mapped tensor, across one or many safetensors files."""

    def __init__(self, files: list[pathlib.Path]):
        self._stack = ExitStack()
        self._handles = {}
        self.file_of: dict[str, pathlib.Path] = {}
        for path in files:
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="numpy"))
            except Exception as err:  # safetensors raises its own error types
                self.close()
                raise ConvertError(f"{path}: not a readable safetensors file ({err})") from None
            self._handles[path] = handle
            for name in handle.keys():
                self.file_of[name] = path

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        return self._handles[self.file_of[name]].get_tensor(name)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
