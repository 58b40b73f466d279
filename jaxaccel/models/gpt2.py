"""GPT-2 decoder: learned positions, pre-norm LayerNorm blocks, GELU MLP, tied embeddings
(or an own `lm_head.weight` when config.json says `tie_word_embeddings: false`).

Shape legend as in `layers`: b batch, t new tokens, s cache slots, d model, n heads,
k kv heads (= n for GPT-2), h head dim, f mlp, v vocab, l layers.

The decoder interface shared with `llama`: `model(ids_bt, positions_bt, mask_btt, cache,
cache_mask_bts)` returns the final hidden states and the new keys/values of every layer
([l, b, k, t, h]); `model.logits(x_btd)` projects to float32 vocabulary logits.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jaxaccel.parallel import sharding as ax
from jaxaccel.models import first_token_id, layers
from jaxaccel.models.attention import attention
from jaxaccel.models.kv_cache import KVCache
from jaxaccel.models.weights import WeightRule

FAMILY = "gpt2"
TASK = "generate"
HF_MODEL_TYPES = ("gpt2",)
# `attn.bias`/`attn.masked_bias` are old causal-mask buffers. A tied `lm_head.weight` is
# checked against `wte` (see `tied_weights`), not ignored.
IGNORED_SOURCE_WEIGHTS = (r"\.attn\.bias$", r"\.attn\.masked_bias$")
SOURCE_ALIASES = ()
# Weight-only quantization (`jaxaccel.models.quantization`): matmul weights -> their contraction axes;
# the head [v, d] only with `head=True`. A tied head quantized is a copy of the embedding
# table (TIED_HEAD: head, table), which the lookup keeps in the compute dtype.
QUANTIZED_WEIGHTS = {"blocks.wq_dnh": (0,), "blocks.wk_dkh": (0,), "blocks.wv_dkh": (0,),
                     "blocks.wo_nhd": (0, 1), "blocks.wi_df": (0,), "blocks.wm_fd": (0,)}
QUANTIZED_HEAD = {"lm_head_vd": (1,)}
TIED_HEAD = ("lm_head_vd", "token_vd")
# GPT2Model names tensors bare; GPT2LMHeadModel prefixes them with `transformer.`.
SOURCE_PREFIXES = ("", "transformer.")


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 1024
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def default_length(self) -> int:
        return self.max_length

    @property
    def max_length(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise ValueError("scale_attn_by_inverse_layer_idx=True is not supported")
        if not hf.get("scale_attn_weights", True):
            raise ValueError("scale_attn_weights=False is not supported")
        if hf.get("add_cross_attention"):
            raise ValueError("GPT-2 with cross-attention is not a decoder-only LM")
        d, n = hf["n_embd"], hf["n_head"]
        if d % n:
            raise ValueError(f"n_embd={d} must be divisible by n_head={n}")
        return cls(vocab_size=hf["vocab_size"], hidden_size=d, num_layers=hf["n_layer"],
                   num_heads=n, intermediate_size=hf.get("n_inner") or 4 * d,
                   max_position_embeddings=hf.get("n_positions", 1024),
                   layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                   hidden_act=hf.get("activation_function", "gelu_new"),
                   bos_token_id=first_token_id(hf.get("bos_token_id")),
                   eos_token_id=first_token_id(hf.get("eos_token_id")),
                   tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)))


class Block(nnx.Module):
    """One pre-norm decoder layer; built stacked over `num_layers` (leading layers axis)."""

    def __init__(self, cfg: Config, *, dtype, rngs: nnx.Rngs, num_layers: int | None = None):
        d, n, h, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
        p = lambda shape, axes, init=layers.normal_init(): layers.make_param(  # noqa: E731
            rngs, shape, axes, dtype, init, num_layers)
        qkv, kv = (ax.EMBED, ax.HEADS, ax.HEAD_DIM), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM)
        self.attn_norm_scale_d = p((d,), (ax.EMBED,), layers.ones_init)
        self.attn_norm_bias_d = p((d,), (ax.EMBED,), layers.zeros_init)
        self.wq_dnh = p((d, n, h), qkv)
        self.wk_dkh, self.wv_dkh = p((d, n, h), kv), p((d, n, h), kv)
        self.bq_nh = p((n, h), (ax.HEADS, ax.HEAD_DIM), layers.zeros_init)
        self.bk_kh = p((n, h), (ax.KV_HEADS, ax.HEAD_DIM), layers.zeros_init)
        self.bv_kh = p((n, h), (ax.KV_HEADS, ax.HEAD_DIM), layers.zeros_init)
        self.wo_nhd = p((n, h, d), (ax.HEADS, ax.HEAD_DIM, ax.EMBED))
        self.bo_d = p((d,), (ax.EMBED,), layers.zeros_init)
        self.mlp_norm_scale_d = p((d,), (ax.EMBED,), layers.ones_init)
        self.mlp_norm_bias_d = p((d,), (ax.EMBED,), layers.zeros_init)
        self.wi_df = p((d, f), (ax.EMBED, ax.MLP))
        self.bi_f = p((f,), (ax.MLP,), layers.zeros_init)
        self.wm_fd = p((f, d), (ax.MLP, ax.EMBED))
        self.bm_d = p((d,), (ax.EMBED,), layers.zeros_init)
        self.eps = cfg.layer_norm_eps
        self.act = cfg.hidden_act

    def __call__(self, x_btd, mask_btt, cached, cached_mask_bts):
        dt = x_btd.dtype
        y_btd = layers.layer_norm(x_btd, self.attn_norm_scale_d[...], self.attn_norm_bias_d[...],
                                  self.eps)
        q_btnh = layers.heads_in(y_btd, self.wq_dnh[...]) + self.bq_nh[...].astype(dt)
        k_btkh = layers.heads_in(y_btd, self.wk_dkh[...]) + self.bk_kh[...].astype(dt)
        v_btkh = layers.heads_in(y_btd, self.wv_dkh[...]) + self.bv_kh[...].astype(dt)
        a_btnh, new_kv = attention(q_btnh, k_btkh, v_btkh, mask_btt, cached, cached_mask_bts)
        x_btd = x_btd + layers.heads_out(a_btnh, self.wo_nhd[...]) + self.bo_d[...].astype(dt)
        y_btd = layers.layer_norm(x_btd, self.mlp_norm_scale_d[...], self.mlp_norm_bias_d[...],
                                  self.eps)
        m_btf = layers.matmul(y_btd, self.wi_df[...]) + self.bi_f[...].astype(dt)
        m_btf = layers.activation(self.act)(m_btf)
        m_btd = layers.matmul(m_btf, self.wm_fd[...])
        x_btd = x_btd + m_btd + self.bm_d[...].astype(dt)
        return x_btd, new_kv


class Model(nnx.Module):
    def __init__(self, cfg: Config, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 head_copy: bool = False):
        """`head_copy`: a tied model also holds its head as `lm_head_vd` (a quantized copy of
        the embedding, `jaxaccel.models.quantization.tied_head`); the lookup keeps `token_vd`."""
        d = cfg.hidden_size
        self.config = cfg
        self.token_vd = layers.make_param(rngs, (cfg.vocab_size, d), (ax.VOCAB, ax.EMBED), dtype)
        self.position_pd = layers.make_param(rngs, (cfg.max_position_embeddings, d),
                                             (None, ax.EMBED), dtype)
        self.blocks = Block(cfg, dtype=dtype, rngs=rngs, num_layers=cfg.num_layers)
        self.norm_scale_d = layers.make_param(rngs, (d,), (ax.EMBED,), dtype, layers.ones_init)
        self.norm_bias_d = layers.make_param(rngs, (d,), (ax.EMBED,), dtype, layers.zeros_init)
        head = lambda: layers.make_param(rngs, (cfg.vocab_size, d), (ax.VOCAB, ax.EMBED), dtype)  # noqa: E731
        self.lm_head_vd = head() if head_copy or not cfg.tie_word_embeddings else None

    def __call__(self, ids_bt, positions_bt, mask_btt, cache: KVCache | None = None,
                 cache_mask_bts=None):
        """Final hidden states [b, t, d] and this call's keys/values [l, b, k, t, h]."""
        x_btd = (layers.lookup(self.token_vd[...], ids_bt)
                 + layers.lookup(self.position_pd[...], positions_bt))

        # Batch-dependent inputs ride in the carry ([b, ...]) and the cache in xs ([l, b, ...]),
        # never in the body's closure, so `jaxaccel.parallel.pipeline` can split them into microbatches.
        def body(block, carry, cached):
            x_btd, mask_btt, cache_mask_bts = carry
            x_btd, new_kv = block(x_btd, mask_btt, cached, cache_mask_bts)
            return (x_btd, mask_btt, cache_mask_bts), new_kv

        (x_btd, _, _), new_kv = layers.scan_layers(
            self.blocks, (x_btd, mask_btt, cache_mask_bts), body, cache)
        x_btd = layers.layer_norm(x_btd, self.norm_scale_d[...], self.norm_bias_d[...],
                                  self.config.layer_norm_eps)
        return x_btd, new_kv

    def logits(self, x_btd):
        """Float32 logits [b, t, v] from the tied token embedding, or the head (untied, or
        the tied head's quantized copy)."""
        head = self.token_vd if self.lm_head_vd is None else self.lm_head_vd
        return layers.head_logits(x_btd, head[...])


def _split_qkv(index: int, cfg: Config, bias: bool):
    """GPT-2's Conv1D `c_attn` stores [d, 3*d] (already [in, out]); take q, k or v."""
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    if bias:
        return lambda b: b[index * d:(index + 1) * d].reshape(n, h)
    return lambda w: w[:, index * d:(index + 1) * d].reshape(d, n, h)


def weight_rules(cfg: Config) -> list[WeightRule]:
    """How Hugging Face GPT-2 tensor names map onto this module's parameters.

    GPT-2 uses Conv1D, which stores weights [in, out]: no transposes are needed.
    """
    n, h = cfg.num_heads, cfg.head_dim
    layer = "h.{i}."
    rules = [
        WeightRule("token_vd", "wte.weight"),
        WeightRule("position_pd", "wpe.weight"),
        WeightRule("norm_scale_d", "ln_f.weight"),
        WeightRule("norm_bias_d", "ln_f.bias"),
    ]
    for index, (w, b) in enumerate((("wq_dnh", "bq_nh"), ("wk_dkh", "bk_kh"), ("wv_dkh", "bv_kh"))):
        rules += [
            WeightRule(f"blocks.{w}", layer + "attn.c_attn.weight", _split_qkv(index, cfg, False)),
            WeightRule(f"blocks.{b}", layer + "attn.c_attn.bias", _split_qkv(index, cfg, True)),
        ]
    rules += [
        WeightRule("blocks.wo_nhd", layer + "attn.c_proj.weight",
                   lambda w: w.reshape(n, h, w.shape[1])),
        WeightRule("blocks.bo_d", layer + "attn.c_proj.bias"),
        WeightRule("blocks.attn_norm_scale_d", layer + "ln_1.weight"),
        WeightRule("blocks.attn_norm_bias_d", layer + "ln_1.bias"),
        WeightRule("blocks.mlp_norm_scale_d", layer + "ln_2.weight"),
        WeightRule("blocks.mlp_norm_bias_d", layer + "ln_2.bias"),
        WeightRule("blocks.wi_df", layer + "mlp.c_fc.weight"),
        WeightRule("blocks.bi_f", layer + "mlp.c_fc.bias"),
        WeightRule("blocks.wm_fd", layer + "mlp.c_proj.weight"),
        WeightRule("blocks.bm_d", layer + "mlp.c_proj.bias"),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(WeightRule("lm_head_vd", "lm_head.weight"))
    return rules


def tied_weights(cfg: Config) -> list[tuple[str, str]]:
    """GPT2LMHeadModel saves may carry `lm_head.weight` although tied: it must equal `wte`."""
    return [("lm_head.weight", "wte.weight")] if cfg.tie_word_embeddings else []


def extra_sources(src) -> tuple[dict, dict]:
    """Config values and weight files beyond config.json and the model's safetensors: none."""
    return {}, {}
