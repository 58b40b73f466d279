"""Mixtral: Mistral's attention with a mixture-of-experts MLP in every layer; the router's
softmax picks the top 2 (`num_experts_per_tok`) of `num_local_experts` experts and
renormalizes their weights to sum to 1.

The model is `moe_decoder`'s; checkpoints name the experts
`layers.{i}.block_sparse_moe.experts.{e}.w1/w3/w2` (gate, up, down) and the router
`layers.{i}.block_sparse_moe.gate`.
"""

from __future__ import annotations

import dataclasses

from jaxaccel.models import llama, moe_decoder
from jaxaccel.models.family import TOKENIZER_FILES, FamilySpec

NAMES = moe_decoder.SourceNames(
    router="block_sparse_moe.gate.weight", gate="block_sparse_moe.experts.{e}.w1.weight",
    up="block_sparse_moe.experts.{e}.w3.weight", down="block_sparse_moe.experts.{e}.w2.weight")


@dataclasses.dataclass(frozen=True)
class Config(moe_decoder.Config):
    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        base = dataclasses.asdict(llama.Config.from_hf(hf))
        return cls(**base, num_experts=hf["num_local_experts"],
                   num_experts_per_tok=hf["num_experts_per_tok"],
                   moe_intermediate_size=hf["intermediate_size"], norm_topk_prob=True)


def weight_rules(cfg: Config):
    return moe_decoder.weight_rules(cfg, NAMES)


SPEC = FamilySpec(
    name="mixtral", task="generate", hf_model_types=("mixtral",), config=Config,
    model=moe_decoder.Model, weight_rules=weight_rules,
    activation_bytes=moe_decoder.activation_bytes, source_prefixes=llama.SPEC.source_prefixes,
    ignored_source_weights=llama.SPEC.ignored_source_weights,
    tied_weights=llama.tied_weights, preprocessing_files=TOKENIZER_FILES,
    quantized_weights=moe_decoder.quantized_weights(shared_expert=False, dense_layers=False),
    quantized_head=llama.SPEC.quantized_head, tied_head=llama.SPEC.tied_head)
