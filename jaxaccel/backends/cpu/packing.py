"""Packing a decoder's matmul weights once, for generation on the CPU: bfloat16 and float32
weights for the dense kernels (`packed`), weight-only int8 / int4 quantized ones (qwix QArrays)
for the quantized kernel (`quantized`), in any compute dtype.

The runtime calls `CpuBackend.prepare_decoder`, which calls `wanted` and then `pack_state`
when a `Generator` is built: the packed weights replace the plain ones in its state (no
second copy is kept), and every compiled prefill and decode step reads them through the CPU
backend's `matmul`, `lookup` and `head_logits` hooks.

Which weights to pack is read off the parameters' logical axes, so any decoder family is
covered without declaring anything: every stacked block weight `w*` of rank >= 2, and the
[vocab, embed] head (`lm_head_vd`, or the tied `token_vd`). A quantized weight appears in
`param_specs` as NAME.values / NAME.scales (`jaxaccel.parallel.params`) and is packed whole.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import qwix

from jaxaccel.parallel import sharding as ax
from jaxaccel.parallel.params import param_specs, path_name
from jaxaccel.backends.cpu import huge_pages, packed, quantized
from jaxaccel.errors import KernelUnavailable

HEAD_NAMES = ("lm_head_vd", "token_vd")  # the untied head first; tied, the table is the head


def packing_spec(state) -> dict[str, tuple[int, bool]]:
    """Dotted path -> (contracting dims, stored [n, k]) of the weights to pack in `state`.

    A block weight whose first (non-layer) axis is `embed` contracts that axis ([d, n, h],
    [d, f]); any other contracts all but its last axis ([n, h, d], [f, d]).
    """
    specs = {name.removesuffix(".values"): s for name, s in param_specs(state).items()
             if not name.endswith(".scales")}
    spec = {}
    for name, s in specs.items():
        block, _, leaf = name.rpartition(".")
        axes = s.axes[1:]
        stacked_matrix = s.axes[:1] == (ax.LAYERS,) and len(axes) >= 2
        if block == "blocks" and leaf.startswith("w") and stacked_matrix:
            spec[name] = (1 if axes[0] == ax.EMBED else len(axes) - 1, False)
    head = next((n for n in HEAD_NAMES if n in specs and specs[n].axes == (ax.VOCAB, ax.EMBED)),
                None)
    if head is not None:
        spec[head] = (1, True)
    return spec


PACKED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def wanted(dtype, single_device: bool, requested: bool | None) -> bool:
    """Whether to pack: bfloat16 or float32 on a single CPU device (no pipeline), kernel
    built.

    `requested` False never packs; True insists (KernelUnavailable if impossible); None decides.
    """
    reasons = []
    if jnp.dtype(dtype) not in PACKED_DTYPES:
        reasons.append(f"the dtype is {jnp.dtype(dtype).name}, not bfloat16 or float32")
    if not single_device:
        reasons.append("the mesh has more than one device")
    if requested is False:
        return False
    if not reasons and not packed.kernel_available(dtype):
        reasons.append("the kernel could not be built (see the warning above)")
    if requested and reasons:
        raise KernelUnavailable("packed decode weights (--kernels, packed_weights=True) "
                                "cannot be used here: "
                                + "; ".join(reasons))
    return not reasons


def _is_qarray(x) -> bool:
    return isinstance(x, qwix.QArray)


def has_quantized(state) -> bool:
    """Whether `state` holds any weight-only quantized (QArray) parameter."""
    return any(map(_is_qarray, jax.tree.leaves(state, is_leaf=_is_qarray)))


def quantized_wanted(state, single_device: bool, requested: bool | None) -> bool:
    """Whether to pack `state`'s quantized weights: it has some, on one CPU device, and the
    quantized kernel builds (`requested` False never packs)."""
    return (requested is not False and single_device and has_quantized(state)
            and quantized.kernel_available())


def pack_state(state, dense=jnp.bfloat16, quantize: bool = True):
    """`state` with its matmul weights (`packing_spec`) replaced by packed ones, packed in one
    jit call and then moved onto huge pages (see `huge_pages`): plain arrays by `packed.pack`
    as `dense` (bfloat16 or float32; None leaves them), quantized QArrays by `quantized.pack`
    (when `quantize`, and where their scale layout fits the kernel: the others keep qwix's
    plain path).

    An abstract state (ShapeDtypeStructs, one device) gives the abstract packed state, so
    programs can compile before the weights are restored.
    """
    spec = packing_spec(state)

    def pack_leaf(path, leaf):
        name = path_name(path)
        if name not in spec:
            return leaf
        contracting, transposed = spec[name]
        stacked = 1 if name.startswith("blocks.") else 0
        if _is_qarray(leaf):
            fits = quantized.packable(leaf, contracting, stacked, transposed) is None
            if not (quantize and fits):
                return leaf
            return quantized.pack(leaf, contracting, stacked=stacked, transposed=transposed)
        if dense is None:
            return leaf
        return packed.pack(leaf, contracting, stacked=stacked, transposed=transposed,
                           dtype=dense)

    pack_all = jax.jit(lambda s: jax.tree_util.tree_map_with_path(pack_leaf, s,
                                                                 is_leaf=_is_qarray))
    first = jax.tree.leaves(state)[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        one_device = first.sharding  # single device: every array has this sharding
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device),
                            jax.eval_shape(pack_all, state))
    packed_state = pack_all(state)

    packed_types = (packed.PackedWeight, quantized.PackedQuantWeight)

    def to_huge_pages(leaf):
        if not isinstance(leaf, packed_types):
            return leaf
        return dataclasses.replace(leaf, lines=huge_pages.copy_to_huge_pages(leaf.lines))

    return jax.tree.map(to_huge_pages, packed_state, is_leaf=lambda x: isinstance(x, packed_types))
