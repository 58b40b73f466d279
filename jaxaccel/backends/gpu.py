"""The GPU backend: plain XLA (`Backend`) except for decode steps of paged attention, which run
jax's Pallas GPU paged attention kernel (`jax.experimental.pallas.ops.gpu.paged_attention`,
Triton: a `__gpu$xla.gpu.triton` custom call in the program).

That kernel is for decode: one query per sequence, every key read from pages
[k, P, c, h] with per-sequence lengths, no softmax scale (queries are pre-scaled) and no
sliding window. A step whose `max_q_len` is 1 and has no window uses it: the layer's pools
go to the kernel's layout with the step's fresh keys scattered in (one pass over the layer's
pool, as on TPU); prefill chunks and windows stay on plain XLA, as does everything on jax
releases without the kernel (0.12 removed jax's Triton ops) and programs over several devices
(XLA's partitioner would gather a custom call's operands whole).

The mixture-of-experts grouped matmul of a small decode step gathers its rows' experts rather
than going through XLA:GPU's dense rewrite of a ragged dot (`GpuBackend.grouped_matmul`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import qwix

try:  # jax 0.12 dropped its Triton ops, this kernel among them: plain XLA there
    from jax.experimental.pallas.ops.gpu import paged_attention as gpu_paged
except ImportError:
    gpu_paged = None

from jaxaccel.backends import paged
from jaxaccel.backends.base import Backend

_PAGES_PER_BLOCK = 8  # the kernel's default pages per compute block
_K_SPLITS = 16  # its default partitions of a sequence's pages


class GpuBackend(Backend):
    name = "gpu"

    def __init__(self, kernels: bool = True):
        # A Pallas kernel is a custom call that XLA's SPMD partitioner cannot split (Mosaic
        # refuses outright): programs over several devices stay plain XLA.
        self.kernels = kernels

    def for_layout(self, single_device: bool) -> GpuBackend:
        return backend() if single_device else _sharded_backend()

    def paged_attention(self, q_tnh, k_tkh, v_tkh, k_pages_pkch, v_pages_pkch, kv_lens,
                        page_indices, cu_q_lens, num_seqs, *, sm_scale: float,
                        sliding_window: int | None = None, soft_cap: float | None = None,
                        max_q_len: int | None = None) -> jax.Array:
        """The Pallas decode kernel on one device for decode-only steps (one token per
        sequence: max_q_len 1 and T == S) without a window, else plain XLA."""
        tokens, seqs = q_tnh.shape[0], page_indices.shape[0]
        if gpu_paged is None or not self.kernels or max_q_len != 1 or tokens != seqs or sliding_window is not None:
            return super().paged_attention(
                q_tnh, k_tkh, v_tkh, k_pages_pkch, v_pages_pkch, kv_lens, page_indices,
                cu_q_lens, num_seqs, sm_scale=sm_scale, sliding_window=sliding_window,
                soft_cap=soft_cap, max_q_len=max_q_len)
        dt = q_tnh.dtype
        k_pages, v_pages = (self.cache_load(x, dt) for x in (k_pages_pkch, v_pages_pkch))
        pages, kv_heads, c, h = k_pages.shape
        page_t, slot_t = paged.fresh_slots(kv_lens, page_indices, cu_q_lens, num_seqs,
                                           tokens, c, pages)

        def with_fresh(pages_pkch, x_tkh):  # -> the kernel's [k, P, c, h]
            x_pkch = pages_pkch.at[page_t, :, slot_t].set(x_tkh.astype(dt), mode="drop")
            return x_pkch.transpose(1, 0, 2, 3)

        width = page_indices.shape[1]
        # The kernel wants the table split evenly, and each split into whole blocks.
        k_splits = math.gcd(width, _K_SPLITS)
        per_split = width // k_splits
        # Sequence s's query is token cu_q_lens[s] (tokens == seqs, one each).
        q_snh = q_tnh[jnp.clip(cu_q_lens[:-1], 0, tokens - 1)] * jnp.asarray(sm_scale, dt)
        out_snh = gpu_paged.paged_attention(
            q_snh, with_fresh(k_pages, k_tkh), with_fresh(v_pages, v_tkh),
            page_indices, kv_lens.astype(jnp.int32), k_splits=k_splits,
            pages_per_compute_block=math.gcd(per_split, _PAGES_PER_BLOCK),
            attn_logits_soft_cap=soft_cap)
        live_s = jnp.arange(seqs) < num_seqs[0]
        target_s = jnp.where(live_s, cu_q_lens[:-1], tokens)
        return jnp.zeros_like(q_tnh).at[target_s].set(out_snh.astype(dt), mode="drop")

    def grouped_matmul(self, x_mk, w_gkn, group_sizes_g) -> jax.Array:
        """Fewer rows than groups (a small-batch decode step): each row times its own
        group's weight, gathered ([m, k, n]: the step reads only the experts its tokens
        chose). Else `jax.lax.ragged_dot`, as the base class.

        Why: XLA:GPU (jaxlib 0.10) rewrites a ragged dot into a dense one over zero-padded
        groups unless its cuDNN ragged-dot fusion is switched on
        (`xla_gpu_experimental_use_ragged_dot_fusion`, experimental; reported to find no
        cuDNN plan on SM100). Dense costs every group's weight read for every row: at batch
        1 (2 rows, 8 experts) four times the bytes of the chosen experts. With at least as
        many rows as groups, nearly every expert is read either way."""
        if x_mk.shape[0] >= w_gkn.shape[0]:
            return super().grouped_matmul(x_mk, w_gkn, group_sizes_g)
        if isinstance(w_gkn, qwix.QArray):
            w_gkn = qwix.dequantize(w_gkn)
        ends_g = jnp.cumsum(group_sizes_g)
        row_m = jnp.arange(x_mk.shape[0], dtype=ends_g.dtype)
        group_m = jnp.minimum(jnp.searchsorted(ends_g, row_m, side="right"),
                              w_gkn.shape[0] - 1)
        out_mn = jnp.einsum("mk,mkn->mn", x_mk, w_gkn[group_m].astype(x_mk.dtype),
                            preferred_element_type=jnp.float32)
        return jnp.where((row_m < ends_g[-1])[:, None], out_mn, 0.0).astype(x_mk.dtype)


@functools.cache
def backend() -> GpuBackend:
    return GpuBackend()


@functools.cache
def _sharded_backend() -> GpuBackend:
    return GpuBackend(kernels=False)
