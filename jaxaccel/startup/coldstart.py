"""Cold start: compile a model's programs while its weights stream in.

Everything the compiler needs (the graph, every parameter's shape, dtype and sharding, the
input bucket's shape) is known from the manifest before a byte is read, so the programs
compile ahead of time (`runtime.Program.compile`) on a second thread during the restore, and
start-up approaches max(restore, compile) instead of their sum. With the persistent compile
cache (`jaxaccel.runtime.compile_cache`) a second start loads the executables instead of compiling.
`embed`, `generate` and `classify` all start this way.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import time
from collections.abc import Callable, Sequence

from jaxaccel import models
from jaxaccel.checkpoint.restore import DEFAULT_HOST_MEMORY_BUDGET
from jaxaccel.runtime.classify import Classifier
from jaxaccel.runtime.embed import Embedder
from jaxaccel.errors import InputError, UsageError
from jaxaccel.runtime.generate import Generator
from jaxaccel.startup.loader import LoadedModel, ModelPlan, plan_model, restore_plan
from jaxaccel.startup.planner import refuse_if_too_big
from jaxaccel.runtime.sampling import GREEDY, Sampling
from jaxaccel.parallel.sharding import Layout
from jaxaccel.inputs import prompts
from jaxaccel.inputs.tokenizer import Encoded, TextTokenizer


@dataclasses.dataclass
class Started:
    loaded: LoadedModel
    runner: Embedder | Generator | Classifier  # compiled for the requested buckets, weights attached
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


def restore_while_compiling(plan: ModelPlan, path, compile_all: Callable[[], object], *,
                            overlap: bool = True,
                            host_memory_budget: int = DEFAULT_HOST_MEMORY_BUDGET,
                            verify_checksums: bool = True, quiet: bool = True
                            ) -> tuple[LoadedModel, dict]:
    """Restore `path` (as `plan` says) and run `compile_all`, concurrently if `overlap`.
    Returns the loaded model and timings (seconds) of restore, compile and both (`ready`)."""
    timings = {}

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
            _, timings["compile"] = future.result()
    else:
        loaded, timings["restore"] = _timed(restore)
        _, timings["compile"] = _timed(compile_all)
    timings["ready"] = time.perf_counter() - ready
    return loaded, timings


def start_embedder(path: str | pathlib.Path, layout: Layout | None = None,
                   dtype: str | None = None, *, shapes: list[tuple[int, int]] | None = None,
                   rows: int = 8, tokens: int = 128, batch_size: int = 32,
                   max_length: int | None = None, microbatches: int | None = None,
                   overlap: bool = True, host_memory_budget: int = DEFAULT_HOST_MEMORY_BUDGET,
                   verify_checksums: bool = True, quiet: bool = True,
                   plan: ModelPlan | None = None, embedder: Embedder | None = None) -> Started:
    """Restore `path` and compile the embed forward for its buckets, concurrently if `overlap`.

    `shapes` are the (rows, length) buckets to precompile (see `Embedder.shapes`; default:
    the bucket of `rows` inputs of `tokens` tokens). Returns an Embedder whose calls of those
    buckets run at once. Callers that planned already pass `plan` (and `embedder`).
    """
    start = time.perf_counter()
    plan = plan or plan_model(path, layout, dtype)
    embedder = embedder or Embedder(plan, batch_size=batch_size, max_length=max_length,
                                    microbatches=microbatches)
    shapes = list(shapes or embedder.shapes([tokens] * rows))
    plan_seconds = time.perf_counter() - start
    loaded, timings = restore_while_compiling(
        plan, path, lambda: embedder.compile(shapes), overlap=overlap,
        host_memory_budget=host_memory_budget, verify_checksums=verify_checksums, quiet=quiet)
    return Started(loaded, embedder.attach(loaded), {"plan": plan_seconds, **timings})


def start_generator(path: str | pathlib.Path, layout: Layout | None = None,
                    dtype: str | None = None, *, prompt_lengths: Sequence[int],
                    max_new_tokens: int, sampling: Sampling = GREEDY,
                    microbatches: int | None = None, packed_weights: bool | None = None,
                    loop: str = "device", overlap: bool = True,
                    host_memory_budget: int = DEFAULT_HOST_MEMORY_BUDGET,
                    verify_checksums: bool = True, quiet: bool = True,
                    plan: ModelPlan | None = None) -> Started:
    """Restore a decoder and compile prefill + decode (`loop` "device", or "host" for
    streaming) for the bucket of these prompts, concurrently if `overlap`; returns a
    Generator ready for them."""
    start = time.perf_counter()
    plan = plan or plan_model(path, layout, dtype)
    generator = Generator.from_plan(plan, microbatches=microbatches, packed_weights=packed_weights)
    plan_seconds = time.perf_counter() - start
    loaded, timings = restore_while_compiling(
        plan, path, lambda: generator.compile(prompt_lengths, max_new_tokens, sampling, loop),
        overlap=overlap, host_memory_budget=host_memory_budget,
        verify_checksums=verify_checksums, quiet=quiet)
    return Started(loaded, generator.attach(loaded), {"plan": plan_seconds, **timings})


def start_classifier(path: str | pathlib.Path, layout: Layout | None = None,
                     dtype: str | None = None, *, images: int, batch_size: int = 32,
                     overlap: bool = True,
                     host_memory_budget: int = DEFAULT_HOST_MEMORY_BUDGET,
                     verify_checksums: bool = False, quiet: bool = True,
                     plan: ModelPlan | None = None) -> Started:
    """Restore an image classifier and compile its forward for the batches that classify
    `images` images (`batch_size` per call: a full batch and the remainder), concurrently
    if `overlap`; returns a Classifier whose calls of those batches run at once."""
    start = time.perf_counter()
    plan = plan or plan_model(path, layout, dtype)
    classifier = Classifier(plan, batch_size=batch_size)
    plan_seconds = time.perf_counter() - start

    def compile_all():  # one executable per distinct padded batch
        by_bucket = {classifier.bucket(rows): rows for rows in classifier.call_rows(images)}
        for rows in by_bucket.values():
            classifier.compile(rows)

    loaded, timings = restore_while_compiling(
        plan, path, compile_all, overlap=overlap, host_memory_budget=host_memory_budget,
        verify_checksums=verify_checksums, quiet=quiet)
    return Started(loaded, classifier.attach(loaded), {"plan": plan_seconds, **timings})


def plan_for(task: str, path, layout: Layout | None, dtype: str | None, *,
             device_memory: int | None = None, batch: int = 1, seq: int | None = None,
             max_new_tokens: int = 0, quantize=None) -> ModelPlan:
    """The plan of a run of `task` ("embed", "generate" or "classify"), checked before
    reading a byte: the checkpoint's family does that task, and (where device memory is
    known) it fits. `quantize`: a quantize-on-load scheme (`quantization.Scheme`) or None."""
    plan = plan_model(path, layout, dtype, quantize)
    family = plan.manifest.family
    if models.task(family) != task:
        raise UsageError(f"{path} holds a {family!r} model; {task} needs one of "
                         f"{', '.join(models.families_for(task))}")
    refuse_if_too_big(path, plan.layout, dtype, batch=batch, seq=seq,
                      max_new_tokens=max_new_tokens, device_memory=device_memory,
                      quantize=quantize)
    return plan


def tokenizer_for(plan: ModelPlan) -> TextTokenizer | None:
    """The checkpoint's tokenizer.json, read before its weights (None if it ships none)."""
    return TextTokenizer(plan.tokenizer_path) if plan.tokenizer_path else None


def start_for_texts(path, texts: list[str], layout: Layout | None, dtype: str | None, *,
                    batch_size: int = 32, max_length: int | None = None, truncate: bool = True,
                    microbatches: int | None = None, device_memory: int | None = None,
                    quantize=None, prompt_name: str | None = None,
                    **restore) -> tuple[Started, Encoded]:
    """Tokenise first (bad input fails before a byte is read), then restore the weights while
    XLA compiles the forward for exactly the buckets these texts need. Each text gets the
    model's sentence-transformers prompt (`prompt_name`, else its default)."""
    plan = plan_for("embed", path, layout, dtype, device_memory=device_memory,
                    batch=min(batch_size, len(texts)), seq=max_length, quantize=quantize)
    texts = prompts.apply(prompts.settings_of(plan.manifest), texts, prompt_name)
    tokenizer = tokenizer_for(plan)
    if tokenizer is None:
        raise InputError(f"{path}: embed needs a checkpoint with a tokenizer.json")
    embedder = Embedder(plan, batch_size=batch_size, max_length=max_length,
                        microbatches=microbatches)
    encoded = tokenizer.encode(texts, embedder.max_length, truncate=truncate)
    shapes = embedder.shapes([len(ids) for ids in encoded.ids])
    started = start_embedder(path, shapes=shapes, plan=plan, embedder=embedder, **restore)
    return started, encoded


def restore_threads() -> int:
    """Restore threads while the compiler runs beside them: all cores but one."""
    return max(1, (os.cpu_count() or 2) - 1)


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start
