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

Activation quantization (W8A8: `input_activations`) is not applied: the weights run
weight-only, and loading says so in one line. Float weights (FP8) are refused in one line.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxaccel.conversion.prequantized.source import Linear, unpack_int32
from jaxaccel.conversion.safetensors_source import ConvertError

PACKED = "pack-quantized"
PLAIN = ("int-quantized", "naive-quantized")
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
            "weight_g_idx", "input_scale", "input_zero_point")


@dataclasses.dataclass(frozen=True)
class CompressedTensors:
    """The integer schemes of one compressed-tensors checkpoint."""

    bits: int
    symmetric: bool
    packed: bool  # pack-quantized (else int8 values as they are)
    strategy: str  # "channel" | "group"
    group_size: int | None
    activations: bool  # W8A8-style input quantization configured (run weight-only)
    config_path: object = None

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
            if kind == "float":
                raise ConvertError(
                    f"{where}.config_groups.{name}: float weights ({weights.get('num_bits')}-"
                    "bit, FP8) are not loaded as stored yet; load the full-precision original")
            if kind != "int" or weights.get("num_bits") not in (4, 8) or strategy not in (
                    "channel", "group") or fmt not in (PACKED, *PLAIN):
                raise ConvertError(
                    f"{where}.config_groups.{name}: weights type {kind!r}, num_bits "
                    f"{weights.get('num_bits')}, strategy {strategy!r}, format {fmt!r}; "
                    "jaxaccel reads int 4/8-bit channel or group weights in "
                    f"{', '.join((PACKED, *PLAIN))}")
            schemes.add((weights["num_bits"], bool(weights.get("symmetric", True)),
                         fmt == PACKED, strategy, weights.get("group_size")
                         if strategy == "group" else None,
                         group.get("input_activations") is not None))
        if len(schemes) != 1:
            raise ConvertError(f"{where}: config_groups hold {len(schemes)} different weight "
                               "schemes; jaxaccel loads one scheme per checkpoint")
        return cls(*schemes.pop(), config_path=config_path)

    @property
    def label(self) -> str:
        """"compressed-tensors pack-quantized int4 group 128 asymmetric" and the like."""
        fmt = PACKED if self.packed else "int-quantized"
        grouping = f"group {self.group_size}" if self.strategy == "group" else "channel-wise"
        return (f"compressed-tensors {fmt} int{self.bits} {grouping}"
                f"{'' if self.symmetric else ' asymmetric'}")

    @property
    def notes(self) -> tuple[str, ...]:
        if not self.activations:
            return ()
        return (f"{self.config_path}: the checkpoint also quantizes activations (W{self.bits}A8);"
                " jaxaccel runs it weight-only (activations in the compute dtype)",)

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
            if files.tensors[f"{prefix}.weight"].dtype != "I8":
                raise ConvertError(f"{where}: tensor {prefix}.weight is "
                                   f"{files.tensors[prefix + '.weight'].dtype}, not I8")
            out, in_ = files.shape(f"{prefix}.weight")
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
        return Linear(prefix, out, in_, self.bits, group,
                      {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype],
                      zeros, tuple(parts))

    def values(self, files, lin: Linear) -> np.ndarray:
        """int8 [out, in]: the signed values q."""
        if not self.packed:
            return files.read(f"{lin.prefix}.weight")
        u = unpack_int32(files.read(f"{lin.prefix}.weight_packed"), lin.bits, lin.in_)
        return (u.astype(np.int16) - (1 << (lin.bits - 1))).astype(np.int8)

    def scales(self, files, lin: Linear) -> np.ndarray:
        """[out, groups] in the stored dtype."""
        return files.read(f"{lin.prefix}.weight_scale")

    def zeros(self, files, lin: Linear) -> np.ndarray | None:
        """int8 [out, groups] (signed, as the values), or None (symmetric)."""
        if not lin.zeros:
            return None
        raw = files.read(f"{lin.prefix}.weight_zero_point")
        if not self.packed:
            return raw.astype(np.int8)
        u = unpack_int32(np.ascontiguousarray(raw.T), lin.bits, lin.out).T
        return (u.astype(np.int16) - (1 << (lin.bits - 1))).astype(np.int8)
