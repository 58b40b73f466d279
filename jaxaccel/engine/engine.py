"""`LLMEngine`: requests in, tokens out, continuous batching over a paged KV cache.

`add_request` queues a request; each `step` asks the scheduler for the next rows, runs them
as one ragged program (decode tokens and prefill chunks flattened together,
`jaxaccel.engine.step`), applies each sampled token's stop conditions and frees finished
sequences' pages. `generate` runs a list of requests to the end
and returns their outputs in request order, streaming each step's outputs to `on_output`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np

from jaxaccel.engine import page_pool
from jaxaccel.engine.page_pool import NULL_PAGE, KVPages, PagePool
from jaxaccel.engine.prefix_cache import PrefixCache
from jaxaccel.engine.requests import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Request,
    RequestOutput,
)
from jaxaccel.engine.scheduler import Scheduled, Scheduler
from jaxaccel.engine.step import Bucket, StepInputs, StepPrograms, StepTokens, bucket
from jaxaccel.errors import InputError, UsageError
from jaxaccel.parallel import distributed

DEFAULT_KV_CACHE_BYTES = 1 << 30


def free_memory_bytes(layout) -> int:
    """Bytes free on the layout's first device (its allocator's limit less what is in use);
    on a device without memory stats (CPU), the host memory available."""
    device = layout.mesh.devices.flat[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fraction_of(fraction: float, free_bytes: int) -> int:
    """`fraction` (in (0, 1]) of `free_bytes`; UsageError outside that range."""
    if not 0.0 < fraction <= 1.0:
        raise UsageError(f"KV cache memory fraction must be in (0, 1], got {fraction}")
    return int(fraction * free_bytes)


def pool_size(config, itemsize: int, page_size: int, max_num_seqs: int,
              budget: int | None, max_num_batched_tokens: int = 512) -> tuple[int, int]:
    """(pages, null page included; bytes of one page over all layers) of the KV page pool:
    `budget` bytes' worth, or by default DEFAULT_KV_CACHE_BYTES' worth capped at what
    `max_num_seqs` sequences of the model's maximum length can use (with a sliding window
    over every layer, the pages a sequence holds at most). UsageError below 2."""
    one = page_pool.page_bytes(config.num_layers, config.num_kv_heads, page_size,
                               config.head_dim, itemsize)
    if budget is not None:
        return page_pool.pages_for_budget(budget, one), one
    width = page_pool.table_width(config.max_length, page_size,
                                  page_pool.cache_window(config), max_num_batched_tokens)
    enough = max_num_seqs * width + 1
    return min(enough, page_pool.pages_for_budget(DEFAULT_KV_CACHE_BYTES, one)), one


def pool_plan(config, dtype, platform: str, *,
              page_size: int = page_pool.DEFAULT_PAGE_SIZE, max_num_seqs: int = 64,
              kv_cache_bytes: int | float | None = None, free_bytes: int | None = None,
              max_num_batched_tokens: int = 512) -> dict:
    """What `LLMEngine` would allocate, from the config alone (for `jaxaccel plan`): pages
    (null page included), page_size (tokens), page_bytes, total bytes (global; kv heads are
    split over `model`) and tokens the pool holds; with a sliding window over every layer
    (`page_pool.cache_window`), also the pages (and bytes) one decoding sequence holds at
    most, window_pages_per_sequence and window_bytes_per_sequence. A fractional
    `kv_cache_bytes` takes that share of `free_bytes` (default: host memory available)."""
    from jaxaccel import backends  # deferred: only the plan needs a platform's backend

    if isinstance(kv_cache_bytes, float):
        free = free_bytes if free_bytes is not None else (
            os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        kv_cache_bytes = fraction_of(kv_cache_bytes, free)
    storage = backends.for_platform(platform).cache_storage_dtype(dtype)
    pages, one = pool_size(config, np.dtype(storage).itemsize, page_size, max_num_seqs,
                           kv_cache_bytes, max_num_batched_tokens)
    plan = {"pages": pages, "page_size": page_size, "page_bytes": one,
            "bytes": pages * one, "tokens": (pages - 1) * page_size}
    window = page_pool.cache_window(config)
    if window is not None:  # what one decoding sequence holds at most
        per_seq = page_pool.window_pages(window, page_size)
        plan.update(window_pages_per_sequence=per_seq, window_bytes_per_sequence=per_seq * one)
    return plan


def step_inputs(rows: list[Scheduled], step: Bucket, width: int, page_size: int,
                seed: int) -> StepInputs:
    """The host arrays of a ragged step over `rows` (in order), padded to `step`, block
    tables `width` pages wide; `seed` draws for requests without their own."""
    t, s = step.tokens, step.seqs
    counts = np.array([r.count for r in rows], np.int32)
    cu = np.zeros(s + 1, np.int32)
    cu[1:len(rows) + 1] = np.cumsum(counts)
    cu[len(rows) + 1:] = cu[len(rows)]
    arrays = StepInputs(
        np.zeros(t, np.int32), np.zeros(t, np.int32), np.full(t, NULL_PAGE, np.int32),
        np.zeros(t, np.int32), np.zeros(s, np.int32), cu, np.array([len(rows)], np.int32),
        np.zeros(s, np.int32), np.full((s, width), NULL_PAGE, np.int32),
        np.zeros(s, np.float32), np.zeros(s, np.int32), np.ones(s, np.float32),
        np.zeros(s, np.uint32), np.zeros(s, np.int32), np.zeros(s, bool))
    for i, row in enumerate(rows):
        seq, params = row.seq, row.seq.request.params
        first, end = cu[i], cu[i + 1]
        positions = np.arange(row.start, row.start + row.count, dtype=np.int32)
        pages = np.asarray(seq.pages, np.int32)
        arrays.ids_t[first:end] = seq.tokens[row.start:row.start + row.count]
        arrays.positions_t[first:end] = positions
        arrays.page_t[first:end] = pages[positions // page_size]
        arrays.slot_t[first:end] = positions % page_size
        arrays.kv_lens_s[i], arrays.last_s[i] = row.start + row.count, end - 1
        arrays.table_sw[i, :len(pages)] = pages
        arrays.temperature_s[i], arrays.top_k_s[i] = params.temperature, params.top_k
        arrays.top_p_s[i], arrays.nth_s[i] = params.top_p, len(seq.generated)
        arrays.seed_s[i] = params.seed if params.seed is not None else (
            (seed * 1_000_003 + seq.number) % 2**32)
        arrays.logprobs_s[i] = params.logprobs is not None
    return arrays


class LLMEngine:
    """The engine over one decoder: a `Generator`'s runtime and placed weights (its layout,
    dtype, backend and jit cache), plus a page pool and a scheduler.

    page_size: tokens per page. num_pages (null page included) or kv_cache_bytes sizes the
    pool: bytes (int), or a float in (0, 1], that fraction of the memory free on the first
    device once the weights are placed (host memory available on CPU). Default: 1 GiB, or
    less when max_num_seqs sequences of the model's maximum length need less. eos_token_ids: the model's EOS ids (a request stops at them unless it
    ignores EOS). detokenize: ids -> text, for stop strings and output text. seed: the
    random stream of requests without their own seed.
    """

    def __init__(self, generator, *, page_size: int = page_pool.DEFAULT_PAGE_SIZE,
                 num_pages: int | None = None,
                 kv_cache_bytes: int | float | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, enable_prefix_caching: bool = True,
                 eos_token_ids: Sequence[int] = (), detokenize: Callable | None = None,
                 seed: int = 0):
        if page_size < 1 or max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise UsageError("page_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        self.generator, self.config = generator, generator.config
        self.page_size, self.max_num_seqs = page_size, max_num_seqs
        self.eos_token_ids, self.detokenize, self.seed = set(eos_token_ids), detokenize, seed
        self.max_num_batched_tokens = max_num_batched_tokens
        self.window = page_pool.cache_window(self.config)  # None: pages kept to the end
        # Pages a sequence holds at most (bounded by a window over every layer) ...
        self.max_pages_per_seq = page_pool.table_width(
            self.config.max_length, page_size, self.window, max_num_batched_tokens)
        # ... and its block table's width: every page position up to the maximum length (the
        # paged-attention contract indexes slot j at page_indices[i, j // c]; pages freed
        # behind a window are listed as the null page, which the window's mask never reads).
        self.table_width = page_pool.pages_needed(self.config.max_length, page_size)
        self.pool = PagePool(num_pages or self._pages_for(kv_cache_bytes))
        self.prefix = PrefixCache(self.pool, page_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, self.prefix, page_size, max_num_seqs,
                                   max_num_batched_tokens, self.window)
        self.programs = StepPrograms(generator.runtime, generator.state_shardings)
        self.pages = self._empty_pages()
        self.outputs: dict[object, RequestOutput] = {}
        self.peak_pages_used = 0
        # Where a step's time goes: all of it, and the part spent waiting for the device (the
        # rest is the host: scheduling, input arrays, dispatch, stop checks).
        self.timings = {"steps": 0, "step_s": 0.0, "device_wait_s": 0.0}

    def _pages_for(self, budget: int | float | None) -> int:
        gen = self.generator
        if isinstance(budget, float):
            budget = fraction_of(budget, free_memory_bytes(gen.runtime.layout))
        storage = gen.runtime.backend.cache_storage_dtype(gen.dtype)
        return pool_size(self.config, np.dtype(storage).itemsize, self.page_size,
                         self.max_num_seqs, budget, self.max_num_batched_tokens)[0]

    def _empty_pages(self) -> KVPages:
        cfg, gen = self.config, self.generator
        shape = (cfg.num_layers, self.pool.num_pages, cfg.num_kv_heads, self.page_size,
                 cfg.head_dim)
        storage = gen.runtime.backend.cache_storage_dtype(gen.dtype)
        zeros = jax.jit(lambda: jax.numpy.zeros(shape, storage),
                        out_shardings=self.programs.page_sharding(shape))
        return KVPages(zeros(), zeros())

    # Requests -------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request; InputError (naming the request) if it cannot run on this model
        and pool: ids outside the vocabulary, too long, stop strings without `detokenize`,
        or an id already in flight."""
        self.check(request)
        self.scheduler.add(request)
        self.outputs[request.request_id] = RequestOutput(
            request.request_id, request.prompt_token_ids, [], arrival_s=time.perf_counter())

    def check(self, request: Request) -> None:
        """InputError, naming the request, if it cannot run on this model and pool (see
        `add_request`)."""
        name, cfg = f"request {request.request_id!r}", self.config
        if request.request_id in self.outputs:
            raise InputError(f"{name}: this request_id is already in the engine")
        bad = [t for t in request.prompt_token_ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise InputError(f"{name}: token ids {bad[:5]} are outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
        tokens = len(request.prompt_token_ids) + request.params.max_tokens - 1
        if tokens > cfg.max_length:
            raise InputError(f"{name}: prompt + max_tokens - 1 = {tokens} tokens exceeds the "
                             f"model's maximum length {cfg.max_length}")
        held = min(page_pool.pages_needed(tokens, self.page_size), self.max_pages_per_seq)
        if held > self.pool.num_pages - 1:
            raise InputError(f"{name}: needs {min(tokens, held * self.page_size)} tokens of KV "
                             f"cache; the pool holds {(self.pool.num_pages - 1) * self.page_size}")
        if request.params.stop and self.detokenize is None:
            raise InputError(f"{name}: stop strings need a tokenizer")

    def abort_request(self, request_id) -> bool:
        """Stop the request `request_id` (a client that went away): its sequence leaves the
        scheduler and its pages are freed now, before the next step. False if it is not in
        flight (finished already, or never added)."""
        found = self.scheduler.abort(request_id)
        self.outputs.pop(request_id, None)
        return found

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # Steps ----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; the outputs of requests that got a token (or finished)."""
        start = time.perf_counter()
        rows = self.scheduler.schedule()
        if not rows:
            return []
        self.peak_pages_used = max(self.peak_pages_used, self.pool.used_count)
        out = self._run(rows)
        self.scheduler.advance(rows)
        waited = time.perf_counter()
        tokens, logprobs = self._fetch(rows, out)
        self.timings["device_wait_s"] += time.perf_counter() - waited
        reported = []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            if row.samples:
                reported.append(self._accept(row, int(token), logprobs and (
                    logprobs[0][i], logprobs[1][i], logprobs[2][i])))
        self.timings["step_s"] += time.perf_counter() - start
        self.timings["steps"] += 1
        return reported

    def _run(self, rows: list[Scheduled]) -> StepTokens:
        """Launch the step's one ragged program over `rows`; its StepTokens (on the device)."""
        step = bucket([r.count for r in rows], self.max_num_seqs)
        inputs = step_inputs(rows, step, self.table_width, self.page_size, self.seed)
        self.pages, out = self.programs.run(self.generator.state, self.pages, inputs,
                                            step.decode)
        return out

    @staticmethod
    def _fetch(rows: list[Scheduled], out: StepTokens):
        """(tokens [S], and when a sequence asked for them (logprob [S], top ids [S, k], top
        logprobs [S, k]) else None) on the host."""
        host = lambda x: np.asarray(distributed.host_array(x))  # noqa: E731
        wanted = any(r.seq.request.params.logprobs is not None for r in rows)
        logprobs = tuple(host(x).tolist() for x in out[1:]) if wanted else None
        return host(out.tokens_b), logprobs

    def _accept(self, row: Scheduled, token: int, logprobs=None) -> RequestOutput:
        """Append a sampled token (and its log-probabilities, when asked: (logprob, top ids,
        top logprobs)); finish the request if it stops here."""
        seq = row.seq
        params = seq.request.params
        out = self.outputs[seq.request.request_id]
        seq.tokens.append(token)
        out.token_ids.append(token)
        if params.logprobs is not None and logprobs:
            chosen, ids, values = logprobs
            top = list(zip(ids, values))[:params.logprobs]
            if out.logprobs is None:
                out.logprobs = []
            out.logprobs.append((float(chosen), top))
        now = time.perf_counter()
        out.first_token_s = out.first_token_s or now
        reason, cut = None, False
        if len(out.token_ids) < params.min_tokens:
            pass  # too early for any stop condition
        elif token in params.stop_token_ids:
            reason = FINISH_STOP
        elif not params.ignore_eos and token in self.eos_token_ids:
            reason = FINISH_EOS
        elif params.stop and self._cut_at_stop(out, params.stop):
            reason, cut = FINISH_STOP, True
        elif len(out.token_ids) >= params.max_tokens:
            reason = FINISH_LENGTH
        if reason is not None:
            self.scheduler.finish(seq)
            out.finished, out.finish_reason, out.finish_s = True, reason, now
            if self.detokenize is not None and not cut:
                out.text = self.detokenize(out.token_ids)
            del self.outputs[seq.request.request_id]  # the caller holds it from here
        return out

    def _cut_at_stop(self, out: RequestOutput, stops: Sequence[str]) -> bool:
        """Whether the text now holds a stop string; if so `out.text` is cut before it."""
        text = self.detokenize(out.token_ids)
        found = [s for s in stops if s and s in text]
        if not found:
            return False
        out.text = text[:min(text.find(s) for s in found)]
        return True

    # Whole runs -----------------------------------------------------------------------------

    def generate(self, requests: Iterable[Request],
                 on_output: Callable[[RequestOutput], None] | None = None
                 ) -> list[RequestOutput]:
        """Run `requests` to the end; their outputs in the order given. `on_output` sees
        each request's output every step it gets a token (finished=True the last time)."""
        requests = list(requests)
        for request in requests:
            self.add_request(request)
        done: dict[object, RequestOutput] = {}
        while self.has_unfinished:
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
                if on_output is not None:
                    on_output(out)
        return [done[r.request_id] for r in requests]

    def stats(self) -> dict:
        """Counters over the engine's life: preemptions, prefix-cache hit pages, prefill
        tokens computed, peak pages used, the pool size, and steps with their seconds (all,
        and waiting for the device)."""
        return {"preemptions": self.scheduler.preemptions,
                "prefix_hit_pages": self.prefix.hit_pages,
                "prefill_tokens": self.scheduler.prefill_tokens,
                "peak_pages_used": self.peak_pages_used, "num_pages": self.pool.num_pages,
                "page_size": self.page_size, **self.timings}
