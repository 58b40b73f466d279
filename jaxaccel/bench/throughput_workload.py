"""The seeded request workload of `jaxaccel bench throughput` (no jax: the parent builds it).

Lengths are log-normal around a median, clipped: prompts 8-512 tokens (median 125), outputs
8-256 (median 62), as the engine issue measured; token ids uniform over the vocabulary, EOS
ignored (every request makes exactly its own number of tokens). A `--workload` JSONL file
gives requests instead: `prompt_ids` (or `prompt_len` for random ids) and `max_new_tokens`.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from jaxaccel.errors import InputError

PROMPT_RANGE, OUTPUT_RANGE = (8, 512), (8, 256)
SIGMA = 0.8  # spread of the log-normal lengths


def lengths(rng, n: int, median: int, bounds: tuple[int, int]) -> list[int]:
    low, high = min(bounds[0], median), max(bounds[1], median)
    drawn = np.exp(rng.normal(np.log(median), SIGMA, n))
    return np.clip(np.rint(drawn), low, high).astype(int).tolist()


def synthetic(requests: int, prompt_len: int, output_len: int, vocab: int,
              seed: int = 0) -> list[dict]:
    """[{"prompt_ids": [...], "max_new_tokens": n}] for `requests` requests."""
    rng = np.random.default_rng(seed)
    prompts = lengths(rng, requests, prompt_len, PROMPT_RANGE)
    outputs = lengths(rng, requests, output_len, OUTPUT_RANGE)
    return [{"prompt_ids": rng.integers(0, vocab, p).tolist(), "max_new_tokens": o}
            for p, o in zip(prompts, outputs)]


def from_file(path: pathlib.Path, vocab: int, seed: int = 0) -> list[dict]:
    """Requests of a JSONL file; InputError naming the line for a bad one."""
    rng = np.random.default_rng(seed)
    work = []
    for number, line in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            ids = record.get("prompt_ids") or rng.integers(0, vocab, int(record["prompt_len"])
                                                           ).tolist()
            work.append({"prompt_ids": [int(t) for t in ids],
                         "max_new_tokens": int(record["max_new_tokens"])})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise InputError(f"{path}:{number}: expected a JSON object with prompt_ids (or "
                             f"prompt_len) and max_new_tokens ({err})") from None
    if not work:
        raise InputError(f"{path}: no requests")
    return work
