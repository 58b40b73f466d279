"""Building blocks shared by the model families.

Shape suffixes follow one legend across jaxaccel/models:
  b batch, t query sequence, s key sequence, d model width, n heads, k kv heads,
  h head dim, f mlp width, v vocab, l layers.

Precision policy: parameters and activations are held in the compute dtype (float32 or
bfloat16); every matmul accumulates in float32 (`preferred_element_type`) and norms and
softmax run in float32. On XLA:CPU a bf16 dot with an f32 result is also ~2x faster than one
with a bf16 result, so the policy costs nothing.

Platform neutrality: `matmul`, `lookup`, `head_logits` and `scan_layers` (and
`models.attention.attention`) are the operations a platform backend may replace
(`jaxaccel.backends`); they call `backends.current()`, which is plain XLA unless the runtime
installed another backend while tracing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from jaxaccel import backends
from jaxaccel.parallel import sharding as ax
from jaxaccel.parallel.params import Permuted

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
    """Matmul in the activation dtype with float32 accumulation, result in x.dtype.

    A quantized `w` (qwix QArray) must be a 2-D "...k,kn->...n" contraction: it goes to the
    backend's `quantized_matmul`."""
    if isinstance(w, (qwix.QArray, Permuted)):
        x, w = _in_held_order(x, w, 1)
        return backends.current().quantized_matmul(x, w, 1)
    out = jnp.einsum(equation, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


def matmul(x, w, contracting: int = 1) -> jax.Array:
    """x[..., *k] . w[*k, *n] -> [..., *n] in x.dtype, float32 accumulation.

    `contracting` counts the k dims of `w`. One 2-D matmul: a 3-D einsum lets XLA fold
    neighbouring head transposes into the matmul by transposing the weight instead (a copy of
    it per layer and step); a [k, n] view cannot be folded. A weight-only quantized `w` (a
    qwix QArray, see `jaxaccel.models.quantization`) goes to the backend's `quantized_matmul`;
    one held with its rows reordered (`Permuted`) first has x's k gathered into that order.
    """
    x, w = _in_held_order(x, w, contracting)
    if isinstance(w, qwix.QArray):
        return backends.current().quantized_matmul(x, w, contracting)
    return backends.current().matmul(x, w, contracting)


def _in_held_order(x, w, contracting: int):
    """(x, w) as the matmul reads them: for a `Permuted` w, x[..., *k] with its flattened k
    gathered by w.perm, and the weight inside. On a mesh that splits k, XLA's partitioner
    moves activations (or the row order) between the devices, never weights."""
    if not isinstance(w, Permuted):
        return x, w
    lead = x.shape[:x.ndim - contracting]
    # "clip": the orders are permutations (checked at load), so no out-of-range fill select.
    x_k = jnp.take(x.reshape(*lead, -1), w.perm, axis=-1, mode="clip",
                   unique_indices=True)
    return x_k.reshape(x.shape), w.inner


def lookup(table_vd, ids) -> jax.Array:
    """Rows `ids` of an embedding table [v, ...] -> [*ids.shape, ...]."""
    return backends.current().lookup(table_vd, ids)


def head_logits(x_btd, head_vd) -> jax.Array:
    """Float32 logits [b, t, v] from a head stored [v, d], as Hugging Face stores it."""
    return backends.current().head_logits(x_btd, head_vd)


def add_bias(x, bias: nnx.Param | None):
    """x + bias (in x's dtype) for an optional bias parameter."""
    return x if bias is None else x + bias[...].astype(x.dtype)


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
    """GELU of x (any shape) in x's dtype. Exact form (`approximate=False`, transformers'
    "gelu"): 0.5 x (1 + erf(x / sqrt 2)) as PyTorch computes it, in float32 and rounded once;
    jax.nn.gelu on bfloat16 rounds every intermediate to bfloat16 (off by several steps) and
    its erfc form cost XLA:CPU more (MiniLM bf16 b32x128 embed: 5-8% faster with this one,
    Zen 4). Tanh form: jax.nn.gelu's."""
    if approximate:
        return jax.nn.gelu(x, approximate=True)
    xf = x.astype(jnp.float32)
    return (0.5 * xf * (1.0 + jax.lax.erf(xf * np.float32(np.sqrt(0.5))))).astype(x.dtype)


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


def layer_runner() -> Callable | None:
    """The runner `use_layer_runner` installed (None: the plain scan)."""
    return _LAYER_RUNNER.get()


def scan_layers(blocks: nnx.Module, carry, body: Callable, xs=None):
    """Run `body(block, carry, x) -> (carry, y)` over the stacked layers of `blocks`.

    `blocks` holds parameters with a leading layers axis (see `make_param`). One layer is
    traced and compiled once, however deep the model, which keeps compile time flat.
    To stay pipelinable (see `jaxaccel.parallel.pipeline`), keep batch-dependent inputs in `carry`
    ([b, ...]) or `xs` ([l, b, ...]), never in the body's closure.
    """
    runner = _LAYER_RUNNER.get()
    with use_layer_runner(None):  # a runner's own per-stage scans are plain
        return backends.current().scan_layers(blocks, carry, body, xs, runner=runner)


def heads_in(x_btd, w_dnh):
    """x @ w into heads: [b, t, d] x [d, n, h] -> [b, t, n, h] (see `matmul`)."""
    return matmul(x_btd, w_dnh, contracting=1)


def heads_out(a_btnh, w_nhd):
    """[b, t, n, h] x [n, h, d] -> [b, t, d] (see `matmul`)."""
    return matmul(a_btnh, w_nhd, contracting=2)
