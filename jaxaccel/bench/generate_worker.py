"""One fresh process of `jaxaccel bench generate`: time jaxaccel on a decoder checkpoint.

    python -m jaxaccel.bench.generate_worker '{"ckpt": CKPT, "dtype": DTYPE,
        "prefill_len": 512, "new_tokens": 32, "xla_dots": false}'

`quantize` ("int8", "int4", "int4+head", ...: a `quantization.Scheme.label`; `group_size`)
quantizes the matmul weights while they restore (weight-only, `jaxaccel.models.quantization`).
`param_bytes` counts what a decode step reads: every parameter whole, except an embedding
table that a head of its own (untied, or a tied head's quantized copy) leaves to the lookup.
`xla_dots` keeps XLA's own dots for bfloat16 on the CPU instead of jaxaccel's packed-weight
kernel (`jaxaccel.backends.cpu`), to show what the kernel buys.

A mixture-of-experts model also reports `grouped_matmul_share_b1`: the share of a batch-1
decode step its experts' grouped matmuls take (`grouped_matmul_share`, by ablation).

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
    if long <= short:  # timing noise above the decode time itself (a loaded machine): again
        short = best_seconds(lambda: generate(rows, 2), repeats=5)
        long = best_seconds(lambda: generate(rows, 2 + new_tokens), repeats=5)
    if long <= short:  # a slope from noise would be a huge, wrong tok/s: fail the contender
        raise RuntimeError(f"decode b{batch}: {2 + new_tokens} tokens took {long:.3f} s, no "
                           f"longer than 2 tokens ({short:.3f} s): the machine's timing noise "
                           f"exceeds the decode time; rerun with more --new-tokens or quieter")
    return batch * new_tokens / (long - short)


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


def grouped_matmul_share(loaded, generator, b1_tok_s: float, new_tokens: int) -> float | None:
    """The share of a batch-1 decode step spent in the expert grouped matmuls (None: no
    experts), by ablation: the same model and backend, except that the grouped matmul returns
    zeros of its shape (routing, sorting and everything else still run), decodes this much
    faster: 1 - (its step time / the full step time)."""
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    import copy

    import jax.numpy as jnp

    from jaxaccel.runtime.generate import Generator

    if not hasattr(loaded.config, "num_experts"):
        return None
    ablated = Generator(loaded.graphdef, loaded.state, loaded.config,
                        dtype=generator.runtime.dtype)
    backend = copy.copy(ablated.runtime.backend)
    backend.grouped_matmul = lambda x, w, sizes: jnp.zeros((x.shape[0], w.shape[-1]), x.dtype)
    ablated.runtime.backend = backend  # before any program is traced
    ablated.buckets = generator.buckets
    without = decode_tokens_per_s(lambda rows, n: ablated.generate(rows, n, loop="device"), 1,
                                  new_tokens, loaded.config.vocab_size)
    return 1.0 - b1_tok_s / without


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
    share = grouped_matmul_share(loaded, generator, result["decode_b1_tok_s"], new_tokens)
    if share is not None:
        result["grouped_matmul_share_b1"] = share
    return result


if __name__ == "__main__":
    serve(main)
