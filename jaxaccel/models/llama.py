"""Llama-family decoder: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention.

Covers Hugging Face `llama` (optionally with `attention_bias`/`mlp_bias` and tied embeddings),
`mistral` (no sliding window beyond the generated length) and `qwen2` (bias on q/k/v only).

Shape legend as in `layers`: b batch, t new tokens, s cache slots, d model, n heads,
k kv heads, h head dim, f mlp, v vocab, l layers, r rotary frequencies (h / 2).

The layer is `blocks.DecoderBlock` (RMSNorm, rotary, gated MLP); rotary scaling variants
are `rotary`'s. What the Hugging Face model types change is data (`MODEL_TYPES`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jaxaccel.models import activation_memory, blocks, first_token_id, layers, rotary
from jaxaccel.models.family import TOKENIZER_FILES, FamilySpec
from jaxaccel.models.kv_cache import KVCache
from jaxaccel.models.weights import (
    WeightRule,
    transpose_to,
    unstack_heads_in,
    unstack_heads_out,
)
from jaxaccel.parallel import sharding as ax


@dataclasses.dataclass(frozen=True)
class ModelType:
    """How one Hugging Face `model_type` reads config.json into this family's Config."""

    # q/k/v and output projection biases: None reads config.json's `attention_bias` (both).
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    # A config.json key that must be true for `sliding_window` to apply (None: it applies).
    sliding_window_switch: str | None = None


MODEL_TYPES = {
    "llama": ModelType(),
    "mistral": ModelType(),  # no sliding window beyond the generated length
    "qwen2": ModelType(qkv_bias=True, o_bias=False, sliding_window_switch="use_sliding_window"),
}
# Model types other families read through `Config.from_hf` (their own files register them).
BORROWED_MODEL_TYPES = {
    "qwen3": ModelType(sliding_window_switch="use_sliding_window"),
}


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before rotary (Qwen3)
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def default_length(self) -> int:
        return self.max_length

    @property
    def max_length(self) -> int:
        limit = self.max_position_embeddings
        return min(limit, self.sliding_window) if self.sliding_window else limit

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        d, n = hf["hidden_size"], hf["num_attention_heads"]
        k = hf.get("num_key_value_heads") or n
        if n % k:
            raise ValueError(f"num_attention_heads={n} must be a multiple of "
                             f"num_key_value_heads={k}")
        # A source converted with --family llama may name another model type: read as Llama.
        model_type = hf.get("model_type")
        kind = {**MODEL_TYPES, **BORROWED_MODEL_TYPES}.get(model_type, MODEL_TYPES["llama"])
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(vocab_size=hf["vocab_size"], hidden_size=d, num_layers=hf["num_hidden_layers"],
                   num_heads=n, num_kv_heads=k, intermediate_size=hf["intermediate_size"],
                   head_dim=hf.get("head_dim") or d // n,
                   max_position_embeddings=hf.get("max_position_embeddings", 2048),
                   rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                   hidden_act=hf.get("hidden_act", "silu"),
                   tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   qkv_bias=attention_bias if kind.qkv_bias is None else kind.qkv_bias,
                   o_bias=attention_bias if kind.o_bias is None else kind.o_bias,
                   mlp_bias=bool(hf.get("mlp_bias", False)),
                   sliding_window=_sliding_window(hf, kind),
                   bos_token_id=first_token_id(hf.get("bos_token_id")),
                   eos_token_id=first_token_id(hf.get("eos_token_id")),
                   **rotary.rope_fields(hf))

    @property
    def layout(self) -> blocks.DecoderLayout:
        """Pre-RMSNorm, rotary, a gated MLP; biases as config.json says."""
        return blocks.DecoderLayout(norm="rms", norm_eps=self.rms_norm_eps,
                                    activation=self.hidden_act, gated_mlp=True, rotary=True,
                                    qkv_bias=self.qkv_bias, o_bias=self.o_bias,
                                    mlp_bias=self.mlp_bias, qk_norm=self.qk_norm)


def _sliding_window(hf: dict, kind: ModelType) -> int | None:
    if kind.sliding_window_switch and not hf.get(kind.sliding_window_switch, False):
        return None
    return hf.get("sliding_window")


class Model(nnx.Module):
    def __init__(self, cfg: Config, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 head_copy: bool = False):
        """`head_copy`: a tied model also holds its head as `lm_head_vd` (a quantized copy of
        the embedding, `jaxaccel.models.quantization.tied_head`); the lookup keeps `token_vd`."""
        d = cfg.hidden_size
        self.config = cfg
        self.token_vd = layers.make_param(rngs, (cfg.vocab_size, d), (ax.VOCAB, ax.EMBED), dtype)
        self.blocks = blocks.DecoderBlock(cfg, cfg.layout, dtype=dtype, rngs=rngs,
                                          num_layers=cfg.num_layers)
        self.norm_scale_d = layers.make_param(rngs, (d,), (ax.EMBED,), dtype, layers.ones_init)
        head = lambda: layers.make_param(rngs, (cfg.vocab_size, d), (ax.VOCAB, ax.EMBED), dtype)  # noqa: E731
        self.lm_head_vd = head() if head_copy or not cfg.tie_word_embeddings else None

    def __call__(self, ids_bt, positions_bt, mask_btt, cache: KVCache | None = None,
                 cache_mask_bts=None):
        """Final hidden states [b, t, d] and this call's keys/values [l, b, k, t, h]."""
        x_btd = layers.lookup(self.token_vd[...], ids_bt)
        tables = rotary.tables(positions_bt, self.config)
        x_btd, new_kv = blocks.run_layers(self.blocks, x_btd, tables, mask_btt, cache,
                                          cache_mask_bts)
        return blocks.norm(self.config.layout, x_btd, self.norm_scale_d, None), new_kv

    def logits(self, x_btd):
        """Float32 logits [b, t, v]; the head is [v, d], as Hugging Face stores it."""
        head = self.token_vd if self.lm_head_vd is None else self.lm_head_vd
        return layers.head_logits(x_btd, head[...])


def weight_rules(cfg: Config) -> list[WeightRule]:
    """How Hugging Face Llama/Mistral/Qwen2 tensor names map onto this module's parameters."""
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn, mlp = "layers.{i}.self_attn.", "layers.{i}.mlp."
    rules = [
        WeightRule("token_vd", "embed_tokens.weight"),
        WeightRule("norm_scale_d", "norm.weight"),
        WeightRule("blocks.attn_norm_scale_d", "layers.{i}.input_layernorm.weight"),
        WeightRule("blocks.mlp_norm_scale_d", "layers.{i}.post_attention_layernorm.weight"),
        WeightRule("blocks.wq_dnh", attn + "q_proj.weight", unstack_heads_out(n, h)),
        WeightRule("blocks.wk_dkh", attn + "k_proj.weight", unstack_heads_out(k, h)),
        WeightRule("blocks.wv_dkh", attn + "v_proj.weight", unstack_heads_out(k, h)),
        WeightRule("blocks.wo_nhd", attn + "o_proj.weight", unstack_heads_in(n, h)),
        WeightRule("blocks.wg_df", mlp + "gate_proj.weight", transpose_to),
        WeightRule("blocks.wu_df", mlp + "up_proj.weight", transpose_to),
        WeightRule("blocks.wm_fd", mlp + "down_proj.weight", transpose_to),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(WeightRule("lm_head_vd", "lm_head.weight"))
    if cfg.qkv_bias:
        rules += [WeightRule("blocks.bq_nh", attn + "q_proj.bias", lambda b: b.reshape(n, h)),
                  WeightRule("blocks.bk_kh", attn + "k_proj.bias", lambda b: b.reshape(k, h)),
                  WeightRule("blocks.bv_kh", attn + "v_proj.bias", lambda b: b.reshape(k, h))]
    if cfg.o_bias:
        rules.append(WeightRule("blocks.bo_d", attn + "o_proj.bias"))
    if cfg.qk_norm:
        rules += [WeightRule("blocks.q_norm_scale_h", attn + "q_norm.weight"),
                  WeightRule("blocks.k_norm_scale_h", attn + "k_norm.weight")]
    if cfg.mlp_bias:
        rules += [WeightRule("blocks.bg_f", mlp + "gate_proj.bias"),
                  WeightRule("blocks.bu_f", mlp + "up_proj.bias"),
                  WeightRule("blocks.bm_d", mlp + "down_proj.bias")]
    return rules


def tied_weights(cfg: Config) -> list[tuple[str, str]]:
    """A tied checkpoint may still ship `lm_head.weight`: it must equal the embedding."""
    return [("lm_head.weight", "embed_tokens.weight")] if cfg.tie_word_embeddings else []


SPEC = FamilySpec(
    name="llama", task="generate", hf_model_types=tuple(MODEL_TYPES), config=Config,
    model=Model, weight_rules=weight_rules, activation_bytes=activation_memory.decoder_bytes,
    # LlamaModel names tensors bare; LlamaForCausalLM prefixes the body with `model.` (but not
    # `lm_head.weight`, which is looked up bare first).
    source_prefixes=("", "model."),
    ignored_source_weights=(r"rotary_emb\.inv_freq$",),
    tied_weights=tied_weights, preprocessing_files=TOKENIZER_FILES,
    # A tied head quantized is a copy of the embedding table, which the lookup keeps.
    quantized_weights=blocks.quantized_weights(gated_mlp=True),
    quantized_head={"lm_head_vd": (1,)}, tied_head=("lm_head_vd", "token_vd"))
