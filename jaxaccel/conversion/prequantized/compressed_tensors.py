"""compressed-tensors checkpoints (llm-compressor's output, vLLM's `compressed-tensors`):
integer weights, channel-wise or in groups, symmetric or with zero points.

config.json's `quantization_config` (quant_method "compressed-tensors") lists
`config_groups`, each with `weights` (num_bits, type "int", strategy "channel" | "group",
group_size, symmetric) and a `format`; the layers outside `ignore` are stored per module
PREFIX as:
  * "pack-quantized": PREFIX.weight_packed int32 [out, ceil(in * bits / 32)], the values
    q + 2^(bits-1) as a dense bit stream per row (element i at bit i * bits, lowest first:
    `compressed_tensors.compressors.pack_quantized.helpers.pack_to_int32`);
    PREFIX.weight_shape int64 [2] = (out, in); PREFIX.weight_scale [out, in / group];
    PREFIX.weight_zero_point (asymmetric) int32, packed the same way along the output axis;
  * "int-quantized" / "naive-quantized": PREFIX.weight int8 [out, in] as is, the zero point
    (if any) int8 [out, groups].
The float weight is (q - z) * scale (`compressed_tensors.quantization.lifecycle.forward`).

  * "float-quantized" (FP8): PREFIX.weight float8_e4m3fn [out, in] as is, PREFIX.weight_scale
    [out, 1] (channel), [1] (tensor) or [out / 128, in / 128] (blocks of `block_structure`);
    the float weight is weight * scale. FP8 runs on GPU/TPU only (refused on the CPU).
Activation quantization (W8A8, FP8 activations: `input_activations`) is not applied: the
weights run weight-only, and loading says so in one line.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxaccel.conversion.prequantized.source import Linear, unpack_int32
from jaxaccel.conversion.safetensors_source import ConvertError

PACKED = "pack-quantized"
PLAIN = ("int-quantized", "naive-quantized")
FLOAT = "float-quantized"
FLOAT_STRATEGIES = ("channel", "block", "tensor")
_SCALE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
            "weight_g_idx", "input_scale", "input_zero_point")


@dataclasses.dataclass(frozen=True)
class CompressedTensors:
    """The integer schemes of one compressed-tensors checkpoint."""

    bits: int
    symmetric: bool
    packed: bool  # pack-quantized (else int8 values as they are)
    strategy: str  # "channel" | "group" | FP8: "channel" | "block" | "tensor"
    group_size: int | None
    activations: bool  # W8A8-style input quantization configured (run weight-only)
    config_path: object = None
    float8: bool = False  # FP8 (e4m3) weights, "float-quantized"
    block: tuple[int, int] | None = None  # FP8 blocks (output rows, input columns)

    @classmethod
    def parse(cls, quant: dict, config_path) -> CompressedTensors:
        """The scheme of `quantization_config`; ConvertError naming the field for anything
        not read here (float weights, several different schemes, other formats)."""
        where = f"{config_path}: quantization_config"
        groups = quant.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ConvertError(f"{where}: 'config_groups' must be a non-empty object")
        schemes = set()
        for name, group in groups.items():
            weights = group.get("weights") if isinstance(group, dict) else None
            if not isinstance(weights, dict):
                raise ConvertError(f"{where}.config_groups.{name}: has no 'weights' object")
            fmt = group.get("format") or quant.get("format")
            kind, strategy = weights.get("type", "int"), weights.get("strategy")
            activations = group.get("input_activations") is not None
            if kind == "float":
                schemes.add(cls._float_scheme(weights, fmt, f"{where}.config_groups.{name}",
                                              activations))
                continue
            if kind != "int" or weights.get("num_bits") not in (4, 8) or strategy not in (
                    "channel", "group") or fmt not in (PACKED, *PLAIN):
                raise ConvertError(
                    f"{where}.config_groups.{name}: weights type {kind!r}, num_bits "
                    f"{weights.get('num_bits')}, strategy {strategy!r}, format {fmt!r}; "
                    "jaxaccel reads int 4/8-bit channel or group weights in "
                    f"{', '.join((PACKED, *PLAIN))}")
            schemes.add((("bits", weights["num_bits"]),
                         ("symmetric", bool(weights.get("symmetric", True))),
                         ("packed", fmt == PACKED), ("strategy", strategy),
                         ("group_size", weights.get("group_size") if strategy == "group"
                          else None), ("activations", activations)))
        if len(schemes) != 1:
            raise ConvertError(f"{where}: config_groups hold {len(schemes)} different weight "
                               "schemes; jaxaccel loads one scheme per checkpoint")
        return cls(**dict(schemes.pop()), config_path=config_path)

    @staticmethod
    def _float_scheme(weights: dict, fmt, where: str, activations: bool) -> tuple:
        """FP8 (e4m3) weights per channel, per tensor or in blocks."""
        strategy, block = weights.get("strategy"), weights.get("block_structure")
        if weights.get("num_bits") != 8 or strategy not in FLOAT_STRATEGIES or fmt != FLOAT or (
                strategy == "block" and not (isinstance(block, list) and len(block) == 2)):
            raise ConvertError(f"{where}: float weights with num_bits {weights.get('num_bits')},"
                               f" strategy {strategy!r}, format {fmt!r}; jaxaccel reads 8-bit "
                               f"{'/'.join(FLOAT_STRATEGIES)} weights in {FLOAT}")
        return (("bits", 8), ("symmetric", True), ("packed", False), ("strategy", strategy),
                ("group_size", None), ("activations", activations), ("float8", True),
                ("block", tuple(block) if strategy == "block" else None))

    @property
    def label(self) -> str:
        """"compressed-tensors pack-quantized int4 group 128 asymmetric" and the like."""
        if self.float8:
            grouping = {"channel": "channel-wise", "tensor": "per tensor"}.get(
                self.strategy, f"blocks {self.block and 'x'.join(map(str, self.block))}")
            return f"compressed-tensors {FLOAT} fp8 {grouping}"
        fmt = PACKED if self.packed else "int-quantized"
        grouping = f"group {self.group_size}" if self.strategy == "group" else "channel-wise"
        return (f"compressed-tensors {fmt} int{self.bits} {grouping}"
                f"{'' if self.symmetric else ' asymmetric'}")

    @property
    def notes(self) -> tuple[str, ...]:
        if not self.activations:
            return ()
        kind = "FP8" if self.float8 else f"W{self.bits}A8"
        return (f"{self.config_path}: the checkpoint also quantizes activations ({kind}); "
                "jaxaccel runs it weight-only (activations in the compute dtype)",)

    def linears(self, files) -> dict[str, Linear]:
        """Every quantized module of `files`, by prefix; ConvertError naming the tensor when
        one is incomplete or inconsistent with the scheme."""
        names = files.names()
        marker = ".weight_packed" if self.packed else ".weight_scale"
        out = {}
        for name in sorted(n for n in names if n.endswith(marker)):
            prefix = name.removesuffix(marker)
            out[prefix] = self._linear(files, prefix, names)
        return out

    def _linear(self, files, prefix: str, names: set[str]) -> Linear:
        parts = [f"{prefix}.{s}" for s in SUFFIXES if f"{prefix}.{s}" in names]
        scale = f"{prefix}.weight_scale"
        where = files.file_of[scale] if scale in names else files.file_of[parts[0]]
        if self.packed:
            out, in_ = (int(d) for d in files.read(f"{prefix}.weight_shape"))
        else:
            parts.append(f"{prefix}.weight")
            stored, wanted = files.tensors[f"{prefix}.weight"].dtype, (
                "F8_E4M3" if self.float8 else "I8")
            if stored != wanted:
                raise ConvertError(f"{where}: tensor {prefix}.weight is {stored}, not {wanted}")
            out, in_ = files.shape(f"{prefix}.weight")
        if self.float8:
            return self._float_linear(files, prefix, parts, out, in_, where)
        if scale not in names or len(files.shape(scale)) != 2:
            raise ConvertError(f"{where}: {prefix} needs weight_scale [out, groups]")
        s_out, groups = files.shape(scale)
        group = in_ // groups if groups and in_ % groups == 0 else 0
        expected = self.group_size if self.strategy == "group" else in_
        if s_out != out or group != expected:
            raise ConvertError(f"{where}: tensor {scale} is {[s_out, groups]}; a [{out}, {in_}] "
                               f"weight in {self.label} needs [{out}, {in_ // expected}]")
        zeros = f"{prefix}.weight_zero_point" in names and not self.symmetric
        dtype = files.tensors[scale].dtype
        return Linear(prefix, out, in_, self.bits, group, _SCALE_DTYPES[dtype], zeros,
                      tuple(parts))

    def _float_linear(self, files, prefix: str, parts, out: int, in_: int, where) -> Linear:
        """An FP8 linear: its scale [out, 1] (channel), [1] (tensor) or blocks
        [out / rows, in / columns] (each dividing exactly)."""
        scale = f"{prefix}.weight_scale"
        shape = tuple(files.shape(scale))
        blocks = {"channel": (out, 1), "tensor": (1, 1)}.get(self.strategy) or (
            -(-out // self.block[0]), -(-in_ // self.block[1]))
        if math.prod(shape) != math.prod(blocks) or out % blocks[0] or in_ % blocks[1]:
            raise ConvertError(f"{where}: tensor {scale} is {list(shape)}; a [{out}, {in_}] "
                               f"weight in {self.label} needs {list(blocks)} (whole blocks)")
        return Linear(prefix, out, in_, 8, in_ // blocks[1],
                      _SCALE_DTYPES[files.tensors[scale].dtype], False, tuple(parts),
                      rows=out // blocks[0], float8=True)

    def values(self, files, lin: Linear) -> np.ndarray:
        """int8 [out, in]: the signed values q (FP8: float8_e4m3fn as stored)."""
        if not self.packed:
            return files.read(f"{lin.prefix}.weight")
        u = unpack_int32(files.read(f"{lin.prefix}.weight_packed"), lin.bits, lin.in_)
        return (u.astype(np.int16) - (1 << (lin.bits - 1))).astype(np.int8)

    def scales(self, files, lin: Linear) -> np.ndarray:
        """[out / rows, groups] in the stored dtype."""
        return files.read(f"{lin.prefix}.weight_scale").reshape(lin.row_groups, lin.groups)

    def zeros(self, files, lin: Linear) -> np.ndarray | None:
        """int8 [out, groups] (signed, as the values), or None (symmetric)."""
        if not lin.zeros:
            return None
        raw = files.read(f"{lin.prefix}.weight_zero_point")
        if not self.packed:
            return raw.astype(np.int8)
        u = unpack_int32(np.ascontiguousarray(raw.T), lin.bits, lin.out).T
        return (u.astype(np.int16) - (1 << (lin.bits - 1))).astype(np.int8)
