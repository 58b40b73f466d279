"""One fresh-process measurement of jaxaccel embedding throughput (used by `bench embed`).

Usage: python -m jaxaccel.bench.embed_worker CKPT DTYPE BATCH LENGTH ITERS
Prints one JSON line: {"sentences_per_s": ..., "seconds": ...}.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def synthetic_batch(vocab: int, batch: int, length: int, seed: int = 0):
    """Random in-vocabulary ids with a full mask: every contender sees the same tokens."""
    ids = np.random.default_rng(seed).integers(1000, vocab, (batch, length)).astype(np.int32)
    return ids, np.ones_like(ids)


def main(ckpt: str, dtype: str, batch: int, length: int, iters: int) -> dict:
    from jaxaccel.embed import Embedder
    from jaxaccel.loader import load_model

    embedder = Embedder(load_model(ckpt, dtype=dtype), batch_size=batch)
    ids, mask = synthetic_batch(embedder.loaded.config.vocab_size, batch, length)
    state = embedder.loaded.state
    for _ in range(2):  # compile and warm up
        embedder.fn(state, ids, mask).block_until_ready()
    start = time.perf_counter()
    for _ in range(iters):
        out = embedder.fn(state, ids, mask)
    out.block_until_ready()
    seconds = time.perf_counter() - start
    return {"sentences_per_s": batch * iters / seconds, "seconds": seconds}


if __name__ == "__main__":
    ckpt, dtype, batch, length, iters = sys.argv[1:6]
    print(json.dumps(main(ckpt, dtype, int(batch), int(length), int(iters))))
