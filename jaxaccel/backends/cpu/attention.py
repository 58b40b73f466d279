"""Fused softmax attention on the CPU (`attention.cc`): one pass per (batch, kv head, block of
query rows) instead of XLA:CPU's batched dots, float32 softmax and transposes.

Shape legend as in `jaxaccel.models.layers`: b batch, t queries, s keys, n query heads, k kv
heads (n % k == 0), h head dim.

Why a kernel: XLA:CPU runs the attention's batched dots at 55-80 GFLOP/s where its dense dots
of the same model run at ~300 (`jaxaccel bench roofline`, Zen 4), and the float32 softmax
between them is a separate pass over [b, n, t, s]. MiniLM b32x128 spent ~40% of its bf16
time there. Measured numbers: scripts/bench_attention.py and the module docstring of
`jaxaccel.backends.cpu`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.backends.cpu import build, isa

KERNEL_SOURCE = "attention.cc"
SYMBOLS = {jnp.dtype(jnp.bfloat16): "JaxaccelAttentionBf16",
           jnp.dtype(jnp.float32): "JaxaccelAttentionF32"}
# The same kernel over a paged pool (`jaxaccel.backends.paged`'s ragged contract).
PAGED_SYMBOLS = {jnp.dtype(jnp.bfloat16): "JaxaccelPagedAttentionBf16",
                 jnp.dtype(jnp.float32): "JaxaccelPagedAttentionF32"}
# Head dims of whole 16-float vectors, up to 8 of them. The kernel has an AVX-512 (F, BW, VL;
# AVX512-BF16 emulated where missing) and an AVX2 + FMA build (`isa.kernel_build`).
MAX_HEAD_DIM = 128


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CacheLayer:
    """One layer of a stacked KV cache, read in place: `stack` [l, b, k, s, h] as stored
    (bfloat16, its uint16 bits, or float32), the `layer` to read (int32 scalar) and the
    compute `dtype` it stands for. Inside a layer scan the CPU backend hands these to
    attention instead of a slice, which XLA would copy out of the stack for a custom call
    on every decode step; the kernel takes the stack and the index."""

    stack: jax.Array
    layer: jax.Array
    dtype: jnp.dtype = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stack.shape[1:])

    def value(self) -> jax.Array:
        """The layer as an array [b, k, s, h] in `dtype` (for code other than the kernel)."""
        x = jax.lax.dynamic_index_in_dim(self.stack, self.layer, keepdims=False)
        if x.dtype == jnp.uint16:
            x = jax.lax.bitcast_convert_type(x, jnp.bfloat16)
        return x.astype(self.dtype)

    def readable_as(self, dtype) -> bool:
        """Whether the kernel for `dtype` can read the stored elements as they are."""
        stored = jnp.dtype(self.stack.dtype)
        return stored == jnp.dtype(dtype) or (
            stored == jnp.uint16 and jnp.dtype(dtype) == jnp.bfloat16)


def cpu_supported(cpu: isa.CpuInfo) -> bool:
    """Whether this CPU has the instructions of one of the kernel's builds."""
    return isa.kernel_build(cpu) is not None


def supported(q_btnh, k_btkh, v_btkh, mask_btt, past=None) -> bool:
    """Whether the kernel takes these operands (dtypes, head dim, shapes); `past` as for
    `attention`."""
    dt = q_btnh.dtype
    b, t, n, h = q_btnh.shape
    kv_heads = k_btkh.shape[2]
    cached = 0 if past is None else past[0].shape[2]
    ok = (jnp.dtype(dt) in SYMBOLS and k_btkh.dtype == dt and v_btkh.dtype == dt
          and k_btkh.shape == v_btkh.shape and k_btkh.shape[0] == b and k_btkh.shape[3] == h
          and n % kv_heads == 0 and h % 16 == 0 and h <= MAX_HEAD_DIM
          and tuple(mask_btt.shape) == (b, t, k_btkh.shape[1]))
    if past is None or not ok:
        return ok
    k_bksh, v_bksh, mask_bts = past
    readable = all(x.readable_as(dt) if isinstance(x, CacheLayer) else x.dtype == dt
                   for x in (k_bksh, v_bksh))
    return (readable and k_bksh.dtype == dt and v_bksh.dtype == dt
            and type(k_bksh) is type(v_bksh) and k_bksh.shape == v_bksh.shape
            and tuple(k_bksh.shape) == (b, kv_heads, cached, h)
            and tuple(mask_bts.shape) == (b, t, cached))


def kernel(dtype, symbols=None) -> str | None:
    """The registered FFI target for `dtype` on this CPU, or None (neither AVX-512 nor AVX2,
    no compiler, JAXACCEL_KERNELS=0). `symbols`: SYMBOLS (default) or PAGED_SYMBOLS."""
    symbol = (symbols or SYMBOLS).get(jnp.dtype(dtype))
    if symbol is None or not cpu_supported(isa.detect()):
        return None
    return build.target(KERNEL_SOURCE, symbol)


def attention(q_btnh, k_btkh, v_btkh, mask_btt, target: str | None = None,
              past=None, scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale, masked) v -> [b, t, n, h] in q's dtype (`scale` default
    1 / sqrt(h)).

    q [b, t, n, h]; k, v [b, t', k, h] (the projections' layout); mask bool [b, t, t'], True
    where a query may attend; `past`, when given, is (keys [b, k, s, h], values [b, k, s, h],
    mask [b, t, s]) from a KV cache (its keys come before the fresh ones; keys and values
    may be `CacheLayer`s, read in place). Query head i reads
    kv head i // (n / k). A row with no True gets uniform weights (as the plain code's
    finfo.min fill gives). Scores, softmax and accumulation are float32. `target` names a
    registered build of the kernel (tests pass portable variants); by default the one
    compiled for this CPU.

    Raises RuntimeError when the kernel is unavailable (check `kernel(dtype)` first).
    """
    target = target or kernel(q_btnh.dtype)
    if target is None:
        raise RuntimeError("the attention kernel is not available on this CPU/build")
    b, _, _, h = q_btnh.shape
    mask_bts = mask_btt.astype(jnp.bool_)
    layer = jnp.int32(0)
    if past is None:
        empty = jnp.zeros((b, k_btkh.shape[2], 0, h), q_btnh.dtype)
        k_bksh, v_bksh = empty, empty
    else:
        k_bksh, v_bksh, cached_mask = past
        mask_bts = jnp.concatenate([cached_mask.astype(jnp.bool_), mask_bts], axis=-1)
        if isinstance(k_bksh, CacheLayer):
            layer = k_bksh.layer.astype(jnp.int32)
            k_bksh, v_bksh = k_bksh.stack, v_bksh.stack
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q_btnh.shape, q_btnh.dtype))
    return call(q_btnh, k_btkh, v_btkh, k_bksh, v_bksh, layer, mask_bts,
                scale=np.float32(h ** -0.5 if scale is None else scale))


def paged_supported(q_tnh, k_tkh, v_tkh, k_pages, v_pages) -> bool:
    """Whether the paged kernel takes these operands: q's dtype everywhere (pages: also as
    readable `CacheLayer`s), head dims as for `supported`, matching key/value shapes."""
    dt = q_tnh.dtype
    tokens, n, h = q_tnh.shape
    kv_heads = k_tkh.shape[1]
    readable = all(x.readable_as(dt) if isinstance(x, CacheLayer) else x.dtype == dt
                   for x in (k_pages, v_pages))
    return (jnp.dtype(dt) in PAGED_SYMBOLS and readable and type(k_pages) is type(v_pages)
            and k_tkh.dtype == dt and v_tkh.dtype == dt and k_tkh.shape == v_tkh.shape
            and tuple(k_tkh.shape) == (tokens, kv_heads, h) and n % kv_heads == 0
            and h % 16 == 0 and h <= MAX_HEAD_DIM and tuple(k_pages.shape) == tuple(v_pages.shape)
            and k_pages.shape[1] == kv_heads and k_pages.shape[3] == h)


def paged_attention(q_tnh, k_tkh, v_tkh, k_pages, v_pages, kv_lens, page_indices, cu_q_lens,
                    num_seqs, *, sm_scale: float, sliding_window: int | None = None,
                    target: str | None = None) -> jax.Array:
    """Ragged paged attention (`jaxaccel.backends.paged`'s contract, without soft capping)
    -> [T, n, h] in q's dtype, keys and values read through the page table in place.

    Pages are [P, k, c, h] arrays or `CacheLayer`s of a stacked pool [l, P, k, c, h] (read at
    their layer, never sliced out). Output rows of tokens no sequence owns are zero. Bad
    metadata (a page index outside the pool, kv_lens below q_len, cached keys past the page
    table) fails the call with an XLA error naming it, before any page is read. `target`
    names a registered build (tests pass portable ones); by default this CPU's.

    Raises RuntimeError when the kernel is unavailable (check `kernel(dtype, PAGED_SYMBOLS)`).
    """
    target = target or kernel(q_tnh.dtype, PAGED_SYMBOLS)
    if target is None:
        raise RuntimeError("the paged attention kernel is not available on this CPU/build")
    layer = jnp.int32(0)
    if isinstance(k_pages, CacheLayer):
        layer = k_pages.layer.astype(jnp.int32)
        k_pages, v_pages = k_pages.stack, v_pages.stack
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q_tnh.shape, q_tnh.dtype))
    ints = [jnp.asarray(x, jnp.int32) for x in (kv_lens, page_indices, cu_q_lens, num_seqs)]
    return call(q_tnh, k_tkh, v_tkh, k_pages, v_pages, layer, *ints,
                scale=np.float32(sm_scale), sliding_window=np.int64(sliding_window or 0))
