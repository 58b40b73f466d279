"""The backend interface, and its plain-XLA implementation (what GPU and TPU run).

Model code (`jaxaccel.models`) is written once, for every platform. Where one platform's
compiler needs help, the help lives in a backend: the runtime picks the backend for the
mesh's platform (`jaxaccel.backends.for_mesh`) and installs it while tracing
(`jaxaccel.backends.use`), and the few model operations that a backend may replace call
`jaxaccel.backends.current()`. This class is the contract and the default: plain jnp/lax,
exactly what a GPU/TPU engineer would write, with nothing platform-specific in the program.

Traced hooks (called inside jit, by `models.layers`, `models.moe` and `models.kv_cache`):
  matmul, quantized_matmul, grouped_matmul, lookup, head_logits, scan_layers, attention,
  paged_attention,
  cache_storage_dtype, cache_store, cache_load.
Host-side policies (called by the runtime when it builds a model's programs):
  prepare_decoder, min_batch, compiler_options, for_layout.
Data the hooks share with the models: `KVCache` (allocated and written by `models.kv_cache`;
a backend's layer scan may take it apart) and the engine's `PagedCache`, so no backend imports
the models.

Shape legend as in `jaxaccel.models.layers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from jaxaccel.backends import paged
from jaxaccel.errors import KernelUnavailable


class KVCache(NamedTuple):
    """A decoder's KV cache: keys and values, each [l, b, k, s, h] in the storage dtype
    (`Backend.cache_storage_dtype`). `jaxaccel.models.kv_cache` allocates and writes it; it
    is defined here because the backends take it apart too (a scan over its layers)."""

    k_lbksh: jax.Array
    v_lbksh: jax.Array


class PagedLayer(NamedTuple):
    """One layer's keys or values held in pages [P, k, c, h] (c slots per page; a scan
    slice of the generation engine's pool [l, P, k, c, h]) with the ragged metadata of the
    step's sequences (`jaxaccel.backends.paged`'s contract): block tables [S, W], keys per
    sequence after the step [S], query offsets [S + 1] (None: one query per sequence, a
    decode step) and the number of real sequences [1]. `window` (None: none) is a
    sliding-window layer's window, possibly traced (a scan over mixed layers). Attention
    reads it through `Backend.paged_attention` (`jaxaccel.models.kv_cache.attend_paged`)."""

    pages_pkch: jax.Array
    table_bw: jax.Array
    kv_lens_b: jax.Array
    cu_q_lens: jax.Array | None
    num_seqs: jax.Array
    window: jax.Array | None = None


class PagedCache(NamedTuple):
    """A cache whose layers are `PagedLayer`s (same field names as KVCache; a type of its
    own, so backends that read a dense KVCache in place leave it alone)."""

    k_lbksh: PagedLayer
    v_lbksh: PagedLayer


class Backend:
    """Plain XLA: every hook is the textbook jnp/lax spelling."""

    name = "xla"

    # Traced hooks -------------------------------------------------------------------------

    def matmul(self, x, w, contracting: int) -> jax.Array:
        """x[..., *k] . w[*k, *n] -> [..., *n] in x.dtype, float32 accumulation.

        One 2-D matmul: `contracting` counts the k dims of `w`.
        """
        k_shape, n_shape = w.shape[:contracting], w.shape[contracting:]
        lead = x.shape[:x.ndim - contracting]
        x2 = x.reshape(*lead, math.prod(k_shape))
        w2 = w.reshape(math.prod(k_shape), math.prod(n_shape)).astype(x.dtype)
        out = jnp.einsum("...k,kn->...n", x2, w2, preferred_element_type=jnp.float32)
        return out.astype(x.dtype).reshape(*lead, *n_shape)

    def quantized_matmul(self, x, w: qwix.QArray, contracting: int = 1) -> jax.Array:
        """x[..., *k] . w[*k, *n] -> [..., *n] in x.dtype, float32 accumulation, for a weight-only
        quantized `w` (`jaxaccel.models.quantization`): `w.qvalue` int8/int4/float8 [*k, *n],
        `w.scale` float per output channel (shape 1 along k) or per group along k (qwix's
        tiled layout; as 2-D, [K / group, N]); zero points (laid out as the scales) only for
        a pre-quantized asymmetric weight, dequantized explicitly before one dot.

        Plain qwix: `qwix.dot_general` of x with the 2-D view of the QArray; with a float x it
        dequantizes the weight inside the dot (XLA fuses the convert and scale into the dot's
        operand), which is what GPU/TPU compilers turn into a weight-only matmul.
        """
        k_shape, n_shape = w.shape[:contracting], w.shape[contracting:]
        lead = x.shape[:x.ndim - contracting]
        k, n = math.prod(k_shape), math.prod(n_shape)
        if w.zero_point is not None or _scale_2d(w.scale, contracting).shape[1] != n:
            # a pre-quantized weight with zero points or scales in blocks of output columns
            w2 = _dequantize_2d(w, contracting).astype(x.dtype)
            out = jnp.einsum("...k,kn->...n", x.reshape(*lead, k), w2,
                             preferred_element_type=jnp.float32)
            return out.astype(x.dtype).reshape(*lead, *n_shape)
        w2 = qwix.QArray(w.qvalue.reshape(k, n), _scale_2d(w.scale, contracting).astype(x.dtype),
                         None, w.qtype)
        out = qwix.dot_general(x.reshape(*lead, k), w2,
                               (((len(lead),), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
        return out.astype(x.dtype).reshape(*lead, *n_shape)

    def grouped_matmul(self, x_mk, w_gkn, group_sizes_g) -> jax.Array:
        """A mixture-of-experts layer's matmul: rows of x sorted into consecutive groups,
        group g's rows times w[g]. x [m, k], w [g, k, n] (or a weight-only quantized QArray
        with one scale per group and output channel), group_sizes int32 [g] summing to at
        most m -> [m, n] in x.dtype, float32 accumulation; rows past the last group are
        zero.

        `jax.lax.ragged_dot`: XLA's grouped matmul (`chlo.ragged_dot` in a program lowered
        for GPU or TPU), each row against its own group's weight only. XLA:TPU compiles it
        as a grouped matmul; XLA:GPU by default as a dense product over all groups (see
        `GpuBackend.grouped_matmul`), XLA:CPU likewise (`CpuBackend`'s own path)."""
        if isinstance(w_gkn, qwix.QArray):
            w_gkn = qwix.dequantize(w_gkn)
        out = jax.lax.ragged_dot(x_mk, w_gkn.astype(x_mk.dtype), group_sizes_g,
                                 preferred_element_type=jnp.float32)
        return out.astype(x_mk.dtype)

    def lookup(self, table_vd, ids) -> jax.Array:
        """Rows `ids` of an embedding table [v, ...]: [*ids.shape, ...]."""
        return jnp.take(table_vd, ids, axis=0)

    def head_logits(self, x_btd, head_vd) -> jax.Array:
        """Float32 logits [b, t, v] from a head stored [v, d] (Hugging Face's layout); a
        quantized head (a QArray with one scale per vocab row) goes through qwix."""
        if isinstance(head_vd, qwix.QArray):
            return qwix.einsum("btd,vd->btv", x_btd, head_vd.astype(x_btd.dtype),
                               preferred_element_type=jnp.float32).astype(jnp.float32)
        return jnp.einsum("btd,vd->btv", x_btd, head_vd.astype(x_btd.dtype),
                          preferred_element_type=jnp.float32)

    def argmax(self, logits_bv) -> jax.Array:
        """Greedy token ids [b] int32 from logits [b, v]: the index of each row's largest
        value, the first one on ties, a NaN counting as largest (jnp.argmax's rule)."""
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    def scan_layers(self, blocks: nnx.Module, carry, body: Callable, xs=None,
                    runner: Callable | None = None):
        """`body(block, carry, x) -> (carry, y)` over the stacked layers of `blocks`, or
        `runner(blocks, carry, body, xs)` (a pipeline) when one is given."""
        if runner is not None:
            return runner(blocks, carry, body, xs)
        graphdef, state = nnx.split(blocks)

        def step(carry, layer_and_x):
            layer_state, x = layer_and_x
            return body(nnx.merge(graphdef, layer_state), carry, x)

        return jax.lax.scan(step, carry, (state, xs))

    def attention(self, q_btnh, k_btkh, v_btkh, mask_btt, past=None, *,
                  scale: float | None = None, soft_cap: float | None = None) -> jax.Array:
        """Softmax attention of t new queries over t new keys/values (and a cache) -> [b, t, n, h]
        in q's dtype. q [b, t, n, h]; k, v [b, t, k, h] (n % k == 0: query head i reads kv
        head i // (n / k)); mask bool [b, t, t], True where a query may attend; `past`, when
        given, is (keys [b, k, s, h], values [b, k, s, h], mask [b, t, s]) from the cache in
        compute dtype. Scores and softmax in float32, masked scores at finfo(float32).min (a
        row with nothing to attend to gets uniform weights). Scores are q.k times `scale`
        (default h ** -0.5), then, with `soft_cap`, soft_cap * tanh(score / soft_cap)
        (Gemma 2's attention-logit capping), before the mask.

        Rows r enumerate (t, g), so each kv head's queries form one [t*g, h] matrix; scores over
        the cache and over the new keys are concatenated before one softmax, so the cache is
        only read, never copied to append the new keys.
        """
        b, t, n, h = q_btnh.shape
        kv_heads = k_btkh.shape[2]
        groups = n // kv_heads
        dt = q_btnh.dtype
        q_bkrh = q_btnh.reshape(b, t, kv_heads, groups, h).transpose(0, 2, 1, 3, 4).reshape(
            b, kv_heads, t * groups, h)
        keys, values, masks = [k_btkh.transpose(0, 2, 1, 3)], [v_btkh.transpose(0, 2, 1, 3)], [mask_btt]
        if past is not None:
            keys.insert(0, past[0])
            values.insert(0, past[1])
            masks.insert(0, past[2])
        scores = [jnp.einsum("bkrh,bksh->bkrs", q_bkrh, k.astype(dt),
                             preferred_element_type=jnp.float32) for k in keys]
        scores_bkrs = jnp.concatenate(scores, axis=-1) * (h ** -0.5 if scale is None else scale)
        if soft_cap is not None:
            scores_bkrs = soft_cap * jnp.tanh(scores_bkrs / soft_cap)
        mask_bts = jnp.concatenate(masks, axis=-1)
        mask_b1rs = jnp.repeat(mask_bts[:, None], groups, axis=2)
        scores_bkrs = jnp.where(mask_b1rs, scores_bkrs, jnp.finfo(jnp.float32).min)
        probs_bkrs = jax.nn.softmax(scores_bkrs, axis=-1).astype(dt)
        out_bkrh, start = 0.0, 0
        for v in values:
            s = v.shape[2]
            out_bkrh += jnp.einsum("bkrs,bksh->bkrh", probs_bkrs[..., start:start + s],
                                   v.astype(dt), preferred_element_type=jnp.float32)
            start += s
        out_btkgh = out_bkrh.reshape(b, kv_heads, t, groups, h).transpose(0, 2, 1, 3, 4)
        return out_btkgh.reshape(b, t, n, h).astype(dt)

    def paged_attention(self, q_tnh, k_tkh, v_tkh, k_pages_pkch, v_pages_pkch, kv_lens,
                        page_indices, cu_q_lens, num_seqs, *, sm_scale: float,
                        sliding_window: int | None = None, soft_cap: float | None = None,
                        max_q_len: int | None = None) -> jax.Array:
        """Ragged paged attention -> [T, n, h] in q's dtype (the contract, close to jax's TPU
        `ragged_paged_attention`, is `jaxaccel.backends.paged`'s docstring).

        q [T, n, h] (all sequences' query tokens back to back); k, v [T, k, h] the same
        tokens' fresh keys/values; pages [P, k, c, h] each, in the cache's storage dtype;
        kv_lens [S], page_indices [S, W], cu_q_lens [S + 1], num_seqs [1], all int32.
        `max_q_len` (static) bounds every sequence's query count: 1 marks a decode-only
        step, where decode kernels apply. Plain XLA: each sequence's pages gathered
        (`paged.reference`)."""
        dt = q_tnh.dtype
        return paged.reference(q_tnh, k_tkh, v_tkh, self.cache_load(k_pages_pkch, dt),
                               self.cache_load(v_pages_pkch, dt), kv_lens, page_indices,
                               cu_q_lens, num_seqs, sm_scale=sm_scale,
                               sliding_window=sliding_window, soft_cap=soft_cap,
                               max_q_len=max_q_len)

    def cache_storage_dtype(self, dtype) -> jnp.dtype:
        """The dtype a KV cache of compute dtype `dtype` is stored in."""
        return jnp.dtype(dtype)

    def cache_store(self, x, storage_dtype) -> jax.Array:
        """Compute values -> the cache's storage dtype."""
        return x.astype(storage_dtype)

    def cache_load(self, x, dtype) -> jax.Array:
        """Stored cache contents -> compute values in `dtype`."""
        return x.astype(dtype)

    # Host-side policies -------------------------------------------------------------------

    def prepare_decoder(self, state, *, dtype, single_device: bool, requested: bool | None):
        """(state, prepared): a decoder's placed state, rewritten for this backend's decode
        kernels where it has any. `requested` False never rewrites, True insists (raises
        KernelUnavailable where impossible), None decides."""
        if requested:
            raise KernelUnavailable(f"--kernels: jaxaccel's decode kernels run on the CPU "
                                    f"only; this run uses the {jax.default_backend()} backend")
        return state, False

    def min_batch(self, dtype, prepared: bool) -> int:
        """The smallest batch bucket worth compiling for (rows are padded up to it)."""
        return 1

    def for_layout(self, single_device: bool) -> Backend:
        """This backend as a program on `single_device` (one device, no pipeline) or not should
        use it: kernels that XLA's SPMD partitioner cannot split are for one device only."""
        return self

    def compiler_options(self) -> dict:
        """XLA compiler options for this platform's programs ({}: XLA's defaults); options the
        caller passes to the runtime take precedence."""
        return {}

def _dequantize_2d(w: qwix.QArray, contracting: int) -> jax.Array:
    """(values - zeros) * scales of a QArray, as float32 [K, N]: scales and zeros (if any)
    [K', N'], one per block of K / K' consecutive k rows and N / N' consecutive columns."""
    k, n = math.prod(w.qvalue.shape[:contracting]), math.prod(w.qvalue.shape[contracting:])
    scale = _scale_2d(w.scale, contracting).astype(jnp.float32)[:, None, :, None]
    kg, ng = scale.shape[0], scale.shape[2]
    q = w.qvalue.reshape(kg, k // kg, ng, n // ng).astype(jnp.float32)
    if w.zero_point is not None:
        q = q - _scale_2d(w.zero_point, contracting).astype(jnp.float32)[:, None, :, None]
    return (q * scale).reshape(k, n)


def _scale_2d(scale, contracting: int):
    """A QArray scale [*k', *n'] (k' = 1 per channel, or groups) as 2-D [K', N']."""
    return scale.reshape(math.prod(scale.shape[:contracting]), math.prod(scale.shape[contracting:]))
