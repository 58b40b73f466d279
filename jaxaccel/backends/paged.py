"""Ragged paged attention: the contract every backend's `paged_attention` keeps, and its
plain-XLA implementation (a gather of each sequence's pages), which is the default on every
platform and the reference in tests.

Shape legend: T query tokens of the step (all sequences' queries back to back), S sequences
(max_num_seqs), W pages per sequence (block table width), P pages in the pool, c slots per
page, n query heads, k kv heads (n % k == 0, query head i reads kv head i // (n / k)), h head
dim.

The contract follows jax's `jax.experimental.pallas.ops.tpu.ragged_paged_attention` (RPA:
queries flattened over tokens, `kv_lens`, `page_indices`, `cu_q_lens`, `num_seqs`, `sm_scale`,
`sliding_window`, `soft_cap`) with two differences, both from the engine's layout:

* the step's fresh keys/values come as arrays of their own (`k_tkh`, `v_tkh`, one row per query
  token; as in vLLM tpu-inference's RPA v3), not yet written into the pages: the engine writes
  them after the decoder (`jaxaccel.engine.step.scatter_tokens`);
* keys and values are two pools [P, k, c, h] (heads before slots: one page of one head is a
  contiguous [c, h] matrix), not RPA's combined [P, c, 2k, h].

Sequence i (i < num_seqs) owns query tokens cu_q_lens[i] .. cu_q_lens[i+1]-1 (q_len of them)
and has kv_lens[i] keys: the first kv_lens[i] - q_len are cached, slot j at slot j % c of page
page_indices[i, j // c]; the last q_len are its own fresh keys, in token order. Its j-th query
sits at position kv_lens[i] - q_len + j and attends to the keys at positions <= its own
(causal), and with `sliding_window` w only to those > position - w. Scores are
q.k * sm_scale, then soft_cap * tanh(score / soft_cap) when `soft_cap` is given, softmax in
float32. `sliding_window` may be traced (an int32 scalar; 2**30 or more: no window) in the
reference. Output rows of tokens no sequence owns are zero on the CPU kernel and unspecified
elsewhere (callers discard them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def static_window(sliding_window) -> bool:
    """Whether `sliding_window` is None or a Python int: kernels take only those; a traced
    window (a layer scan mixing windowed and global layers) runs the plain-XLA reference."""
    return sliding_window is None or isinstance(sliding_window, int)


def query_rows(cu_q_lens, num_seqs, rows: int):
    """(token index [S, rows] int32, valid [S, rows] bool): sequence i's j-th query token, for
    j < rows; tokens past a sequence's q_len (or of sequences past num_seqs) are invalid and
    index 0."""
    seqs = cu_q_lens.shape[0] - 1
    live_s = jnp.arange(seqs) < num_seqs[0]
    q_len_s = jnp.where(live_s, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    j = jnp.arange(rows)
    valid_sj = j[None] < q_len_s[:, None]
    return jnp.where(valid_sj, cu_q_lens[:-1, None] + j[None], 0), valid_sj


def fresh_slots(kv_lens, page_indices, cu_q_lens, num_seqs, tokens: int, page_size: int,
                num_pages: int):
    """(page [T], slot [T]) where each query token's own key belongs in the pool; tokens no
    sequence owns get page `num_pages` (out of range: a scatter with mode="drop" skips them).
    Kernels that read every key from the pages (TPU RPA, the GPU decode kernel) write the
    fresh keys there first."""
    seqs = page_indices.shape[0]
    t = jnp.arange(tokens)
    # The sequence owning token t: the last i with cu_q_lens[i] <= t.
    seq_t = jnp.clip(jnp.searchsorted(cu_q_lens[1:], t, side="right"), 0, seqs - 1)
    owned_t = (t >= cu_q_lens[0]) & (t < cu_q_lens[num_seqs[0]]) & (seq_t < num_seqs[0])
    q_len_t = cu_q_lens[seq_t + 1] - cu_q_lens[seq_t]
    position_t = kv_lens[seq_t] - q_len_t + (t - cu_q_lens[seq_t])
    width = page_indices.shape[1]
    page_t = page_indices[seq_t, jnp.clip(position_t // page_size, 0, width - 1)]
    owned_t &= position_t < width * page_size
    return jnp.where(owned_t, page_t, num_pages), position_t % page_size


def reference(q_tnh, k_tkh, v_tkh, k_pages_pkch, v_pages_pkch, kv_lens, page_indices,
              cu_q_lens, num_seqs, *, sm_scale: float, sliding_window: int | None = None,
              soft_cap: float | None = None, max_q_len: int | None = None) -> jax.Array:
    """Ragged paged attention in plain XLA (see the module docstring) -> [T, n, h] in q's dtype.

    Each sequence's pages are gathered into a dense [S, k, W * c, h] view and its queries into
    [S, max_q_len, n, h] rows (`max_q_len`, static, bounds every sequence's q_len; None: T,
    correct but S times the memory). Pages must already hold q's dtype (a backend converts
    its storage first). Masked scores are finfo(float32).min; probabilities are cast to q's
    dtype before the value product, as `Backend.attention` does.
    """
    tokens, n, h = q_tnh.shape
    seqs, width = page_indices.shape
    _, kv_heads, c, _ = k_pages_pkch.shape
    groups, rows = n // kv_heads, min(max_q_len or tokens, tokens)
    dt = q_tnh.dtype
    token_sj, valid_sj = query_rows(cu_q_lens, num_seqs, rows)
    q_len_s = valid_sj.sum(axis=1)
    cached_s = kv_lens - q_len_s
    # Row r of a kv head's query matrix is (query j, group g): [S, k, rows * g, h].
    q_skrh = q_tnh[token_sj].reshape(seqs, rows, kv_heads, groups, h).transpose(
        0, 2, 1, 3, 4).reshape(seqs, kv_heads, rows * groups, h)

    def dense(pages_pkch):
        return pages_pkch[page_indices].transpose(0, 2, 1, 3, 4).reshape(
            seqs, kv_heads, width * c, h)

    def fresh(x_tkh):
        return x_tkh[token_sj].transpose(0, 2, 1, 3)  # [S, k, rows, h]

    keys = (dense(k_pages_pkch), fresh(k_tkh))
    values = (dense(v_pages_pkch), fresh(v_tkh))
    scores_skrm = jnp.concatenate(
        [jnp.einsum("skrh,skmh->skrm", q_skrh, x, preferred_element_type=jnp.float32)
         for x in keys], axis=-1) * sm_scale
    if soft_cap is not None:
        scores_skrm = soft_cap * jnp.tanh(scores_skrm / soft_cap)
    mask_sjm = _mask(cached_s, valid_sj, width * c, sliding_window)
    mask_srm = jnp.repeat(mask_sjm, groups, axis=1)
    scores_skrm = jnp.where(mask_srm[:, None], scores_skrm, jnp.finfo(jnp.float32).min)
    probs_skrm = jax.nn.softmax(scores_skrm, axis=-1).astype(dt)
    split = width * c
    out_skrh = (jnp.einsum("skrm,skmh->skrh", probs_skrm[..., :split], values[0],
                           preferred_element_type=jnp.float32)
                + jnp.einsum("skrm,skmh->skrh", probs_skrm[..., split:], values[1],
                             preferred_element_type=jnp.float32))
    out_sjnh = out_skrh.reshape(seqs, kv_heads, rows, groups, h).transpose(
        0, 2, 1, 3, 4).reshape(seqs, rows, n, h).astype(dt)
    target_sj = jnp.where(valid_sj, token_sj, tokens)  # invalid rows are dropped
    return jnp.zeros_like(q_tnh).at[target_sj].set(out_sjnh, mode="drop")


def _mask(cached_s, valid_sj, slots: int, sliding_window):
    """bool [S, rows, slots + rows]: query j of each sequence over its cached slots, then its
    fresh keys (causal; within the window)."""
    rows = valid_sj.shape[1]
    j = jnp.arange(rows)
    position_sj = cached_s[:, None] + j[None]
    key_sm = jnp.concatenate([jnp.broadcast_to(jnp.arange(slots), (cached_s.shape[0], slots)),
                              position_sj], axis=1)
    key_ok_sm = jnp.concatenate([jnp.arange(slots)[None] < cached_s[:, None], valid_sj],
                                axis=1)
    mask = key_ok_sm[:, None, :] & (key_sm[:, None, :] <= position_sj[:, :, None])
    if sliding_window is not None:
        mask &= key_sm[:, None, :] > position_sj[:, :, None] - sliding_window
    return mask
