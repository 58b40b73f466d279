"""Pre-quantized Hugging Face checkpoints, loaded as stored (no requantizing).

A Hugging Face directory whose config.json has a `quantization_config` is read through its
format's module (`compressed_tensors`: INT8 channel-wise, INT4 "pack-quantized" with groups
and optional zero points, FP8 per channel / tensor / block; `awq_gptq`: AWQ GEMM packing,
GPTQ symmetric and asymmetric, desc_act included): each quantized linear layer, stored as
packed integers (or float8) + scales (+ zero points), is presented to the conversion plan
(`hf.plan_arrays`) as the float weight
`PREFIX.weight` [out, in] it stands for, so the family's weight rules, shape checks and
coverage checks apply unchanged. The manifest then holds each quantized parameter in
jaxaccel's stored form (`models.quantization`): NAME.values (int8; int4 one per byte;
float8_e4m3fn) and
NAME.scales (the source's own scale dtype, converted exactly), plus NAME.zeros where the
source has zero points, plus NAME.perm where GPTQ's g_idx puts a group's rows apart (the
rows are held sorted by group; `awq_gptq`); `PrequantizedReader` fills their slices by
unpacking the source's integers and sending values, scales and zero points through the
weight rule's transform.

How the scales follow the weight rule's transform (a transpose, a heads split): the scale of
each block is broadcast over the block's rows and columns, the [out, in] result goes through
the transform, and one entry per held tile is taken. That is exact only when every held
tile is one source group; `_check_groups` proves it on the group numbers at plan time.

Values: a b-bit integer q is held centred, v = q - 2^(b-1) for a format that stores it
unsigned, so int4 fits int4 and int8 fits int8; a zero point z is held the same way, and
dequantized weights are (v - z) * scale, as in every format read here.
"""

from __future__ import annotations

from jaxaccel.conversion.prequantized import awq_gptq, compressed_tensors
from jaxaccel.conversion.prequantized.source import (
    PrequantizedReader,
    QuantizedSource,
    held_bytes,
    quantized_arrays,
)
from jaxaccel.conversion.safetensors_source import ConvertError

__all__ = ["PrequantizedReader", "QuantizedSource", "format_of", "held_bytes",
           "quantized_arrays"]

# quant_method -> the reader of its quantization_config.
FORMATS = {"compressed-tensors": compressed_tensors.CompressedTensors.parse,
           "awq": awq_gptq.PackedInt32.parse, "gptq": awq_gptq.PackedInt32.parse}


def format_of(hf_config: dict, config_path):
    """The format reader of a pre-quantized checkpoint (None: not quantized). ConvertError
    naming config.json's quantization_config for a format or scheme not read here."""
    quant = hf_config.get("quantization_config")
    if not isinstance(quant, dict):
        return None
    method = quant.get("quant_method", "unknown")
    if method in FORMATS:
        return FORMATS[method](quant, config_path)
    details = ", ".join(f"{k} {quant[k]}" for k in ("bits", "group_size", "format") if k in quant)
    raise ConvertError(
        f"{config_path}: quantization_config: quant_method {method!r}"
        f"{' (' + details + ')' if details else ''} is not a format jaxaccel loads as stored "
        f"(it reads {', '.join(FORMATS)}); load the full-precision original, with "
        "--quantize int8/int4 to quantize it while restoring")
