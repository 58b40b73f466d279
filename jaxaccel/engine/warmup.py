"""Compiling the engine's step programs before a run, so the run itself never compiles.

A step's program depends only on its bucket (T tokens, S sequences, decode or not), the
block tables' width and the pool's shape, and which buckets a run meets depends only on the requests' lengths and
the engine's settings: the scheduler never looks at token values. `step_buckets` replays
the scheduler on the host (microseconds a step, no jax) with every request running to its
max_tokens; `compile_buckets` compiles those programs from abstract arguments, which
`jaxaccel generate` does on the start-up thread while the weights restore. A request that
stops early (EOS, a stop string) only shrinks later steps; a bucket it leads to that the
replay did not meet compiles when first used.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import jax
import numpy as np

from jaxaccel.engine import page_pool
from jaxaccel.engine.page_pool import KVPages, PagePool
from jaxaccel.engine.prefix_cache import PrefixCache
from jaxaccel.engine.requests import Request
from jaxaccel.engine.scheduler import Scheduler
from jaxaccel.engine.step import Bucket, StepInputs, StepPrograms, bucket

def step_buckets(requests: Iterable[Request], *, num_pages: int, page_size: int,
                 max_num_seqs: int, max_num_batched_tokens: int,
                 enable_prefix_caching: bool = True, window: int | None = None
                 ) -> list[Bucket]:
    """The buckets `LLMEngine.step` meets running `requests` to their max_tokens
    with these settings (the engine's own; `window`: its `page_pool.cache_window`), in order
    of first use."""
    pool = PagePool(num_pages)
    scheduler = Scheduler(pool, PrefixCache(pool, page_size, enable_prefix_caching),
                          page_size, max_num_seqs, max_num_batched_tokens, window)
    for request in requests:
        scheduler.add(request)
    seen: dict[Bucket, None] = {}
    while scheduler.has_work:
        rows = scheduler.schedule()
        if not rows:
            break
        seen[bucket([r.count for r in rows], max_num_seqs)] = None
        scheduler.advance(rows)
        for row in rows:
            if row.samples:
                seq = row.seq
                seq.tokens.append(0)  # any id: the schedule depends on lengths only
                if len(seq.generated) >= seq.request.params.max_tokens:
                    scheduler.finish(seq)
    return list(seen)


def compile_buckets(programs: StepPrograms, state, pages_shape: tuple[int, ...],
                    storage_dtype, buckets: Iterable[Bucket], width: int) -> dict:
    """Compile the step program of each bucket, block tables `width` pages wide, for a pool
    of `pages_shape` ([l, p, k, c, h], `storage_dtype`) from abstract arguments (`state` may
    be abstract). Returns {"programs": how many, "seconds": wall time}."""
    clock, count = time.perf_counter(), 0
    sharding = programs.page_sharding(pages_shape)
    page = jax.ShapeDtypeStruct(pages_shape, storage_dtype, sharding=sharding)
    for step in buckets:
        inputs = StepInputs.specs(step, width)
        programs.program(step, width, pages_shape).compile(state, KVPages(page, page), inputs)
        count += 1
    return {"programs": count, "seconds": time.perf_counter() - clock}


def precompile(generator, requests: Iterable[Request], *, page_size: int = 16,
               max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
               kv_cache_bytes: int | float | None = None,
               enable_prefix_caching: bool = True, **_) -> dict:
    """Compile, on `generator`'s runtime (its weights may still be abstract), the step
    programs an `LLMEngine` with these settings (its keyword arguments; others ignored)
    meets running `requests`. Returns {"programs", "seconds"}; nothing is compiled where
    the pool's size is known only once the weights are placed (a fractional
    `kv_cache_bytes`) or for a pipeline (`stage`) layout, which the engine does not run."""
    from jaxaccel.engine.engine import pool_size  # deferred: engine imports this module's peers

    runtime, config = generator.runtime, generator.config
    if runtime.pipeline is not None or isinstance(kv_cache_bytes, float):
        return {"programs": 0, "seconds": 0.0}
    storage = runtime.backend.cache_storage_dtype(generator.dtype)
    num_pages, _ = pool_size(config, np.dtype(storage).itemsize, page_size, max_num_seqs,
                             kv_cache_bytes, max_num_batched_tokens)
    buckets = step_buckets(requests, num_pages=num_pages, page_size=page_size,
                           max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=max_num_batched_tokens,
                           enable_prefix_caching=enable_prefix_caching,
                           window=page_pool.cache_window(config))
    shape = (config.num_layers, num_pages, config.num_kv_heads, page_size, config.head_dim)
    return compile_buckets(StepPrograms(runtime, generator.state_shardings), generator.state,
                           shape, storage, buckets,
                           page_pool.pages_needed(config.max_length, page_size))
