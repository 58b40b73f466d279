"""Weights packed for the small-batch matmul kernels: bfloat16 for `bf16_matmul.cc`,
float32 for `f32_matmul.cc`.

A weight W[k..., n...] (contracting dims first) becomes `PackedWeight.lines`, laid out so that
each group of 64 output columns is one contiguous stream that the kernel reads once (n padded
to a multiple of 64; any leading stacked-layer dims stay in front):
  * bfloat16: uint16 bits [n/64, k/2, 4, 16, 2] (k padded to a multiple of 2); each 64-byte
    line holds 16 output columns x 2 contraction rows;
  * float32: [n/64, k, 4, 16]; each k row of a group is 4 vectors of 16 columns.

Why kernels: XLA:CPU's bfloat16 dots read a decode step's weights at 14-19 GB/s, the kernel
at ~47 GB/s (scripts/bench_bf16_matmul.py). Its fast bf16 path (YNNPACK) rejects matrix-vector products and
weights stored [n, k], and the Eigen fallback converts every weight to float32 first. In
float32 XLA's dots are fast, but inside a layer scan each layer's weights are first copied out
of the stack, step after step; the kernels read a stack in place at a layer index.

`PackedWeight` is a pytree, so it travels through nnx state, jit and scan; indexing it with
`[...]` (how models read an `nnx.Param`) hands it on unchanged, and the CPU backend dispatches
on it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxaccel.backends.cpu import build
from jaxaccel.utils.units import round_up

PANEL = 16  # output columns per 64-byte line (16 x 2 bf16)
PANELS = 4  # lines per pair of k rows in a group
GROUP = PANEL * PANELS  # output columns per contiguous stream


class WholeWeight:
    """What every packed weight shares: it is read whole (`param[...]` returns it, as an
    nnx.Param would its value) and knows its logical sizes k = prod(k_shape), n = prod(n_shape)."""

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError(f"a {type(self).__name__} is read whole (`param[...]`), not indexed")
        return self

    @property
    def k(self) -> int:
        return math.prod(self.k_shape)

    @property
    def n(self) -> int:
        return math.prod(self.n_shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight(WholeWeight):
    lines: jax.Array  # uint16 [*stacked, n_pad/64, k_pad/2, 4, 16, 2] or float32 [*, n_pad/64, k, 4, 16]
    k_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    n_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    # Inside a layer scan: `lines` is the whole [layers, ...] stack and `layer` the index of
    # the one to use, so the kernel reads it in place (see `CpuBackend.scan_layers`).
    layer: jax.Array | None = None




def is_f32(w: PackedWeight) -> bool:
    """Whether `w` packs float32 weights (else bfloat16 bits)."""
    return w.lines.dtype == jnp.float32


def pack(w, contracting: int, stacked: int = 0, transposed: bool = False,
         dtype=jnp.bfloat16) -> PackedWeight:
    """Pack `w` [*stacked, *k_shape, *n_shape] as `dtype` (bfloat16 or float32);
    `contracting` = number of k dims.

    With `transposed`, `w` is [*stacked, *n_shape, *k_shape] (how Hugging Face stores a head
    [vocab, d]), `contracting` still counting the k dims, which then come last.
    """
    f32 = jnp.dtype(dtype) == jnp.float32
    k_shape, n_shape, w2 = _padded_kn(w, contracting, stacked, transposed,
                                      jnp.float32 if f32 else jnp.bfloat16, 1 if f32 else 2)
    lead, (k_pad, n_pad), a = w2.shape[:stacked], w2.shape[stacked:], stacked
    if f32:  # [*lead, k, n/64, 4, 16] -> [*lead, n/64, k, 4, 16]
        lines = jnp.moveaxis(w2.reshape(*lead, k_pad, n_pad // GROUP, PANELS, PANEL), a + 1, a)
        return PackedWeight(lines, k_shape, n_shape)
    # [*lead, k/2, 2, n/64, 4, 16] -> [*lead, n/64, k/2, 4, 16, 2]
    w5 = w2.reshape(*lead, k_pad // 2, 2, n_pad // GROUP, PANELS, PANEL)
    w5 = jnp.moveaxis(w5, (a + 2, a, a + 3, a + 4, a + 1), (a, a + 1, a + 2, a + 3, a + 4))
    return PackedWeight(jax.lax.bitcast_convert_type(w5, jnp.uint16), k_shape, n_shape)


def _padded_kn(w, contracting: int, stacked: int, transposed: bool, dtype, k_multiple: int):
    """(k_shape, n_shape, w as [*stacked, k_pad, n_pad] in `dtype`): k padded to a multiple
    of `k_multiple`, n to one of GROUP, with zeros."""
    lead, dims = w.shape[:stacked], w.shape[stacked:]
    if transposed:
        k_shape, n_shape = dims[len(dims) - contracting:], dims[:len(dims) - contracting]
    else:
        k_shape, n_shape = dims[:contracting], dims[contracting:]
    k, n = math.prod(k_shape), math.prod(n_shape)
    w2 = w.astype(dtype).reshape(*lead, *((n, k) if transposed else (k, n)))
    if transposed:
        w2 = jnp.swapaxes(w2, -1, -2)
    pads = [(0, round_up(k, k_multiple) - k), (0, round_up(n, GROUP) - n)]
    return tuple(k_shape), tuple(n_shape), jnp.pad(w2, [(0, 0)] * stacked + pads)


def unpack(w: PackedWeight) -> jax.Array:
    """The weight [*stacked, *k_shape, *n_shape] that `w` packs (bfloat16 or float32)."""
    if is_f32(w):
        lead = w.lines.shape[:-4]
        w2 = jnp.moveaxis(w.lines, len(lead), len(lead) + 1)
        w2 = w2.reshape(*lead, w.k, -1)[..., :w.n]
        return w2.reshape(*lead, *w.k_shape, *w.n_shape)
    lines = jax.lax.bitcast_convert_type(w.lines, jnp.bfloat16)
    lead = lines.shape[:-5]
    a = len(lead)
    w5 = jnp.moveaxis(lines, (a, a + 1, a + 2, a + 3, a + 4), (a + 2, a, a + 3, a + 4, a + 1))
    k_pad, n_pad = 2 * lines.shape[-4], GROUP * lines.shape[-5]
    w2 = w5.reshape(*lead, k_pad, n_pad)[..., :w.k, :w.n]
    return w2.reshape(*lead, *w.k_shape, *w.n_shape)


def lookup_rows(w: PackedWeight, ids) -> jax.Array:
    """Rows `ids` of the [n, k] table that `w` packs transposed (a tied embedding):
    [*ids.shape, k] in bfloat16, gathered straight from the packed lines."""
    column = ids % GROUP
    if is_f32(w):  # [n/64, k, 4, 16]
        rows = w.lines[ids // GROUP, :, column // PANEL, column % PANEL]  # [*ids, k]
        return rows.reshape(*ids.shape, *w.k_shape)
    lines = w.lines  # [n/64, k/2, 4, 16, 2]
    rows = lines[ids // GROUP, :, column // PANEL, column % PANEL, :]  # [*ids, k/2, 2]
    rows = rows.reshape(*ids.shape, -1)[..., :w.k]
    return jax.lax.bitcast_convert_type(rows, jnp.bfloat16).reshape(*ids.shape, *w.k_shape)


KERNEL_SOURCE, KERNEL_SYMBOL = "bf16_matmul.cc", "JaxaccelBf16Matmul"
F32_SOURCE, F32_SYMBOL = "f32_matmul.cc", "JaxaccelF32Matmul"


def _kernel(f32: bool) -> str | None:
    return build.target(*((F32_SOURCE, F32_SYMBOL) if f32 else (KERNEL_SOURCE, KERNEL_SYMBOL)))


def kernel_available(dtype=jnp.bfloat16) -> bool:
    """Whether the compiled kernel for `dtype` weights (bfloat16 or float32) can run here
    (CPU backend, built or buildable)."""
    return (jax.default_backend() == "cpu"
            and _kernel(jnp.dtype(dtype) == jnp.float32) is not None)


def matmul(x, w: PackedWeight, kernel: str | None = None) -> jax.Array:
    """x[..., *k_shape] . w -> float32 [..., *n_shape], float32 accumulation.

    `kernel` names a registered build of the kernel (tests pass portable variants); by
    default, the one compiled for this CPU.
    """
    lead = x.shape[:x.ndim - len(w.k_shape)]
    if tuple(x.shape[len(lead):]) != w.k_shape:
        raise ValueError(f"x {x.shape} does not end in the packed weight's k dims {w.k_shape}")
    f32 = is_f32(w)
    if w.lines.ndim != (4 if f32 else 5) + (w.layer is not None):
        raise ValueError(f"packed lines {w.lines.shape} are a stack: matmul needs one layer")
    kernel = kernel or _kernel(f32)
    if kernel is None:
        raise RuntimeError(f"the {'f32' if f32 else 'bf16'} matmul kernel is not available; "
                           f"pack weights only when `kernel_available()` says so")
    rows = math.prod(lead)
    x2 = x.astype(jnp.float32 if f32 else jnp.bfloat16).reshape(rows, w.k)
    if f32:
        k_pad, n_pad = w.k, GROUP * w.lines.shape[-4]
    else:
        k_pad, n_pad = 2 * w.lines.shape[-4], GROUP * w.lines.shape[-5]
    if k_pad != w.k:
        x2 = jnp.pad(x2, ((0, 0), (0, k_pad - w.k)))
    layer = jnp.int32(0) if w.layer is None else w.layer.astype(jnp.int32)
    y = jax.ffi.ffi_call(kernel, jax.ShapeDtypeStruct((rows, n_pad), jnp.float32))(
        x2, w.lines, layer)
    return y[:, :w.n].reshape(*lead, *w.n_shape)
