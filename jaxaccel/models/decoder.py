"""Pieces shared by the decoder families (`gpt2`, `llama`) that XLA:CPU is sensitive to.

Shape legend as in `layers`: b batch, t tokens, d model, n heads (or kv heads), h head dim.

All three exist for one reason: inside the layer scan the weight slices are intermediates
whose layout and type XLA:CPU may rewrite, and its rewrites there turned every weight into a
transposed or float32 copy per layer and step. The code below pins them, so weights are read
as stored. (`scan_blocks` would serve `bert` too; it could move into `layers.scan_layers`.)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxaccel.models import layers


def heads_in(x_btd, w_dnh):
    """x @ w into heads: [b, t, d] x [d, n, h] -> [b, t, n, h], as one 2-D matmul.

    A 3-D einsum lets XLA fold the following head transposes into the matmul by transposing
    the weight instead (a copy of it per layer and step); a [d, n*h] view cannot be folded.
    """
    d, n, h = w_dnh.shape
    out = layers.einsum("btd,dm->btm", x_btd, w_dnh.reshape(d, n * h))
    return out.reshape(*x_btd.shape[:2], n, h)


def heads_out(a_btnh, w_nhd):
    """[b, t, n, h] x [n, h, d] -> [b, t, d], as one 2-D matmul (see `heads_in`)."""
    n, h, d = w_nhd.shape
    return layers.einsum("btm,md->btd", a_btnh.reshape(*a_btnh.shape[:2], n * h),
                         w_nhd.reshape(n * h, d))


def _to_carrier(x):
    # XLA:CPU has no bfloat16 dynamic-slice: it converts the whole stacked weight to float32
    # (every call) to slice it. Slicing the same bits as uint16 is native and free.
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def _from_carrier(x):
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def _map_params(module: nnx.Module, fn) -> nnx.Module:
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(fn, state))


def scan_blocks(blocks: nnx.Module, carry, body: Callable, xs=None):
    """`layers.scan_layers`, with bfloat16 weights sliced as uint16 (see `_to_carrier`)."""
    def typed_body(block, carry, x):
        return body(_map_params(block, _from_carrier), carry, x)

    return layers.scan_layers(_map_params(blocks, _to_carrier), carry, typed_body, xs)
