"""Read a Hugging Face-layout model directory: config.json plus safetensors weights.

Weights are read through safetensors' memory-mapped `safe_open`; pickle-based formats
(`.bin`, `.pt`, `.pth`, `.ckpt`) are refused, because loading them can execute code.
Every safetensors dtype with a numpy or ml_dtypes type is read (fp8 included, from the raw
bytes: safetensors' numpy reader cannot make those arrays); a weight stored with a scale
beside it (`W.weight_scale`: per tensor, per row, or blocks as `W.weight_scale_inv`) reads
as its float32 value, weight times scale, and the activation scales (`input_scale`, ...)
of such a layer are left out. A dtype with no numpy type (sub-byte floats, complex, bool)
is refused at planning time, naming the tensor and its dtype (`check_dtype`).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import struct
from contextlib import ExitStack

import ml_dtypes
import numpy as np
from safetensors import safe_open

from jaxaccel.errors import ConvertError  # noqa: F401  (re-exported)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"
# safetensors' integer dtypes (I8 ... U64) -> numpy's.
_INTEGERS = {f"{kind}{bits}": np.dtype(f"{kind.lower()}{bits // 8}").type
             for kind in "IU" for bits in (8, 16, 32, 64)}
# safetensors dtype -> the numpy type holding it (ml_dtypes for what numpy lacks).
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
          "F8_E8M0": ml_dtypes.float8_e8m0fnu, **_INTEGERS}
# What safetensors' own numpy reader returns without help.
_NUMPY_NATIVE = {"F64", "F32", "F16", *_INTEGERS}
# Suffixes of a weight's scale (multiplied in) and of its layer's activation/cache scales
# (for fp8 compute; a dequantized weight does not use them).
WEIGHT_SCALES = ("_scale", "_scale_inv")
ACTIVATION_SCALES = ("input_scale", "output_scale", "k_scale", "v_scale")


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
    """The safetensors files of a model directory, as transformers picks them (see
    `choose_weight_files`)."""
    return choose_weight_files(src)[0]


# Sharded weights as transformers' save_pretrained names them (its index may be missing).
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Copies that ship beside transformers' weights and transformers never loads: Mistral's
# original-format `consolidated*.safetensors`, PEFT adapters.
_NOT_TRANSFORMERS = re.compile(r"consolidated.*\.safetensors|.*adapter_model\.safetensors")


def choose_weight_files(src: pathlib.Path) -> tuple[list[pathlib.Path], list[str]]:
    """(the safetensors files transformers would load, the other *.safetensors names left
    out). In transformers' order: the index's shards; else `model.safetensors`; else the
    `model-NNNNN-of-NNNNN` shards; else every *.safetensors file that is not a known copy
    (consolidated*, adapters: foreign layouts such as torchvision's name their file freely).
    ConvertError naming SRC when none is left, or when only pickles are there."""
    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory")
    present = sorted(src.glob("*.safetensors"))
    weight_map = read_index(src)
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
    elif (src / "model.safetensors").is_file():
        files = [src / "model.safetensors"]
    else:
        files = ([p for p in present if _SHARD.fullmatch(p.name)]
                 or [p for p in present if not _NOT_TRANSFORMERS.fullmatch(p.name)])
    ignored = [p.name for p in present if p not in files]
    if files:
        return files, ignored
    if ignored:
        raise ConvertError(f"{src}: holds only {ignored} (copies transformers does not load); "
                           "expected model.safetensors or model.safetensors.index.json")
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
        self._handles, self._keys, self._headers = {}, {}, {}
        self.file_of: dict[str, pathlib.Path] = {}
        # weight name -> its scale's name; scales and activation scales hidden from names()
        self.scale_of: dict[str, str] = {}
        self.dropped: list[str] = []
        prefixes = prefixes or {}
        try:
            for path in files:
                self._open(path, prefixes.get(path, ""), weight_map)
            if weight_map is not None:
                self._check_index(weight_map)
            self._pair_scales()
        except ConvertError:
            self.close()
            raise

    def _open(self, path: pathlib.Path, prefix: str, weight_map: dict | None) -> None:
        try:
            handle = self._stack.enter_context(safe_open(str(path), framework="numpy"))
        except Exception as err:  # safetensors raises its own error types
            raise ConvertError(f"{path}: not a readable safetensors file ({err})") from None
        self._handles[path] = handle
        self._headers[path] = _read_header(path)
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

    def _pair_scales(self) -> None:
        """Find each quantized weight's scale (`W.weight` + `W.weight_scale[_inv]`) and its
        layer's activation scales; check each scale's shape fits its weight."""
        for name in sorted(self.file_of):
            base = next((name[:-len(s)] for s in WEIGHT_SCALES
                         if name.endswith(s) and name[:-len(s)] in self.file_of), None)
            if base is not None and self.dtype(base) not in ("F32", "F16", "BF16", "F64"):
                _scale_expander(self.shape(base), self.shape(name), name, self.file_of[name])
                self.scale_of[base] = name
        scaled_layers = {w.rsplit(".", 1)[0] for w in self.scale_of}
        self.dropped = sorted(n for n in self.file_of if n.rsplit(".", 1)[0] in scaled_layers
                              and n.rsplit(".", 1)[-1] in ACTIVATION_SCALES)

    def names(self) -> set[str]:
        return set(self.file_of) - set(self.scale_of.values()) - set(self.dropped)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._headers[self.file_of[name]][self._key(name)]["shape"])

    def dtype(self, name: str) -> str:
        """The tensor's safetensors dtype string ("F8_E4M3", "BF16", ...)."""
        return self._headers[self.file_of[name]][self._key(name)]["dtype"]

    def check_dtype(self, name: str) -> None:
        """ConvertError naming the tensor, its file and its dtype when it cannot be read (a
        weight's scale included); called while planning, before anything is written."""
        for tensor in (name, self.scale_of.get(name)):
            if tensor is not None and self.dtype(tensor) not in DTYPES:
                raise ConvertError(
                    f"{self.file_of[tensor]}: tensor {tensor!r} is stored as "
                    f"{self.dtype(tensor)}, which jaxaccel cannot read (readable: "
                    f"{', '.join(DTYPES)})")

    def read(self, name: str) -> np.ndarray:
        """The tensor as numpy; a scaled weight as float32 weight * scale, and an fp8 one
        as float32 (exact), so that transforms and range checks see ordinary floats."""
        array = self._raw(name)
        if name in self.scale_of:
            scale = self._raw(self.scale_of[name]).astype(np.float32)
            expand = _scale_expander(array.shape, scale.shape, self.scale_of[name],
                                     self.file_of[name])
            return array.astype(np.float32) * expand(scale)
        if self.dtype(name).startswith("F8"):
            return array.astype(np.float32)
        return array

    def _raw(self, name: str) -> np.ndarray:
        self.check_dtype(name)
        path, dtype = self.file_of[name], self.dtype(name)
        if dtype in _NUMPY_NATIVE:
            return self._handles[path].get_tensor(self._key(name))
        entry = self._headers[path][self._key(name)]
        start, end = entry["data_offsets"]
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=entry["offset"] + start,
                         shape=(end - start,)) if end > start else np.zeros(0, np.uint8)
        return np.asarray(data).view(DTYPES[dtype]).reshape(entry["shape"])

    def _key(self, name: str) -> str:
        """The name inside its file (without a module prefix)."""
        return self._keys.get(name, name)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_header(path: pathlib.Path) -> dict:
    """name -> {"dtype", "shape", "data_offsets", "offset" (of the data section)}, from the
    file's own header: an 8-byte little-endian length, then JSON."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return {name: {**entry, "offset": 8 + length} for name, entry in header.items()}


def _scale_expander(weight_shape, scale_shape, scale_name: str, path):
    """A function broadcasting a scale onto its weight: one value, one per row ([out] or
    [out, 1]), or one per block of a 2-D weight ([ceil(out/bo), ceil(in/bi)], DeepSeek-style
    `weight_scale_inv`). ConvertError naming the scale when its shape fits none of these."""

    weight_shape, scale_shape = tuple(weight_shape), tuple(scale_shape)
    if math.prod(scale_shape) == 1:
        return lambda s: s.reshape(())
    rows = weight_shape[:1] + (1,) * (len(weight_shape) - 1)
    if weight_shape and scale_shape in (weight_shape[:1], rows):
        return lambda s: s.reshape(rows)
    if len(weight_shape) == len(scale_shape) == 2 and all(scale_shape):
        blocks = [_block(w, s) for w, s in zip(weight_shape, scale_shape)]
        if all(blocks) and all(math.ceil(w / b) == s
                               for w, b, s in zip(weight_shape, blocks, scale_shape)):
            return lambda s: np.repeat(np.repeat(s, blocks[0], 0), blocks[1], 1)[
                :weight_shape[0], :weight_shape[1]]
    raise ConvertError(f"{path}: scale {scale_name!r} of shape {list(scale_shape)} fits "
                       f"neither one value, one per row nor blocks of its weight's shape "
                       f"{list(weight_shape)}")


def _block(size: int, blocks: int) -> int:
    """The block length that cuts `size` into `blocks` blocks: the largest power of two that
    does, the last block possibly short (quantizers use 128 x 128), else an exact division
    (0 when neither: no block layout fits)."""
    powers = [2 ** k for k in range(32) if math.ceil(size / 2 ** k) == blocks]
    return max(powers) if powers else (size // blocks if size % blocks == 0 else 0)
