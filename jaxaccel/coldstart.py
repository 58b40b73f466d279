"""Cold start: compile the jitted forward while the weights stream in.

Everything the compiler needs (the graph, every parameter's shape, dtype and sharding, the
input bucket's shape) is known from the manifest before a byte is read, so `jit(...).lower(
abstract).compile()` runs on a second thread during the restore, and start-up approaches
max(restore, compile) instead of their sum. With the persistent compile cache
(jaxaccel.compile_cache) a second start loads the executable instead of compiling it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import time

import jax
import numpy as np

from jaxaccel import pipeline
from jaxaccel.checkpoint.restore import DEFAULT_HOST_MEMORY_BUDGET
from jaxaccel.embed import Embedder, make_embed_fn, state_shardings
from jaxaccel.loader import LoadedModel, ModelPlan, plan_model, restore_plan
from jaxaccel.sharding import Layout
from jaxaccel.tokenizer import bucket_batch, bucket_length


@dataclasses.dataclass
class Started:
    loaded: LoadedModel
    embedder: Embedder
    timings: dict  # seconds: plan, restore, compile, ready (plan end -> restored + compiled)


class Precompiled:
    """Calls like the jitted forward; uses an ahead-of-time executable for the shapes it was
    compiled for and falls back to the jitted function (which traces) for any other."""

    def __init__(self, jitted, compiled: dict):
        self.jitted, self.compiled = jitted, compiled

    def __call__(self, state, ids_bt, mask_bt):
        executable = self.compiled.get(tuple(ids_bt.shape))
        return (executable or self.jitted)(state, ids_bt, mask_bt)


def embed_fn_for(plan: ModelPlan, microbatches: int | None = None):
    """The Embedder's jitted forward, built from the plan alone (no weights needed)."""
    runner = pipeline.for_layout(plan.layout, plan.config.num_layers, microbatches)
    return make_embed_fn(plan.graphdef, state_shardings(plan.abstract_state),
                         plan.layout.batch_sharding(2), runner)


def batch_shapes(plan: ModelPlan, token_counts: list[int], batch_size: int,
                 max_length: int | None = None, microbatches: int | None = None
                 ) -> list[tuple[int, int]]:
    """The distinct (rows, length) buckets Embedder.embed_ids pads inputs of these token
    counts to: sorted by length, `batch_size` per call."""
    runner = pipeline.for_layout(plan.layout, plan.config.num_layers, microbatches)
    divisor = plan.layout.batch_divisor * (runner.microbatches if runner else 1)
    limit = min(max_length or plan.config.default_length, plan.config.max_length)
    ordered = sorted(token_counts)
    shapes = []
    for begin in range(0, len(ordered), batch_size):
        part = ordered[begin:begin + batch_size]
        shape = (bucket_batch(len(part), batch_size, divisor), bucket_length(part[-1], limit))
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def compile_embed(plan: ModelPlan, shape: tuple[int, int], fn=None):
    """AOT-compile the forward for one (rows, length) bucket from abstract, sharded inputs."""
    fn = fn or embed_fn_for(plan)
    sharding = plan.layout.batch_sharding(2)
    ids = jax.ShapeDtypeStruct(shape, np.int32, sharding=sharding)
    return fn.lower(plan.abstract_state, ids, ids).compile()


def start_embedder(path: str | pathlib.Path, layout: Layout | None = None,
                   dtype: str | None = None, *, shapes: list[tuple[int, int]] | None = None,
                   rows: int = 8, tokens: int = 128, batch_size: int = 32,
                   max_length: int | None = None, microbatches: int | None = None,
                   overlap: bool = True, host_memory_budget: int = DEFAULT_HOST_MEMORY_BUDGET,
                   verify_checksums: bool = False, quiet: bool = True,
                   plan: ModelPlan | None = None) -> Started:
    """Restore `path` and compile the embed forward for its buckets, concurrently if `overlap`.

    `shapes` are the (rows, length) buckets to precompile (see `batch_shapes`; default: the
    bucket of `rows` inputs of `tokens` tokens). Returns an Embedder whose calls of those
    buckets run at once.
    """
    timings = {}
    start = time.perf_counter()
    plan = plan or plan_model(path, layout, dtype)  # callers that planned already pass it
    shapes = list(shapes or batch_shapes(plan, [tokens] * rows, batch_size, max_length,
                                         microbatches))
    fn = embed_fn_for(plan, microbatches)
    timings["plan"] = time.perf_counter() - start

    def compile_all():
        return {shape: compile_embed(plan, shape, fn) for shape in shapes}

    def restore(threads=None):
        return restore_plan(plan, path, host_memory_budget=host_memory_budget, quiet=quiet,
                            verify_checksums=verify_checksums, threads=threads)

    ready = time.perf_counter()
    if overlap:
        with concurrent.futures.ThreadPoolExecutor(1, "jaxaccel-compile") as pool:
            future = pool.submit(_timed, compile_all)
            # Leave the compiler a core: on 2 cores, restoring with 2 threads beside it
            # slowed both (ready 1.6x max(restore, compile) instead of ~1.0x).
            loaded, timings["restore"] = _timed(restore, restore_threads())
            compiled, timings["compile"] = future.result()
    else:
        loaded, timings["restore"] = _timed(restore)
        compiled, timings["compile"] = _timed(compile_all)
    timings["ready"] = time.perf_counter() - ready
    embedder = Embedder(loaded, batch_size=batch_size, max_length=max_length,
                        microbatches=microbatches)
    embedder.fn = Precompiled(fn, compiled)
    return Started(loaded, embedder, timings)


def restore_threads() -> int:
    """Restore threads while the compiler runs beside them: all cores but one."""
    return max(1, (os.cpu_count() or 2) - 1)


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start
