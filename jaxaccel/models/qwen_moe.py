"""Qwen2-MoE and Qwen3-MoE: Qwen's attention (Qwen2: q/k/v biases; Qwen3: per-head q/k
RMSNorm) with a mixture-of-experts MLP: the top `num_experts_per_tok` of `num_experts`
experts, renormalized only with `norm_topk_prob`; layers in `mlp_only_layers`, or whose
(index + 1) `decoder_sparse_step` does not divide, have a dense MLP instead. Qwen2-MoE adds a
shared expert that every token runs through, scaled by a sigmoid gate.

The model is `moe_decoder`'s; `qwen2_moe.py` and `qwen3_moe.py` are the two families.
"""

from __future__ import annotations

import dataclasses

from jaxaccel.models import llama, moe_decoder
from jaxaccel.models.family import TOKENIZER_FILES, FamilySpec

QWEN2_NAMES = dataclasses.replace(moe_decoder.QWEN_NAMES, shared="mlp.shared_expert",
                                  shared_gate="mlp.shared_expert_gate.weight")


@dataclasses.dataclass(frozen=True)
class Config(moe_decoder.Config):
    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        base = dataclasses.asdict(llama.Config.from_hf(hf))
        qwen2 = hf.get("model_type") == "qwen2_moe"
        base.update(qkv_bias=bool(hf.get("qkv_bias", True)) if qwen2 else base["qkv_bias"],
                    o_bias=False if qwen2 else base["o_bias"], qk_norm=not qwen2,
                    sliding_window=hf.get("sliding_window")
                    if hf.get("use_sliding_window") else None)
        # Published configs say `num_experts`; transformers 5 writes Qwen3-MoE's as
        # `num_local_experts`.
        experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
        return cls(**base, num_experts=experts,
                   num_experts_per_tok=hf["num_experts_per_tok"],
                   moe_intermediate_size=hf["moe_intermediate_size"],
                   norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                   shared_expert_intermediate_size=(
                       hf.get("shared_expert_intermediate_size", 0) if qwen2 else 0),
                   dense_layers=moe_decoder.dense_layers(hf))


def spec(name: str, names: moe_decoder.SourceNames, shared_expert: bool) -> FamilySpec:
    """The FamilySpec of one Qwen MoE generation."""
    return FamilySpec(
        name=name, task="generate", hf_model_types=(name,), config=Config,
        model=moe_decoder.Model, weight_rules=lambda cfg: moe_decoder.weight_rules(cfg, names),
        activation_bytes=moe_decoder.activation_bytes,
        source_prefixes=llama.SPEC.source_prefixes,
        ignored_source_weights=llama.SPEC.ignored_source_weights,
        tied_weights=llama.tied_weights, preprocessing_files=TOKENIZER_FILES,
        quantized_weights=moe_decoder.quantized_weights(shared_expert, dense_layers=True),
        quantized_head=llama.SPEC.quantized_head, tied_head=llama.SPEC.tied_head)
