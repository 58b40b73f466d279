"""The TPU backend: plain XLA (`Backend`) except for paged attention, which runs jax's own
ragged paged attention kernel (`jax.experimental.pallas.ops.tpu.ragged_paged_attention`,
Pallas/Mosaic: a `tpu_custom_call` in the program).

The kernel reads every key from its combined pages [P, c, 2k, h] (keys and values interleaved
per head); the engine's pools are two [P, k, c, h] arrays and its fresh keys are not written
yet (`jaxaccel.backends.paged`). So each layer's pools are converted into the kernel's layout
with the step's fresh keys scattered in: one pass over the layer's pool, in the fusion that
copies the layer out of the scanned stack for the custom call anyway. A pool kept in the
kernel's layout (and written by the kernel, as tpu-inference's RPA v3 does) is the next step.

Programs over several devices stay plain XLA: Mosaic kernels cannot be partitioned
automatically (a `shard_map` over kv heads is the next step).

Head dims below a multiple of 128 (GPT-2's 64) are zero-padded to it, as tpu-inference does:
the kernel tiles the head dim by TPU lanes.

Block sizes: jax's tuned table where jax can see the TPU (`get_tuned_block_sizes`), else
(a program exported for `tpu` from another host) jax's untuned defaults, which also avoid the
table's "TPU version must be 4 or higher" on a host without a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import ragged_paged_attention as rpa
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa_kernel

from jaxaccel.backends import paged
from jaxaccel.backends.base import Backend

# jax's defaults when the table has no entry: kv pages and queries per block.
_DEFAULT_BLOCKS = (128, 32)
_LANES = 128  # the kernel's head dim must be a multiple of this


class TpuBackend(Backend):
    name = "tpu"

    def __init__(self, kernels: bool = True):
        # A Pallas kernel is a custom call that XLA's SPMD partitioner cannot split (Mosaic
        # refuses outright): programs over several devices stay plain XLA.
        self.kernels = kernels

    def for_layout(self, single_device: bool) -> TpuBackend:
        return backend() if single_device else _sharded_backend()

    def paged_attention(self, q_tnh, k_tkh, v_tkh, k_pages_pkch, v_pages_pkch, kv_lens,
                        page_indices, cu_q_lens, num_seqs, *, sm_scale: float,
                        sliding_window: int | None = None, soft_cap: float | None = None,
                        max_q_len: int | None = None) -> jax.Array:
        """jax's ragged paged attention on one device where it takes the head layout (see
        `supported`), else plain XLA."""
        if not (self.kernels and supported(q_tnh, k_pages_pkch)
                and paged.static_window(sliding_window)):
            return super().paged_attention(
                q_tnh, k_tkh, v_tkh, k_pages_pkch, v_pages_pkch, kv_lens, page_indices,
                cu_q_lens, num_seqs, sm_scale=sm_scale, sliding_window=sliding_window,
                soft_cap=soft_cap, max_q_len=max_q_len)
        dt, h = q_tnh.dtype, q_tnh.shape[-1]
        kv_pages = combined_pages(k_tkh, v_tkh, self.cache_load(k_pages_pkch, dt),
                                  self.cache_load(v_pages_pkch, dt), kv_lens, page_indices,
                                  cu_q_lens, num_seqs)
        q_tnh = _pad_lanes(q_tnh)
        kv_blocks, q_blocks = block_sizes(q_tnh, kv_pages, page_indices.shape[1])
        out_tnh = rpa.ragged_paged_attention(
            q_tnh, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
            sliding_window=sliding_window, soft_cap=soft_cap,
            num_kv_pages_per_block=kv_blocks, num_queries_per_block=q_blocks)
        return out_tnh[..., :h]


def supported(q_tnh, k_pages_pkch) -> bool:
    """Whether jax's kernel takes this layout: float32 or bf16, and its combined kv heads
    (2k) tile a TPU register (2k / packing in 1, 2, 4, 8 or a multiple of 8; packing 2 for
    bf16), the kernel's own condition (`get_min_heads_per_blk`)."""
    dt = jnp.dtype(q_tnh.dtype)
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return False
    combined, packing = 2 * k_pages_pkch.shape[1], 4 // dt.itemsize
    tiles = combined // packing
    return combined % packing == 0 and (tiles in (1, 2, 4, 8) or tiles % 8 == 0)


def combined_pages(k_tkh, v_tkh, k_pages_pkch, v_pages_pkch, kv_lens, page_indices, cu_q_lens,
                   num_seqs) -> jax.Array:
    """The kernel's kv pages [P, c, 2k, h'] (head 2i keys, 2i+1 values of kv head i; h' the
    head dim padded to 128 lanes) holding the cached slots and, at their own slots, the
    step's fresh keys/values."""
    pages, kv_heads, c, h = k_pages_pkch.shape
    kv = jnp.stack([k_pages_pkch, v_pages_pkch], axis=2)  # [P, k, 2, c, h]
    kv_pages = kv.transpose(0, 3, 1, 2, 4).reshape(pages, c, 2 * kv_heads, h)
    page_t, slot_t = paged.fresh_slots(kv_lens, page_indices, cu_q_lens, num_seqs,
                                       k_tkh.shape[0], c, pages)
    fresh_tmh = jnp.stack([k_tkh, v_tkh], axis=2).reshape(k_tkh.shape[0], 2 * kv_heads, h)
    kv_pages = kv_pages.at[page_t, slot_t].set(fresh_tmh.astype(kv_pages.dtype), mode="drop")
    return _pad_lanes(kv_pages)


def _pad_lanes(x):
    """`x` with its head dim zero-padded to a multiple of 128 (the kernel's lane tiling;
    zeros add nothing to q.k, and the output's padded lanes are cut off)."""
    pad = -x.shape[-1] % _LANES
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x


def block_sizes(q_tnh, kv_pages, pages_per_seq: int) -> tuple[int, int]:
    """(kv pages, queries) per kernel block: jax's tuned table on a TPU, else its defaults."""
    tokens, n, h = q_tnh.shape
    _, c, combined, _ = kv_pages.shape
    q_heads, kv_heads = rpa_kernel.get_min_heads_per_blk(n, combined, q_tnh.dtype,
                                                         kv_pages.dtype)
    try:
        return rpa.get_tuned_block_sizes(q_tnh.dtype, kv_pages.dtype, q_heads, kv_heads // 2,
                                         h, c, tokens, pages_per_seq)
    except (NotImplementedError, AssertionError):  # no TPU in this process: jax's defaults
        return min(pages_per_seq, _DEFAULT_BLOCKS[0]), min(tokens, _DEFAULT_BLOCKS[1])


@functools.cache
def backend() -> TpuBackend:
    return TpuBackend()


@functools.cache
def _sharded_backend() -> TpuBackend:
    return TpuBackend(kernels=False)
