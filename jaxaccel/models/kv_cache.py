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

from typing import NamedTuple

import jax

from jaxaccel import backends
from jaxaccel.backends.base import KVCache  # noqa: F401  (the cache's type: backends scan it)
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


class PagedLayer(NamedTuple):
    """One layer's keys or values held in pages [p, k, c, h] (c slots per page; a scan
    slice of the generation engine's pool [l, p, k, c, h]) with the block tables [b, w] that
    list each row's pages in order. `load` reads it as a dense [b, k, w * c, h], one layer
    at a time, so the dense copy never spans the layer stack."""

    pages_pkch: jax.Array
    table_bw: jax.Array

    def dense(self) -> jax.Array:
        b, w = self.table_bw.shape
        _, k, c, h = self.pages_pkch.shape
        return self.pages_pkch[self.table_bw].transpose(0, 2, 1, 3, 4).reshape(b, k, w * c, h)


class PagedCache(NamedTuple):
    """A cache whose layers are `PagedLayer`s (same field names as KVCache; a type of its
    own, so backends that read a dense KVCache in place leave it alone)."""

    k_lbksh: PagedLayer
    v_lbksh: PagedLayer


def load(x, dtype) -> jax.Array:
    """One layer's cached keys or values [b, k, s, h] as compute values in `dtype` (a
    `PagedLayer` is gathered into that dense layout first)."""
    if isinstance(x, PagedLayer):
        x = x.dense()
    return backends.current().cache_load(x, dtype)
