"""BERT-family encoder (BERT, MiniLM, sentence-transformers checkpoints).

Shape legend as in `layers`: b batch, t sequence, d model, n heads, h head dim, f mlp,
v vocab, l layers. Embedding = mean of the last hidden states over the attention mask,
L2-normalised, exactly as sentence-transformers' all-MiniLM-L6-v2 pipeline.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jaxaccel import sharding as ax
from jaxaccel.models import layers
from jaxaccel.models.attention import attention
from jaxaccel.models.weights import (
    WeightRule,
    transpose_to,
    unstack_heads_in,
    unstack_heads_out,
)

FAMILY = "bert"
TASK = "embed"
HF_MODEL_TYPES = ("bert",)
# Source tensors a converter may see but that the embedding pipeline does not use.
IGNORED_SOURCE_WEIGHTS = (r"^pooler\.", r"position_ids$", r"^cls\.")
# BertModel checkpoints name tensors bare; BertFor* heads prefix the encoder with `bert.`.
SOURCE_PREFIXES = ("", "bert.")


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    # sentence-transformers' own input limit (sentence_bert_config.json), if the source has one:
    # its pipeline truncates there, not at max_position_embeddings.
    max_seq_length: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_length(self) -> int:
        """The hard limit: positions the model has embeddings for."""
        return self.max_position_embeddings

    @property
    def default_length(self) -> int:
        """Where inputs are truncated unless --max-length says otherwise."""
        return min(self.max_seq_length or self.max_position_embeddings,
                   self.max_position_embeddings)

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported, got "
                             f"position_embedding_type={hf['position_embedding_type']!r}")
        if hf["hidden_size"] % hf["num_attention_heads"]:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                   num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                   intermediate_size=hf["intermediate_size"],
                   max_position_embeddings=hf.get("max_position_embeddings", 512),
                   type_vocab_size=hf.get("type_vocab_size", 2),
                   layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                   hidden_act=hf.get("hidden_act", "gelu"),
                   pad_token_id=hf.get("pad_token_id", 0) or 0,
                   max_seq_length=hf.get("max_seq_length"))


class Embeddings(nnx.Module):
    def __init__(self, cfg: Config, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.token_vd = layers.make_param(rngs, (cfg.vocab_size, d), (ax.VOCAB, ax.EMBED), dtype)
        self.position_pd = layers.make_param(rngs, (cfg.max_position_embeddings, d),
                                             (None, ax.EMBED), dtype)
        self.segment_sd = layers.make_param(rngs, (cfg.type_vocab_size, d), (None, ax.EMBED), dtype)
        self.norm_scale_d = layers.make_param(rngs, (d,), (ax.EMBED,), dtype, layers.ones_init)
        self.norm_bias_d = layers.make_param(rngs, (d,), (ax.EMBED,), dtype, layers.zeros_init)
        self.eps = cfg.layer_norm_eps

    def __call__(self, ids_bt, segment_bt):
        t = ids_bt.shape[1]
        x_btd = (layers.lookup(self.token_vd[...], ids_bt)
                 + self.position_pd[...][None, :t]
                 + layers.lookup(self.segment_sd[...], segment_bt))
        return layers.layer_norm(x_btd, self.norm_scale_d[...], self.norm_bias_d[...], self.eps)


class Block(nnx.Module):
    """One post-norm encoder layer; built stacked over `num_layers` (leading layers axis)."""

    def __init__(self, cfg: Config, *, dtype, rngs: nnx.Rngs, num_layers: int | None = None):
        d, n, h, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
        p = lambda shape, axes, init=layers.normal_init(): layers.make_param(  # noqa: E731
            rngs, shape, axes, dtype, init, num_layers)
        self.wq_dnh = p((d, n, h), (ax.EMBED, ax.HEADS, ax.HEAD_DIM))
        self.wk_dnh = p((d, n, h), (ax.EMBED, ax.HEADS, ax.HEAD_DIM))
        self.wv_dnh = p((d, n, h), (ax.EMBED, ax.HEADS, ax.HEAD_DIM))
        self.bq_nh = p((n, h), (ax.HEADS, ax.HEAD_DIM), layers.zeros_init)
        self.bk_nh = p((n, h), (ax.HEADS, ax.HEAD_DIM), layers.zeros_init)
        self.bv_nh = p((n, h), (ax.HEADS, ax.HEAD_DIM), layers.zeros_init)
        self.wo_nhd = p((n, h, d), (ax.HEADS, ax.HEAD_DIM, ax.EMBED))
        self.bo_d = p((d,), (ax.EMBED,), layers.zeros_init)
        self.attn_norm_scale_d = p((d,), (ax.EMBED,), layers.ones_init)
        self.attn_norm_bias_d = p((d,), (ax.EMBED,), layers.zeros_init)
        self.wi_df = p((d, f), (ax.EMBED, ax.MLP))
        self.bi_f = p((f,), (ax.MLP,), layers.zeros_init)
        self.wm_fd = p((f, d), (ax.MLP, ax.EMBED))
        self.bm_d = p((d,), (ax.EMBED,), layers.zeros_init)
        self.mlp_norm_scale_d = p((d,), (ax.EMBED,), layers.ones_init)
        self.mlp_norm_bias_d = p((d,), (ax.EMBED,), layers.zeros_init)
        self.eps = cfg.layer_norm_eps
        self.act = cfg.hidden_act

    def __call__(self, x_btd, mask_bts):
        dt = x_btd.dtype
        q = layers.heads_in(x_btd, self.wq_dnh[...]) + self.bq_nh[...].astype(dt)
        k = layers.heads_in(x_btd, self.wk_dnh[...]) + self.bk_nh[...].astype(dt)
        v = layers.heads_in(x_btd, self.wv_dnh[...]) + self.bv_nh[...].astype(dt)
        a_btnh, _ = attention(q, k, v, mask_bts)
        a_btd = layers.heads_out(a_btnh, self.wo_nhd[...]) + self.bo_d[...].astype(dt)
        x_btd = layers.layer_norm(x_btd + a_btd, self.attn_norm_scale_d[...],
                                  self.attn_norm_bias_d[...], self.eps)
        m_btf = layers.einsum("btd,df->btf", x_btd, self.wi_df[...]) + self.bi_f[...].astype(dt)
        m_btf = layers.activation(self.act)(m_btf)
        m_btd = layers.einsum("btf,fd->btd", m_btf, self.wm_fd[...]) + self.bm_d[...].astype(dt)
        return layers.layer_norm(x_btd + m_btd, self.mlp_norm_scale_d[...],
                                 self.mlp_norm_bias_d[...], self.eps)


class Model(nnx.Module):
    def __init__(self, cfg: Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = Embeddings(cfg, dtype=dtype, rngs=rngs)
        self.blocks = Block(cfg, dtype=dtype, rngs=rngs, num_layers=cfg.num_layers)

    def __call__(self, ids_bt, mask_bt, segment_bt=None):
        """Last hidden states [b, t, d] in the parameters' dtype."""
        if segment_bt is None:
            segment_bt = jnp.zeros_like(ids_bt)
        x_btd = self.embeddings(ids_bt, segment_bt)
        mask_bts = jnp.broadcast_to(mask_bt[:, None, :].astype(bool),
                                    (ids_bt.shape[0], ids_bt.shape[1], ids_bt.shape[1]))
        # The mask rides in the carry (not the closure) so a pipeline can microbatch it.
        (x_btd, _), _ = layers.scan_layers(
            self.blocks, (x_btd, mask_bts), lambda block, c, _: ((block(*c), c[1]), None))
        return x_btd

    def embed(self, ids_bt, mask_bt, segment_bt=None):
        """Sentence embeddings [b, d], float32: masked mean pooling + L2 normalisation."""
        return mean_pool_normalise(self(ids_bt, mask_bt, segment_bt), mask_bt)


def mean_pool_normalise(x_btd, mask_bt):
    weights_bt = mask_bt.astype(jnp.float32)
    summed_bd = jnp.einsum("btd,bt->bd", x_btd, weights_bt.astype(x_btd.dtype),
                           preferred_element_type=jnp.float32)
    mean_bd = summed_bd / jnp.maximum(weights_bt.sum(-1, keepdims=True), 1e-9)
    norm_b1 = jnp.linalg.norm(mean_bd, axis=-1, keepdims=True)
    return mean_bd / jnp.maximum(norm_b1, 1e-12)


def weight_rules(cfg: Config) -> list[WeightRule]:
    """How Hugging Face BERT tensor names map onto this module's parameters."""
    n, h = cfg.num_heads, cfg.head_dim
    e, layer = "embeddings.", "encoder.layer.{i}."
    rules = [
        WeightRule("embeddings.token_vd", e + "word_embeddings.weight"),
        WeightRule("embeddings.position_pd", e + "position_embeddings.weight"),
        WeightRule("embeddings.segment_sd", e + "token_type_embeddings.weight"),
        WeightRule("embeddings.norm_scale_d", e + "LayerNorm.weight"),
        WeightRule("embeddings.norm_bias_d", e + "LayerNorm.bias"),
    ]
    for name, hf in (("q", "query"), ("k", "key"), ("v", "value")):
        rules += [
            WeightRule(f"blocks.w{name}_dnh", layer + f"attention.self.{hf}.weight",
                       unstack_heads_out(n, h)),
            WeightRule(f"blocks.b{name}_nh", layer + f"attention.self.{hf}.bias",
                       lambda b: b.reshape(n, h)),
        ]
    rules += [
        WeightRule("blocks.wo_nhd", layer + "attention.output.dense.weight", unstack_heads_in(n, h)),
        WeightRule("blocks.bo_d", layer + "attention.output.dense.bias"),
        WeightRule("blocks.attn_norm_scale_d", layer + "attention.output.LayerNorm.weight"),
        WeightRule("blocks.attn_norm_bias_d", layer + "attention.output.LayerNorm.bias"),
        WeightRule("blocks.wi_df", layer + "intermediate.dense.weight", transpose_to),
        WeightRule("blocks.bi_f", layer + "intermediate.dense.bias"),
        WeightRule("blocks.wm_fd", layer + "output.dense.weight", transpose_to),
        WeightRule("blocks.bm_d", layer + "output.dense.bias"),
        WeightRule("blocks.mlp_norm_scale_d", layer + "output.LayerNorm.weight"),
        WeightRule("blocks.mlp_norm_bias_d", layer + "output.LayerNorm.bias"),
    ]
    return rules

