"""The decoder layer every decoder family composes: pre-norm causal self-attention over the
KV cache, then a pre-norm MLP, each added to the residual stream.

Shape legend as in `layers`: b batch, t new tokens, s cache slots, d model, n heads,
k kv heads, h head dim, f mlp, l layers, r rotary frequencies.

What tells the families' layers apart is data (`DecoderLayout`), not subclasses: GPT-2 is
LayerNorm + biases + a plain GELU MLP without rotary; Llama is RMSNorm + rotary + a gated
MLP with optional biases. A new switch (q/k norms, post-norms, soft-capping) is one more
field, read in one place below. Parameter names are the checkpoint's: `blocks.wq_dnh`,
`blocks.attn_norm_scale_d`, ... (the CPU backend packs every stacked `blocks.w*` by its axes).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxaccel.models import layers
from jaxaccel.models import moe as moe_layer
from jaxaccel.models import rotary as rope
from jaxaccel.models.attention import attention
from jaxaccel.models.kv_cache import KVCache, PagedCache
from jaxaccel.parallel import sharding as ax

NORMS = ("layer", "rms")
NO_WINDOW = 2**30  # a window wider than any sequence: a global layer in a traced-window scan
# Weight-only quantization (`FamilySpec.quantized_weights`): the layer's matmul weights ->
# their contraction axes.
_QUANTIZED_ATTENTION = {"blocks.wq_dnh": (0,), "blocks.wk_dkh": (0,), "blocks.wv_dkh": (0,),
                        "blocks.wo_nhd": (0, 1)}
_QUANTIZED_MLP = {True: {"blocks.wg_df": (0,), "blocks.wu_df": (0,), "blocks.wm_fd": (0,)},
                  False: {"blocks.wi_df": (0,), "blocks.wm_fd": (0,)}}


def quantized_weights(gated_mlp: bool) -> dict[str, tuple[int, ...]]:
    """The stacked matmul weights of a decoder layer with or without a gated MLP."""
    return {**_QUANTIZED_ATTENTION, **_QUANTIZED_MLP[gated_mlp]}


@dataclasses.dataclass(frozen=True)
class DecoderLayout:
    """The switches of one decoder layer (hashable: it is static model metadata)."""

    norm: str  # "layer": LayerNorm (scale and bias); "rms": RMSNorm (scale only)
    norm_eps: float
    activation: str  # a `layers.ACTIVATIONS` name
    gated_mlp: bool  # act(y wg) * (y wu) -> wm (SwiGLU); else act(y wi) -> wm
    rotary: bool  # rotate q and k by position (the model passes cos/sin tables)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Per-head norms (the layout's norm over h, scale [h]) of queries and keys before rotary
    # (Qwen3, Gemma 3).
    qk_norm: bool = False
    # A mixture of experts in place of the MLP (`moe.MoELayout`); None: the dense MLP above.
    moe: moe_layer.MoELayout | None = None
    # RMSNorm scale (norm_offset + w): Gemma stores w around 0 and scales by (1 + w).
    norm_offset: float = 0.0
    # Norms after attention and after the MLP too, before each is added to the residual
    # (Gemma 2 and 3: pre- and post-norms around both).
    sandwich_norms: bool = False
    # Attention score scale (None: h ** -0.5; Gemma: query_pre_attn_scalar ** -0.5) and the
    # tanh soft cap of the scores (None: none; Gemma 2).
    attn_scale: float | None = None
    attn_soft_cap: float | None = None

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.qk_norm and self.norm != "rms":
            raise ValueError("qk_norm needs norm='rms' (the per-head norms have no bias)")


def norm(layout: DecoderLayout, x_btd, scale_d, bias_d):
    """The layout's norm of x; `bias_d` is None for RMSNorm."""
    if layout.norm == "rms":
        scale = scale_d[...]
        if layout.norm_offset:  # in float32, as Gemma's reference computes (1 + w)
            scale = scale.astype(jnp.float32) + layout.norm_offset
        return layers.rms_norm(x_btd, scale, layout.norm_eps)
    return layers.layer_norm(x_btd, scale_d[...], bias_d[...], layout.norm_eps)


class DecoderBlock(nnx.Module):
    """One pre-norm decoder layer; built stacked over `num_layers` (leading layers axis).

    `cfg` gives the sizes: hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size.
    """

    def __init__(self, cfg, layout: DecoderLayout, *, dtype, rngs: nnx.Rngs,
                 num_layers: int | None = None):
        self.layout = layout
        p = lambda shape, axes, init=layers.normal_init(): layers.make_param(  # noqa: E731
            rngs, shape, axes, dtype, init, num_layers)
        self.attn_norm_scale_d, self.attn_norm_bias_d = self._norm_params(cfg, p)
        self._attention_params(cfg, p)
        self.mlp_norm_scale_d, self.mlp_norm_bias_d = self._norm_params(cfg, p)
        if layout.moe is not None:
            self.moe = moe_layer.MoE(cfg.hidden_size, layout.moe, dtype=dtype, rngs=rngs,
                                     num_layers=num_layers)
        else:
            self._mlp_params(cfg, p)
        if layout.sandwich_norms:
            self.attn_post_norm_scale_d, self.attn_post_norm_bias_d = self._norm_params(cfg, p)
            self.mlp_post_norm_scale_d, self.mlp_post_norm_bias_d = self._norm_params(cfg, p)

    def _norm_params(self, cfg, p):
        """(scale, bias or None): LayerNorm has a bias, RMSNorm none."""
        d = cfg.hidden_size
        scale = p((d,), (ax.EMBED,), layers.ones_init)
        bias = p((d,), (ax.EMBED,), layers.zeros_init) if self.layout.norm == "layer" else None
        return scale, bias

    def _attention_params(self, cfg, p):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        zero, bias = layers.zeros_init, self.layout.qkv_bias
        self.wq_dnh = p((d, n, h), (ax.EMBED, ax.HEADS, ax.HEAD_DIM))
        self.wk_dkh = p((d, k, h), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM))
        self.wv_dkh = p((d, k, h), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM))
        self.wo_nhd = p((n, h, d), (ax.HEADS, ax.HEAD_DIM, ax.EMBED))
        self.bq_nh = p((n, h), (ax.HEADS, ax.HEAD_DIM), zero) if bias else None
        self.bk_kh = p((k, h), (ax.KV_HEADS, ax.HEAD_DIM), zero) if bias else None
        self.bv_kh = p((k, h), (ax.KV_HEADS, ax.HEAD_DIM), zero) if bias else None
        self.bo_d = p((d,), (ax.EMBED,), zero) if self.layout.o_bias else None
        qk_norm = self.layout.qk_norm
        self.q_norm_scale_h = p((h,), (ax.HEAD_DIM,), layers.ones_init) if qk_norm else None
        self.k_norm_scale_h = p((h,), (ax.HEAD_DIM,), layers.ones_init) if qk_norm else None

    def _mlp_params(self, cfg, p):
        d, f = cfg.hidden_size, cfg.intermediate_size
        zero, bias = layers.zeros_init, self.layout.mlp_bias
        if self.layout.gated_mlp:
            self.wg_df = p((d, f), (ax.EMBED, ax.MLP))
            self.wu_df = p((d, f), (ax.EMBED, ax.MLP))
            self.bg_f = p((f,), (ax.MLP,), zero) if bias else None
            self.bu_f = p((f,), (ax.MLP,), zero) if bias else None
        else:
            self.wi_df = p((d, f), (ax.EMBED, ax.MLP))
            self.bi_f = p((f,), (ax.MLP,), zero) if bias else None
        self.wm_fd = p((f, d), (ax.MLP, ax.EMBED))
        self.bm_d = p((d,), (ax.EMBED,), zero) if bias else None

    def __call__(self, x_btd, rotary, mask_btt, cached, cached_mask_bts):
        """(x_btd after this layer, its new keys/values [b, k, t, h]); `rotary` is the
        (cos_btr, sin_btr) tables, or None for a layout without rotary."""
        y_btd = norm(self.layout, x_btd, self.attn_norm_scale_d, self.attn_norm_bias_d)
        a_btd, new_kv = self.self_attention(y_btd, rotary, mask_btt, cached, cached_mask_bts)
        if self.layout.sandwich_norms:
            a_btd = norm(self.layout, a_btd, self.attn_post_norm_scale_d,
                         self.attn_post_norm_bias_d)
        x_btd = x_btd + a_btd
        y_btd = norm(self.layout, x_btd, self.mlp_norm_scale_d, self.mlp_norm_bias_d)
        m_btd = self.mlp(y_btd)
        if self.layout.sandwich_norms:
            m_btd = norm(self.layout, m_btd, self.mlp_post_norm_scale_d, self.mlp_post_norm_bias_d)
        return x_btd + m_btd, new_kv

    def self_attention(self, y_btd, rotary, mask_btt, cached, cached_mask_bts):
        """Projections -> optional rotary -> attention over the cache -> output projection."""
        q_btnh = layers.add_bias(layers.heads_in(y_btd, self.wq_dnh[...]), self.bq_nh)
        k_btkh = layers.add_bias(layers.heads_in(y_btd, self.wk_dkh[...]), self.bk_kh)
        v_btkh = layers.add_bias(layers.heads_in(y_btd, self.wv_dkh[...]), self.bv_kh)
        if self.layout.qk_norm:
            q_btnh = norm(self.layout, q_btnh, self.q_norm_scale_h, None)
            k_btkh = norm(self.layout, k_btkh, self.k_norm_scale_h, None)
        if self.layout.rotary:
            q_btnh, k_btkh = rope.apply(q_btnh, *rotary), rope.apply(k_btkh, *rotary)
        a_btnh, new_kv = attention(q_btnh, k_btkh, v_btkh, mask_btt, cached, cached_mask_bts,
                                   scale=self.layout.attn_scale,
                                   soft_cap=self.layout.attn_soft_cap)
        return layers.add_bias(layers.heads_out(a_btnh, self.wo_nhd[...]), self.bo_d), new_kv

    def mlp(self, y_btd):
        """The feed-forward: gated (act(y wg) * y wu) or plain (act(y wi)), then wm; or the
        layout's mixture of experts."""
        if self.layout.moe is not None:
            return self.moe(y_btd)
        act = layers.activation(self.layout.activation)
        if self.layout.gated_mlp:
            g_btf = layers.add_bias(layers.matmul(y_btd, self.wg_df[...]), self.bg_f)
            u_btf = layers.add_bias(layers.matmul(y_btd, self.wu_df[...]), self.bu_f)
            m_btf = act(g_btf) * u_btf
        else:
            m_btf = act(layers.add_bias(layers.matmul(y_btd, self.wi_df[...]), self.bi_f))
        return layers.add_bias(layers.matmul(m_btf, self.wm_fd[...]), self.bm_d)


class LocalLayers(NamedTuple):
    """What sliding-window ("local") layers use instead of the global layers' inputs.

    `windowed_lb` [l, b] bool says which layers are local; it rides in the layer scan's xs
    (broadcast over the batch, so a pipeline can split it like the cache), so the stack of
    mixed local and global layers stays one scan. The masks are the global ones narrowed to
    the window (None both in the engine's ragged step, whose paged attention applies
    `window`); `rotary` is the local layers' own (cos, sin) tables (Gemma 3's separate
    base), or None for the global tables.
    """

    windowed_lb: jax.Array
    mask_btt: jax.Array | None
    cache_mask_bts: jax.Array | None
    rotary: tuple | None
    window: int | None = None  # the window (tokens), for attention that applies it itself


def run_layers(blocks: DecoderBlock, x_btd, rotary, mask_btt, cache: KVCache | None,
               cache_mask_bts, local: LocalLayers | None = None):
    """Every stacked layer of `blocks` over x: (x_btd, new keys/values [l, b, k, t, h]).

    Batch-dependent inputs ride in the carry ([b, ...]) and the cache in xs ([l, b, ...]),
    never in the body's closure, so `jaxaccel.parallel.pipeline` can split them into
    microbatches. `rotary` (None without rotary) rides in the carry too. With `local`, each
    layer picks its masks (and rotary tables) by its `windowed_lb` flag.
    """
    if local is None:
        def body(block, carry, cached):
            x_btd, rotary, mask_btt, cache_mask_bts = carry
            x_btd, new_kv = block(x_btd, rotary, mask_btt, cached, cache_mask_bts)
            return (x_btd, rotary, mask_btt, cache_mask_bts), new_kv

        (x_btd, *_), new_kv = layers.scan_layers(
            blocks, (x_btd, rotary, mask_btt, cache_mask_bts), body, cache)
        return x_btd, new_kv

    def local_body(block, carry, xs):
        x_btd, rotary, mask_btt, cache_mask_bts, local = carry
        cached, windowed_b = xs
        if isinstance(cached, PagedCache):
            # The engine's ragged step has no masks: paged attention applies the window,
            # a traced one (NO_WINDOW on global layers).
            layer_window = jnp.where(windowed_b[0], window, NO_WINDOW).astype(jnp.int32)
            cached = PagedCache(*(x._replace(window=layer_window) for x in cached))
        pick = lambda near, far: None if near is None else jnp.where(windowed_b[0], near, far)  # noqa: E731
        x_btd, new_kv = block(
            x_btd, rotary if local.rotary is None else jax.tree.map(pick, local.rotary, rotary),
            pick(local.mask_btt, mask_btt), cached,
            None if cache_mask_bts is None else pick(local.cache_mask_bts, cache_mask_bts))
        return (x_btd, rotary, mask_btt, cache_mask_bts, local), new_kv

    window = local.window
    carry = (x_btd, rotary, mask_btt, cache_mask_bts,
             local._replace(windowed_lb=None, window=None))
    (x_btd, *_), new_kv = layers.scan_layers(blocks, carry, local_body,
                                             (cache, local.windowed_lb))
    return x_btd, new_kv
