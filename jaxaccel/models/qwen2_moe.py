"""Qwen2-MoE: q/k/v biases, a shared expert with a sigmoid gate (see `qwen_moe`)."""

from jaxaccel.models import qwen_moe

SPEC = qwen_moe.spec("qwen2_moe", qwen_moe.QWEN2_NAMES, shared_expert=True)
