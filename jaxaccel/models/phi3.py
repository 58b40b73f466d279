"""Phi-3 and Phi-4-mini decoders (model_type `phi3`): the Llama layout with fused
projections and partial rotary.

  * `self_attn.qkv_proj` ([(n + 2k) h, d]) and `mlp.gate_up_proj` ([2f, d], gate first) are
    split at convert time into the separate q/k/v and gate/up parameters (`weight_rules`)
  * `partial_rotary_factor` (Phi-4-mini: 0.75): only the leading head dims rotate
  * a `sliding_window` windows every layer.

`longrope` scaling (the 128k-context variants) is refused by `rotary.rope_fields`, naming it.
"""

from __future__ import annotations

import dataclasses

from jaxaccel.models import llama
from jaxaccel.models.weights import WeightRule, transpose_to, unstack_heads_out


@dataclasses.dataclass(frozen=True)
class Config(llama.Config):
    """Llama's fields; `from_hf` reads `partial_rotary_factor` (both spellings)."""


def weight_rules(cfg: Config) -> list[WeightRule]:
    """Llama's rules, with q/k/v and gate/up cut out of the fused tensors."""
    n, k, h, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    qkv, gate_up = "layers.{i}.self_attn.qkv_proj.weight", "layers.{i}.mlp.gate_up_proj.weight"
    qkv_rows, gate_up_rows = (n + 2 * k) * h, 2 * f
    fused = {
        "blocks.wq_dnh": (qkv, _rows(0, n * h, qkv_rows, unstack_heads_out(n, h))),
        "blocks.wk_dkh": (qkv, _rows(n * h, (n + k) * h, qkv_rows, unstack_heads_out(k, h))),
        "blocks.wv_dkh": (qkv, _rows((n + k) * h, qkv_rows, qkv_rows, unstack_heads_out(k, h))),
        "blocks.wg_df": (gate_up, _rows(0, f, gate_up_rows, transpose_to)),
        "blocks.wu_df": (gate_up, _rows(f, 2 * f, gate_up_rows, transpose_to)),
    }
    return [WeightRule(rule.target, *fused[rule.target]) if rule.target in fused else rule
            for rule in llama.weight_rules(cfg)]


def _rows(start: int, stop: int, total: int, then):
    """Rows start:stop of a fused torch Linear weight [total, in], then `then`; a fused
    tensor of another height is refused (ValueError: the converter names the tensor)."""
    def transform(w):
        if w.shape[0] != total:
            raise ValueError(f"fused tensor has {w.shape[0]} rows, config.json implies {total}")
        return then(w[start:stop])
    return transform


SPEC = llama.derived_spec("phi3", ("phi3",), Config, weight_rules=weight_rules)
