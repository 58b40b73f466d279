"""The jitted engine step: one ragged batch of tokens over the paged KV cache.

Shape legend as in `jaxaccel.models.layers`, plus (as in `jaxaccel.backends.paged`): T
tokens of the step (every sequence's new tokens back to back), S sequences, W pages per
sequence (block table width), c slots per page.

A step's sequences each bring `count` new tokens from position `start` (a decode row 1, a
prefill chunk up to the token budget). Their tokens are flattened into one [T] batch, so the
projections and the MLP run on the step's real tokens, padded only up to a bucket of T; a
step is one program, decode and prefill tokens together. Buckets (`Bucket`): T and S powers
of two (T >= `MIN_CHUNK` and S >= T / 8 when any sequence prefills), and whether every sequence decodes
(one query each: attention kernels for decode take that shape); W is the engine's maximum,
fixed (kernels read only each sequence's `kv_lens` worth of pages). Padding tokens write to
the null page and belong to no sequence. Per step, the step
  1. hands the decoder the pool with the ragged metadata as its cache
     (`kv_cache.PagedCache`): inside the layer scan, each layer's attention is the backend's
     ragged paged attention (`Backend.paged_attention`): jax's Pallas kernels on TPU/GPU, the
     C++ kernel reading pages in place on the CPU, and by default a gather of each
     sequence's pages, one layer at a time (gathering the whole [l, S, k, W * c, h] stack up
     front measured 2.5x slower per decode step: GPT-2 124M shape, 16 rows x 1024 slots,
     float32, 3.3 s vs 1.35 s on the shared 2-core host),
  2. runs the decoder unchanged otherwise, as one row of T tokens at their own positions,
  3. scatters the new keys/values into their slots (`page_t`, `slot_t`, computed on the
     host; the pool is donated: updated in place),
  4. chooses each sequence's next token from its last token's logits with its own sampling
     settings (`jaxaccel.engine.sampling`).

Before, a step ran decode rows and prefill rows as two programs padded to [rows, longest
chunk]: one 512-token chunk beside three short ones computed 2048 token rows for ~560 real.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel import backends
from jaxaccel.engine.page_pool import KVPages
from jaxaccel.engine.sampling import choose_rows
from jaxaccel.models.kv_cache import KVCache, PagedCache, PagedLayer
from jaxaccel.parallel import sharding as ax
from jaxaccel.runtime.programs import next_power_of_two

PAGE_AXES = (ax.LAYERS, None, ax.KV_HEADS, None, ax.HEAD_DIM)
MIN_CHUNK = 16  # smallest token bucket of a step that prefills: fewer programs
SEQS_PER_TOKENS = 8  # a prefilling step's sequence bucket is at least T / 8 (see `bucket`)
MAX_LOGPROBS = 5  # OpenAI's completions limit


class Bucket(NamedTuple):
    """A step program's padded shape: T tokens, S sequences, and whether every sequence
    decodes (one token each; then T == S)."""

    tokens: int
    seqs: int
    decode: bool


class StepInputs(NamedTuple):
    """Host arrays of one ragged step (numpy); per-token [T], per-sequence [S]."""

    ids_t: np.ndarray  # int32 token ids (0 where padding)
    positions_t: np.ndarray  # int32 each token's position in its sequence (0 where padding)
    page_t: np.ndarray  # int32 the page its key/value goes to (the null page for padding)
    slot_t: np.ndarray  # int32 its slot in that page
    kv_lens_s: np.ndarray  # int32 keys of each sequence after this step (0 for padding)
    cu_q_lens_s: np.ndarray  # int32 [S + 1] sequence i's tokens are cu[i] .. cu[i + 1] - 1
    num_seqs: np.ndarray  # int32 [1] real sequences
    last_s: np.ndarray  # int32 index in [T] of each sequence's last token (0 for padding)
    table_sw: np.ndarray  # int32 block tables, padded with the null page
    temperature_s: np.ndarray  # float32
    top_k_s: np.ndarray  # int32
    top_p_s: np.ndarray  # float32
    seed_s: np.ndarray  # uint32
    nth_s: np.ndarray  # int32 tokens the sequence's request has generated so far
    logprobs_s: np.ndarray  # bool: the sequence's request asks for log-probabilities

    @classmethod
    def specs(cls, bucket: Bucket, width: int) -> "StepInputs":
        """Shapes and dtypes of a bucket's inputs with block tables `width` pages wide
        (jax.ShapeDtypeStruct), for compiling its program before any request arrives."""
        t, s = bucket.tokens, bucket.seqs
        shapes = {"cu_q_lens_s": (s + 1,), "num_seqs": (1,), "table_sw": (s, width)}
        dtypes = {"temperature_s": np.float32, "top_p_s": np.float32, "seed_s": np.uint32,
                  "logprobs_s": np.bool_}
        return cls(*(jax.ShapeDtypeStruct(
            shapes.get(name, (t,) if name.endswith("_t") else (s,)),
            dtypes.get(name, np.int32)) for name in cls._fields))


class StepTokens(NamedTuple):
    """What a step chooses per sequence (on the device): the next token, and when any
    sequence asked for them, log-probabilities of the model's distribution (before
    temperature and truncation, as vLLM reports them): the chosen token's and the
    `MAX_LOGPROBS` best."""

    tokens_b: object  # int32
    logprob_b: object  # float32
    top_ids_bk: object  # int32, best first
    top_logprobs_bk: object  # float32


def bucket(counts: list[int], max_seqs: int) -> Bucket:
    """The padded bucket of a step whose sequences bring `counts` new tokens each.

    A step that prefills pads its sequences to at least T / `SEQS_PER_TOKENS`: their logits
    then cost at most ~6% of the step (GPT-2 124M: 77 MFLOP a sequence's head against 170
    a token's layers), and one program serves a T bucket whatever its mix of sequences."""
    most = next_power_of_two(max_seqs)
    s = min(next_power_of_two(len(counts)), most)
    if all(c == 1 for c in counts):
        return Bucket(s, s, True)
    t = next_power_of_two(sum(counts), MIN_CHUNK)
    return Bucket(t, min(max(s, t // SEQS_PER_TOKENS), most), False)


def paged_view(pages: KVPages, inputs: StepInputs, decode: bool) -> PagedCache:
    """The pool as the decoder's cache: each layer's attention reads the step's sequences'
    pages through the backend's ragged paged attention (`kv_cache.PagedLayer`), inside the
    layer scan. A decode step leaves `cu_q_lens` implied (one query per sequence)."""
    layers = pages.k_lpkch.shape[0]
    per_layer = lambda x: jnp.broadcast_to(x[None], (layers, *x.shape))  # noqa: E731
    ragged = dict(table_bw=per_layer(inputs.table_sw), kv_lens_b=per_layer(inputs.kv_lens_s),
                  cu_q_lens=None if decode else per_layer(inputs.cu_q_lens_s),
                  num_seqs=per_layer(inputs.num_seqs))
    return PagedCache(PagedLayer(pages.k_lpkch, **ragged), PagedLayer(pages.v_lpkch, **ragged))


def scatter_tokens(pages: KVPages, new: KVCache, page_t, slot_t) -> KVPages:
    """Write new keys/values [l, 1, k, T, h] at their tokens' page slots (padding tokens
    go to the null page)."""
    backend = backends.current()

    def write(x_lpkch, new_l1kth):
        update_tlkh = backend.cache_store(new_l1kth[:, 0], x_lpkch.dtype).transpose(2, 0, 1, 3)
        return x_lpkch.at[:, page_t, :, slot_t, :].set(update_tlkh)

    return KVPages(*(write(x, n) for x, n in zip(pages, new)))


def step_body(model, pages: KVPages, inputs: StepInputs, decode: bool = False):
    """(pages, StepTokens) of one ragged step (traced; see the module docstring)."""
    cache = paged_view(pages, inputs, decode)
    # No masks: paged attention's causal structure comes from the ragged metadata.
    x_1td, new_kv = model(inputs.ids_t[None], inputs.positions_t[None], None, cache, None)
    pages = scatter_tokens(pages, new_kv, inputs.page_t, inputs.slot_t)
    x_s1d = x_1td[0, inputs.last_s][:, None]
    logits_sv = model.logits(x_s1d)[:, 0]
    tokens_s = choose_rows(logits_sv, inputs.temperature_s, inputs.top_k_s, inputs.top_p_s,
                           inputs.seed_s, inputs.nth_s)
    return pages, token_logprobs(logits_sv, tokens_s, inputs.logprobs_s)


def token_logprobs(logits_bv, tokens_b, want_b) -> StepTokens:
    """`tokens_b` with their log-probabilities and the best ones (zeros when no row wants
    them: a softmax and top-k over the vocabulary is skipped then)."""
    b, v = logits_bv.shape
    k = min(MAX_LOGPROBS, v)

    def compute(logits_bv):
        logprobs_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
        chosen_b = jnp.take_along_axis(logprobs_bv, tokens_b[:, None], axis=1)[:, 0]
        top_bk, ids_bk = jax.lax.top_k(logprobs_bv, k)
        return chosen_b, ids_bk.astype(jnp.int32), top_bk

    def skip(logits_bv):
        return (jnp.zeros(b, jnp.float32), jnp.zeros((b, k), jnp.int32),
                jnp.zeros((b, k), jnp.float32))

    return StepTokens(tokens_b, *jax.lax.cond(jnp.any(want_b), compute, skip, logits_bv))


class StepPrograms:
    """The step's jitted programs, one per bucket, on a `Runtime` (its backend, shardings,
    jit cache and trace counts)."""

    def __init__(self, runtime, state_shardings):
        if runtime.pipeline is not None:
            raise NotImplementedError("the engine does not run pipeline (`stage`) layouts yet")
        self.runtime, self.state_shardings = runtime, state_shardings

    def page_sharding(self, shape):
        return self.runtime.sharding(PAGE_AXES, shape)

    def program(self, bucket: Bucket, width: int, pages_shape: tuple[int, ...]):
        """The jitted step of `bucket` with block tables `width` pages wide over a pool of
        `pages_shape`."""
        rt = self.runtime
        page_sh = self.page_sharding(pages_shape)
        pages_sh = KVPages(page_sh, page_sh)
        replicated = rt.replicated()
        inputs_sh = StepInputs(*[replicated] * len(StepInputs._fields))
        traced = self._decode_traced if bucket.decode else self._traced
        return rt.program(("engine_step", *bucket, width, pages_shape), traced,
                          in_shardings=(self.state_shardings, pages_sh, inputs_sh),
                          out_shardings=(pages_sh, replicated), donate_argnums=(1,))

    def _traced(self, state, pages, inputs):
        return step_body(self.runtime.model(state), pages, inputs)

    def _decode_traced(self, state, pages, inputs):
        return step_body(self.runtime.model(state), pages, inputs, decode=True)

    def run(self, state, pages: KVPages, inputs: StepInputs, decode: bool):
        """(new pages, StepTokens on the device) for one ragged step."""
        s, width = inputs.table_sw.shape
        bucket_ = Bucket(inputs.ids_t.shape[0], s, decode)
        return self.program(bucket_, width, tuple(pages.k_lpkch.shape))(state, pages, inputs)
