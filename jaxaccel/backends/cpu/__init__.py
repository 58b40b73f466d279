"""The CPU backend: what XLA:CPU needs to run jaxaccel's models at the speed they can.

Everything here was measured on XLA:CPU (scripts/bench_cpu_workarounds.py, each with and
without), is applied only where it helps on the running jax version, and is neither imported
nor traced on any other platform (`jaxaccel.backends.for_platform`):

* Packed bf16 decode weights read by a C++ FFI kernel (`packed`, `packing`, `build`,
  `bf16_matmul.cc`, `huge_pages`): XLA:CPU's bf16 dots read a decode step's weights at
  14-19 GB/s, the kernel at ~47 GB/s (scripts/bench_bf16_matmul.py).
* Packed float32 weights read by a third kernel (`packed`, `f32_matmul.cc`): XLA's float32
  dots are fast, but in the layer scan each layer's weights are first copied out of the
  stack, step after step; the kernel reads the stack in place (GPT-2 124M engine decode step
  at 2 sequences: about half the time; scripts/bench_bf16_matmul.py --dtype float32).
* Packed int8 / int4 weight-only quantized weights (qwix QArrays) read by a second kernel
  (`quantized`, `quantized_matmul.cc`, AVX512-VNNI): a decode step reads half (a quarter) of
  bf16's bytes, ~2x (~3x) faster per matmul at one row (scripts/bench_quantized_matmul.py).
* Fused softmax attention on one device (`attention`, `attention.cc`): XLA:CPU's batched
  QK^T/PV dots, float32 softmax and head transposes took ~40% of MiniLM's bf16 time; the
  kernel runs that attention 2.4-5x faster (scripts/bench_attention.py: MiniLM b32x128, GPT-2
  512-token prefill, Zen 4). Decode steps hand it the whole stacked KV cache and the layer
  (`attention.CacheLayer`), read in place: XLA converted each layer's cache to float32 for its
  dots every step (GPT-2 124M bf16, batch 8, 128 slots: 6.4 ms of thread time per step in
  those converts and dots, 4.1 in the kernel; decode b8 509/519 -> 545/531 tok/s, fresh
  processes alternated, Zen 4). The engine's paged pool is read the same way: the kernel
  follows each row's page table inside the layer's pool, where plain XLA gathers the pages
  (`attention.paged_attention`; scripts/bench_paged_decode.py).
* jax < 0.12 only: bf16 carried as its uint16 bits where that XLA:CPU lacks a bf16 op and
  converts a whole array to float32 instead: dynamic slices of the stacked layer weights
  inside the layer scan (x1.55 faster with), the KV cache's dynamic-update-slice (x10), and
  the embedding gather (no float32 table in the program). jax 0.12's XLA:CPU has the bf16
  ops, and there the carriers cost time (scan x3.7, cache write x2, gather x8 slower).
* A lone bf16 prompt decodes as a batch of two when the packed kernel is not in use: XLA:CPU's
  fast bf16 dot (YNNPACK) takes no matrix-vector products (x1.34 on jax 0.10, x1.3-1.7 on 0.12).
* Which library runs the dots, per CPU kind (`tuning`, from the ISA record of `isa`).
* Each C++ kernel in two builds, from the same ISA record (`isa.kernel_build`): AVX-512
  (`-march=native`) and AVX2 + FMA (`-march=x86-64-v3`, e.g. AMD Zen 3); none elsewhere
  (aarch64: one warning line, XLA's dots). $JAXACCEL_CPU_ISA=avx2 runs the AVX2 build and
  every AVX2 choice on an AVX-512 machine, to measure it.

Where MiniLM's time goes with and without these, and the fences that measured no gain and are
gone: docs/performance.md, "The CPU backend's choices".
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from jaxaccel.backends import paged
from jaxaccel.backends.base import Backend, KVCache, PagedCache
from jaxaccel.backends.cpu import attention as attention_kernel
from jaxaccel.backends.cpu import grouped, isa, packed, packing, quantized, tuning
from jaxaccel.backends.cpu.packed import PackedWeight
from jaxaccel.backends.cpu.quantized import PackedQuantWeight


def _jax_version() -> tuple[int, ...]:
    return tuple(int(p) for p in jax.__version__.split(".")[:2])


# XLA:CPU before jax 0.12 has no bf16 dynamic-slice, dynamic-update-slice or gather of its own
# (it converts the whole array to float32); from 0.12 it has, and uint16 carriers only cost.
# tests/test_packed_decode.py and tests/test_export.py check the programs both ways.
CARRIERS = _jax_version() < (0, 12)


def to_carrier(x):
    """bf16 -> its uint16 bits (other dtypes unchanged)."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def from_carrier(x):
    """uint16 bits -> bf16 (other dtypes unchanged)."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def _is_packed(x) -> bool:
    return isinstance(x, (PackedWeight, PackedQuantWeight))


def _packed_matmul(x, w) -> jax.Array:
    """float32 x . w for either kind of packed weight."""
    if isinstance(w, PackedQuantWeight):
        return quantized.matmul(x, w)
    return packed.matmul(x, w)


def _map_params(module, fn):
    """`fn` applied to every plain array parameter (packed weights are left as they are)."""
    graphdef, state = nnx.split(module)
    state = jax.tree.map(lambda x: x if _is_packed(x) else fn(x), state, is_leaf=_is_packed)
    return nnx.merge(graphdef, state)


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, fused_attention: bool = True):
        # The attention kernel is for one-device programs: XLA's SPMD partitioner would
        # gather a custom call's sharded operands onto every device.
        self.fused_attention = fused_attention

    def matmul(self, x, w, contracting: int) -> jax.Array:
        if _is_packed(w):
            return _packed_matmul(x, w).astype(x.dtype)
        return super().matmul(x, w, contracting)

    def quantized_matmul(self, x, w, contracting: int = 1) -> jax.Array:
        if _is_packed(w):
            return _packed_matmul(x, w).astype(x.dtype)
        return super().quantized_matmul(x, w, contracting)

    def grouped_matmul(self, x_mk, w_gkn, group_sizes_g) -> jax.Array:
        """XLA:CPU runs ragged_dot as the dense all-groups product: `grouped` instead."""
        if isinstance(w_gkn, qwix.QArray):
            w_gkn = qwix.dequantize(w_gkn)
        return grouped.grouped_matmul(x_mk, w_gkn, group_sizes_g, CARRIERS)

    def lookup(self, table_vd, ids) -> jax.Array:
        if _is_packed(table_vd):
            return packed.lookup_rows(table_vd, ids)
        if CARRIERS:
            return from_carrier(jnp.take(to_carrier(table_vd), ids, axis=0))
        return super().lookup(table_vd, ids)

    def head_logits(self, x_btd, head_vd) -> jax.Array:
        if _is_packed(head_vd):
            return _packed_matmul(x_btd, head_vd)
        return super().head_logits(x_btd, head_vd)

    def argmax(self, logits_bv) -> jax.Array:
        """As the base class's, by two plain reductions: each row's maximum, then the first
        index holding it (or a NaN, whose maximum is NaN). XLA:CPU runs jnp.argmax as one
        variadic (value, index) reduce it does not vectorize: over GPT-2's 50304 logits this
        is 4x faster (batch 1: 245 -> 55 us, batch 8: 0.90 -> 0.21 ms of a ~13 ms decode
        step, Zen 4)."""
        top_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
        hit_bv = (logits_bv == top_b1) | jnp.isnan(logits_bv)
        index_bv = jax.lax.broadcasted_iota(jnp.int32, logits_bv.shape, logits_bv.ndim - 1)
        return jnp.min(jnp.where(hit_bv, index_bv, logits_bv.shape[-1]), axis=-1)

    def scan_layers(self, blocks, carry, body, xs=None, runner=None):
        """Packed weights read in place by layer index (a scanned slice would be copied out,
        layer by layer, step by step); before jax 0.12, bf16 weights sliced as their uint16
        bits (XLA:CPU then converted the whole stack to float32 on every call)."""
        if CARRIERS:
            blocks, body = _map_params(blocks, to_carrier), _typed(body)
        if runner is not None:
            return runner(blocks, carry, body, xs)
        cache_views = self.fused_attention and attention_kernel.cpu_supported(isa.detect())
        return _scan_packed(blocks, carry, body, xs, cache_views)

    def attention(self, q_btnh, k_btkh, v_btkh, mask_btt, past=None, *,
                  scale: float | None = None, soft_cap: float | None = None) -> jax.Array:
        """The fused kernel (`attention.cc`) on one device, where the CPU and the operands
        suit it: without a cache (encoder, prefill) or over a cache read in place
        (`CacheLayer`s from `scan_layers`: decode steps); else plain XLA.

        A cache handed over as a slice stays with XLA: the slice would be copied out of the
        stack for the kernel on every step (GPT-2 124M bf16 decoded 0.93x as fast at batch 1
        and 0.98x at batch 8 that way, in-process A/B, Zen 4)."""
        in_place = past is None or isinstance(past[0], attention_kernel.CacheLayer)
        # The kernel has no soft cap (Gemma 2): plain XLA then.
        if in_place and soft_cap is None and self.fused_attention and attention_kernel.supported(
                q_btnh, k_btkh, v_btkh, mask_btt, past):
            target = attention_kernel.kernel(q_btnh.dtype)
            if target is not None:
                return attention_kernel.attention(q_btnh, k_btkh, v_btkh, mask_btt, target,
                                                  past, scale=scale)
        if past is not None:
            past = tuple(x.value() if isinstance(x, attention_kernel.CacheLayer) else x
                         for x in past)
        return super().attention(q_btnh, k_btkh, v_btkh, mask_btt, past, scale=scale,
                                 soft_cap=soft_cap)

    def paged_attention(self, q_tnh, k_tkh, v_tkh, k_pages_pkch, v_pages_pkch, kv_lens,
                        page_indices, cu_q_lens, num_seqs, *, sm_scale: float,
                        sliding_window: int | None = None, soft_cap: float | None = None,
                        max_q_len: int | None = None) -> jax.Array:
        """The fused kernel reading keys/values through the page table in place
        (`attention.paged_attention`; pages as `CacheLayer`s from `scan_layers`) on one
        device, where the CPU and operands suit it and there is no soft cap or traced window;
        else plain XLA over gathered pages."""
        if (self.fused_attention and soft_cap is None and paged.static_window(sliding_window)
                and attention_kernel.paged_supported(
                q_tnh, k_tkh, v_tkh, k_pages_pkch, v_pages_pkch)):
            target = attention_kernel.kernel(q_tnh.dtype, attention_kernel.PAGED_SYMBOLS)
            if target is not None:
                return attention_kernel.paged_attention(
                    q_tnh, k_tkh, v_tkh, k_pages_pkch, v_pages_pkch, kv_lens, page_indices,
                    cu_q_lens, num_seqs, sm_scale=sm_scale, sliding_window=sliding_window,
                    target=target)
        k_pages_pkch, v_pages_pkch = (
            x.value() if isinstance(x, attention_kernel.CacheLayer) else x
            for x in (k_pages_pkch, v_pages_pkch))
        return super().paged_attention(
            q_tnh, k_tkh, v_tkh, k_pages_pkch, v_pages_pkch, kv_lens, page_indices, cu_q_lens,
            num_seqs, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
            max_q_len=max_q_len)

    def cache_storage_dtype(self, dtype) -> jnp.dtype:
        # No bf16 dynamic-update-slice on XLA:CPU before jax 0.12: it would convert the whole
        # cache to float32 and back every step; the same bits as uint16 update in place.
        bf16 = jnp.dtype(dtype) == jnp.bfloat16
        return jnp.dtype(jnp.uint16) if CARRIERS and bf16 else jnp.dtype(dtype)

    def cache_store(self, x, storage_dtype) -> jax.Array:
        if storage_dtype == jnp.uint16:
            return to_carrier(x.astype(jnp.bfloat16))
        return x.astype(storage_dtype)

    def cache_load(self, x, dtype) -> jax.Array:
        if isinstance(x, attention_kernel.CacheLayer):  # read later, in place
            return dataclasses.replace(x, dtype=jnp.dtype(dtype))
        return from_carrier(x).astype(dtype)

    def prepare_decoder(self, state, *, dtype, single_device: bool, requested: bool | None):
        quantize = packing.quantized_wanted(state, single_device, requested)
        # --kernels with quantized weights is satisfied by their kernel in any dtype.
        dense = packing.wanted(dtype, single_device, None if quantize else requested)
        if not (dense or quantize):
            return state, False
        return packing.pack_state(state, dense=dtype if dense else None, quantize=quantize), True

    def min_batch(self, dtype, prepared: bool) -> int:
        return 2 if jnp.dtype(dtype) == jnp.bfloat16 and not prepared else 1

    def compiler_options(self) -> dict:
        return tuning.compiler_options(isa.detect())
    def for_layout(self, single_device: bool) -> CpuBackend:
        return backend() if single_device else _sharded_backend()


def _typed(body):
    """`body` given its layer's weights back as bf16 (from their uint16 carriers)."""
    def typed_body(block, carry, x):
        return body(_map_params(block, from_carrier), carry, x)

    return typed_body


def _stacked_fields(leaf) -> tuple[str, ...]:
    return getattr(leaf, "STACKED", ("lines",))


def _scan_packed(blocks, carry, body, xs, cache_views: bool = False):
    """A plain layer scan in which each packed weight leaves the scanned state: it becomes a
    layer index to scan over, and its whole stacks are handed to the kernel, which picks the
    layer. With `cache_views`, a KV cache scanned as `xs` (or as the first of a pair, the
    other being per-layer data such as sliding-window flags) likewise reaches the body as
    `CacheLayer`s (the whole stacks and the layer) for the attention kernel, and the pools of
    an engine's `PagedCache` (scanned alone) reach it as `CacheLayer`s in its `PagedLayer`s."""
    # (cache, per-layer data); a KVCache is a tuple itself, hence the exact type test
    paired = type(xs) is tuple and len(xs) == 2 and isinstance(xs[0], (KVCache, PagedCache))
    cache, extra = xs if paired else (xs, None)
    views = cache_views and isinstance(cache, KVCache)
    # Windowed layers read pages through their masks (gathered), so only a lone pool is viewed.
    paged = cache_views and isinstance(cache, PagedCache) and not paired
    stacked_cache = cache if views else None
    if views:
        cache = jnp.arange(cache.k_lbksh.shape[0], dtype=jnp.int32)
    if paged:  # the pools stay whole; the layer index is scanned in their place
        stacked_cache = (cache.k_lbksh.pages_pkch, cache.v_lbksh.pages_pkch)
        layers = jnp.arange(stacked_cache[0].shape[0], dtype=jnp.int32)
        cache = PagedCache(*(x._replace(pages_pkch=layers) for x in cache))
    xs = (cache, extra) if paired else cache
    graphdef, state = nnx.split(blocks)
    stacks = []

    def index(leaf):
        if not _is_packed(leaf):
            return leaf
        fields = _stacked_fields(leaf)
        stacks.append({f: getattr(leaf, f) for f in fields})
        layers = jnp.arange(getattr(leaf, fields[0]).shape[0])
        return dataclasses.replace(leaf, **{f: None for f in fields}, layer=layers)

    state = jax.tree.map(index, state, is_leaf=_is_packed)

    def attach(layer_state):
        remaining = iter(stacks)
        return jax.tree.map(
            lambda leaf: dataclasses.replace(leaf, **next(remaining)) if _is_packed(leaf)
            else leaf, layer_state, is_leaf=_is_packed)

    def step(carry, layer_and_x):
        layer_state, x = layer_and_x
        x, per_layer = x if paired else (x, None)
        if views:
            x = KVCache(*(attention_kernel.CacheLayer(stack, x, _compute_dtype(stack))
                          for stack in stacked_cache))
        if paged:
            x = PagedCache(*(
                part._replace(pages_pkch=attention_kernel.CacheLayer(
                    stack, part.pages_pkch, _compute_dtype(stack)))
                for stack, part in zip(stacked_cache, x)))
        x = (x, per_layer) if paired else x
        return body(nnx.merge(graphdef, attach(layer_state)), carry, x)

    return jax.lax.scan(step, carry, (state, xs))


def _compute_dtype(stored) -> jnp.dtype:
    """What a cache stored as `stored` holds (uint16: bf16 bits, see `cache_storage_dtype`)."""
    return jnp.dtype(jnp.bfloat16) if stored.dtype == jnp.uint16 else jnp.dtype(stored.dtype)


@functools.cache
def backend() -> CpuBackend:
    return CpuBackend()


@functools.cache
def _sharded_backend() -> CpuBackend:
    """The backend of programs over several devices or pipeline stages (no fused attention)."""
    return CpuBackend(fused_attention=False)
