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


def storage_dtype(dtype):
    """bfloat16 caches are stored as their uint16 bits: XLA:CPU has no bfloat16
    dynamic-update-slice and would convert the whole cache to float32 and back every step."""
    return jnp.uint16 if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def _store(x, storage):
    if storage == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(storage)


def load(x):
    """Cache contents as compute values (bfloat16 from their stored uint16 bits)."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def empty(num_layers: int, batch: int, kv_heads: int, slots: int, head_dim: int,
          dtype) -> KVCache:
    shape = (num_layers, batch, kv_heads, slots, head_dim)
    storage = storage_dtype(dtype)
    return KVCache(jnp.zeros(shape, storage), jnp.zeros(shape, storage))


def write(cache: KVCache, new: KVCache, slot) -> KVCache:
    """Store new keys/values [l, b, k, t, h] at slots slot..slot+t-1 of every row.

    One dynamic_update_slice on the whole cache, so a donated cache is updated in place.
    """
    start = (0, 0, 0, slot, 0)
    return KVCache(*(jax.lax.dynamic_update_slice(old, _store(x, old.dtype), start)
                     for old, x in zip(cache, new)))


def attend(q_btnh, k_btkh, v_btkh, mask_btt, cached: KVCache | None = None,
           cached_mask_bts=None) -> tuple[jax.Array, KVCache]:
    """Softmax attention of t new queries over t new keys and, optionally, s cached keys.

    Takes the projections as their matmuls produce them ([b, t, heads, h]) and returns the
    attention output [b, t, n, h] plus the new keys/values in cache layout [b, k, t, h].
    `cached` holds one layer's cache ([b, k, s, h] each). Scores over the cache and over the
    new keys are concatenated before one float32 softmax, so the cache is only read, never
    copied to append the new keys. Masks are boolean, True where a query may attend.
    """
    # Fence the head transposes off the projection matmuls: otherwise XLA folds each
    # transpose into its matmul by swapping the operands, which turns every weight into a
    # transposed copy per layer and step (measured: decode 5-10x slower on CPU).
    q_btnh, k_btkh, v_btkh = jax.lax.optimization_barrier((q_btnh, k_btkh, v_btkh))
    new = KVCache(k_btkh.transpose(0, 2, 1, 3), v_btkh.transpose(0, 2, 1, 3))
    b, t, n, h = q_btnh.shape
    kv_heads = k_btkh.shape[2]
    groups = n // kv_heads
    dt = q_btnh.dtype
    # Rows r enumerate (t, g): each KV head's queries form one [t*g, h] matrix.
    q_bkrh = q_btnh.reshape(b, t, kv_heads, groups, h).transpose(0, 2, 1, 3, 4).reshape(
        b, kv_heads, t * groups, h)
    keys, values, masks = [new.k_lbksh], [new.v_lbksh], [mask_btt]
    if cached is not None:
        keys.insert(0, load(cached.k_lbksh))
        values.insert(0, load(cached.v_lbksh))
        masks.insert(0, cached_mask_bts)
    scores = [jnp.einsum("bkrh,bksh->bkrs", q_bkrh, k.astype(dt),
                         preferred_element_type=jnp.float32) for k in keys]
    scores_bkrs = jnp.concatenate(scores, axis=-1) * (h ** -0.5)
    mask_bts = jnp.concatenate(masks, axis=-1)
    mask_b1rs = jnp.repeat(mask_bts[:, None], groups, axis=2)
    scores_bkrs = jnp.where(mask_b1rs, scores_bkrs, jnp.finfo(jnp.float32).min)
    probs_bkrs = jax.nn.softmax(scores_bkrs, axis=-1).astype(dt)
    out_bkrh, start = 0.0, 0
    for v in values:
        s = v.shape[2]
        out_bkrh += jnp.einsum("bkrs,bksh->bkrh", probs_bkrs[..., start:start + s], v.astype(dt),
                               preferred_element_type=jnp.float32)
        start += s
    out_btkgh = out_bkrh.reshape(b, kv_heads, t, groups, h).transpose(0, 2, 1, 3, 4)
    out_btnh = out_btkgh.reshape(b, t, n, h)
    return jax.lax.optimization_barrier(out_btnh.astype(dt)), new
