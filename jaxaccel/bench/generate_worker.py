"""One fresh process of `jaxaccel bench generate`: time jaxaccel on a decoder checkpoint.

    python -m jaxaccel.bench.generate_worker CKPT DTYPE PREFILL_LEN DECODE_TOKENS [--xla-dots]
    python -m jaxaccel.bench.generate_worker --bandwidth

`--xla-dots` keeps XLA's own dots for bfloat16 on the CPU instead of jaxaccel's packed-weight
kernel (`jaxaccel.kernels`), to show what the kernel buys.

Prints one JSON line. Decode speed is the slope between a short and a long generation of the
same batch (prefill and compile excluded): tokens/s = batch x extra tokens / extra seconds.
"""

from __future__ import annotations

import json
import sys
import time

REPEATS = 3


def best_seconds(fn, repeats: int = REPEATS) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def memory_read_bandwidth() -> float:
    """Bytes/s of a multi-threaded float32 sum over 1 GiB (far beyond any cache)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((256 * 1024 * 1024,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = best_seconds(lambda: total(x).block_until_ready(), repeats=5)
    return x.nbytes / seconds


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    return [[(17 * row + 31 * i) % (vocab - 1) + 1 for i in range(length)] for row in range(batch)]


def decode_tokens_per_s(generator, batch: int, new_tokens: int, loop: str) -> float:
    rows = prompts(batch, 16, generator.config.vocab_size)
    short = best_seconds(lambda: generator.generate(rows, 2, loop=loop))
    long = best_seconds(lambda: generator.generate(rows, 2 + new_tokens, loop=loop))
    return batch * new_tokens / max(long - short, 1e-9)


def measure(ckpt: str, dtype: str, prefill_len: int, new_tokens: int,
            xla_dots: bool = False) -> dict:
    import jax
    import numpy as np

    from jaxaccel.generate import Buckets, Generator, default_buckets
    from jaxaccel.loader import load_model

    loaded = load_model(ckpt, dtype=dtype)
    # The model's own bytes in `dtype` (packing pads a little; the padding is not counted).
    param_bytes = sum(x.size * np.dtype(dtype).itemsize for x in jax.tree.leaves(loaded.state))
    packed_weights = False if xla_dots else None
    generator = Generator(loaded.graphdef, loaded.state, loaded.config, dtype=dtype,
                          packed_weights=packed_weights)
    # One cache bucket for the short and the long run, so both time the same program.
    generator.buckets = Buckets(
        slot_multiple=128,
        min_batch=default_buckets(dtype, generator.packed_weights).min_batch)
    long_prompt = prompts(1, prefill_len, loaded.config.vocab_size)
    result = {"dtype": dtype, "param_bytes": param_bytes,
              "packed_weights": generator.packed_weights,
              "prefill_ms": 1e3 * best_seconds(lambda: generator.last_logits(long_prompt))}
    for batch in (1, 8):
        result[f"decode_b{batch}_tok_s"] = decode_tokens_per_s(generator, batch, new_tokens,
                                                               "device")
    result["decode_b1_host_loop_tok_s"] = decode_tokens_per_s(generator, 1, new_tokens, "host")
    return result


def main() -> None:
    if sys.argv[1:] == ["--bandwidth"]:
        print(json.dumps({"read_bytes_per_s": memory_read_bandwidth()}))
        return
    ckpt, dtype, prefill_len, new_tokens = sys.argv[1:5]
    xla_dots = sys.argv[5:] == ["--xla-dots"]
    print(json.dumps(measure(ckpt, dtype, int(prefill_len), int(new_tokens), xla_dots)))


if __name__ == "__main__":
    main()
