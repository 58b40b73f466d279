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


def batch_shape(plan: ModelPlan, rows: int, tokens: int, batch_size: int) -> tuple[int, int]:
    """The (rows, length) bucket that Embedder pads `rows` inputs of `tokens` tokens to."""
    runner = pipeline.for_layout(plan.layout, plan.config.num_layers, None)
    divisor = plan.layout.batch_divisor * (runner.microbatches if runner else 1)
    return (bucket_batch(rows, batch_size, divisor),
            bucket_length(tokens, plan.config.max_length))


def compile_embed(plan: ModelPlan, shape: tuple[int, int], fn=None):
    """AOT-compile the forward for one (rows, length) bucket from abstract, sharded inputs."""
    fn = fn or embed_fn_for(plan)
    sharding = plan.layout.batch_sharding(2)
    ids = jax.ShapeDtypeStruct(shape, np.int32, sharding=sharding)
    return fn.lower(plan.abstract_state, ids, ids).compile()


def start_embedder(path: str | pathlib.Path, layout: Layout | None = None,
                   dtype: str | None = None, *, shape: tuple[int, int] | None = None,
                   rows: int = 8, tokens: int = 128, batch_size: int = 32, overlap: bool = True,
                   host_memory_budget: int = DEFAULT_HOST_MEMORY_BUDGET,
                   quiet: bool = True) -> Started:
    """Restore `path` and compile the embed forward for one bucket, concurrently if `overlap`.

    `shape` is the (rows, length) bucket to precompile (default: the bucket of `rows` inputs
    of `tokens` tokens). Returns an Embedder whose first call of that bucket runs at once.
    """
    timings = {}
    start = time.perf_counter()
    plan = plan_model(path, layout, dtype)
    shape = shape or batch_shape(plan, rows, tokens, batch_size)
    fn = embed_fn_for(plan)
    timings["plan"] = time.perf_counter() - start
    ready = time.perf_counter()
    if overlap:
        with concurrent.futures.ThreadPoolExecutor(1, "jaxaccel-compile") as pool:
            future = pool.submit(_timed, compile_embed, plan, shape, fn)
            loaded, timings["restore"] = _timed(restore_plan, plan, path,
                                                host_memory_budget=host_memory_budget,
                                                quiet=quiet)
            compiled, timings["compile"] = future.result()
    else:
        loaded, timings["restore"] = _timed(restore_plan, plan, path,
                                            host_memory_budget=host_memory_budget, quiet=quiet)
        compiled, timings["compile"] = _timed(compile_embed, plan, shape, fn)
    timings["ready"] = time.perf_counter() - ready
    embedder = Embedder(loaded, batch_size=batch_size)
    embedder.fn = Precompiled(fn, {shape: compiled})
    return Started(loaded, embedder, timings)


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start
