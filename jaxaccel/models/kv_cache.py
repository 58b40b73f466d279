"""The decoder KV cache: layout, allocation and the per-step write.

Shape legend as in `jaxaccel.models.layers`, plus s for cache slots. The cache holds, per
layer, keys and values as [l, b, k, s, h]: the leading layers axis is what `scan_layers`
iterates and pipeline stages split, and heads before slots make each (b, k) block of keys a
contiguous [s, h] matrix, so attention is a plain batched matmul without a transpose.

Prompts are left-padded so that every row writes its next token into the same slot; a row's
padding is masked out and its positions start at 0 after the padding (see `generate`).
The storage dtype is the backend's choice (`Backend.cache_storage_dtype`); `load` hands
attention the compute values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxaccel import backends
# The caches' types live with the backends, which scan them.
from jaxaccel.backends.base import KVCache, PagedCache, PagedLayer  # noqa: F401
from jaxaccel.parallel import sharding as ax

# Slots are never sharded: a decode step writes one slot, which would then live on one device.
CACHE_AXES = (ax.LAYERS, ax.BATCH, ax.KV_HEADS, None, ax.HEAD_DIM)


def empty(num_layers: int, batch: int, kv_heads: int, slots: int, head_dim: int,
          dtype) -> KVCache:
    """A zeroed cache [l, b, k, s, h] for compute dtype `dtype` (stored as the backend says)."""
    shape = (num_layers, batch, kv_heads, slots, head_dim)
    storage = backends.current().cache_storage_dtype(dtype)
    return KVCache(jax.numpy.zeros(shape, storage), jax.numpy.zeros(shape, storage))


def write(cache: KVCache, new: KVCache, slot) -> KVCache:
    """Store new keys/values [l, b, k, t, h] at slots slot..slot+t-1 of every row.

    One dynamic_update_slice on the whole cache, so a donated cache is updated in place.
    """
    backend = backends.current()
    start = (0, 0, 0, slot, 0)
    return KVCache(*(jax.lax.dynamic_update_slice(old, backend.cache_store(x, old.dtype), start)
                     for old, x in zip(cache, new)))


def attend_paged(q_btnh, k_btkh, v_btkh, cached: PagedCache, *, scale: float | None = None,
                 sliding_window: int | None = None, soft_cap: float | None = None) -> jax.Array:
    """Attention [1, T, n, h] of a ragged step's T tokens (one row: every sequence's new
    tokens back to back, as `cached`'s metadata says) over each sequence's cached slots in
    pages and, causally, its own new keys, through the backend's ragged paged attention.
    Outputs of padding tokens are zero or unspecified (callers discard them).
    `sliding_window` (or the layers' own `window`) and `soft_cap` as in
    `jaxaccel.backends.paged`; `scale` defaults to h ** -0.5."""
    _, t, n, h = q_btnh.shape
    kv_heads = k_btkh.shape[2]
    keys, values = cached
    seqs = keys.table_bw.shape[0]
    decode = keys.cu_q_lens is None  # one query per sequence
    cu_q_lens = jnp.arange(seqs + 1, dtype=jnp.int32) if decode else keys.cu_q_lens
    window = sliding_window if keys.window is None else keys.window
    out_tnh = backends.current().paged_attention(
        q_btnh.reshape(t, n, h), k_btkh.reshape(t, kv_heads, h), v_btkh.reshape(t, kv_heads, h),
        keys.pages_pkch, values.pages_pkch, keys.kv_lens_b.astype(jnp.int32),
        keys.table_bw.astype(jnp.int32), cu_q_lens.astype(jnp.int32),
        keys.num_seqs.astype(jnp.int32), sm_scale=h ** -0.5 if scale is None else scale,
        sliding_window=window, soft_cap=soft_cap, max_q_len=1 if decode else t)
    return out_tnh.reshape(1, t, n, h)


def load(x, dtype) -> jax.Array:
    """One layer's cached keys or values [b, k, s, h] as compute values in `dtype`."""
    return backends.current().cache_load(x, dtype)
