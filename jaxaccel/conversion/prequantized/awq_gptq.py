"""AWQ (GEMM) and GPTQ checkpoints: 4/8-bit integers packed in int32 words, fp16 scales per
group, zero points packed the same way.

AWQ (AutoAWQ's "gemm" version; `quantization_config` quant_method "awq", bits, group_size,
zero_point): per linear PREFIX,
  * PREFIX.qweight int32 [in, out * bits / 32]: the 32 / bits values of consecutive output
    columns c..c+7 in one word, column c + AWQ_ORDER[i] in field i (field i = bits
    [i * bits, (i + 1) * bits));
  * PREFIX.qzeros int32 [in / group, out * bits / 32], packed as qweight;
  * PREFIX.scales float16 [in / group, out];
  weight[o, i] = (q[i, o] - z[i // group, o]) * s[i // group, o], q and z unsigned.
GPTQ (AutoGPTQ / GPTQModel, checkpoint_format "gptq"; quant_method "gptq", bits,
group_size, sym, desc_act): per linear PREFIX,
  * PREFIX.qweight int32 [in * bits / 32, out]: input rows r..r+7 of one column in one word,
    row r + i in field i;
  * PREFIX.qzeros int32 [groups, out * bits / 32], output columns packed in order, each
    stored as z - 1 (the format's offset; "gptq_v2" stores z itself);
  * PREFIX.scales float16 [groups, out]; PREFIX.g_idx int32 [in]: the group of each input row
    (with desc_act, quantization ran in another row order; rows of a group need not be
    consecutive).
  weight[o, i] = (q[i, o] - z[g_idx[i], o]) * s[g_idx[i], o].
Symmetric GPTQ stores z = 2^(bits-1) everywhere: held without zero points. A g_idx that is not
i // group (desc_act: row i belongs to group (its place in the activation order) // group) is
held with the input rows sorted by group (`row_order`, a stable sort), so each group is
consecutive rows and values, scales and zero points stay as stored; the layer gathers its
activations into that order (`parallel.params.Permuted`). Every group must then hold exactly
`group_size` rows, as GPTQ writes it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxaccel.conversion.prequantized.source import Linear, unpack_int32
from jaxaccel.conversion.safetensors_source import ConvertError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # field i holds column AWQ_ORDER[i] of each 8
_HELD = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class PackedInt32:
    """AWQ or GPTQ: the settings of `quantization_config`."""

    method: str  # "awq" | "gptq"
    bits: int
    group_size: int  # -1: one group over all input rows
    symmetric: bool
    zero_offset: int  # added to stored zeros (GPTQ v1: 1)
    config_path: object = None

    @classmethod
    def parse(cls, quant: dict, config_path) -> PackedInt32:
        where = f"{config_path}: quantization_config"
        method = quant["quant_method"]
        bits, group = quant.get("bits", quant.get("w_bit")), quant.get(
            "group_size", quant.get("q_group_size"))
        if bits not in (4, 8) or not isinstance(group, int) or not (group > 0 or group == -1):
            raise ConvertError(f"{where}: bits {bits}, group_size {group}; jaxaccel reads "
                               f"{method} with bits 4 or 8 and a positive group_size (or -1)")
        if method == "awq":
            version = str(quant.get("version", "gemm")).lower()
            if version != "gemm":
                raise ConvertError(f"{where}: AWQ version {version!r}; jaxaccel reads the "
                                   "'gemm' packing")
            return cls("awq", bits, group, not quant.get("zero_point", True), 0, config_path)
        fmt = quant.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ConvertError(f"{where}: checkpoint_format {fmt!r}; jaxaccel reads 'gptq' "
                               "and 'gptq_v2'")
        return cls("gptq", bits, group, bool(quant.get("sym", True)),
                   1 if fmt == "gptq" else 0, config_path)

    @property
    def label(self) -> str:
        group = f"group {self.group_size}" if self.group_size > 0 else "channel-wise"
        kind = "symmetric" if self.symmetric else "with zero points"
        return f"{self.method} int{self.bits} {group} {kind}"

    notes = ()

    def linears(self, files) -> dict[str, Linear]:
        names = files.names()
        return {n.removesuffix(".qweight"): self._linear(files, n.removesuffix(".qweight"),
                                                         names)
                for n in sorted(names) if n.endswith(".qweight")}

    def _linear(self, files, prefix: str, names: set[str]) -> Linear:
        parts = [f"{prefix}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")
                 if f"{prefix}.{s}" in names]
        where = files.file_of[f"{prefix}.qweight"]
        if f"{prefix}.scales" not in names or f"{prefix}.qzeros" not in names:
            raise ConvertError(f"{where}: {prefix} has qweight but not scales and qzeros")
        groups, out = files.shape(f"{prefix}.scales")
        per = 32 // self.bits
        rows, cols = files.shape(f"{prefix}.qweight")
        in_ = rows if self.method == "awq" else rows * per
        expected = (in_, out // per) if self.method == "awq" else (in_ // per, out)
        group = self.group_size if self.group_size > 0 else in_
        if (rows, cols) != expected or groups * group != in_:
            raise ConvertError(f"{where}: {prefix}.qweight {[rows, cols]} and .scales "
                               f"{[groups, out]} do not fit {self.label}")
        lin = Linear(prefix, out, in_, self.bits, group,
                     _HELD[files.tensors[f"{prefix}.scales"].dtype], not self.symmetric,
                     tuple(parts))
        if self.row_order(files, lin, where) is not None:
            lin = dataclasses.replace(lin, permuted=True)
        if self.symmetric and not np.all(self._raw_zeros(files, lin) == 1 << (self.bits - 1)):
            raise ConvertError(f"{where}: {prefix}.qzeros: sym is true, but the zero points "
                               f"are not all {1 << (self.bits - 1)}")
        return lin

    def row_order(self, files, lin: Linear, where=None) -> np.ndarray | None:
        """GPTQ with a g_idx that is not i // group: the input rows sorted by group (a
        stable argsort of g_idx, int64 [in]); None where the stored order is already
        grouped. ConvertError if g_idx does not give each group `group` rows."""
        name = f"{lin.prefix}.g_idx"
        if self.method != "gptq" or name not in lin.tensors:
            return None
        g_idx = files.read(name).astype(np.int64)
        if np.array_equal(g_idx, np.arange(lin.in_) // lin.group):
            return None
        if (g_idx.shape != (lin.in_,) or g_idx.min(initial=0) < 0
                or g_idx.max(initial=0) >= lin.groups
                or np.any(np.bincount(g_idx, minlength=lin.groups) != lin.group)):
            raise ConvertError(f"{where or files.file_of[name]}: {name} {list(g_idx.shape)} "
                               f"does not put {lin.group} of the {lin.in_} input rows in each "
                               f"of {lin.groups} groups")
        return np.argsort(g_idx, kind="stable")

    def values(self, files, lin: Linear) -> np.ndarray:
        """int8 [out, in]: q - 2^(bits-1)."""
        packed = files.read(f"{lin.prefix}.qweight")
        if self.method == "awq":
            q = _awq_unpack(packed, lin.bits).T
        else:
            q = unpack_int32(np.ascontiguousarray(packed.T), lin.bits, lin.in_)
        return _centred(q, lin.bits)

    def scales(self, files, lin: Linear) -> np.ndarray:
        return np.ascontiguousarray(files.read(f"{lin.prefix}.scales").T)

    def zeros(self, files, lin: Linear) -> np.ndarray | None:
        if not lin.zeros:
            return None
        raw = self._raw_zeros(files, lin)
        if raw.max(initial=0) >= 1 << lin.bits:  # GPTQ v1's stored z - 1 wrapped around
            raise ConvertError(f"{files.file_of[lin.prefix + '.qzeros']}: {lin.prefix}.qzeros "
                               f"holds a zero point of {int(raw.max())}, beyond {lin.bits} bits")
        return _centred(raw, lin.bits).T

    def _raw_zeros(self, files, lin: Linear) -> np.ndarray:
        """Unsigned zero points [groups, out], the format's offset applied."""
        packed = files.read(f"{lin.prefix}.qzeros")
        z = (_awq_unpack(packed, lin.bits) if self.method == "awq"
             else unpack_int32(packed, lin.bits, lin.out))
        return z.astype(np.int16) + self.zero_offset


def _awq_unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [rows, cols * 32 / bits] from AWQ's interleaved words (see AWQ_ORDER)."""
    fields = unpack_int32(packed, bits, packed.shape[-1] * (32 // bits))
    per = 32 // bits
    order = AWQ_ORDER if bits == 4 else tuple(range(per))
    out = np.empty_like(fields)
    view_in = fields.reshape(*fields.shape[:-1], -1, per)
    view_out = out.reshape(view_in.shape)
    for i, column in enumerate(order):
        view_out[..., column] = view_in[..., i]
    return out


def _centred(q: np.ndarray, bits: int) -> np.ndarray:
    return (q.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)
