"""One fresh process of `jaxaccel bench generate`: time jaxaccel on a decoder checkpoint.

    python -m jaxaccel.bench.generate_worker '{"ckpt": CKPT, "dtype": DTYPE,
        "prefill_len": 512, "new_tokens": 32, "xla_dots": false}'

`quantize` ("int8", "int4", "int4+head", ...: a `quantization.Scheme.label`; `group_size`)
quantizes the matmul weights while they restore (weight-only, `jaxaccel.models.quantization`).
`param_bytes` counts what a decode step reads: every parameter whole, except an embedding
table that a head of its own (untied, or a tied head's quantized copy) leaves to the lookup.
`xla_dots` keeps XLA's own dots for bfloat16 on the CPU instead of jaxaccel's packed-weight
kernel (`jaxaccel.backends.cpu`), to show what the kernel buys.

A mixture-of-experts model also reports `grouped_matmul_b1_ms`: its experts' grouped
matmuls of one batch-1 decode step (every MoE layer, the top-k rows of one token, through the
generator's backend hook), timed alone, for their share of the step.

Prints one JSON line. Decode speed is the slope between a short and a long generation of the
same batch (prefill and compile excluded): tokens/s = batch x extra tokens / extra seconds.
"""

from __future__ import annotations

from jaxaccel.bench.worker import best_seconds, serve


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    return [[(17 * row + 31 * i) % (vocab - 1) + 1 for i in range(length)] for row in range(batch)]


def decode_tokens_per_s(generate, batch: int, new_tokens: int, vocab: int) -> float:
    """Tokens/s of `generate(rows, n)` (prompt ids -> n new tokens each), from the slope
    between 2 and 2 + new_tokens tokens: prefill and compile cancel out."""
    rows = prompts(batch, 16, vocab)
    short = best_seconds(lambda: generate(rows, 2))
    long = best_seconds(lambda: generate(rows, 2 + new_tokens))
    return batch * new_tokens / max(long - short, 1e-9)


def load_generator(ckpt: str, dtype: str, xla_dots: bool, quantize: str | None = None,
                   group_size: int = 128):
    """The runtime's model and generator (kept apart: their API is the runtime's to change)."""
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    from jaxaccel.runtime.generate import Generator
    from jaxaccel.startup.loader import load_model
    from jaxaccel.models.quantization import Scheme
    from jaxaccel.runtime.programs import Buckets

    loaded = load_model(ckpt, dtype=dtype, quantize=Scheme.from_label(quantize, group_size))
    packed_weights = False if xla_dots else None
    generator = Generator(loaded.graphdef, loaded.state, loaded.config, dtype=dtype,
                          packed_weights=packed_weights)
    # One cache bucket for the short and the long run, so both time the same program.
    generator.buckets = Buckets(slot_multiple=128, min_batch=generator.buckets.min_batch)
    return loaded, generator


def grouped_matmul_ms(loaded, generator) -> float | None:
    """Milliseconds of the expert grouped matmuls of a batch-1 decode step (None: no experts):
    each MoE layer's gate, up and down matmuls of top-k rows, one row per chosen expert."""
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    import jax
    import jax.numpy as jnp

    from jaxaccel.parallel.params import flat_arrays

    arrays = flat_arrays(loaded.state)
    names = ("blocks.moe.wg_edf", "blocks.moe.wu_edf", "blocks.moe.wm_efd")
    if not all(n in arrays for n in names):
        return None
    weights = tuple(arrays[n] for n in names)  # [l, e, ...]
    rows, experts = loaded.config.num_experts_per_tok, weights[0].shape[1]
    sizes = jnp.zeros((experts,), jnp.int32).at[jnp.arange(rows) % experts].add(1)
    x = jnp.ones((rows, weights[0].shape[2]), generator.runtime.dtype)
    backend = generator.runtime.backend

    def step(x, weights):
        def layer(total, w):
            wg, wu, wm = w
            h = backend.grouped_matmul(x, wg, sizes) * backend.grouped_matmul(x, wu, sizes)
            return total + backend.grouped_matmul(h, wm, sizes).astype(jnp.float32).sum(), None
        return jax.lax.scan(layer, jnp.float32(0), weights)[0]

    jitted = jax.jit(step)
    return 1e3 * best_seconds(lambda: jitted(x, weights).block_until_ready())


def main(ckpt: str, dtype: str, prefill_len: int, new_tokens: int,
         xla_dots: bool = False, quantize: str | None = None, group_size: int = 128) -> dict:
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    from jaxaccel.models import family_spec
    from jaxaccel.models.quantization import lookup_only, read_bytes

    loaded, generator = load_generator(ckpt, dtype, xla_dots, quantize, group_size)
    # The model's own bytes as held (packing pads a little; the padding is not counted).
    param_bytes = read_bytes(loaded.state, lookup_only(loaded.state, family_spec(loaded.family)))
    long_prompt = prompts(1, prefill_len, loaded.config.vocab_size)
    result = {"dtype": dtype, "param_bytes": param_bytes,
              "packed_weights": generator.packed_weights,
              "prefill_ms": 1e3 * best_seconds(lambda: generator.last_logits(long_prompt))}
    vocab = loaded.config.vocab_size
    for batch in (1, 8):
        result[f"decode_b{batch}_tok_s"] = decode_tokens_per_s(
            lambda rows, n: generator.generate(rows, n, loop="device"), batch, new_tokens, vocab)
    result["decode_b1_host_loop_tok_s"] = decode_tokens_per_s(
        lambda rows, n: generator.generate(rows, n, loop="host"), 1, new_tokens, vocab)
    moe_ms = grouped_matmul_ms(loaded, generator)
    if moe_ms is not None:
        result["grouped_matmul_b1_ms"] = moe_ms
    return result


if __name__ == "__main__":
    serve(main)
