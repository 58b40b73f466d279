"""Rough activation-memory estimates of a transformer's forward, for the planner when XLA
cannot be asked (`FamilySpec.activation_bytes`; the planner prefers XLA's own analysis).

A few [b, t, d] and [b, t, f] buffers plus one layer's float32 attention scores, split as the
layout's rules split batch, heads and mlp; a decoder adds its float32 logits row.
"""

from __future__ import annotations

import math

from jaxaccel.models.family import ActivationShape
from jaxaccel.parallel import sharding as ax


def _transformer_bytes(config, shape: ActivationShape, vocab: int) -> int:
    b = math.ceil(shape.batch / shape.split(ax.BATCH))
    d, f, t = config.hidden_size, config.intermediate_size, shape.seq
    n = math.ceil(config.num_heads / shape.split(ax.HEADS))
    return (b * t * (6 * d + 2 * math.ceil(f / shape.split(ax.MLP))) * shape.itemsize
            + b * n * t * t * 4 + b * math.ceil(vocab / shape.split(ax.VOCAB)) * 4)


def encoder_bytes(config, shape: ActivationShape) -> int:
    """An encoder's forward over `shape.seq` tokens (config: hidden_size,
    intermediate_size, num_heads)."""
    return _transformer_bytes(config, shape, vocab=0)


def decoder_bytes(config, shape: ActivationShape) -> int:
    """A decoder's prefill: the encoder's buffers plus the last position's float32 logits
    (config also: vocab_size)."""
    return _transformer_bytes(config, shape, vocab=config.vocab_size)
