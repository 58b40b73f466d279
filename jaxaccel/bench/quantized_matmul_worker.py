"""One fresh-process measurement of `scripts/bench_quantized_matmul.py`: x . W over a scan of
LAYERS stacked weights of each GPT-2 124M matmul shape, for one contender and several row
counts.

    python -m jaxaccel.bench.quantized_matmul_worker '{"contender": "int8", "rows": [1, 8]}'

Contenders: `bf16` (the packed bf16 kernel, `jaxaccel.backends.cpu.packed`), `int8` / `int4`
(the quantized kernel's VNNI entry point, `jaxaccel.backends.cpu.quantized`, int4 in groups
of 128 k rows), `int8_panels` / `int4_panels` (its entry point for many rows: streams
dequantized to bf16 panels),
`int8_xla` / `int4_xla` (XLA dequantizing the same packed weights, then one bf16 dot),
`qwix_int8` / `qwix_int4` (qwix's `dequantize` of the QArray, then XLA's dot: the plain
backend's hook). x is bfloat16. Prints one JSON line: per shape and row count, the best of
10 timed calls (s) and GB/s of weight bytes read (values and scales).
"""

from __future__ import annotations

from jaxaccel.bench.worker import best_seconds, serve

LAYERS = 12
SHAPES = ((768, 2304), (768, 768), (768, 3072), (3072, 768))  # GPT-2 124M: qkv, o, up, down
GROUP = 128  # int4 group along k
CONTENDERS = ("bf16", "int8", "int4", "int8_panels", "int4_panels", "int8_xla", "int4_xla",
              "qwix_int8", "qwix_int4")


def quantize(w, bits: int):
    """A stacked [LAYERS, k, n] weight as a qwix QArray: per output column, int4 also per
    group of GROUP k rows."""
    # deferred: jax and qwix load in the worker process only
    import jax.numpy as jnp
    import qwix

    if bits == 8:
        return qwix.quantize(w, jnp.int8, channelwise_axes=[0, 2])
    return qwix.quantize(w, jnp.int4, channelwise_axes=[0, 2], tiled_axes={1: GROUP})


def layer_fn(contender: str, w, x):
    """(scan body acc, layer -> acc, bytes of weights one scan reads)."""
    # deferred: jax and the runtime load in the worker process only
    import dataclasses

    import jax.numpy as jnp
    import qwix

    from jaxaccel.backends.cpu import build, packed, quantized

    if contender == "bf16":
        weights = packed.pack(w, 1, stacked=1)
        return (lambda i: packed.matmul(x, dataclasses.replace(weights, layer=i)),
                weights.lines.nbytes)
    bits = 8 if "int8" in contender else 4
    qarray = quantize(w, bits)
    if contender.startswith("qwix"):
        return (lambda i: jnp.dot(x, qwix.dequantize(qarray[i]).astype(x.dtype),
                                  preferred_element_type=jnp.float32),
                qarray.qvalue.nbytes + qarray.scale.nbytes)
    weights = quantized.pack(qarray, 1, stacked=1)
    nbytes = weights.lines.nbytes + weights.scales.nbytes
    if contender.endswith("_xla"):
        return (lambda i: quantized.matmul_xla(x, dataclasses.replace(weights, layer=i)), nbytes)
    if contender.endswith("_panels"):
        panels = build.target(quantized.KERNEL_SOURCE, quantized.PANELS_SYMBOL)
        return (lambda i: quantized.matmul_panels(x, dataclasses.replace(weights, layer=i),
                                                  panels), nbytes)
    kernel = build.target(quantized.KERNEL_SOURCE, quantized.KERNEL_SYMBOL)
    return (lambda i: quantized.matmul(x, dataclasses.replace(weights, layer=i), kernel),
            nbytes)


def measure(contender: str, k: int, n: int, rows: int) -> dict:
    # deferred: jax loads in the worker process only
    import jax
    import jax.numpy as jnp

    w = 0.02 * jax.random.normal(jax.random.key(0), (LAYERS, k, n))
    if contender == "bf16":
        w = w.astype(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (rows, k)).astype(jnp.bfloat16)
    matmul, nbytes = layer_fn(contender, w, x)
    run = jax.jit(lambda: jax.lax.scan(lambda acc, i: (acc + matmul(i).sum(), None),
                                       jnp.float32(0), jnp.arange(LAYERS))[0])
    best = best_seconds(lambda: run().block_until_ready(), repeats=10)
    return {"seconds": best, "gb_per_s": nbytes / best / 1e9, "bytes": nbytes}


def main(contender: str, rows: list[int], shapes: list[list[int]] | None = None) -> dict:
    results = {}
    for k, n in shapes or SHAPES:
        for r in rows:
            results[f"{k}x{n}/{r}"] = measure(contender, k, n, r)
    return {"contender": contender, "results": results}


if __name__ == "__main__":
    serve(main)
