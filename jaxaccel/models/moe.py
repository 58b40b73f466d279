"""A mixture-of-experts feed-forward: a softmax router picks each token's top-k experts, and
each expert (a gated MLP) runs only on the tokens routed to it.

Shape legend as in `layers`, plus e experts, m routed tokens (b * t), k the top-k slots, g
the experts one device holds.

Dropless and exact: every token reaches all of its k experts (no capacity, no dropped
tokens), so the layer computes what transformers computes. The (token, slot) pairs are
sorted by expert and the experts run as grouped matmuls over those sorted rows
(`Backend.grouped_matmul`, `jax.lax.ragged_dot` by default): no token is multiplied by an
expert it was not routed to.

Expert parallelism: under a layout whose rules map the `experts` logical axis onto a mesh
axis (`ep`, `dp_ep`, `tp_ep`), each device holds e / size experts and the layer runs in a
`shard_map`. Every device of an `expert` group already holds the same tokens (the batch is
split over `data` only) and their routing. Two dispatches, chosen per shape by measurement (`choose_dispatch`, table there):

* psum (prefill): every device sorts all of the group's (token, slot) pairs and computes the
  (token, slot) pairs of its own experts; one `psum` over the expert (and `model`, where the
  experts' mlp dim is split) axes adds the partial outputs back, in token order: one
  all-reduce of [m, d] per layer, the cost of a tensor-parallel MLP.
* all-to-all (decode-sized shards): each device takes 1/n of the tokens and sends each
  (token, slot) pair to the device holding its expert (`jax.lax.all_to_all`, dropless
  fixed-size blocks); results come back the same way and an all-gather restores the order.

An expert count the mesh axis does not divide leaves the experts replicated (the rule
tables' usual fallback) and runs them locally.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxaccel import backends
from jaxaccel.models import layers
from jaxaccel.parallel import sharding as ax

# Logical axes of one layer's expert weights (the stacked parameter adds `layers` first).
EXPERT_IN_AXES = (ax.EXPERTS, ax.EMBED, ax.MLP)  # wg_edf, wu_edf: [e, d, f]
EXPERT_OUT_AXES = (ax.EXPERTS, ax.MLP, ax.EMBED)  # wm_efd: [e, f, d]
# Weight-only quantization (`FamilySpec.quantized_weights`): contraction axes per expert, so
# each expert gets its own per-channel scales ([e, 1, f] and [e, 1, d]).
QUANTIZED = {"wg_edf": (1,), "wu_edf": (1,), "wm_efd": (1,)}
QUANTIZED_SHARED = {"shared_wg_df": (0,), "shared_wu_df": (0,), "shared_wm_fd": (0,)}


@dataclasses.dataclass(frozen=True)
class MoELayout:
    """The switches of a mixture-of-experts MLP (hashable: static model metadata)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    norm_topk_prob: bool  # renormalize the k chosen probabilities to sum to 1 (Mixtral: yes)
    activation: str = "silu"
    # A shared expert every token runs through, scaled by sigmoid(y . gate) (Qwen2-MoE); 0: none
    shared_intermediate_size: int = 0

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be between 1 and "
                             f"num_experts={self.num_experts}")


def quantized_weights(prefix: str, layout_has_shared: bool) -> dict[str, tuple[int, ...]]:
    """The quantized expert weights of a stack named `prefix` (e.g. "blocks.moe")."""
    table = {**QUANTIZED, **(QUANTIZED_SHARED if layout_has_shared else {})}
    return {f"{prefix}.{name}": axes for name, axes in table.items()}


class MoE(nnx.Module):
    """The router and the experts of one MoE layer (built stacked over `num_layers`)."""

    def __init__(self, hidden_size: int, layout: MoELayout, *, dtype, rngs: nnx.Rngs,
                 num_layers: int | None = None):
        self.layout = layout
        d, e, f = hidden_size, layout.num_experts, layout.intermediate_size
        p = lambda shape, axes: layers.make_param(  # noqa: E731
            rngs, shape, axes, dtype, layers.normal_init(), num_layers)
        # The router stays whole on every device: each routes its own tokens.
        self.router_de = p((d, e), (ax.EMBED, None))
        self.wg_edf = p((e, d, f), EXPERT_IN_AXES)
        self.wu_edf = p((e, d, f), EXPERT_IN_AXES)
        self.wm_efd = p((e, f, d), EXPERT_OUT_AXES)
        s = layout.shared_intermediate_size
        self.shared_wg_df = p((d, s), (ax.EMBED, ax.MLP)) if s else None
        self.shared_wu_df = p((d, s), (ax.EMBED, ax.MLP)) if s else None
        self.shared_wm_fd = p((s, d), (ax.MLP, ax.EMBED)) if s else None
        self.shared_gate_d1 = p((d, 1), (ax.EMBED, None)) if s else None

    def __call__(self, y_btd):
        """The layer's output [b, t, d] in y's dtype."""
        b, t, d = y_btd.shape
        weights_mk, experts_mk = route(y_btd.reshape(b * t, d), self.router_de[...],
                                       self.layout)
        expert_weights = (self.wg_edf[...], self.wu_edf[...], self.wm_efd[...])
        out_btd = dispatch(y_btd, weights_mk.reshape(b, t, -1), experts_mk.reshape(b, t, -1),
                           expert_weights, self.layout.activation)
        if self.shared_wg_df is not None:
            out_btd = out_btd + self._shared(y_btd)
        return out_btd

    def _shared(self, y_btd):
        """The shared expert's gated MLP, scaled by its sigmoid gate."""
        act = layers.activation(self.layout.activation)
        g_btf = layers.matmul(y_btd, self.shared_wg_df[...])
        u_btf = layers.matmul(y_btd, self.shared_wu_df[...])
        out_btd = layers.matmul(act(g_btf) * u_btf, self.shared_wm_fd[...])
        gate_bt1 = jax.nn.sigmoid(layers.matmul(y_btd, self.shared_gate_d1[...]))
        return gate_bt1 * out_btd


def route(y_md, router_de, layout: MoELayout):
    """(weights [m, k] float32, expert ids [m, k] int32): softmax over all experts in float32,
    the k largest probabilities, renormalized to sum to 1 when the layout says so."""
    logits_me = layers.matmul(y_md, router_de).astype(jnp.float32)
    probs_me = jax.nn.softmax(logits_me, axis=-1)
    weights_mk, experts_mk = jax.lax.top_k(probs_me, layout.top_k)
    if layout.norm_topk_prob:
        weights_mk = weights_mk / weights_mk.sum(-1, keepdims=True)
    return weights_mk, experts_mk.astype(jnp.int32)


def local_experts(y_md, weights_mk, experts_mk, expert_weights, activation: str,
                  first_expert=0):
    """The summed output [m, d] (float32) of the (token, slot) pairs whose expert is one of
    the g experts held here (ids first_expert .. first_expert + g - 1); other pairs add 0.

    Pairs are sorted by expert (pairs of other experts last), each expert's rows run through
    its gated MLP as grouped matmuls, and the results are put back in (token, slot) order.
    """
    wg_gdf, wu_gdf, wm_gfd = expert_weights
    m, k = experts_mk.shape
    held = wg_gdf.shape[0]
    local_mk = experts_mk - first_expert
    mine_mk = (local_mk >= 0) & (local_mk < held)
    key_p = jnp.where(mine_mk, local_mk, held).reshape(m * k)  # p: (token, slot) pairs
    order_p = jnp.argsort(key_p, stable=True)
    sizes_g = jnp.sum(key_p[None, :] == jnp.arange(held)[:, None], axis=1, dtype=jnp.int32)
    x_pd = y_md[order_p // k]
    backend, act = backends.current(), layers.activation(activation)
    h_pf = (act(backend.grouped_matmul(x_pd, wg_gdf, sizes_g))
            * backend.grouped_matmul(x_pd, wu_gdf, sizes_g))
    out_pd = backend.grouped_matmul(h_pf, wm_gfd, sizes_g).astype(jnp.float32)
    # Back to (token, slot) order: the inverse permutation of the sort.
    inverse_p = jnp.zeros_like(order_p).at[order_p].set(jnp.arange(m * k, dtype=order_p.dtype))
    out_mkd = out_pd[inverse_p].reshape(m, k, -1)
    # Rows of other experts were never computed (zero, or whatever a kernel leaves there).
    scale_mk = jnp.where(mine_mk, weights_mk, 0.0)
    return jnp.sum(jnp.where(mine_mk[..., None], out_mkd, 0.0) * scale_mk[..., None], axis=1)


def dispatch(y_btd, weights_btk, experts_btk, expert_weights, activation: str):
    """Every token's weighted expert outputs [b, t, d] in y's dtype, on the current layout's
    devices (`jaxaccel.parallel.sharding.current_layout`): on one device (or a layout that
    does not split the experts) a plain call of `local_experts`, else a shard_map in which
    each device computes its experts' share, brought back by a psum or an all-to-all
    (`choose_dispatch`, by the tokens of one data shard)."""
    layout = ax.current_layout()
    specs = _expert_specs(layout, expert_weights)
    reduce_axes = tuple(sorted({a for spec in specs for a in spec if a is not None}))
    if not reduce_axes:
        return _local(y_btd, weights_btk, experts_btk, expert_weights, activation, 0)
    mesh, rules = layout.mesh, layout.rules
    experts_axis = specs[0][0] if specs[0] else None
    row_spec = ax.logical_to_spec((ax.BATCH,), y_btd.shape[:1], mesh, rules)

    b, t, _ = y_btd.shape
    row_axes = (row_spec[0] if isinstance(row_spec[0], tuple) else (row_spec[0],)) \
        if len(row_spec) and row_spec[0] else ()
    shard_tokens = b * t // math.prod(mesh.shape[a] for a in row_axes)
    use_all_to_all = experts_axis is not None and choose_dispatch(
        shard_tokens, mesh.shape[experts_axis]) == "all_to_all"

    def shard(y_btd, weights_btk, experts_btk, expert_weights):
        if use_all_to_all:
            other_axes = tuple(a for a in reduce_axes if a != experts_axis)
            return all_to_all_experts(y_btd, weights_btk, experts_btk, expert_weights,
                                      activation, experts_axis, other_axes)
        held = expert_weights[0].shape[0]
        first = jax.lax.axis_index(experts_axis) * held if experts_axis else 0
        out_btd = _local(y_btd, weights_btk, experts_btk, expert_weights, activation, first,
                         float32=True)
        return jax.lax.psum(out_btd, reduce_axes).astype(y_btd.dtype)

    weight_specs = tuple(_tree_spec(w, s) for w, s in zip(expert_weights, specs))
    return jax.shard_map(shard, mesh=mesh, in_specs=(row_spec, row_spec, row_spec, weight_specs),
                         out_specs=row_spec, check_vma=False)(
        y_btd, weights_btk, experts_btk, expert_weights)


# Which dispatch runs for a shard of m tokens on an expert axis of n devices: see the measured
# table in `choose_dispatch`. Set by `dispatch_strategy` (tests, measurements); None: measured.
_FORCED: list[str | None] = [None]


def dispatch_strategy(strategy: str | None) -> None:
    """Force "psum" or "all_to_all" for every later trace (None: the measured choice)."""
    if strategy not in (None, "psum", "all_to_all"):
        raise ValueError(f"dispatch strategy {strategy!r}: expected 'psum' or 'all_to_all'")
    _FORCED[0] = strategy


# Shards of at most this many tokens (decode steps) dispatch by all-to-all (measured below).
ALL_TO_ALL_MAX_TOKENS = 8


def choose_dispatch(tokens: int, expert_devices: int) -> str:
    """The dispatch for `tokens` tokens (one data shard's b * t) on `expert_devices` devices:
    "all_to_all" for decode-sized shards (at most `ALL_TO_ALL_MAX_TOKENS`), else "psum".

    Measured with `python -m jaxaccel.bench.moe_dispatch` (one MoE layer, bf16, d 1024,
    f 2048, 8 experts, top-2, 8 simulated CPU devices on a shared 2-core AVX-512 Xeon at load
    15-20; median ms, the two strategies' calls alternated; three runs' all-to-all / psum):

        mesh             tokens   psum ms   all-to-all ms   all-to-all / psum (3 runs)
        expert=4         8          325       316           1.12, 0.81, 0.97
        expert=4         512       2114      2020           1.00, 1.01, 0.96
        data=2,expert=4  8          736       578           0.90, 0.86, 0.79
        data=2,expert=4  512       1667      1614           0.97, 0.98, 0.97

    Decode-sized shards: the all-to-all was faster in 5 of 6 runs (each device sorts and
    gathers the pairs of 1/n of the tokens). Prefill: equal within this machine's noise (+-5%), and the
    psum program is the simpler one, so it stays. Simulated devices share the host's cores
    (their collectives are memory copies): on a real interconnect the all-to-all moves
    2 x [m * k, d] per device against the psum's all-reduce of [m, d], and wants a new
    measurement (and a ragged all-to-all, which XLA:CPU lacks).
    """
    if _FORCED[0] is not None:
        return _FORCED[0]
    return "all_to_all" if tokens <= ALL_TO_ALL_MAX_TOKENS else "psum"


def all_to_all_experts(y_btd, weights_btk, experts_btk, expert_weights, activation: str,
                       experts_axis: str, other_axes: tuple[str, ...] = ()):
    """The expert outputs [b, t, d] of the tokens this expert group holds, each device
    taking a 1/n slice of them and sending every (token, slot) pair to the device that
    holds its expert (`jax.lax.all_to_all` over `experts_axis`, n devices), which runs its
    experts on the pairs it received and sends the results back; an all-gather puts the
    slices together again. Runs inside a shard_map; exact (same pairs, same weights).

    Buffers are dropless: each (source, destination) block has room for all n_local * k
    pairs of the source (a fixed shape: XLA:CPU has no ragged all-to-all), so the pairs a
    device runs are [n * n_local * k, d] rows of which its own are sorted first.
    `other_axes`: mesh axes that also split the experts' weights (`model` under tp_ep),
    psum-ed after the local compute.
    """
    b, t, d = y_btd.shape
    k = experts_btk.shape[-1]
    n = jax.lax.axis_size(experts_axis)
    me = jax.lax.axis_index(experts_axis)
    held = expert_weights[0].shape[0]
    m = b * t
    per = -(-m // n)  # tokens each device dispatches
    pad = per * n - m
    y_md = jnp.pad(y_btd.reshape(m, d), ((0, pad), (0, 0)))
    w_mk = jnp.pad(weights_btk.reshape(m, k), ((0, pad), (0, 0)))
    e_mk = jnp.pad(experts_btk.reshape(m, k), ((0, pad), (0, 0)), constant_values=-1)
    start = me * per
    x_nd = jax.lax.dynamic_slice_in_dim(y_md, start, per)
    w_nk = jax.lax.dynamic_slice_in_dim(w_mk, start, per)
    e_nk = jax.lax.dynamic_slice_in_dim(e_mk, start, per)
    pairs = per * k
    e_p = e_nk.reshape(pairs)
    dest_p = jnp.where(e_p >= 0, e_p // held, n)  # padding rows go nowhere
    # Each pair's slot in its destination's block: its rank among the pairs to that device.
    onehot_pn = dest_p[:, None] == jnp.arange(n)[None, :]
    slot_p = jnp.sum((jnp.cumsum(onehot_pn, axis=0) - 1) * onehot_pn, axis=1)
    send_x = jnp.zeros((n + 1, pairs, d), y_btd.dtype).at[dest_p, slot_p].set(
        jnp.repeat(x_nd, k, axis=0))[:n]
    send_e = jnp.full((n + 1, pairs), -1, jnp.int32).at[dest_p, slot_p].set(e_p)[:n]
    recv_x = jax.lax.all_to_all(send_x, experts_axis, 0, 0)
    recv_e = jax.lax.all_to_all(send_e, experts_axis, 0, 0)
    rows = n * pairs
    out_rd = local_experts(recv_x.reshape(rows, d), jnp.ones((rows, 1), jnp.float32),
                           recv_e.reshape(rows, 1), expert_weights, activation, me * held)
    if other_axes:
        out_rd = jax.lax.psum(out_rd, other_axes)
    back = jax.lax.all_to_all(out_rd.reshape(n, pairs, d), experts_axis, 0, 0)  # float32
    back = jnp.concatenate([back, jnp.zeros((1, pairs, d), back.dtype)])  # padding rows
    out_nkd = back[dest_p, slot_p].reshape(per, k, d)
    out_nd = jnp.sum(out_nkd * w_nk[..., None], axis=1)
    out_md = jax.lax.all_gather(out_nd, experts_axis, tiled=True)[:m]
    return out_md.reshape(b, t, d).astype(y_btd.dtype)


def _local(y_btd, weights_btk, experts_btk, expert_weights, activation, first,
           float32: bool = False):
    b, t, d = y_btd.shape
    k = experts_btk.shape[-1]
    out_md = local_experts(y_btd.reshape(b * t, d), weights_btk.reshape(b * t, k),
                           experts_btk.reshape(b * t, k), expert_weights, activation, first)
    return out_md.reshape(b, t, d).astype(jnp.float32 if float32 else y_btd.dtype)


def _expert_specs(layout, expert_weights) -> tuple[P, ...]:
    """PartitionSpecs of (wg, wu, wm) on `layout` (all empty without a layout or inside a
    pipeline stage, where the layer runs as traced and XLA places it)."""
    empty = (P(),) * len(expert_weights)
    if layout is None or layout.mesh.shape.get("stage", 1) > 1:
        return empty
    return tuple(ax.logical_to_spec(axes, _shape(w), layout.mesh, layout.rules)
                 for w, axes in zip(expert_weights,
                                    (EXPERT_IN_AXES, EXPERT_IN_AXES, EXPERT_OUT_AXES)))


def _shape(w) -> tuple[int, ...]:
    return tuple(w.shape)


def _tree_spec(w, spec: P):
    """The in_spec of one weight: a quantized QArray's scales split with its values, except
    along a dim one scale spans (size 1: the contraction of per-channel scales)."""
    if not isinstance(w, qwix.QArray):
        return spec
    entries = list(spec) + [None] * (w.qvalue.ndim - len(spec))
    scale = [None if dim == 1 else entry for entry, dim in zip(entries, w.scale.shape)]
    return dataclasses.replace(w, qvalue=spec, scale=P(*scale))
