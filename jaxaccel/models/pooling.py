"""sentence-transformers' pooling, Dense and Normalize modules, in platform-neutral jnp.

Shape legend as in `layers`: b batch, t sequence, d model, f Dense outputs. Every function
takes the last hidden states x [b, t, d] (any float dtype) and a right-padded attention mask
[b, t] (1 for tokens) and returns float32, as sentence-transformers computes them:

  cls: the first token; max: max over tokens (padding at -1e9); mean: masked mean;
  mean_sqrt_len_tokens: masked sum / sqrt(token count); weightedmean: positions 1..t as
  weights; lasttoken: the last real token. Several modes concatenate in that order.
"""

from __future__ import annotations

import jax.numpy as jnp

# sentence-transformers' Pooling config keys, in the order it concatenates the outputs.
POOLING_MODES = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
                 "mean": "pooling_mode_mean_tokens",
                 "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
                 "weightedmean": "pooling_mode_weightedmean_tokens",
                 "lasttoken": "pooling_mode_lasttoken"}
# torch activation class paths a sentence-transformers Dense module may name -> jnp.
DENSE_ACTIVATIONS = {
    "torch.nn.modules.activation.Tanh": jnp.tanh,
    "torch.nn.modules.linear.Identity": lambda x: x,
    "torch.nn.modules.activation.ReLU": lambda x: jnp.maximum(x, 0),
    "torch.nn.modules.activation.Sigmoid": lambda x: 1 / (1 + jnp.exp(-x)),
}


def _masked_sum(x_btd, weights_bt):
    return jnp.einsum("btd,bt->bd", x_btd, weights_bt.astype(x_btd.dtype),
                      preferred_element_type=jnp.float32)


def _mean(x_btd, mask_bt):
    m = mask_bt.astype(jnp.float32)
    return _masked_sum(x_btd, m) / jnp.maximum(m.sum(-1, keepdims=True), 1e-9)


def _mean_sqrt_len(x_btd, mask_bt):
    m = mask_bt.astype(jnp.float32)
    return _masked_sum(x_btd, m) / jnp.sqrt(jnp.maximum(m.sum(-1, keepdims=True), 1e-9))


def _weighted_mean(x_btd, mask_bt):
    w_bt = mask_bt.astype(jnp.float32) * jnp.arange(1, x_btd.shape[1] + 1, dtype=jnp.float32)
    return _masked_sum(x_btd, w_bt) / jnp.maximum(w_bt.sum(-1, keepdims=True), 1e-9)


def _max(x_btd, mask_bt):
    x32 = x_btd.astype(jnp.float32)
    return jnp.where(mask_bt[..., None] > 0, x32, -1e9).max(axis=1)


def _cls(x_btd, mask_bt):
    return x_btd[:, 0].astype(jnp.float32)


def _last_token(x_btd, mask_bt):
    last_b = jnp.maximum(mask_bt.astype(jnp.int32).sum(-1) - 1, 0)
    return jnp.take_along_axis(x_btd, last_b[:, None, None], axis=1)[:, 0].astype(jnp.float32)


_POOLERS = {"cls": _cls, "max": _max, "mean": _mean, "mean_sqrt_len_tokens": _mean_sqrt_len,
            "weightedmean": _weighted_mean, "lasttoken": _last_token}


def pool(x_btd, mask_bt, modes: tuple[str, ...]):
    """Pooled float32 [b, d * len(modes)]: each mode in POOLING_MODES order, concatenated.
    KeyError for a mode not in POOLING_MODES (configs are checked when built)."""
    ordered = [m for m in POOLING_MODES if m in modes]
    return jnp.concatenate([_POOLERS[m](x_btd, mask_bt) for m in ordered], axis=-1)


def dense(x_bd, w_df, b_f, activation: str):
    """sentence-transformers Dense: activation(x @ w + b), float32 [b, f]."""
    y_bf = jnp.einsum("bd,df->bf", x_bd, w_df.astype(jnp.float32),
                      preferred_element_type=jnp.float32)
    if b_f is not None:
        y_bf = y_bf + b_f.astype(jnp.float32)
    return DENSE_ACTIVATIONS[activation](y_bf)


def normalise(x_bd):
    """L2 normalisation, as torch.nn.functional.normalize (norm clamped at 1e-12)."""
    return x_bd / jnp.maximum(jnp.linalg.norm(x_bd, axis=-1, keepdims=True), 1e-12)
