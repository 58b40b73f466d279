"""Qwen3 dense decoder: the Llama layout plus per-head RMSNorm on queries and keys before
rotary (`q_norm`/`k_norm`), an explicit `head_dim`, and no q/k/v biases unless
`attention_bias`.

The layer is `blocks.DecoderBlock` with `qk_norm` on; parameters, weight names and the
model are `llama`'s (the switch adds `blocks.q_norm_scale_h` and `blocks.k_norm_scale_h`).
"""

from __future__ import annotations

import dataclasses

from jaxaccel.models import llama
from jaxaccel.models.family import TOKENIZER_FILES, FamilySpec


@dataclasses.dataclass(frozen=True)
class Config(llama.Config):
    qk_norm: bool = True

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        return super().from_hf(hf, qk_norm=True)


SPEC = FamilySpec(
    name="qwen3", task="generate", hf_model_types=("qwen3",), config=Config,
    model=llama.Model, weight_rules=llama.weight_rules,
    activation_bytes=llama.SPEC.activation_bytes, source_prefixes=llama.SPEC.source_prefixes,
    ignored_source_weights=llama.SPEC.ignored_source_weights,
    tied_weights=llama.tied_weights, preprocessing_files=TOKENIZER_FILES,
    quantized_weights=llama.SPEC.quantized_weights, quantized_head=llama.SPEC.quantized_head,
    tied_head=llama.SPEC.tied_head)
