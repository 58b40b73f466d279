"""Choosing the next token from float32 logits: greedy, or temperature / top-k / top-p.

`Sampling` is static configuration (hashable): each setting compiles its own decode step,
and a top-k needs a static k anyway. Shape legend: b batch, v vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxaccel import backends


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 mean no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


def choose(logits_bv, key, sampling: Sampling):
    """Next token ids [b] (int32)."""
    if sampling.greedy:
        return backends.current().argmax(logits_bv)
    logits_bv = logits_bv.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        logits_bv = _keep_top_k(logits_bv, sampling.top_k)
    if sampling.top_p < 1.0:
        logits_bv = _keep_top_p(logits_bv, sampling.top_p)
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


def _keep_top_k(logits_bv, k: int):
    k = min(k, logits_bv.shape[-1])
    kth_b1 = jax.lax.top_k(logits_bv, k)[0][:, -1:]
    return jnp.where(logits_bv >= kth_b1, logits_bv, -jnp.inf)


def _keep_top_p(logits_bv, p: float):
    """Keep the smallest set of tokens whose probability mass reaches p (always the best one)."""
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    # A token stays if the mass strictly before it is < p; the cut-off is the last such logit.
    before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    kept_b = jnp.maximum(jnp.sum(before_bv < p, axis=-1), 1)
    cutoff_b1 = jnp.take_along_axis(sorted_bv, kept_b[:, None] - 1, axis=-1)
    return jnp.where(logits_bv >= cutoff_b1, logits_bv, -jnp.inf)
