"""Softmax attention, the one entry every family uses: encoder self-attention, decoder
prefill, and decode steps over a KV cache; the math is `Backend.attention`.

Shape legend as in `jaxaccel.models.layers`: b batch, t new queries/keys, s cached slots,
n query heads, k kv heads (n % k == 0), g = n / k query heads per kv head, h head dim,
r = t * g query rows per kv head.
"""

from __future__ import annotations

import jax

from jaxaccel import backends
from jaxaccel.models import kv_cache
from jaxaccel.models.kv_cache import KVCache


def attention(q_btnh, k_btkh, v_btkh, mask_btt, cached: KVCache | None = None,
              cached_mask_bts=None) -> tuple[jax.Array, KVCache]:
    """Attention of t new queries over t new keys and, optionally, s cached keys.

    Takes the projections as their matmuls produce them ([b, t, heads, h]) and returns the
    output [b, t, n, h] in q's dtype plus the new keys/values in cache layout [b, k, t, h]
    (callers without a cache ignore them, and XLA drops their transposes). `cached` holds
    one layer's cache ([b, k, s, h] each), or a `PagedCache` layer (the engine's pages: the
    masks are then implied, causal over each row's cached slots and new tokens). Masks are
    boolean, True where a query may attend.
    The math is the backend's (`Backend.attention`: plain jnp, or a CPU kernel).
    """
    new = KVCache(k_btkh.transpose(0, 2, 1, 3), v_btkh.transpose(0, 2, 1, 3))
    if isinstance(cached, kv_cache.PagedCache):  # the engine's pool: ragged paged attention
        return kv_cache.attend_paged(q_btnh, k_btkh, v_btkh, cached), new
    past = None
    if cached is not None:
        dt = q_btnh.dtype
        past = (kv_cache.load(cached.k_lbksh, dt), kv_cache.load(cached.v_lbksh, dt),
                cached_mask_bts)
    out_btnh = backends.current().attention(q_btnh, k_btkh, v_btkh, mask_btt, past)
    return out_btnh, new
