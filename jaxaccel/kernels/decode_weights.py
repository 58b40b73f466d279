"""Packing a decoder's matmul weights once, for bfloat16 generation on the CPU.

`Generator` calls `wanted` and then `pack_state` when it is built: the packed weights replace
the plain ones in its state (no second copy is kept), and every compiled prefill and decode
step reads them through `layers.matmul`, `layers.lookup` and `layers.head_logits`.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp

from jaxaccel import sharding as ax
from jaxaccel.kernels import huge_pages, packed
from jaxaccel.models.state import path_name


class KernelUnavailable(ValueError):
    """Packed weights were asked for where the kernel cannot run."""


def family_packing(config) -> dict[str, tuple[int, bool]]:
    """Dotted path -> (contracting dims, stored [n, k]) for the family of `config`: its
    `PACKED_BLOCK_WEIGHTS` (stacked, [k, n]) and its `packed_head` ([v, d])."""
    module = importlib.import_module(type(config).__module__)
    if not hasattr(module, "PACKED_BLOCK_WEIGHTS"):
        return {}
    packing = {f"blocks.{name}": (contracting, False)
               for name, contracting in module.PACKED_BLOCK_WEIGHTS.items()}
    return {**packing, module.packed_head(config): (1, True)}


def wanted(dtype, layout: ax.Layout, pipelined: bool, requested: bool | None) -> bool:
    """Whether to pack: bfloat16 on a single CPU device, without a pipeline, kernel built.

    `requested` False never packs; True insists (an error if impossible); None decides.
    """
    reasons = []
    if jnp.dtype(dtype) != jnp.bfloat16:
        reasons.append("the dtype is not bfloat16")
    if jax.default_backend() != "cpu":
        reasons.append("the backend is not the CPU")
    if layout.mesh.size != 1 or pipelined:
        reasons.append("the mesh has more than one device")
    if requested is False:
        return False
    if not reasons and not packed.kernel_available():
        reasons.append("the kernel could not be built (see the warning above)")
    if requested and reasons:
        raise KernelUnavailable("packed bf16 decode weights cannot be used here: "
                                + "; ".join(reasons))
    return not reasons


def pack_state(state, config):
    """`state` with the family's matmul weights replaced by `PackedWeight`s, packed in one
    jit call and then moved onto huge pages (see `huge_pages`)."""
    spec = family_packing(config)

    def pack_leaf(path, leaf):
        name = path_name(path)
        if name not in spec:
            return leaf
        contracting, transposed = spec[name]
        stacked = 1 if name.startswith("blocks.") else 0
        return packed.pack(leaf, contracting, stacked=stacked, transposed=transposed)

    packed_state = jax.jit(lambda s: jax.tree_util.tree_map_with_path(pack_leaf, s))(state)

    def to_huge_pages(leaf):
        if not isinstance(leaf, packed.PackedWeight):
            return leaf
        return dataclasses.replace(leaf, lines=huge_pages.copy_to_huge_pages(leaf.lines))

    return jax.tree.map(to_huge_pages, packed_state,
                        is_leaf=lambda x: isinstance(x, packed.PackedWeight))
