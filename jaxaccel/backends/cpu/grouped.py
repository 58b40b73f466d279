"""The mixture-of-experts grouped matmul on XLA:CPU (`Backend.grouped_matmul`).

XLA:CPU runs `jax.lax.ragged_dot` through its generic decomposition: every group's weight
against every row, then masked, i.e. the dense all-experts product. Measured on a shared
Zen 4 (8 experts, d 1024, f 2816, float32): 2 rows (a batch-1 Mixtral decode step) 468 ms
with ragged_dot, 6.3 ms gathering the 2 rows' expert weights. So:

* few rows (at most half the groups: decode): each row times its own group's weight,
  gathered ([m, k, n]); the step reads only the experts its tokens chose;
* more rows: tiles of `TILE` sorted rows; a loop over (tile, group) pairs runs the matmul of
  a tile with a group's weight only where the group has rows in that tile (`lax.cond`, a
  real branch on the CPU), masked to those rows: about one pass over the rows per weight,
  plus the tiles a group boundary splits (the scheme of the TPU megablox kernel).

Same contract as the base hook: x [m, k], w [g, k, n], group_sizes int32 [g] -> [m, n] in
x.dtype with float32 accumulation; rows past the last group are zero. With `carriers`
(jax < 0.12, see `jaxaccel.backends.cpu`), bf16 weights are gathered and sliced as their
uint16 bits: that XLA:CPU converted the whole [g, k, n] stack to float32 first (a batch-1
decode step of a 1B 8-expert model: 962 ms of grouped matmuls without, shared Zen 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TILE = 128


def grouped_matmul(x_mk, w_gkn, sizes_g, carriers: bool = False) -> jax.Array:
    m, groups = x_mk.shape[0], w_gkn.shape[0]
    bits = carriers and w_gkn.dtype == jnp.bfloat16
    w_gkn = jax.lax.bitcast_convert_type(w_gkn, jnp.uint16) if bits else w_gkn
    if 2 * m <= groups:
        return _gathered(x_mk, w_gkn, sizes_g)
    return _tiled(x_mk, w_gkn, sizes_g, min(TILE, m))


def _weights(w):
    """A slice of the weights in their own dtype (bf16 back from its uint16 bits)."""
    return jax.lax.bitcast_convert_type(w, jnp.bfloat16) if w.dtype == jnp.uint16 else w


def _row_groups(sizes_g, m: int):
    """(group of each row [m], whether the row is inside a group [m])."""
    ends_g = jnp.cumsum(sizes_g)
    row_m = jnp.arange(m, dtype=ends_g.dtype)
    group_m = jnp.searchsorted(ends_g, row_m, side="right")
    return jnp.minimum(group_m, sizes_g.shape[0] - 1), row_m < ends_g[-1]


def _gathered(x_mk, w_gkn, sizes_g):
    """Row by row (few rows): a float32 vector-matrix product with the row's group's weight,
    indexed in place. XLA:CPU's batched bf16 [m, k] x [m, k, n] einsum was 2.8x slower (2
    rows, 8 x 1024 x 2816 weights: 13.8 vs 5.0 ms, shared Zen 4)."""
    group_m, inside_m = _row_groups(sizes_g, x_mk.shape[0])
    rows = []
    for r in range(x_mk.shape[0]):
        w_kn = _weights(jax.lax.dynamic_index_in_dim(w_gkn, group_m[r], keepdims=False))
        rows.append(jnp.dot(x_mk[r:r + 1].astype(jnp.float32), w_kn.astype(jnp.float32)))
    out = jnp.concatenate(rows)
    return jnp.where(inside_m[:, None], out, 0.0).astype(x_mk.dtype)


def _tiled(x_mk, w_gkn, sizes_g, tile: int):
    m, groups, n = x_mk.shape[0], w_gkn.shape[0], w_gkn.shape[2]
    tiles = -(-m // tile)
    x_pk = jnp.pad(x_mk, ((0, tiles * tile - m), (0, 0)))
    ends_g = jnp.cumsum(sizes_g)
    starts_g = ends_g - sizes_g

    def item(i, out_pn):
        t, g = i // groups, i % groups
        lo = jnp.maximum(starts_g[g], t * tile)
        hi = jnp.minimum(ends_g[g], (t + 1) * tile)

        def compute(out_pn):
            x_tk = jax.lax.dynamic_slice_in_dim(x_pk, t * tile, tile)
            w_kn = _weights(jax.lax.dynamic_index_in_dim(w_gkn, g, keepdims=False))
            w_kn = w_kn.astype(x_mk.dtype)
            y_tn = jnp.dot(x_tk, w_kn, preferred_element_type=jnp.float32)
            row_t = t * tile + jnp.arange(tile)
            y_tn = jnp.where(((row_t >= lo) & (row_t < hi))[:, None], y_tn, 0.0)
            old_tn = jax.lax.dynamic_slice_in_dim(out_pn, t * tile, tile)
            return jax.lax.dynamic_update_slice_in_dim(out_pn, old_tn + y_tn, t * tile, 0)

        return jax.lax.cond(hi > lo, compute, lambda o: o, out_pn)

    out_pn = jax.lax.fori_loop(0, tiles * groups, item,
                               jnp.zeros((tiles * tile, n), jnp.float32))
    return out_pn[:m].astype(x_mk.dtype)
