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
              cached_mask_bts=None, *, scale: float | None = None,
              soft_cap: float | None = None) -> tuple[jax.Array, KVCache]:
    """Attention of t new queries over t new keys and, optionally, s cached keys.

    Takes the projections as their matmuls produce them ([b, t, heads, h]) and returns the
    output [b, t, n, h] in q's dtype plus the new keys/values in cache layout [b, k, t, h]
    (callers without a cache ignore them, and XLA drops their transposes). `cached` holds
    one layer's cache ([b, k, s, h] each), or a `PagedCache` layer (the engine's ragged step:
    b = 1 row of every sequence's tokens, masks None, implied by the pages' metadata: causal
    over each sequence's cached slots and new tokens, within the layer's `window`). Masks
    are boolean, True where a query may attend. The math is the backend's (`Backend.attention`: plain jnp, or a CPU kernel);
    `scale` (default h ** -0.5) and `soft_cap` are its score scale and tanh cap.
    """
    new = KVCache(k_btkh.transpose(0, 2, 1, 3), v_btkh.transpose(0, 2, 1, 3))
    if isinstance(cached, kv_cache.PagedCache):  # the engine's pool: ragged paged attention
        return kv_cache.attend_paged(q_btnh, k_btkh, v_btkh, cached, scale=scale,
                                      soft_cap=soft_cap), new
    past = None
    if cached is not None:
        dt = q_btnh.dtype
        past = (kv_cache.load(cached.k_lbksh, dt), kv_cache.load(cached.v_lbksh, dt),
                cached_mask_bts)
    out_btnh = backends.current().attention(q_btnh, k_btkh, v_btkh, mask_btt, past,
                                            scale=scale, soft_cap=soft_cap)
    return out_btnh, new


def window_masks(window: int, positions_bt, mask_btt, cache_positions_bs=None,
                 cache_mask_bts=None):
    """The masks of a sliding-window layer: (mask [b, t, t], cache mask [b, t, s] or None),
    the given ones narrowed to keys at positions > query position - `window` (transformers'
    `sliding_window_overlay`). Positions are int [b, t] for the new tokens and [b, s] for
    the cache slots."""
    q_bt1 = positions_bt[:, :, None]
    near_btt = mask_btt & (q_bt1 - positions_bt[:, None, :] < window)
    if cache_mask_bts is None:
        return near_btt, None
    return near_btt, cache_mask_bts & (q_bt1 - cache_positions_bs[:, None, :] < window)
