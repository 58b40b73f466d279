"""One fresh-process measurement of `scripts/bench_bf16_matmul.py`: x . W over a scan of
LAYERS stacked [K, N] weights (bfloat16, or float32 with `"dtype": "float32"`), through
jaxaccel's packed kernel or XLA's own dot.

    python -m jaxaccel.bench.bf16_matmul_worker '{"contender": "kernel", "rows": 8}'

Contenders: `kernel` (`jaxaccel.backends.cpu.packed`), `xla` (XLA's dot on the plain [k, n]
weights), `xla_pad2` (the same with the rows padded to two, which XLA:CPU's fast bf16 path
needs). Prints one JSON line: the best of 10 timed calls (s) and GB/s of weights read.
"""

from __future__ import annotations

from jaxaccel.bench.worker import best_seconds, serve

LAYERS, K, N = 12, 768, 3072
CONTENDERS = ("kernel", "xla", "xla_pad2")


def kernel_layers(w, x):
    """(scan body, scan inputs) through the packed kernel (kept apart: the kernel's API is
    the runtime's to change)."""
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    import dataclasses

    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    import jax.numpy as jnp

    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    from jaxaccel.backends.cpu import packed

    weights = packed.pack(w, 1, stacked=1, dtype=w.dtype)

    def layer(acc, index):
        y = packed.matmul(x, dataclasses.replace(weights, layer=index))
        return acc + y.sum(), None

    return layer, jnp.arange(LAYERS)


def xla_layers(w, x, pad: bool):
    """(scan body, scan inputs) through XLA's dot, the row padded to two when `pad`."""
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    import jax.numpy as jnp

    from jaxaccel.backends.cpu import from_carrier, to_carrier

    rows = x.shape[0]

    def layer(acc, w_carried):
        w_kn = from_carrier(w_carried)
        lhs = jnp.concatenate([x, jnp.zeros_like(x)]) if pad else x
        y = jnp.dot(lhs, w_kn, preferred_element_type=jnp.float32)[:rows]
        return acc + y.sum(), None

    return layer, to_carrier(w)  # sliced as the CPU backend slices bf16 stacks


def main(contender: str, rows: int, dtype: str = "bfloat16") -> dict:
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    import jax
    import jax.numpy as jnp

    w = (0.02 * jax.random.normal(jax.random.key(0), (LAYERS, K, N))).astype(dtype)
    x = jax.random.normal(jax.random.key(1), (rows, K)).astype(dtype)
    if contender == "kernel":
        layer, xs = kernel_layers(w, x)
    else:
        layer, xs = xla_layers(w, x, pad=contender == "xla_pad2")
    run = jax.jit(lambda xs: jax.lax.scan(layer, jnp.float32(0), xs)[0])
    # The untimed first call compiles and touches every buffer.
    best = best_seconds(lambda: run(xs).block_until_ready(), repeats=10)
    return {"contender": contender, "rows": rows, "dtype": dtype, "seconds": best,
            "gb_per_s": w.nbytes / best / 1e9}


if __name__ == "__main__":
    serve(main)
