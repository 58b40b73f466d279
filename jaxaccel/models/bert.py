"""BERT-family encoder (BERT, MiniLM, sentence-transformers checkpoints).

Shape legend as in `layers`: b batch, t sequence, d model, n heads, h head dim, f mlp,
v vocab, l layers. Embedding = the sentence-transformers pipeline that the source's
`modules.json` declares (Transformer -> Pooling -> optional Dense -> optional Normalize; the
family owns that metadata, `pooling` computes it); without `modules.json`, masked mean
pooling + L2 normalisation, as all-MiniLM-L6-v2.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax.numpy as jnp
from flax import nnx

from jaxaccel.parallel import sharding as ax
from jaxaccel.errors import ConvertError
from jaxaccel.models import activation_memory, layers, pooling
from jaxaccel.models.attention import attention
from jaxaccel.models.family import TOKENIZER_FILES, FamilySpec
from jaxaccel.models.weights import (
    WeightRule,
    transpose_to,
    unstack_heads_in,
    unstack_heads_out,
)
from jaxaccel.utils.files import read_json

ST_MODULE = "sentence_transformers.models."
# A Dense module's weights enter the converter's source under this prefix.
DENSE_SOURCE_PREFIX = "st_dense."


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
    # The sentence-transformers pipeline after the encoder (defaults: mean + normalise, what
    # checkpoints converted before these fields existed did).
    pooling_modes: tuple[str, ...] = ("mean",)
    dense_in: int | None = None
    dense_out: int | None = None
    dense_bias: bool = True
    dense_activation: str = "torch.nn.modules.activation.Tanh"
    normalize: bool = True

    @property
    def embedding_dim(self) -> int:
        """Width of `Model.embed`'s output: Dense outputs, or the pooled width."""
        return self.dense_out or self.hidden_size * len(self.pooling_modes)

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
                   max_seq_length=hf.get("max_seq_length"),
                   **_pipeline_fields(hf))


def _pipeline_fields(hf: dict) -> dict:
    """The sentence-transformers fields that `extra_sources` put into `hf`, checked."""
    fields = {k: hf[k] for k in ("pooling_modes", "dense_in", "dense_out", "dense_bias",
                                 "dense_activation", "normalize") if k in hf}
    modes = tuple(fields.get("pooling_modes", ("mean",)))
    unknown = [m for m in modes if m not in pooling.POOLING_MODES]
    if not modes or unknown:
        raise ValueError(f"pooling modes {list(modes)} not supported; supported: "
                         f"{sorted(pooling.POOLING_MODES)}")
    return {**fields, "pooling_modes": modes}


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
        q = layers.add_bias(layers.heads_in(x_btd, self.wq_dnh[...]), self.bq_nh)
        k = layers.add_bias(layers.heads_in(x_btd, self.wk_dnh[...]), self.bk_nh)
        v = layers.add_bias(layers.heads_in(x_btd, self.wv_dnh[...]), self.bv_nh)
        a_btnh, _ = attention(q, k, v, mask_bts)
        a_btd = layers.add_bias(layers.heads_out(a_btnh, self.wo_nhd[...]), self.bo_d)
        x_btd = layers.layer_norm(x_btd + a_btd, self.attn_norm_scale_d[...],
                                  self.attn_norm_bias_d[...], self.eps)
        m_btf = layers.add_bias(layers.einsum("btd,df->btf", x_btd, self.wi_df[...]), self.bi_f)
        m_btf = layers.activation(self.act)(m_btf)
        m_btd = layers.add_bias(layers.einsum("btf,fd->btd", m_btf, self.wm_fd[...]), self.bm_d)
        return layers.layer_norm(x_btd + m_btd, self.mlp_norm_scale_d[...],
                                 self.mlp_norm_bias_d[...], self.eps)


class PoolingDense(nnx.Module):
    """sentence-transformers' Dense module after pooling: activation(x @ w + b)."""

    def __init__(self, cfg: Config, *, dtype, rngs: nnx.Rngs):
        self.w_df = layers.make_param(rngs, (cfg.dense_in, cfg.dense_out), (ax.EMBED, None), dtype)
        self.b_f = (layers.make_param(rngs, (cfg.dense_out,), (None,), dtype, layers.zeros_init)
                    if cfg.dense_bias else None)
        self.activation = cfg.dense_activation

    def __call__(self, x_bd):
        bias = None if self.b_f is None else self.b_f[...]
        return pooling.dense(x_bd, self.w_df[...], bias, self.activation)


class Model(nnx.Module):
    def __init__(self, cfg: Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = Embeddings(cfg, dtype=dtype, rngs=rngs)
        self.blocks = Block(cfg, dtype=dtype, rngs=rngs, num_layers=cfg.num_layers)
        self.pooling_dense = PoolingDense(cfg, dtype=dtype, rngs=rngs) if cfg.dense_out else None

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
        """Sentence embeddings [b, embedding_dim], float32: the configured pooling, then the
        optional Dense and L2 normalisation."""
        cfg = self.config
        y_bd = pooling.pool(self(ids_bt, mask_bt, segment_bt), mask_bt, cfg.pooling_modes)
        if self.pooling_dense is not None:
            y_bd = self.pooling_dense(y_bd)
        return pooling.normalise(y_bd) if cfg.normalize else y_bd


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
    if cfg.dense_out:
        rules.append(WeightRule("pooling_dense.w_df", DENSE_SOURCE_PREFIX + "linear.weight",
                                transpose_to))
        if cfg.dense_bias:
            rules.append(WeightRule("pooling_dense.b_f", DENSE_SOURCE_PREFIX + "linear.bias"))
    return rules


# sentence-transformers metadata ------------------------------------------------------------

def extra_sources(src: pathlib.Path) -> tuple[dict, dict]:
    """(config values, {weight file: name prefix}) from a sentence-transformers export:
    `max_seq_length` and the module pipeline of `modules.json`. ConvertError naming the file
    or module for anything this family cannot compute."""
    extras = read_json(src / "sentence_bert_config.json") or {}
    limit = extras.get("max_seq_length")
    values = {"max_seq_length": int(limit)} if limit else {}
    modules = read_json(src / "modules.json", list)
    if modules is None:
        return values, {}
    pipeline, files = _pipeline(src, modules)
    return {**values, **pipeline}, files


def _pipeline(src: pathlib.Path, modules) -> tuple[dict, dict]:
    """Walk modules.json: Transformer, Pooling, then optional Dense and Normalize, in order."""
    path = src / "modules.json"
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ConvertError(f"{path}: expected a list of module objects")
    kinds = [str(m.get("type", "")).removeprefix(ST_MODULE) for m in modules]
    allowed = ["Transformer", "Pooling", "Dense", "Normalize"]
    position = [allowed.index(k) if k in allowed else -1 for k in kinds]
    bad = next((m for m, p in zip(modules, position) if p < 0), None)
    if bad is not None:
        raise ConvertError(f"{path}: module {bad.get('path') or bad.get('name')!r} of type "
                           f"{bad.get('type')!r} is not supported (supported: Transformer, "
                           "Pooling, one Dense, Normalize)")
    if kinds[:2] != ["Transformer", "Pooling"] or position != sorted(set(position)):
        raise ConvertError(f"{path}: modules {kinds} are not Transformer, Pooling, [Dense], "
                           "[Normalize] in that order")
    by_kind = dict(zip(kinds, modules))
    values = {"pooling_modes": _pooling_modes(src / by_kind["Pooling"].get("path", "")),
              "normalize": "Normalize" in by_kind}
    if "Dense" not in by_kind:
        return values, {}
    dense_values, files = _dense(src / by_kind["Dense"].get("path", ""))
    return {**values, **dense_values}, files


def _pooling_modes(directory: pathlib.Path) -> list[str]:
    config = read_json(directory / "config.json")
    if config is None:
        raise ConvertError(f"{directory / 'config.json'}: missing (the Pooling module's config)")
    modes = [mode for mode, key in pooling.POOLING_MODES.items() if config.get(key)]
    if not modes:
        raise ConvertError(f"{directory / 'config.json'}: no pooling mode is enabled")
    return modes


def _dense(directory: pathlib.Path) -> tuple[dict, dict]:
    path = directory / "config.json"
    config = read_json(path)
    if config is None:
        raise ConvertError(f"{path}: missing (the Dense module's config)")
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in pooling.DENSE_ACTIVATIONS:
        raise ConvertError(f"{path}: Dense activation {activation!r} is not supported; "
                           f"supported: {sorted(pooling.DENSE_ACTIVATIONS)}")
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise ConvertError(f"{weights}: missing (the Dense module's weights; pickled "
                           "pytorch_model.bin files are refused)")
    try:
        values = {"dense_in": int(config["in_features"]), "dense_out": int(config["out_features"]),
                  "dense_bias": bool(config.get("bias", True)), "dense_activation": activation}
    except (KeyError, TypeError, ValueError) as err:
        raise ConvertError(f"{path}: in_features/out_features missing or not integers "
                           f"({err!r})") from None
    return values, {weights: DENSE_SOURCE_PREFIX}


SPEC = FamilySpec(
    name="bert", task="embed", hf_model_types=("bert",), config=Config, model=Model,
    weight_rules=weight_rules, activation_bytes=activation_memory.encoder_bytes,
    # BertModel checkpoints name tensors bare; BertFor* heads prefix the encoder with `bert.`.
    source_prefixes=("", "bert."),
    # The original TF-converted checkpoints (bert-base-uncased) name LayerNorm gamma/beta.
    source_aliases=(("LayerNorm.weight", "LayerNorm.gamma"), ("LayerNorm.bias", "LayerNorm.beta")),
    # Source tensors a converter may see but that the embedding pipeline does not use, matched
    # after a prefix is removed (so `bert.pooler.*` is ignored too): the pooler, the MLM/NSP
    # heads of BertForPreTraining, and task heads (classifier, QA).
    ignored_source_weights=(r"^pooler\.", r"position_ids$", r"^cls\.", r"^classifier\.",
                            r"^qa_outputs\."),
    metadata_files=("sentence_bert_config.json", "modules.json"),
    preprocessing_files=TOKENIZER_FILES, read_extra_sources=extra_sources,
    quantized_weights={"blocks.wq_dnh": (0,), "blocks.wk_dnh": (0,), "blocks.wv_dnh": (0,),
                       "blocks.wo_nhd": (0, 1), "blocks.wi_df": (0,), "blocks.wm_fd": (0,)})
