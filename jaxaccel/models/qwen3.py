"""Qwen3 dense decoder: the Llama layout plus per-head RMSNorm on queries and keys before
rotary (`q_norm`/`k_norm`), an explicit `head_dim`, and no q/k/v biases unless
`attention_bias`.

The layer is `blocks.DecoderBlock` with `qk_norm` on; parameters, weight names and the
model are `llama`'s (the switch adds `blocks.q_norm_scale_h` and `blocks.k_norm_scale_h`).
"""

from __future__ import annotations

import dataclasses

from jaxaccel.models import llama


@dataclasses.dataclass(frozen=True)
class Config(llama.Config):
    qk_norm: bool = True

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        return super().from_hf(hf, qk_norm=True)


SPEC = llama.derived_spec("qwen3", ("qwen3",), Config)
