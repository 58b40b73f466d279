"""Qwen3-MoE: per-head q/k RMSNorm, many experts, no shared expert (see `qwen_moe`)."""

from jaxaccel.models import moe_decoder, qwen_moe

SPEC = qwen_moe.spec("qwen3_moe", moe_decoder.QWEN_NAMES, shared_expert=False)
