"""Llama-family decoder: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention.

Covers Hugging Face `llama` (optionally with `attention_bias`/`mlp_bias` and tied embeddings),
`mistral` (every layer windowed by `sliding_window`) and `qwen2` (bias on q/k/v only; windows
with `use_sliding_window` from layer `max_window_layers` on). The Config's switches (q/k
norms, sandwich norms, soft caps, partial rotary, per-layer windows, a local rotary base) are
what the other decoder families built on this model (`qwen3`, `gemma2`, `gemma3`, `phi3`)
turn on.

Shape legend as in `layers`: b batch, t new tokens, s cache slots, d model, n heads,
k kv heads, h head dim, f mlp, v vocab, l layers, r rotary frequencies (h / 2).

The layer is `blocks.DecoderBlock` (RMSNorm, rotary, gated MLP); rotary scaling variants
are `rotary`'s. What the Hugging Face model types change is data (`MODEL_TYPES`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jaxaccel.models import activation_memory, attention, blocks, first_token_id, layers, rotary
from jaxaccel.models.family import DECODER_FILES, FamilySpec
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


LAYER_TYPES = ("full_attention", "sliding_attention")

MODEL_TYPES = {
    "llama": ModelType(),
    "mistral": ModelType(),
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
    # Sliding-window attention: a windowed layer's query at position p sees keys at
    # positions > p - sliding_window (None: no window). `layer_types` names each layer
    # "sliding_attention" or "full_attention" (transformers' spelling); empty: every layer
    # is windowed when there is a window (Mistral).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    # The windowed layers' own rotary base, unscaled (Gemma 3's rope_local_base_freq; None:
    # the global tables).
    local_rope_theta: float | None = None
    partial_rotary_factor: float = 1.0  # the leading fraction of head dims that rotate (Phi-3)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w) (Gemma: 1)
    sandwich_norms: bool = False  # post-norms after attention and MLP too (Gemma 2, 3)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size) in the compute dtype (Gemma)
    query_pre_attn_scalar: float | None = None  # scores scaled by its ** -0.5 (Gemma)
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # the same on the output logits (Gemma 2)
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        kinds = set(self.layer_types) - set(LAYER_TYPES)
        if kinds:
            raise ValueError(f"unsupported layer_types {sorted(kinds)}; supported: "
                             f"{LAYER_TYPES}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types lists {len(self.layer_types)} layers, but "
                             f"num_hidden_layers is {self.num_layers}")

    @property
    def default_length(self) -> int:
        return self.max_length

    @property
    def max_length(self) -> int:
        """The position limit; a sliding window is attended over, not a limit."""
        return self.max_position_embeddings

    @property
    def windowed_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it attends over the sliding window only."""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        if not self.layer_types:
            return (True,) * self.num_layers
        return tuple(kind == "sliding_attention" for kind in self.layer_types)

    @classmethod
    def from_hf(cls, hf: dict, **fields) -> "Config":
        """The config of a config.json dict; `fields` (a family's own switches) override
        what is read."""
        d, n = hf["hidden_size"], hf["num_attention_heads"]
        k = hf.get("num_key_value_heads") or n
        if n % k:
            raise ValueError(f"num_attention_heads={n} must be a multiple of "
                             f"num_key_value_heads={k}")
        # A source converted with --family llama may name another model type: read as Llama.
        model_type = hf.get("model_type")
        kind = {**MODEL_TYPES, **BORROWED_MODEL_TYPES}.get(model_type, MODEL_TYPES["llama"])
        attention_bias = bool(hf.get("attention_bias", False))
        window = _sliding_window(hf, kind)
        values = dict(vocab_size=hf["vocab_size"], hidden_size=d,
                      num_layers=hf["num_hidden_layers"],
                      num_heads=n, num_kv_heads=k, intermediate_size=hf["intermediate_size"],
                      head_dim=hf.get("head_dim") or d // n,
                      max_position_embeddings=hf.get("max_position_embeddings", 2048),
                      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                      hidden_act=hf.get("hidden_act", "silu"),
                      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                      qkv_bias=attention_bias if kind.qkv_bias is None else kind.qkv_bias,
                      o_bias=attention_bias if kind.o_bias is None else kind.o_bias,
                      mlp_bias=bool(hf.get("mlp_bias", False)),
                      sliding_window=window, layer_types=_layer_types(hf, kind, window),
                      partial_rotary_factor=rotary.partial_factor(hf),
                      bos_token_id=first_token_id(hf.get("bos_token_id")),
                      eos_token_id=first_token_id(hf.get("eos_token_id")),
                      **rotary.rope_fields(hf, "full_attention"))
        return cls(**{**values, **fields})

    @property
    def layout(self) -> blocks.DecoderLayout:
        """Pre-RMSNorm, rotary, a gated MLP; biases as config.json says."""
        scalar = self.query_pre_attn_scalar
        return blocks.DecoderLayout(norm="rms", norm_eps=self.rms_norm_eps,
                                    activation=self.hidden_act, gated_mlp=True, rotary=True,
                                    qkv_bias=self.qkv_bias, o_bias=self.o_bias,
                                    mlp_bias=self.mlp_bias, qk_norm=self.qk_norm,
                                    norm_offset=self.norm_offset,
                                    sandwich_norms=self.sandwich_norms,
                                    attn_scale=None if scalar is None else scalar ** -0.5,
                                    attn_soft_cap=self.attn_logit_softcap)


def local_layers(cfg: Config, positions_bt, mask_btt, cache_mask_bts, cache_positions_bs):
    """The sliding-window layers' masks (and rotary tables) of a decoder with `cfg`, or None
    without any (`blocks.LocalLayers`; every llama-layout decoder, MoE ones too)."""
    windowed = cfg.windowed_layers
    if not any(windowed):
        return None
    if cache_mask_bts is not None and cache_positions_bs is None:
        raise ValueError("sliding-window layers over a cache need cache_positions_bs")
    local_mask_btt = local_cache_mask_bts = None  # the engine's ragged step: no masks
    if mask_btt is not None:
        local_mask_btt, local_cache_mask_bts = attention.window_masks(
            cfg.sliding_window, positions_bt, mask_btt, cache_positions_bs, cache_mask_bts)
    local_rotary = None
    if cfg.local_rope_theta is not None:
        local_cfg = dataclasses.replace(cfg, rope_theta=cfg.local_rope_theta,
                                        rope_type="default", rope_factor=1.0)
        local_rotary = rotary.tables(positions_bt, local_cfg)
    windowed_lb = jnp.broadcast_to(jnp.asarray(windowed)[:, None],
                                   (len(windowed), positions_bt.shape[0]))
    return blocks.LocalLayers(windowed_lb, local_mask_btt, local_cache_mask_bts,
                              local_rotary, cfg.sliding_window)


def _sliding_window(hf: dict, kind: ModelType) -> int | None:
    if kind.sliding_window_switch and not hf.get(kind.sliding_window_switch, False):
        return None
    return hf.get("sliding_window")


def _layer_types(hf: dict, kind: ModelType, window: int | None) -> tuple[str, ...]:
    """config.json's `layer_types` (transformers 5), else what transformers derives: Qwen's
    windows start at layer `max_window_layers`; other types window every layer."""
    if window is None:
        return ()
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    if kind.sliding_window_switch:
        first = hf.get("max_window_layers", 0)
        return tuple("sliding_attention" if i >= first else "full_attention"
                     for i in range(hf["num_hidden_layers"]))
    return ()


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
                 cache_mask_bts=None, cache_positions_bs=None):
        """Final hidden states [b, t, d] and this call's keys/values [l, b, k, t, h].

        `cache_positions_bs` [b, s] int32: the position each cache slot holds, which
        sliding-window layers need with a cache (ValueError without it)."""
        cfg = self.config
        x_btd = layers.lookup(self.token_vd[...], ids_bt)
        if cfg.embed_scale:  # the reference rounds sqrt(d) to the compute dtype first
            x_btd = x_btd * jnp.asarray(cfg.hidden_size ** 0.5, x_btd.dtype)
        tables = rotary.tables(positions_bt, cfg)
        local = local_layers(cfg, positions_bt, mask_btt, cache_mask_bts, cache_positions_bs)
        x_btd, new_kv = blocks.run_layers(self.blocks, x_btd, tables, mask_btt, cache,
                                          cache_mask_bts, local)
        return blocks.norm(cfg.layout, x_btd, self.norm_scale_d, None), new_kv

    def logits(self, x_btd):
        """Float32 logits [b, t, v]; the head is [v, d], as Hugging Face stores it. With
        `final_logit_softcap`: cap * tanh(logits / cap)."""
        head = self.token_vd if self.lm_head_vd is None else self.lm_head_vd
        logits_btv = layers.head_logits(x_btd, head[...])
        cap = self.config.final_logit_softcap
        return logits_btv if cap is None else cap * jnp.tanh(logits_btv / cap)


def weight_rules(cfg: Config) -> list[WeightRule]:
    """How Hugging Face Llama/Mistral/Qwen2 tensor names map onto this module's parameters."""
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn, mlp = "layers.{i}.self_attn.", "layers.{i}.mlp."
    rules = [
        WeightRule("token_vd", "embed_tokens.weight"),
        WeightRule("norm_scale_d", "norm.weight"),
        WeightRule("blocks.attn_norm_scale_d", "layers.{i}.input_layernorm.weight"),
        *_mlp_norm_rules(cfg),
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


def _mlp_norm_rules(cfg: Config) -> list[WeightRule]:
    """Llama's `post_attention_layernorm` is the pre-MLP norm; with sandwich norms (Gemma) it
    is the post-attention norm, and `pre_/post_feedforward_layernorm` wrap the MLP."""
    if not cfg.sandwich_norms:
        return [WeightRule("blocks.mlp_norm_scale_d", "layers.{i}.post_attention_layernorm.weight")]
    layer = "layers.{i}."
    return [WeightRule("blocks.attn_post_norm_scale_d", layer + "post_attention_layernorm.weight"),
            WeightRule("blocks.mlp_norm_scale_d", layer + "pre_feedforward_layernorm.weight"),
            WeightRule("blocks.mlp_post_norm_scale_d", layer + "post_feedforward_layernorm.weight")]


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
    tied_weights=tied_weights, preprocessing_files=DECODER_FILES,
    # A tied head quantized is a copy of the embedding table, which the lookup keeps.
    quantized_weights=blocks.quantized_weights(gated_mlp=True),
    quantized_head={"lm_head_vd": (1,)}, tied_head=("lm_head_vd", "token_vd"))


def derived_spec(name: str, model_types: tuple[str, ...], config: type, **changes) -> FamilySpec:
    """The spec of a family built on this model, its weight rules and its switches (Qwen3,
    Gemma 2 and 3, Phi-3): its own name, model types and Config; `changes` replace fields."""
    return dataclasses.replace(SPEC, name=name, hf_model_types=model_types, config=config,
                               **changes)
