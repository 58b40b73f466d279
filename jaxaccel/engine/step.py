"""The jitted engine step: one padded batch of rows over the paged KV cache.

Shape legend as in `jaxaccel.models.layers`, plus: b rows (sequences), t new tokens per row,
p pages per row (block table width), c slots per page, s = p * c gathered slots.

A step's rows each bring `count` new tokens from position `start` (a decode row 1, a prefill
chunk up to the token budget). A row's block table lists its pages from its `first_page` on
(the pages before it are out of every query's sliding window and freed), so slot j of the
table holds position first_page * c + j. The batch is padded to a bucket (b, t, p): b and p
powers of two, t 1 (a decode step) or a power of two >= `MIN_CHUNK`; padding rows and
tokens write to the null page and are masked out. Per step, the step
  1. hands the decoder the pool with the block tables and each row's `start` as its cache
     (`kv_cache.PagedCache`): inside the layer scan, each layer's attention is the backend's
     ragged paged attention (`Backend.paged_attention`, rows as sequences of t tokens over
     their `start` cached slots): jax's Pallas kernels on TPU/GPU, the C++ kernel reading
     pages in place on the CPU, and by default a gather of the rows' pages into a dense
     [b, k, s, h] view, one layer at a time (gathering the whole [l, b, k, s, h] stack up
     front measured 2.5x slower per decode step: GPT-2 124M shape, 16 rows x 1024 slots,
     float32, 3.3 s vs 1.35 s on the shared 2-core host),
  2. runs the decoder unchanged otherwise: new tokens attend causally among themselves,
  3. scatters the new keys/values into their pages (the pool is donated: updated in place),
  4. chooses each row's next token from its last real token's logits with the row's own
     sampling settings (`jaxaccel.engine.sampling`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel import backends
from jaxaccel.engine.page_pool import NULL_PAGE, KVPages
from jaxaccel.engine.sampling import choose_rows
from jaxaccel.models.kv_cache import KVCache, PagedCache, PagedLayer
from jaxaccel.parallel import sharding as ax
from jaxaccel.runtime.programs import next_power_of_two

PAGE_AXES = (ax.LAYERS, None, ax.KV_HEADS, None, ax.HEAD_DIM)
MIN_CHUNK = 16  # smallest prefill bucket: fewer programs, little padding
MAX_LOGPROBS = 5  # OpenAI's completions limit


class StepInputs(NamedTuple):
    """Host arrays of one padded step (numpy)."""

    ids_bt: np.ndarray  # int32 token ids (0 where padding)
    start_b: np.ndarray  # int32 position of each row's first new token = slots cached before
    count_b: np.ndarray  # int32 new tokens per row (0 for padding rows)
    table_bp: np.ndarray  # int32 block tables, padded with the null page
    temperature_b: np.ndarray  # float32
    top_k_b: np.ndarray  # int32
    top_p_b: np.ndarray  # float32
    seed_b: np.ndarray  # uint32
    nth_b: np.ndarray  # int32 tokens the row's request has generated so far
    logprobs_b: np.ndarray  # bool: the row's request asks for log-probabilities
    first_page_b: np.ndarray  # int32 index, in the sequence, of the table's first page

    @classmethod
    def specs(cls, b: int, t: int, p: int) -> "StepInputs":
        """Shapes and dtypes of a (b, t, p) bucket's inputs (jax.ShapeDtypeStruct), for
        compiling its program before any request arrives."""
        shapes = {"ids_bt": (b, t), "table_bp": (b, p)}
        dtypes = {"temperature_b": np.float32, "top_p_b": np.float32, "seed_b": np.uint32,
                  "logprobs_b": np.bool_}
        return cls(*(jax.ShapeDtypeStruct(shapes.get(name, (b,)), dtypes.get(name, np.int32))
                     for name in cls._fields))


class StepTokens(NamedTuple):
    """What a step chooses per row (on the device): the next token, and when any row asked
    for them, log-probabilities of the model's distribution (before temperature and
    truncation, as vLLM reports them): the chosen token's and the `MAX_LOGPROBS` best."""

    tokens_b: object  # int32
    logprob_b: object  # float32
    top_ids_bk: object  # int32, best first
    top_logprobs_bk: object  # float32


def bucket(rows: int, tokens: int, pages: int, max_rows: int, max_pages: int
           ) -> tuple[int, int, int]:
    """The padded (b, t, p) of a step with these rows, most new tokens in a row, and most
    pages in a row."""
    b = min(next_power_of_two(rows), next_power_of_two(max_rows))
    t = 1 if tokens == 1 else next_power_of_two(tokens, MIN_CHUNK)
    return b, t, min(next_power_of_two(pages), next_power_of_two(max_pages))


def paged_view(pages: KVPages, table_bp, start_b) -> PagedCache:
    """The pool as the decoder's cache: each layer's attention reads its rows' pages through
    the backend's paged attention (`kv_cache.PagedLayer`), inside the layer scan. `start_b`:
    each row's cached slots in its table."""
    layers = pages.k_lpkch.shape[0]
    table_lbp = jnp.broadcast_to(table_bp[None], (layers, *table_bp.shape))
    start_lb = jnp.broadcast_to(start_b[None], (layers, *start_b.shape))
    return PagedCache(PagedLayer(pages.k_lpkch, table_lbp, start_lb),
                      PagedLayer(pages.v_lpkch, table_lbp, start_lb))


def scatter_tokens(pages: KVPages, new: KVCache, table_bp, first_page_b, positions_bt,
                   valid_bt) -> KVPages:
    """Write new keys/values [l, b, k, t, h] at their positions' page slots (the table of
    row i starts at the sequence's page first_page_b[i]); padding tokens go to the null
    page."""
    c = pages.k_lpkch.shape[3]
    index_bt = jnp.maximum(positions_bt // c - first_page_b[:, None], 0)
    page_bt = jnp.take_along_axis(table_bp, index_bt, axis=1)
    page_bt = jnp.where(valid_bt, page_bt, NULL_PAGE)
    slot_bt = positions_bt % c
    backend = backends.current()

    def write(x_lpkch, new_lbkth):
        update_btlkh = backend.cache_store(new_lbkth, x_lpkch.dtype).transpose(1, 3, 0, 2, 4)
        return x_lpkch.at[:, page_bt, :, slot_bt, :].set(update_btlkh)

    return KVPages(*(write(x, n) for x, n in zip(pages, new)))


def step_body(model, pages: KVPages, inputs: StepInputs):
    """(pages, StepTokens) of one padded step (traced; see the module docstring)."""
    b, t = inputs.ids_bt.shape
    index_t = jnp.arange(t)
    valid_bt = index_t[None] < inputs.count_b[:, None]
    positions_bt = jnp.where(valid_bt, inputs.start_b[:, None] + index_t[None], 0)
    # Causal among the new tokens; a padding query sees itself, so no row is empty.
    mask_btt = (index_t[None, :, None] >= index_t[None, None, :]) & (
        valid_bt[:, None, :] | jnp.eye(t, dtype=bool)[None])
    c = pages.k_lpkch.shape[3]
    offset_b = inputs.first_page_b * c  # the position of each row's first listed slot
    cache = paged_view(pages, inputs.table_bp, inputs.start_b - offset_b)
    s = inputs.table_bp.shape[1] * c
    # The gathered view's slot j holds position offset + j (what sliding-window layers
    # compare); the slots before `start` are cached.
    cache_positions_bs = offset_b[:, None] + jnp.arange(s)[None]
    cache_mask_bts = jnp.broadcast_to(
        (cache_positions_bs < inputs.start_b[:, None])[:, None, :], (b, t, s))
    x_btd, new_kv = model(inputs.ids_bt, positions_bt, mask_btt, cache, cache_mask_bts,
                          cache_positions_bs=cache_positions_bs)
    pages = scatter_tokens(pages, new_kv, inputs.table_bp, inputs.first_page_b,
                           positions_bt, valid_bt)
    last_b = jnp.maximum(inputs.count_b - 1, 0)
    x_b1d = jnp.take_along_axis(x_btd, last_b[:, None, None], axis=1)
    logits_bv = model.logits(x_b1d)[:, 0]
    tokens_b = choose_rows(logits_bv, inputs.temperature_b, inputs.top_k_b, inputs.top_p_b,
                           inputs.seed_b, inputs.nth_b)
    return pages, token_logprobs(logits_bv, tokens_b, inputs.logprobs_b)


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

    def program(self, bucket_btp: tuple[int, int, int], pages_shape: tuple[int, ...]):
        rt = self.runtime
        page_sh = self.page_sharding(pages_shape)
        pages_sh = KVPages(page_sh, page_sh)
        replicated = rt.replicated()
        inputs_sh = StepInputs(*[replicated] * len(StepInputs._fields))
        return rt.program(("engine_step", *bucket_btp, pages_shape), self._traced,
                          in_shardings=(self.state_shardings, pages_sh, inputs_sh),
                          out_shardings=(pages_sh, replicated), donate_argnums=(1,))

    def _traced(self, state, pages, inputs):
        return step_body(self.runtime.model(state), pages, inputs)

    def run(self, state, pages: KVPages, inputs: StepInputs):
        """(new pages, StepTokens on the device) for one padded step."""
        b, t = inputs.ids_bt.shape
        p = inputs.table_bp.shape[1]
        return self.program((b, t, p), tuple(pages.k_lpkch.shape))(state, pages, inputs)


