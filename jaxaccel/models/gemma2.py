"""Gemma 2 decoder (`Gemma2ForCausalLM`): the Llama-layout layer with Gemma's switches.

  * RMSNorm scaled by (1 + w), as pre- and post-norms around attention and around the MLP
  * attention scores scaled by `query_pre_attn_scalar` ** -0.5 and soft-capped
    (cap * tanh(s / cap), `attn_logit_softcapping`); final logits capped the same way
    (`final_logit_softcapping`)
  * alternating sliding-window and global layers (`layer_types`; older configs: even layers
    windowed)
  * GeGLU with the tanh GELU (`hidden_activation`), embeddings times sqrt(hidden_size)
    rounded to the compute dtype, a head tied to the embedding.

Every switch is a `llama.Config` field read by `blocks.DecoderBlock`; the model, parameter
names and weight rules are `llama`'s.
"""

from __future__ import annotations

import dataclasses

from jaxaccel.models import llama


def gemma_fields(hf: dict) -> dict:
    """The switches every Gemma generation shares, from its config.json."""
    return dict(norm_offset=1.0, sandwich_norms=True, embed_scale=True,
                hidden_act=hf.get("hidden_activation") or hf.get("hidden_act")
                or "gelu_pytorch_tanh",
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
                query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
                attn_logit_softcap=hf.get("attn_logit_softcapping"),
                final_logit_softcap=hf.get("final_logit_softcapping"))


def with_layer_types(hf: dict, period: int) -> dict:
    """config.json with `layer_types` spelled out when it predates them: every `period`-th
    layer global, the others windowed (transformers' default)."""
    if hf.get("layer_types") or hf.get("sliding_window") is None:
        return hf
    return {**hf, "layer_types": ["sliding_attention" if (i + 1) % period else "full_attention"
                                  for i in range(hf["num_hidden_layers"])]}


@dataclasses.dataclass(frozen=True)
class Config(llama.Config):
    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        return super().from_hf(with_layer_types(hf, 2), **gemma_fields(hf))


SPEC = llama.derived_spec("gemma2", ("gemma2",), Config)
