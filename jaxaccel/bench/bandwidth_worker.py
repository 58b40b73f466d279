"""This machine's memory read bandwidth, in a fresh process (used by `bench generate`).

    python -m jaxaccel.bench.bandwidth_worker '{}'

Prints one JSON line: {"read_bytes_per_s": ...}.
"""

from __future__ import annotations

from jaxaccel.bench.worker import best_seconds, serve


def main() -> dict:
    """Bytes/s of a multi-threaded float32 sum over 1 GiB (far beyond any cache)."""
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    import jax
    import jax.numpy as jnp

    x = jnp.ones((256 * 1024 * 1024,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = best_seconds(lambda: total(x).block_until_ready(), repeats=5)
    return {"read_bytes_per_s": x.nbytes / seconds}


if __name__ == "__main__":
    serve(main)
