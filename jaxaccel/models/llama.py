"""Llama-family decoder: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention.

Covers Hugging Face `llama` (optionally with `attention_bias`/`mlp_bias` and tied embeddings),
`mistral` (no sliding window beyond the generated length) and `qwen2` (bias on q/k/v only).

Shape legend as in `layers`: b batch, t new tokens, s cache slots, d model, n heads,
k kv heads, h head dim, f mlp, v vocab, l layers, r rotary frequencies (h / 2).

Rotary layout: Meta's original checkpoints rotate interleaved (even, odd) pairs; Hugging
Face's conversion permuted the q/k projection rows so that the pairs become (i, i + h/2) and
applies `rotate_half`. We read the Hugging Face weights unpermuted and rotate halves the same
way, which is exactly equivalent; the parity tests check it against transformers.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxaccel.parallel import sharding as ax
from jaxaccel.models import first_token_id, layers
from jaxaccel.models.attention import attention
from jaxaccel.models.kv_cache import KVCache
from jaxaccel.models.weights import (
    WeightRule,
    transpose_to,
    unstack_heads_in,
    unstack_heads_out,
)

FAMILY = "llama"
TASK = "generate"
HF_MODEL_TYPES = ("llama", "mistral", "qwen2")
IGNORED_SOURCE_WEIGHTS = (r"rotary_emb\.inv_freq$",)
SOURCE_ALIASES = ()
# Weight-only quantization (`jaxaccel.models.quantization`): matmul weights -> their contraction axes;
# the head [v, d] only with `head=True`. A tied head quantized is a copy of the embedding
# table (TIED_HEAD: head, table), which the lookup keeps in the compute dtype.
QUANTIZED_WEIGHTS = {"blocks.wq_dnh": (0,), "blocks.wk_dkh": (0,), "blocks.wv_dkh": (0,),
                     "blocks.wo_nhd": (0, 1), "blocks.wg_df": (0,), "blocks.wu_df": (0,),
                     "blocks.wm_fd": (0,)}
QUANTIZED_HEAD = {"lm_head_vd": (1,)}
TIED_HEAD = ("lm_head_vd", "token_vd")
# LlamaModel names tensors bare; LlamaForCausalLM prefixes the body with `model.` (but not
# `lm_head.weight`, which is looked up bare first).
SOURCE_PREFIXES = ("", "model.")
ROPE_TYPES = ("default", "linear", "llama3")



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
        model_type = hf.get("model_type", "llama")
        qwen2 = model_type == "qwen2"
        return cls(vocab_size=hf["vocab_size"], hidden_size=d, num_layers=hf["num_hidden_layers"],
                   num_heads=n, num_kv_heads=k, intermediate_size=hf["intermediate_size"],
                   head_dim=hf.get("head_dim") or d // n,
                   max_position_embeddings=hf.get("max_position_embeddings", 2048),
                   rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                   hidden_act=hf.get("hidden_act", "silu"),
                   tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   qkv_bias=qwen2 or bool(hf.get("attention_bias", False)),
                   o_bias=not qwen2 and bool(hf.get("attention_bias", False)),
                   mlp_bias=bool(hf.get("mlp_bias", False)),
                   sliding_window=_sliding_window(hf),
                   bos_token_id=first_token_id(hf.get("bos_token_id")),
                   eos_token_id=first_token_id(hf.get("eos_token_id")),
                   **_rope_fields(hf))


def _sliding_window(hf: dict) -> int | None:
    if hf.get("model_type") == "qwen2" and not hf.get("use_sliding_window", False):
        return None
    return hf.get("sliding_window")


def _rope_fields(hf: dict) -> dict:
    """Flatten transformers' `rope_parameters` (5.x) or `rope_scaling` + `rope_theta` (4.x)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {ROPE_TYPES}")
    fields = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
              "rope_type": rope_type, "rope_factor": float(params.get("factor", 1.0))}
    if rope_type == "llama3":
        fields.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                      rope_high_freq_factor=float(params["high_freq_factor"]),
                      rope_original_max_position_embeddings=int(
                          params["original_max_position_embeddings"]))
    return fields


def inverse_frequencies(cfg: Config) -> np.ndarray:
    """Rotary inverse frequencies [r], with the config's scaling applied (float64, static)."""
    h = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h)
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type == "llama3":
        return _llama3_scaling(inv_freq, cfg)
    return inv_freq


def _llama3_scaling(inv_freq: np.ndarray, cfg: Config) -> np.ndarray:
    """Llama 3.1: slow long wavelengths by `factor`, keep short ones, blend in between."""
    old_len = cfg.rope_original_max_position_embeddings
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / cfg.rope_factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, blended, scaled)


def rotary_tables(positions_bt, cfg: Config):
    """cos and sin [b, t, r] in float32 for the given absolute positions."""
    inv_freq_r = jnp.asarray(inverse_frequencies(cfg), jnp.float32)
    angles_btr = positions_bt.astype(jnp.float32)[..., None] * inv_freq_r
    return jnp.cos(angles_btr), jnp.sin(angles_btr)


def apply_rotary(x_btnh, cos_btr, sin_btr):
    """Rotate (i, i + h/2) pairs (HF `rotate_half` layout) in float32."""
    x32 = x_btnh.astype(jnp.float32)
    r = x32.shape[-1] // 2
    x1, x2 = x32[..., :r], x32[..., r:]
    cos, sin = cos_btr[:, :, None], sin_btr[:, :, None]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


class Block(nnx.Module):
    """One pre-norm decoder layer; built stacked over `num_layers` (leading layers axis)."""

    def __init__(self, cfg: Config, *, dtype, rngs: nnx.Rngs, num_layers: int | None = None):
        d, n, k, h, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.intermediate_size)
        p = lambda shape, axes, init=layers.normal_init(): layers.make_param(  # noqa: E731
            rngs, shape, axes, dtype, init, num_layers)
        zero = layers.zeros_init
        self.attn_norm_scale_d = p((d,), (ax.EMBED,), layers.ones_init)
        self.wq_dnh = p((d, n, h), (ax.EMBED, ax.HEADS, ax.HEAD_DIM))
        self.wk_dkh = p((d, k, h), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM))
        self.wv_dkh = p((d, k, h), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM))
        self.wo_nhd = p((n, h, d), (ax.HEADS, ax.HEAD_DIM, ax.EMBED))
        self.bq_nh = p((n, h), (ax.HEADS, ax.HEAD_DIM), zero) if cfg.qkv_bias else None
        self.bk_kh = p((k, h), (ax.KV_HEADS, ax.HEAD_DIM), zero) if cfg.qkv_bias else None
        self.bv_kh = p((k, h), (ax.KV_HEADS, ax.HEAD_DIM), zero) if cfg.qkv_bias else None
        self.bo_d = p((d,), (ax.EMBED,), zero) if cfg.o_bias else None
        self.mlp_norm_scale_d = p((d,), (ax.EMBED,), layers.ones_init)
        self.wg_df = p((d, f), (ax.EMBED, ax.MLP))
        self.wu_df = p((d, f), (ax.EMBED, ax.MLP))
        self.wm_fd = p((f, d), (ax.MLP, ax.EMBED))
        self.bg_f = p((f,), (ax.MLP,), zero) if cfg.mlp_bias else None
        self.bu_f = p((f,), (ax.MLP,), zero) if cfg.mlp_bias else None
        self.bm_d = p((d,), (ax.EMBED,), zero) if cfg.mlp_bias else None
        self.eps = cfg.rms_norm_eps
        self.act = cfg.hidden_act

    def __call__(self, x_btd, rotary, mask_btt, cached, cached_mask_bts):
        y_btd = layers.rms_norm(x_btd, self.attn_norm_scale_d[...], self.eps)
        q_btnh = _add_bias(layers.heads_in(y_btd, self.wq_dnh[...]), self.bq_nh)
        k_btkh = _add_bias(layers.heads_in(y_btd, self.wk_dkh[...]), self.bk_kh)
        v_btkh = _add_bias(layers.heads_in(y_btd, self.wv_dkh[...]), self.bv_kh)
        q_btnh = apply_rotary(q_btnh, *rotary)
        k_btkh = apply_rotary(k_btkh, *rotary)
        a_btnh, new_kv = attention(q_btnh, k_btkh, v_btkh, mask_btt, cached, cached_mask_bts)
        x_btd = x_btd + _add_bias(layers.heads_out(a_btnh, self.wo_nhd[...]), self.bo_d)
        y_btd = layers.rms_norm(x_btd, self.mlp_norm_scale_d[...], self.eps)
        g_btf = _add_bias(layers.matmul(y_btd, self.wg_df[...]), self.bg_f)
        u_btf = _add_bias(layers.matmul(y_btd, self.wu_df[...]), self.bu_f)
        m_btf = layers.activation(self.act)(g_btf) * u_btf
        x_btd = x_btd + _add_bias(layers.matmul(m_btf, self.wm_fd[...]), self.bm_d)
        return x_btd, new_kv


def _add_bias(x, bias: nnx.Param | None):
    """x + bias for an optional bias."""
    return x if bias is None else x + bias[...].astype(x.dtype)


class Model(nnx.Module):
    def __init__(self, cfg: Config, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 head_copy: bool = False):
        """`head_copy`: a tied model also holds its head as `lm_head_vd` (a quantized copy of
        the embedding, `jaxaccel.models.quantization.tied_head`); the lookup keeps `token_vd`."""
        d = cfg.hidden_size
        self.config = cfg
        self.token_vd = layers.make_param(rngs, (cfg.vocab_size, d), (ax.VOCAB, ax.EMBED), dtype)
        self.blocks = Block(cfg, dtype=dtype, rngs=rngs, num_layers=cfg.num_layers)
        self.norm_scale_d = layers.make_param(rngs, (d,), (ax.EMBED,), dtype, layers.ones_init)
        head = lambda: layers.make_param(rngs, (cfg.vocab_size, d), (ax.VOCAB, ax.EMBED), dtype)  # noqa: E731
        self.lm_head_vd = head() if head_copy or not cfg.tie_word_embeddings else None

    def __call__(self, ids_bt, positions_bt, mask_btt, cache: KVCache | None = None,
                 cache_mask_bts=None):
        """Final hidden states [b, t, d] and this call's keys/values [l, b, k, t, h]."""
        x_btd = layers.lookup(self.token_vd[...], ids_bt)
        cos_btr, sin_btr = rotary_tables(positions_bt, self.config)

        # Batch-dependent inputs ride in the carry ([b, ...]) and the cache in xs ([l, b, ...]),
        # never in the body's closure, so `jaxaccel.parallel.pipeline` can split them into microbatches.
        def body(block, carry, cached):
            x_btd, cos_btr, sin_btr, mask_btt, cache_mask_bts = carry
            x_btd, new_kv = block(x_btd, (cos_btr, sin_btr), mask_btt, cached, cache_mask_bts)
            return (x_btd, cos_btr, sin_btr, mask_btt, cache_mask_bts), new_kv

        carry = (x_btd, cos_btr, sin_btr, mask_btt, cache_mask_bts)
        (x_btd, *_), new_kv = layers.scan_layers(self.blocks, carry, body, cache)
        return layers.rms_norm(x_btd, self.norm_scale_d[...], self.config.rms_norm_eps), new_kv

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
    if cfg.mlp_bias:
        rules += [WeightRule("blocks.bg_f", mlp + "gate_proj.bias"),
                  WeightRule("blocks.bu_f", mlp + "up_proj.bias"),
                  WeightRule("blocks.bm_d", mlp + "down_proj.bias")]
    return rules


def tied_weights(cfg: Config) -> list[tuple[str, str]]:
    """A tied checkpoint may still ship `lm_head.weight`: it must equal the embedding."""
    return [("lm_head.weight", "embed_tokens.weight")] if cfg.tie_word_embeddings else []


def extra_sources(src) -> tuple[dict, dict]:
    """Config values and weight files beyond config.json and the model's safetensors: none."""
    return {}, {}
