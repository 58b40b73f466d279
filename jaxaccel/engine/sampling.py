"""Choosing each row's next token with its own settings, inside one compiled program.

Every row carries its temperature, top-k, top-p, seed and the number of tokens its request
has generated so far, as arrays: one program serves any mix of greedy and sampling rows.
A row's random key is fold_in(key(seed), n) for its n-th token, so its tokens do not depend
on which rows share the batch, or on a preemption and recomputation in between.
Shape legend: b rows, v vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxaccel import backends


def keep_top_k(logits_bv, top_k_b):
    """Logits outside each row's top k set to -inf (k 0: keep all)."""
    v = logits_bv.shape[-1]
    sorted_bv = -jnp.sort(-logits_bv, axis=-1)
    kth_b1 = jnp.take_along_axis(sorted_bv, jnp.clip(top_k_b - 1, 0, v - 1)[:, None], axis=-1)
    drop_bv = (top_k_b[:, None] > 0) & (logits_bv < kth_b1)
    return jnp.where(drop_bv, -jnp.inf, logits_bv)


def keep_top_p(logits_bv, top_p_b):
    """Each row keeps its smallest set of tokens whose probability reaches p (at least the
    best one; p 1.0 keeps all): a token stays if the mass strictly before it is < p."""
    sorted_bv = -jnp.sort(-logits_bv, axis=-1)
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    kept_b = jnp.maximum(jnp.sum(before_bv < top_p_b[:, None], axis=-1), 1)
    cutoff_b1 = jnp.take_along_axis(sorted_bv, kept_b[:, None] - 1, axis=-1)
    keep_bv = (top_p_b[:, None] >= 1.0) | (logits_bv >= cutoff_b1)
    return jnp.where(keep_bv, logits_bv, -jnp.inf)


def choose_rows(logits_bv, temperature_b, top_k_b, top_p_b, seed_b, nth_b):
    """Next token ids [b] int32: argmax where temperature is 0, else a draw from the row's
    tempered, truncated distribution with key fold_in(key(seed), nth)."""
    greedy_b = backends.current().argmax(logits_bv).astype(jnp.int32)

    def draw(logits_bv):
        hot_b = temperature_b > 0
        scaled_bv = logits_bv / jnp.where(hot_b, temperature_b, 1.0)[:, None]
        scaled_bv = keep_top_p(keep_top_k(scaled_bv, top_k_b), top_p_b)
        keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seed_b, nth_b)
        drawn_b = jax.vmap(jax.random.categorical)(keys, scaled_bv).astype(jnp.int32)
        return jnp.where(hot_b, drawn_b, greedy_b)

    # Sorting the vocabulary costs more than the argmax: an all-greedy step skips it.
    return jax.lax.cond(jnp.any(temperature_b > 0), draw, lambda _: greedy_b,
                        logits_bv.astype(jnp.float32))
