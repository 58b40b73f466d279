"""Softmax attention, the one implementation every family uses: encoder self-attention,
decoder prefill, and decode steps over a KV cache.

Shape legend as in `jaxaccel.models.layers`: b batch, t new queries/keys, s cached slots,
n query heads, k kv heads (n % k == 0), g = n / k query heads per kv head, h head dim,
r = t * g query rows per kv head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxaccel.models import kv_cache
from jaxaccel.models.kv_cache import KVCache


def attention(q_btnh, k_btkh, v_btkh, mask_btt, cached: KVCache | None = None,
              cached_mask_bts=None) -> tuple[jax.Array, KVCache]:
    """Attention of t new queries over t new keys and, optionally, s cached keys.

    Takes the projections as their matmuls produce them ([b, t, heads, h]) and returns the
    output [b, t, n, h] in q's dtype plus the new keys/values in cache layout [b, k, t, h]
    (callers without a cache ignore them, and XLA drops their transposes). `cached` holds
    one layer's cache ([b, k, s, h] each). Scores over the cache and over the new keys are
    concatenated before one float32 softmax, so the cache is only read, never copied to
    append the new keys. Masks are boolean, True where a query may attend.
    """
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
        keys.insert(0, kv_cache.load(cached.k_lbksh, dt))
        values.insert(0, kv_cache.load(cached.v_lbksh, dt))
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
    return out_btnh.astype(dt), new
