"""Building blocks shared by the model families.

Shape suffixes follow one legend across jaxaccel/models:
  b batch, t query sequence, s key sequence, d model width, n heads, k kv heads,
  h head dim, f mlp width, v vocab, l layers.

Precision policy: parameters and activations are held in the compute dtype (float32 or
bfloat16); every matmul accumulates in float32 (`preferred_element_type`) and norms and
softmax run in float32. On XLA:CPU a bf16 dot with an f32 result is also ~2x faster than one
with a bf16 result, so the policy costs nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxaccel import sharding as ax
from jaxaccel.kernels import packed
from jaxaccel.kernels.packed import PackedWeight

Init = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def normal_init(stddev: float = 0.02) -> Init:
    return lambda key, shape, dtype: stddev * jax.random.normal(key, shape, dtype)


def zeros_init(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def ones_init(key, shape, dtype):
    return jnp.ones(shape, dtype)


def make_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None],
               dtype, init: Init = normal_init(), num_layers: int | None = None) -> nnx.Param:
    """An nnx.Param carrying its logical axis names as `axes` metadata.

    With `num_layers`, the parameter is stacked: a leading `layers` axis holds one slice per
    transformer block, which `scan_layers` iterates and pipeline stages split.
    """
    if num_layers is not None:
        shape, axes = (num_layers, *shape), (ax.LAYERS, *axes)
    if len(shape) != len(axes):
        raise ValueError(f"shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=tuple(axes))


def einsum(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """Matmul in the activation dtype with float32 accumulation, result in x.dtype."""
    out = jnp.einsum(equation, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


def matmul(x, w, contracting: int = 1) -> jax.Array:
    """x[..., *k] . w[*k, *n] -> [..., *n] in x.dtype, float32 accumulation.

    `contracting` counts the k dims. `w` may be a `PackedWeight` (bf16 decode on CPU), which
    runs the packed-weight kernel. Otherwise it is one 2-D matmul: a 3-D einsum lets XLA fold
    neighbouring head transposes into the matmul by transposing the weight instead (a copy of
    it per layer and step); a [k, n] view cannot be folded.
    """
    if isinstance(w, PackedWeight):
        return packed.matmul(x, w).astype(x.dtype)
    k_shape, n_shape = w.shape[:contracting], w.shape[contracting:]
    lead = x.shape[:x.ndim - contracting]
    x2 = x.reshape(*lead, math.prod(k_shape))
    out = einsum("...k,kn->...n", x2, w.reshape(math.prod(k_shape), math.prod(n_shape)))
    return out.reshape(*lead, *n_shape)


def lookup(table_vd, ids) -> jax.Array:
    """Rows `ids` of an embedding table [v, ...] (plain, or packed as a tied head)."""
    if isinstance(table_vd, PackedWeight):
        return packed.lookup_rows(table_vd, ids)
    # XLA:CPU gathers bfloat16 by converting the whole table to float32 first; the same
    # bits gathered as uint16 need no conversion.
    return _from_carrier(jnp.take(_to_carrier(table_vd), ids, axis=0))


def head_logits(x_btd, head_vd) -> jax.Array:
    """Float32 logits [b, t, v] from a head stored [v, d] (plain, or packed transposed)."""
    if isinstance(head_vd, PackedWeight):
        return packed.matmul(x_btd, head_vd)
    return jnp.einsum("btd,vd->btv", x_btd, head_vd.astype(x_btd.dtype),
                      preferred_element_type=jnp.float32)


def layer_norm(x, scale, bias, eps: float):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rms_norm(x, scale, eps: float):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def gelu(x, approximate: bool):
    return jax.nn.gelu(x, approximate=approximate)


ACTIVATIONS = {
    "gelu": lambda x: gelu(x, approximate=False),
    "gelu_new": lambda x: gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def attention(q_btnh, k_bskh, v_bskh, mask_bts) -> jax.Array:
    """Softmax attention with grouped KV heads (n % k == 0), softmax in float32.

    `mask_bts` is boolean, True where query t may attend to key s.
    """
    b, t, n, h = q_btnh.shape
    kv_heads = k_bskh.shape[2]
    k_bskh, v_bskh = k_bskh.astype(q_btnh.dtype), v_bskh.astype(q_btnh.dtype)
    if kv_heads == n and q_btnh.dtype == jnp.bfloat16:
        # XLA:CPU picks different dot layouts for the two spellings: on MiniLM (32 x 128
        # tokens) the plain multi-head one runs bf16 ~12% faster end to end, while the
        # grouped one runs float32 ~30% faster (74 vs 56 sentences/s). Measured, not guessed.
        return _softmax_attention("btnh,bsnh->bnts", "bnts,bsnh->btnh", q_btnh, k_bskh,
                                  v_bskh, mask_bts[:, None])
    q_btkgh = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h)
    out = _softmax_attention("btkgh,bskh->bkgts", "bkgts,bskh->btkgh", q_btkgh, k_bskh,
                             v_bskh, mask_bts[:, None, None])
    return out.reshape(b, t, n, h)


def _softmax_attention(score_eq, out_eq, q, k, v, mask):
    scores = jnp.einsum(score_eq, q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum(out_eq, probs, v, preferred_element_type=jnp.float32).astype(q.dtype)


# A replacement for the plain scan below, e.g. `pipeline.Pipeline`; set while tracing.
_LAYER_RUNNER: contextvars.ContextVar = contextvars.ContextVar("layer_runner", default=None)


@contextlib.contextmanager
def use_layer_runner(runner: Callable | None):
    """Within the block, `scan_layers` calls `runner(blocks, carry, body, xs)` instead."""
    token = _LAYER_RUNNER.set(runner)
    try:
        yield
    finally:
        _LAYER_RUNNER.reset(token)


def scan_layers(blocks: nnx.Module, carry, body: Callable, xs=None):
    """Run `body(block, carry, x) -> (carry, y)` over the stacked layers of `blocks`.

    `blocks` holds parameters with a leading layers axis (see `make_param`). One layer is
    traced and compiled once, however deep the model, which keeps compile time flat.
    To stay pipelinable (see `jaxaccel.pipeline`), keep batch-dependent inputs in `carry`
    ([b, ...]) or `xs` ([l, b, ...]), never in the body's closure.
    """
    runner = _LAYER_RUNNER.get()
    if runner is not None:
        with use_layer_runner(None):  # the runner's own per-stage scans are plain
            return runner(blocks, carry, body, xs)
    graphdef, state = nnx.split(blocks)
    state, stacks = _index_packed_stacks(state)

    def step(carry, layer_and_x):
        layer_state, x = layer_and_x
        layer_state = _attach_packed_stacks(layer_state, stacks)
        return body(nnx.merge(graphdef, layer_state), carry, x)

    return jax.lax.scan(step, carry, (state, xs))


def _is_packed(x) -> bool:
    return isinstance(x, PackedWeight)


def _index_packed_stacks(state):
    """Packed weights leave the scanned state: each becomes a layer index to scan over, and
    its stack is returned to be read whole (the kernel picks the layer; a scanned slice would
    be copied out by XLA, layer by layer, step by step)."""
    stacks = []

    def index(leaf):
        if not _is_packed(leaf):
            return leaf
        stacks.append(leaf.lines)
        return dataclasses.replace(leaf, lines=None, layer=jnp.arange(leaf.lines.shape[0]))

    return jax.tree.map(index, state, is_leaf=_is_packed), stacks


def _attach_packed_stacks(layer_state, stacks):
    remaining = iter(stacks)

    def attach(leaf):
        return dataclasses.replace(leaf, lines=next(remaining)) if _is_packed(leaf) else leaf

    return jax.tree.map(attach, layer_state, is_leaf=_is_packed)


# XLA:CPU-sensitive helpers. Inside the layer scan the weight slices are intermediates whose
# layout and type XLA:CPU may rewrite; its rewrites there turned every weight into a
# transposed or float32 copy per layer and step. These pin them, so weights are read as stored.


def heads_in(x_btd, w_dnh):
    """x @ w into heads: [b, t, d] x [d, n, h] -> [b, t, n, h] (see `matmul`)."""
    return matmul(x_btd, w_dnh, contracting=1)


def heads_out(a_btnh, w_nhd):
    """[b, t, n, h] x [n, h, d] -> [b, t, d] (see `matmul`)."""
    return matmul(a_btnh, w_nhd, contracting=2)


def _to_carrier(x):
    # XLA:CPU has no bfloat16 dynamic-slice: it converts the whole stacked weight to float32
    # (every call) to slice it. Slicing the same bits as uint16 is native and free.
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def _from_carrier(x):
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def _map_params(module: nnx.Module, fn) -> nnx.Module:
    """`fn` applied to every plain array parameter (packed weights are left as they are)."""
    graphdef, state = nnx.split(module)
    state = jax.tree.map(lambda x: x if _is_packed(x) else fn(x), state, is_leaf=_is_packed)
    return nnx.merge(graphdef, state)


def scan_blocks(blocks: nnx.Module, carry, body: Callable, xs=None):
    """`layers.scan_layers`, with bfloat16 weights sliced as uint16 (see `_to_carrier`)."""
    def typed_body(block, carry, x):
        return body(_map_params(block, _from_carrier), carry, x)

    return scan_layers(_map_params(blocks, _to_carrier), carry, typed_body, xs)
