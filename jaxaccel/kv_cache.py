"""The decoder KV cache and the attention that reads it.

Shape legend as in `jaxaccel.models.layers`, plus s for cache slots. The cache holds, per
layer, keys and values as [l, b, k, s, h]: the leading layers axis is what `scan_layers`
iterates and pipeline stages split, and heads before slots make each (b, k) block of keys a
contiguous [s, h] matrix, so attention is a plain batched matmul without a transpose.

Prompts are left-padded so that every row writes its next token into the same slot; a row's
padding is masked out and its positions start at 0 after the padding (see `generate`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxaccel import sharding as ax

# Slots are never sharded: a decode step writes one slot, which would then live on one device.
CACHE_AXES = (ax.LAYERS, ax.BATCH, ax.KV_HEADS, None, ax.HEAD_DIM)


class KVCache(NamedTuple):
    k_lbksh: jax.Array
    v_lbksh: jax.Array


def empty(num_layers: int, batch: int, kv_heads: int, slots: int, head_dim: int,
          dtype) -> KVCache:
    shape = (num_layers, batch, kv_heads, slots, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def write(cache: KVCache, new: KVCache, slot) -> KVCache:
    """Store new keys/values [l, b, k, t, h] at slots slot..slot+t-1 of every row.

    One dynamic_update_slice on the whole cache, so a donated cache is updated in place.
    """
    start = (0, 0, 0, slot, 0)
    return KVCache(jax.lax.dynamic_update_slice(cache.k_lbksh, new.k_lbksh.astype(cache.k_lbksh.dtype), start),
                   jax.lax.dynamic_update_slice(cache.v_lbksh, new.v_lbksh.astype(cache.v_lbksh.dtype), start))


def attend(q_btnh, k_bkth, v_bkth, mask_btt, cached: KVCache | None = None,
           cached_mask_bts=None) -> jax.Array:
    """Softmax attention of t new queries over t new keys and, optionally, s cached keys.

    `cached` holds one layer's cache ([b, k, s, h] each). Scores over the cache and over the
    new keys are concatenated before one float32 softmax, so the cache is only read, never
    copied to append the new keys. Masks are boolean, True where a query may attend.
    """
    b, t, n, h = q_btnh.shape
    kv_heads = k_bkth.shape[1]
    dt = q_btnh.dtype
    q_bktgh = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 1, 3, 4)
    q_bkgh = q_bktgh.reshape(b, kv_heads, t * (n // kv_heads), h)  # rows ordered (t, g)
    keys, values, masks = [k_bkth], [v_bkth], [mask_btt]
    if cached is not None:
        keys.insert(0, cached.k_lbksh)
        values.insert(0, cached.v_lbksh)
        masks.insert(0, cached_mask_bts)
    scores = [jnp.einsum("bkrh,bksh->bkrs", q_bkgh, k.astype(dt), preferred_element_type=jnp.float32)
              for k in keys]
    scores_bkrs = jnp.concatenate(scores, axis=-1) * (h ** -0.5)
    mask_bts = jnp.concatenate(masks, axis=-1)
    mask_bkrs = jnp.repeat(mask_bts[:, None], n // kv_heads, axis=2).reshape(b, 1, -1, mask_bts.shape[-1])
    scores_bkrs = jnp.where(mask_bkrs, scores_bkrs, jnp.finfo(jnp.float32).min)
    probs_bkrs = jax.nn.softmax(scores_bkrs, axis=-1).astype(dt)
    out_bkrh = jnp.zeros((b, kv_heads, q_bkgh.shape[2], h), jnp.float32)
    start = 0
    for v in values:
        s = v.shape[2]
        out_bkrh += jnp.einsum("bkrs,bksh->bkrh", probs_bkrs[..., start:start + s], v.astype(dt),
                               preferred_element_type=jnp.float32)
        start += s
    out = out_bkrh.reshape(b, kv_heads, t, n // kv_heads, h).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, n, h).astype(dt)
