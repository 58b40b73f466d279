"""Gemma 3 text decoder (`Gemma3ForCausalLM`, model_type `gemma3_text`): Gemma 2's layer
(see `gemma2`) with per-head q/k norms, five windowed layers to one global
(`layer_types`; older configs: `sliding_window_pattern`), and separate rotary tables: the
windowed layers use their own base unscaled (`rope_local_base_freq`, or
`rope_parameters["sliding_attention"]`), the global ones the global base with its scaling
(linear on the published checkpoints).

The multimodal checkpoints (model_type `gemma3`, `Gemma3ForConditionalGeneration`) carry a
vision tower and are refused, naming it.
"""

from __future__ import annotations

import dataclasses

from jaxaccel.models import gemma2, llama, rotary

GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0  # transformers' defaults


@dataclasses.dataclass(frozen=True)
class Config(llama.Config):
    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        if hf.get("model_type") == "gemma3" or "vision_config" in hf:
            raise ValueError("model_type 'gemma3' (Gemma3ForConditionalGeneration) has a "
                             "vision tower (vision_config), which jaxaccel does not run; "
                             "convert a text-only gemma3_text checkpoint")
        hf = gemma2.with_layer_types(hf, int(hf.get("sliding_window_pattern", 6)))
        if not hf.get("rope_parameters"):  # 4.x: one global base (default 1e6), one local
            hf = {**hf, "rope_theta": hf.get("rope_theta", GLOBAL_THETA)}
        local = rotary.rope_fields(hf, "sliding_attention")
        if isinstance((hf.get("rope_parameters") or {}).get("sliding_attention"), dict):
            if local["rope_type"] != "default":
                raise ValueError(f"unsupported rope type {local['rope_type']!r} on the "
                                 "sliding_attention layers; supported: 'default'")
            local_theta = local["rope_theta"]
        else:
            local_theta = float(hf.get("rope_local_base_freq", LOCAL_THETA))
        return super().from_hf(hf, **gemma2.gemma_fields(hf), qk_norm=True,
                               local_rope_theta=local_theta)


SPEC = llama.derived_spec("gemma3", ("gemma3_text", "gemma3"), Config)
