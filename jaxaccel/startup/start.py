"""The one start path: from a checkpoint path to restored weights and a compiled runner.

`jaxaccel.load` and every command (`embed`, `generate`, `classify`, the cold-start
benchmark) call `start`, which

1. plans once (`loader.plan_model`: the abstract, already-sharded model, from the manifest);
2. refuses, from that same plan, a checkpoint of another task or a run that would overflow a
   device (`planner.refuse_if_too_big`; skipped where no device memory is known);
3. builds the runner from the plan (`prepare`: what the caller will run, e.g. the buckets of
   its inputs) and compiles its programs on a second thread while the weights stream in.

Everything the compiler needs (the graph, every parameter's shape, dtype and sharding, the
input bucket's shape) is known from the manifest before a byte is read, so start-up
approaches max(restore, compile) instead of their sum. With the persistent compile cache
(`jaxaccel.runtime.compile_cache`) a second start loads the executables instead.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import time
from collections.abc import Callable

from jaxaccel import models
from jaxaccel.checkpoint.restore import DEFAULT_HOST_MEMORY_BUDGET
from jaxaccel.engine import warmup
from jaxaccel.engine.requests import Request, SamplingParams
from jaxaccel.errors import UsageError
from jaxaccel.parallel.sharding import Layout
from jaxaccel.runtime import requests
from jaxaccel.runtime.classify import Classifier
from jaxaccel.runtime.embed import Embedder
from jaxaccel.runtime.generate import Generator
from jaxaccel.runtime.loaded import LoadedModel
from jaxaccel.startup.loader import ModelPlan, plan_model, restore_plan
from jaxaccel.startup.planner import refuse_if_too_big

Runner = Embedder | Generator | Classifier
# From the plan: the runner (no weights yet) and the function that compiles its programs.
Prepare = Callable[[ModelPlan], tuple[Runner, Callable[[], object]]]

# What `jaxaccel.load` compiles while restoring, knowing no input yet: the programs of a
# first small call (one short text or image; a short prompt and this many new tokens,
# through the generation engine with its default settings).
DEFAULT_NEW_TOKENS = 32
DEFAULT_PROMPT_TOKENS = 8


@dataclasses.dataclass
class Started:
    loaded: LoadedModel
    runner: Runner  # compiled for the requested buckets, weights attached
    timings: dict  # seconds: plan, restore, compile, ready (plan end -> restored + compiled)

    @property
    def embedder(self) -> Embedder:
        return self.runner

    @property
    def generator(self) -> Generator:
        return self.runner

    @property
    def classifier(self) -> Classifier:
        return self.runner


def start(path: str | pathlib.Path, layout: Layout | None = None, dtype: str | None = None, *,
          task: str | None = None, quantize=None, device_memory: int | None = None,
          batch: int = 1, seq: int | None = None, max_new_tokens: int = 0,
          prepare: Prepare | None = None, microbatches: int | None = None,
          overlap: bool = True, host_memory_budget: int = DEFAULT_HOST_MEMORY_BUDGET,
          verify_checksums: bool = True, quiet: bool = True,
          restore_mode: str | None = None) -> Started:
    """Plan `path` once on `layout` in `dtype` (`quantize`: a quantize-on-load
    `quantization.Scheme` or None), refuse a checkpoint whose family does not do `task`
    (None: any) and a run of `batch` rows x `seq` tokens (+ `max_new_tokens`) that overflows
    `device_memory` (default: what the backend reports), then restore while compiling what
    `prepare` builds (default: the first small call's programs, see `default_prepare`).
    Raises UsageError, PlanError, CheckpointError before reading a byte of weights."""
    clock = time.perf_counter()
    plan = plan_model(path, layout, dtype, quantize)
    check_task(plan, task)
    refuse_if_too_big(plan, batch=batch, seq=seq, max_new_tokens=max_new_tokens,
                      device_memory=device_memory)
    runner, compile_all = (prepare or default_prepare(microbatches))(plan)
    plan_seconds = time.perf_counter() - clock
    loaded, timings = restore_while_compiling(
        plan, path, compile_all, overlap=overlap, host_memory_budget=host_memory_budget,
        verify_checksums=verify_checksums, quiet=quiet, restore_mode=restore_mode)
    return Started(loaded, runner.attach(loaded), {"plan": plan_seconds, **timings})


def check_task(plan: ModelPlan, task: str | None) -> None:
    """UsageError unless the checkpoint's family does `task` (None: any task)."""
    family = plan.manifest.family
    if task is not None and models.task(family) != task:
        raise UsageError(f"{plan.path} holds a {family!r} model; {task} needs one of "
                         f"{', '.join(models.families_for(task))}")


def default_prepare(microbatches: int | None = None) -> Prepare:
    """The runner `Model` uses first, compiled for a first small call: embed one short text
    (batches of 32), classify one image (batches of 32), or generate from one short prompt
    (the engine's step programs; a pipeline layout's static programs with the checkpoint's
    default sampling)."""
    def prepare(plan: ModelPlan):
        task = models.task(plan.manifest.family)
        if task == "embed":
            embedder = Embedder(plan, batch_size=32, microbatches=microbatches)
            return embedder, lambda: embedder.compile(embedder.shapes([1]))
        if task == "classify":
            classifier = Classifier(plan, batch_size=32)
            return classifier, lambda: classifier.compile(1)
        generator = Generator.from_plan(plan, microbatches=microbatches)
        if generator.runtime.pipeline is not None:  # static decode: the engine runs no stages
            sampling = requests.sampling(defaults=plan.manifest.generation)
            return generator, lambda: generator.compile([1], DEFAULT_NEW_TOKENS, sampling)
        first = Request(0, [0] * DEFAULT_PROMPT_TOKENS,
                        SamplingParams(max_tokens=DEFAULT_NEW_TOKENS))
        return generator, lambda: warmup.precompile(generator, [first])
    return prepare


def restore_while_compiling(plan: ModelPlan, path, compile_all: Callable[[], object], *,
                            overlap: bool = True,
                            host_memory_budget: int = DEFAULT_HOST_MEMORY_BUDGET,
                            verify_checksums: bool = True, quiet: bool = True,
                            restore_mode: str | None = None) -> tuple[LoadedModel, dict]:
    """Restore `path` (as `plan` says) and run `compile_all`, concurrently if `overlap`.
    Returns the loaded model and timings (seconds) of restore, compile and both (`ready`)."""
    timings = {}

    def restore(threads=None):
        return restore_plan(plan, path, host_memory_budget=host_memory_budget, quiet=quiet,
                            verify_checksums=verify_checksums, threads=threads,
                            restore_mode=restore_mode)

    ready = time.perf_counter()
    if overlap:
        with concurrent.futures.ThreadPoolExecutor(1, "jaxaccel-compile") as pool:
            future = pool.submit(_timed, compile_all)
            # Leave the compiler a core: on 2 cores, restoring with 2 threads beside it
            # slowed both (ready 1.6x max(restore, compile) instead of ~1.0x).
            loaded, timings["restore"] = _timed(restore, restore_threads())
            _, timings["compile"] = future.result()
    else:
        loaded, timings["restore"] = _timed(restore)
        _, timings["compile"] = _timed(compile_all)
    timings["ready"] = time.perf_counter() - ready
    return loaded, timings


def restore_threads() -> int:
    """Restore threads while the compiler runs beside them: all cores but one."""
    return max(1, (os.cpu_count() or 2) - 1)


def _timed(function, *args, **kwargs):
    start_ = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start_
