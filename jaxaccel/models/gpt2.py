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

from jaxaccel.models import activation_memory, blocks, first_token_id, layers
from jaxaccel.models.family import TOKENIZER_FILES, FamilySpec
from jaxaccel.models.kv_cache import KVCache
from jaxaccel.models.weights import WeightRule
from jaxaccel.parallel import sharding as ax

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

    @property
    def layout(self) -> blocks.DecoderLayout:
        """Pre-LayerNorm, biases everywhere, a plain MLP, learned positions (no rotary)."""
        return blocks.DecoderLayout(norm="layer", norm_eps=self.layer_norm_eps,
                                    activation=self.hidden_act, gated_mlp=False, rotary=False,
                                    qkv_bias=True, o_bias=True, mlp_bias=True)

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
        self.blocks = blocks.DecoderBlock(cfg, cfg.layout, dtype=dtype, rngs=rngs,
                                          num_layers=cfg.num_layers)
        self.norm_scale_d = layers.make_param(rngs, (d,), (ax.EMBED,), dtype, layers.ones_init)
        self.norm_bias_d = layers.make_param(rngs, (d,), (ax.EMBED,), dtype, layers.zeros_init)
        head = lambda: layers.make_param(rngs, (cfg.vocab_size, d), (ax.VOCAB, ax.EMBED), dtype)  # noqa: E731
        self.lm_head_vd = head() if head_copy or not cfg.tie_word_embeddings else None

    def __call__(self, ids_bt, positions_bt, mask_btt, cache: KVCache | None = None,
                 cache_mask_bts=None, cache_positions_bs=None):
        """Final hidden states [b, t, d] and this call's keys/values [l, b, k, t, h]
        (`cache_positions_bs`, for sliding windows, is unused: GPT-2 has none)."""
        x_btd = (layers.lookup(self.token_vd[...], ids_bt)
                 + layers.lookup(self.position_pd[...], positions_bt))
        x_btd, new_kv = blocks.run_layers(self.blocks, x_btd, None, mask_btt, cache,
                                          cache_mask_bts)
        return blocks.norm(self.config.layout, x_btd, self.norm_scale_d, self.norm_bias_d), new_kv

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


SPEC = FamilySpec(
    name="gpt2", task="generate", hf_model_types=("gpt2",), config=Config, model=Model,
    weight_rules=weight_rules, activation_bytes=activation_memory.decoder_bytes,
    # GPT2Model names tensors bare; GPT2LMHeadModel prefixes them with `transformer.`.
    source_prefixes=("", "transformer."),
    # `attn.bias`/`attn.masked_bias` are old causal-mask buffers. A tied `lm_head.weight` is
    # checked against `wte` (see `tied_weights`), not ignored.
    ignored_source_weights=(r"\.attn\.bias$", r"\.attn\.masked_bias$"),
    tied_weights=tied_weights, preprocessing_files=TOKENIZER_FILES,
    # A tied head quantized is a copy of the embedding table, which the lookup keeps.
    quantized_weights=blocks.quantized_weights(gated_mlp=False),
    quantized_head={"lm_head_vd": (1,)}, tied_head=("lm_head_vd", "token_vd"))
