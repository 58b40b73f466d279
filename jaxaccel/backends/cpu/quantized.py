"""int8 / int4 weights (qwix `QArray`s) packed for the weight-only matmul kernel
(`quantized_matmul.cc`).

A quantized weight q[k..., n...] with scales (symmetric, per output column, optionally per
group of consecutive k rows: qwix's tiled scale, one entry per tile) becomes
`PackedQuantWeight`: `lines`, uint8 [*stacked, n_pad/64, k_pad/s, 4, 16, 4] holding
u = q + 128 (int8, s = 4 k rows per step) or two nibbles u = q + 8 (int4, s = 8), and
`scales`, float32 [*stacked, groups, n_pad]. Each group of 64 output columns is one
contiguous stream read once per call; the layout of a step is described in the kernel.

Why a kernel: decode is bound by the bytes of weights read, and the packed int8 (int4) weights
are half (a quarter) of bfloat16's; the kernel reads them at about the bf16 kernel's bandwidth
(scripts/bench_quantized_matmul.py). `matmul_xla` is XLA's dequantize-then-dot on the same
packed weights; the kernel is used at every row count, since it measured faster than that at
32 and 128 rows too (14 of 16 GPT-2 shape/row cases, 1.1-3.4x).

Many rows (prefill) take the kernel's second entry point (`matmul_panels`): each 64-column
stream is dequantized to bfloat16 once per call and run through the bf16 kernel's tiles, from
`PANEL_ROWS` rows on where the CPU has AVX512-BF16 (`panel_rows`); below that the VNNI path
wins. The crossover measurements: docs/performance.md, "The CPU backend's choices".

A weight with zero points (pre-quantized AWQ/GPTQ/compressed-tensors, w = (q - z) * s) keeps
the kernel: its packed form also holds `zeros` = z * s per group and column, and the product
is the kernel's x . (q * s) minus (x summed over each group's rows) . (z * s), a [rows, groups]
x [groups, n] correction in XLA.

`PackedQuantWeight` is a pytree like `packed.PackedWeight`: read whole with `[...]`, and its
stacked arrays (`STACKED`) are indexed in place by layer inside a layer scan.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.backends.cpu import build, isa, packed
from jaxaccel.utils.units import round_up

PANEL, PANELS = 16, 4
STREAM = PANEL * PANELS  # output columns per contiguous stream
STEP_ROWS = {8: 4, 4: 8}  # k rows per step of a stream, by bits
OFFSET = {8: 128, 4: 8}  # stored u = q + OFFSET (unsigned, what `vpdpbusd` multiplies)
QTYPES = {jnp.dtype(jnp.int8): 8, jnp.dtype(jnp.int4): 4}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedQuantWeight(packed.WholeWeight):
    lines: jax.Array  # uint8 [*stacked, n_pad/64, k_pad/step, 4, 16, 4]
    scales: jax.Array  # float32 [*stacked, groups, n_pad]
    k_shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    n_shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    bits: int = dataclasses.field(metadata={"static": True})
    # Inside a layer scan: the arrays are whole stacks and `layer` picks one (see
    # `CpuBackend.scan_layers`).
    layer: jax.Array | None = None
    zeros: jax.Array | None = None  # float32 [*stacked, groups, n_pad]: z * s (zero points)

    STACKED = ("lines", "scales", "zeros")

    @property
    def k_pad(self) -> int:
        return STEP_ROWS[self.bits] * self.lines.shape[-4]

    @property
    def n_pad(self) -> int:
        return STREAM * self.lines.shape[-5]


def group_rows(k_shape, k_scale_shape) -> int:
    """Rows of the flattened k that share one scale: qwix tiles each k axis i by
    k_shape[i] // k_scale_shape[i]; below the last tiled axis everything shares, so a group
    is that axis's tile times the sizes of the axes after it (all of k when none is tiled)."""
    tiled = [i for i, s in enumerate(k_scale_shape) if s > 1]
    if not tiled:
        return math.prod(k_shape)
    last = tiled[-1]
    return k_shape[last] // k_scale_shape[last] * math.prod(k_shape[last + 1:])


def _group_scales(scale, lead: int, k_shape, n_shape) -> jax.Array:
    """qwix's scale [*lead, *k_scale, *n_scale] -> float32 [*lead, groups, n]: the scale of
    each group's first row, gathered through the tile arithmetic."""
    c = len(k_shape)
    k_scale = scale.shape[lead:lead + c]
    gk = group_rows(k_shape, k_scale)
    first_rows = np.unravel_index(np.arange(0, math.prod(k_shape), gk), k_shape)
    index = tuple(r // (k // s) for r, k, s in zip(first_rows, k_shape, k_scale))
    grouped = scale[(slice(None),) * lead + index]  # [*lead, groups, *n_scale]
    grouped = jnp.broadcast_to(grouped, (*grouped.shape[:lead + 1], *n_shape))
    return grouped.reshape(*grouped.shape[:lead + 1], math.prod(n_shape)).astype(jnp.float32)


def packable(w, contracting: int, stacked: int = 0, transposed: bool = False) -> str | None:
    """Why the QArray `w` cannot be packed (None: it can): int8/int4, symmetric, scales per
    output column (or shared) and per whole groups of k rows that fit the step layout."""
    if jnp.dtype(w.qtype) not in QTYPES:
        return f"qtype {w.qtype} is not int8 or int4"
    q, s = _k_first(w, contracting, stacked, transposed)
    s = s[0] if isinstance(s, tuple) else s
    k_shape = q.shape[stacked:stacked + contracting]
    n_scale = s.shape[stacked + contracting:]
    if any(ns not in (1, nq) for ns, nq in zip(n_scale, q.shape[stacked + contracting:])):
        return f"scales {s.shape} tile the output axes"
    gk = group_rows(k_shape, s.shape[stacked:stacked + contracting])
    if gk != math.prod(k_shape) and gk % STEP_ROWS[QTYPES[jnp.dtype(w.qtype)]]:
        return f"groups of {gk} k rows are not a multiple of the kernel's step"
    return None


def _k_first(w, contracting: int, stacked: int, transposed: bool):
    """(qvalue, scale) with the k axes before the n axes."""
    q, s = w.qvalue, w.scale
    if w.zero_point is not None:  # carried as z * s, laid out as the scales
        s = (s.astype(jnp.float32), w.zero_point.astype(jnp.float32) * s.astype(jnp.float32))
    if transposed:
        n_axes = q.ndim - stacked - contracting
        order = (*range(stacked), *range(stacked + n_axes, q.ndim),
                 *range(stacked, stacked + n_axes))
        q = q.transpose(order)
        s = jax.tree.map(lambda a: a.transpose(order), s)
    return q, s


def pack(w, contracting: int, stacked: int = 0, transposed: bool = False) -> PackedQuantWeight:
    """Pack the QArray `w` [*stacked, *k_shape, *n_shape]; `contracting` = number of k dims
    (with `transposed`, `w` is [*stacked, *n_shape, *k_shape]). ValueError if `packable`
    says it cannot be."""
    reason = packable(w, contracting, stacked, transposed)
    if reason is not None:
        raise ValueError(f"cannot pack this quantized weight for the CPU kernel: {reason}")
    bits = QTYPES[jnp.dtype(w.qtype)]
    q, s = _k_first(w, contracting, stacked, transposed)
    s, zs = s if isinstance(s, tuple) else (s, None)
    lead, dims = q.shape[:stacked], q.shape[stacked:]
    k_shape, n_shape = dims[:contracting], dims[contracting:]
    k, n = math.prod(k_shape), math.prod(n_shape)
    scales = _group_scales(s, stacked, k_shape, n_shape)
    n_pad_widths = [(0, 0)] * (stacked + 1) + [(0, round_up(n, STREAM) - n)]
    zeros = None if zs is None else jnp.pad(_group_scales(zs, stacked, k_shape, n_shape),
                                            n_pad_widths)
    step = STEP_ROWS[bits]
    k_pad, n_pad = round_up(k, step), round_up(n, STREAM)
    u = q.reshape(*lead, k, n).astype(jnp.int32) + OFFSET[bits]
    u = jnp.pad(u, [(0, 0)] * stacked + [(0, k_pad - k), (0, n_pad - n)],
                constant_values=OFFSET[bits]).astype(jnp.uint8)  # padding stores q = 0
    scales = jnp.pad(scales, [(0, 0)] * (stacked + 1) + [(0, n_pad - n)])
    return PackedQuantWeight(_layout(u, bits, stacked), scales, tuple(k_shape),
                             tuple(n_shape), bits, zeros=zeros)


def _layout(u, bits: int, stacked: int) -> jax.Array:
    """u [*lead, k_pad, n_pad] -> [*lead, n/64, k/step, 4, 16, 4] (see the kernel)."""
    lead, (k_pad, n_pad) = u.shape[:stacked], u.shape[stacked:]
    a = stacked
    if bits == 8:
        # [*lead, k/4, 4t, n/64, 4q, 16c] -> [*lead, n/64, k/4, 4q, 16c, 4t]
        u6 = u.reshape(*lead, k_pad // 4, 4, n_pad // STREAM, PANELS, PANEL)
        return jnp.moveaxis(u6, (a + 2, a, a + 3, a + 4, a + 1), (a, a + 1, a + 2, a + 3, a + 4))
    # [*lead, k/8, 2half, 4t, n/64, 4q, 16c] -> [*lead, n/64, k/8, 4q, 16c, 4t, 2half]
    u7 = u.reshape(*lead, k_pad // 8, 2, 4, n_pad // STREAM, PANELS, PANEL)
    u7 = jnp.moveaxis(u7, (a + 3, a, a + 4, a + 5, a + 2, a + 1),
                      (a, a + 1, a + 2, a + 3, a + 4, a + 5))
    return u7[..., 0] | (u7[..., 1] << 4)


def unpack_values(w: PackedQuantWeight) -> jax.Array:
    """The integer values q, int8 [*stacked, k_pad, n_pad] (the inverse of `_layout`)."""
    lines = w.lines
    lead, a = lines.shape[:-5], lines.ndim - 5
    streams, steps = lines.shape[-5], lines.shape[-4]
    if w.bits == 8:
        u = jnp.moveaxis(lines, (a, a + 1, a + 2, a + 3, a + 4), (a + 2, a, a + 3, a + 4, a + 1))
    else:
        halves = jnp.stack([lines & 0x0F, lines >> 4], axis=-1)
        u = jnp.moveaxis(halves, (a, a + 1, a + 2, a + 3, a + 4, a + 5),
                         (a + 3, a, a + 4, a + 5, a + 2, a + 1))
    u = u.reshape(*lead, steps * STEP_ROWS[w.bits], streams * STREAM)
    return (u.astype(jnp.int16) - OFFSET[w.bits]).astype(jnp.int8)


KERNEL_SOURCE, KERNEL_SYMBOL = "quantized_matmul.cc", "JaxaccelQuantizedMatmul"
# The many-rows entry point of the same source: bf16 x, streams dequantized to bf16 panels.
PANELS_SYMBOL = "JaxaccelQuantizedMatmulPanels"


def kernel_available() -> bool:
    """Whether the compiled kernel can run here (CPU backend, built or buildable)."""
    return jax.default_backend() == "cpu" and build.target(KERNEL_SOURCE, KERNEL_SYMBOL) is not None


def _rows(x, w: PackedQuantWeight):
    lead = x.shape[:x.ndim - len(w.k_shape)]
    if tuple(x.shape[len(lead):]) != w.k_shape:
        raise ValueError(f"x {x.shape} does not end in the packed weight's k dims {w.k_shape}")
    if w.lines.ndim != (5 if w.layer is None else 6):
        raise ValueError(f"packed lines {w.lines.shape} are a stack: matmul needs one layer")
    return lead, math.prod(lead)


def panel_rows(cpu: isa.CpuInfo) -> int | None:
    """The fewest rows of bfloat16 x from which `matmul` takes the dequantized-panel entry
    point on `cpu` (None: never).

    With AVX512-BF16, the panels' `vdpbf16ps` does as many multiplies per instruction as the
    int16-split `vpdpbusd`, without quantizing x or unpacking nibbles per row tile, and once
    the per-call dequantizing is spread over enough rows it wins (Zen 4, GPT-2 shapes,
    scripts/bench_quantized_matmul.py: see PANEL_ROWS). Without it the panels' portable
    bf16 dot is far slower than VNNI, so they are not used.
    """
    return PANEL_ROWS if cpu.bf16_dot and cpu.has("avx512_vnni") else None


# Measured on Zen 4 (AMD EPYC, 2 cores, avx512_bf16 + avx512_vnni), int8 and int4 (group 128)
# on the four GPT-2 124M shapes: see the module docstring. Decode (1-8 rows) stays on VNNI.
PANEL_ROWS = 16


def matmul(x, w: PackedQuantWeight, kernel: str | None = None) -> jax.Array:
    """x[..., *k_shape] (float32 or bfloat16) . dequantize(w) -> float32 [..., *n_shape].

    `kernel` names a registered build of the VNNI entry point (tests pass portable
    variants). By default, the build for this CPU, and bfloat16 x of at least
    `panel_rows(cpu)` rows goes to `matmul_panels` instead.
    """
    lead, rows = _rows(x, w)
    if kernel is None and x.dtype == jnp.bfloat16:
        threshold = panel_rows(isa.detect())
        if threshold is not None and rows >= threshold:
            return matmul_panels(x, w)
    kernel = kernel or build.target(KERNEL_SOURCE, KERNEL_SYMBOL)
    return _call(kernel, x.astype(jnp.float32).reshape(rows, w.k), w, lead)


def matmul_panels(x, w: PackedQuantWeight, kernel: str | None = None) -> jax.Array:
    """The same product through the dequantized-panel entry point (PANELS_SYMBOL): x rounded
    to bfloat16, q exact in bfloat16, float32 sums, scales applied per group. `kernel` names
    a registered build of PANELS_SYMBOL; by default, the one for this CPU."""
    lead, rows = _rows(x, w)
    kernel = kernel or build.target(KERNEL_SOURCE, PANELS_SYMBOL)
    return _call(kernel, x.astype(jnp.bfloat16).reshape(rows, w.k), w, lead)


def _call(kernel: str | None, x2, w: PackedQuantWeight, lead) -> jax.Array:
    """One entry point of the kernel on x2 [rows, k] (zero-padded here to k_pad): y [*lead, *n]
    float32. RuntimeError if no build of the kernel is registered."""
    if kernel is None:
        raise RuntimeError("the quantized matmul kernel is not available; pack weights only "
                           "when `kernel_available()` says so")
    correction = _zero_point_term(x2, w)
    if w.k_pad != w.k:
        x2 = jnp.pad(x2, ((0, 0), (0, w.k_pad - w.k)))
    layer = jnp.int32(0) if w.layer is None else w.layer.astype(jnp.int32)
    y = jax.ffi.ffi_call(kernel, jax.ShapeDtypeStruct((x2.shape[0], w.n_pad), jnp.float32))(
        x2, w.lines, w.scales, layer, bits=np.int32(w.bits))
    if correction is not None:
        y = y - correction
    return y[:, :w.n].reshape(*lead, *w.n_shape)


def _zero_point_term(x2, w: PackedQuantWeight):
    """x2 [rows, k] . (z * s) expanded over each group's rows: float32 [rows, n_pad], what
    the zero points take off the kernel's x . (q * s); None without zero points."""
    if w.zeros is None:
        return None
    zs = w.zeros if w.layer is None else jax.lax.dynamic_index_in_dim(
        w.zeros, w.layer.astype(jnp.int32), keepdims=False)
    groups = zs.shape[0]
    sums = x2.astype(jnp.float32).reshape(x2.shape[0], groups, w.k // groups).sum(-1)
    return jnp.dot(sums, zs, preferred_element_type=jnp.float32)


def matmul_xla(x, w: PackedQuantWeight) -> jax.Array:
    """The same product by XLA: the packed weight dequantized to x's dtype, then one dot."""
    lead, rows = _rows(x, w)
    lines, scales, zeros = w.lines, w.scales, w.zeros
    if w.layer is not None:
        lines, scales = lines[w.layer], scales[w.layer]
        zeros = None if zeros is None else zeros[w.layer]
    q = unpack_values(dataclasses.replace(w, lines=lines, scales=scales, layer=None,
                                          zeros=None))
    groups = scales.shape[0]
    gk = w.k_pad // groups if groups > 1 else w.k_pad
    dtype = x.dtype if x.dtype in (jnp.bfloat16, jnp.float32) else jnp.float32
    deq = q.reshape(groups, gk, w.n_pad).astype(jnp.float32) * scales[:, None, :]
    if zeros is not None:
        deq = deq - zeros[:, None, :]
    deq = deq.astype(dtype)
    deq = deq.reshape(w.k_pad, w.n_pad)[:w.k, :w.n]
    x2 = x.astype(dtype).reshape(rows, w.k)
    y = jnp.dot(x2, deq, preferred_element_type=jnp.float32)
    return y.reshape(*lead, *w.n_shape)
