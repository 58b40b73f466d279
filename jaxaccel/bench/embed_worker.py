"""One fresh-process measurement of jaxaccel embedding throughput (used by `bench embed`).

    python -m jaxaccel.bench.embed_worker '{"ckpt": CKPT, "dtype": DTYPE, "batch": 32,
                                           "length": 128, "iters": 8}'

Prints one JSON line: {"sentences_per_s": ..., "seconds": ...}.
"""

from __future__ import annotations

import numpy as np

from jaxaccel.bench.worker import loop_seconds, serve


def synthetic_batch(vocab: int, batch: int, length: int, seed: int = 0):
    """Random in-vocabulary ids with a full mask: every contender sees the same tokens."""
    ids = np.random.default_rng(seed).integers(1000, vocab, (batch, length)).astype(np.int32)
    return ids, np.ones_like(ids)


def load_embedder(ckpt: str, dtype: str, batch: int, quantize: str | None = None):
    """The runtime's embedder for `ckpt` (kept apart: its API is the runtime's to change);
    `quantize` ("int8", "int4") quantizes the matmul weights while they restore."""
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    from jaxaccel.runtime.embed import Embedder
    from jaxaccel.startup.loader import load_model

    return Embedder(load_model(ckpt, dtype=dtype, quantize=quantize), batch_size=batch)


def main(ckpt: str, dtype: str, batch: int, length: int, iters: int,
         quantize: str | None = None) -> dict:
    embedder = load_embedder(ckpt, dtype, batch, quantize)
    ids, mask = synthetic_batch(embedder.loaded.config.vocab_size, batch, length)
    state = embedder.loaded.state
    seconds = loop_seconds(lambda: embedder.forward(state, ids, mask), iters,
                           wait=lambda out: out.block_until_ready())
    return {"sentences_per_s": batch * iters / seconds, "seconds": seconds}


if __name__ == "__main__":
    serve(main)
