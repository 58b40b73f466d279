"""One fresh process of `jaxaccel bench generate`: time jaxaccel on a decoder checkpoint.

    python -m jaxaccel.bench.generate_worker CKPT DTYPE PREFILL_LEN DECODE_TOKENS
    python -m jaxaccel.bench.generate_worker --bandwidth

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


def measure(ckpt: str, dtype: str, prefill_len: int, new_tokens: int) -> dict:
    import jax

    from jaxaccel.generate import Buckets, Generator, default_buckets
    from jaxaccel.loader import load_model

    loaded = load_model(ckpt, dtype=dtype)
    # One cache bucket for the short and the long run, so both time the same program.
    buckets = Buckets(slot_multiple=128, min_batch=default_buckets(dtype).min_batch)
    generator = Generator(loaded.graphdef, loaded.state, loaded.config, dtype=dtype,
                          buckets=buckets)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(generator.state))
    long_prompt = prompts(1, prefill_len, loaded.config.vocab_size)
    result = {"dtype": dtype, "param_bytes": param_bytes,
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
    print(json.dumps(measure(ckpt, dtype, int(prefill_len), int(new_tokens))))


if __name__ == "__main__":
    main()
