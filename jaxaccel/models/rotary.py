"""Rotary position embeddings (RoPE) and their scaling variants, for any decoder family.

Shape legend as in `layers`: b batch, t new tokens, n heads, h head dim, r rotary
frequencies (h / 2).

A config using RoPE carries the flat fields `rope_fields` returns (`rope_theta`,
`rope_type`, `rope_factor`, `rope_low_freq_factor`, `rope_high_freq_factor`,
`rope_original_max_position_embeddings`) and `head_dim`; the functions below read them.

Rotary layout: Meta's original checkpoints rotate interleaved (even, odd) pairs; Hugging
Face's conversion permuted the q/k projection rows so that the pairs become (i, i + h/2) and
applies `rotate_half`. We read the Hugging Face weights unpermuted and rotate halves the same
way, which is exactly equivalent; the parity tests check it against transformers.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

# Scaling variants: none, linear position interpolation, Llama 3.1's frequency blend.
ROPE_TYPES = ("default", "linear", "llama3")


def rope_fields(hf: dict, layer_type: str | None = None) -> dict:
    """Flatten transformers' `rope_parameters` (5.x) or `rope_scaling` + `rope_theta` (4.x)
    into config fields; ValueError for a scaling variant not in ROPE_TYPES. `layer_type`
    picks one entry of a per-layer-type `rope_parameters` ({"full_attention": {...},
    "sliding_attention": {...}}, Gemma 3)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {ROPE_TYPES}")
    fields = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
              "rope_type": rope_type, "rope_factor": float(params.get("factor", 1.0))}
    if rope_type == "llama3":
        fields.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                      rope_high_freq_factor=float(params["high_freq_factor"]),
                      rope_original_max_position_embeddings=int(
                          params["original_max_position_embeddings"]))
    return fields


def partial_factor(hf: dict) -> float:
    """The fraction of each head's dims that rotate (`partial_rotary_factor`, top-level in
    4.x configs, inside `rope_parameters` in 5.x; 1.0 when absent)."""
    params = hf.get("rope_parameters") or {}
    return float(hf.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0)


def rotary_dim(cfg) -> int:
    """How many leading dims of each head rotate: head_dim * partial_rotary_factor (Phi-3's
    and Phi-4-mini's partial rotary), as transformers rounds it."""
    return int(cfg.head_dim * getattr(cfg, "partial_rotary_factor", 1.0))


def inverse_frequencies(cfg) -> np.ndarray:
    """Rotary inverse frequencies [r], with the config's scaling applied (float64, static)."""
    h = rotary_dim(cfg)
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h)
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type == "llama3":
        return _llama3_scaling(inv_freq, cfg)
    return inv_freq


def _llama3_scaling(inv_freq: np.ndarray, cfg) -> np.ndarray:
    """Llama 3.1: slow long wavelengths by `factor`, keep short ones, blend in between."""
    old_len = cfg.rope_original_max_position_embeddings
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / cfg.rope_factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, blended, scaled)


def tables(positions_bt, cfg):
    """cos and sin [b, t, r] in float32 for the given absolute positions."""
    inv_freq_r = jnp.asarray(inverse_frequencies(cfg), jnp.float32)
    angles_btr = positions_bt.astype(jnp.float32)[..., None] * inv_freq_r
    return jnp.cos(angles_btr), jnp.sin(angles_btr)


def apply(x_btnh, cos_btr, sin_btr):
    """Rotate (i, i + r) pairs (HF `rotate_half` layout) of the first 2r dims in float32;
    dims past 2r (partial rotary) pass through."""
    x32 = x_btnh.astype(jnp.float32)
    r = cos_btr.shape[-1]
    x1, x2, rest = x32[..., :r], x32[..., r:2 * r], x32[..., 2 * r:]
    cos, sin = cos_btr[:, :, None], sin_btr[:, :, None]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x_btnh.dtype)
