"""What each command compiles while its weights stream in: the buckets of its inputs.

Each function here is `start.start` with a `prepare` that builds the command's runner from
the plan and names the programs to compile; the planning, the refusals and the restore are
`start`'s, the same for every command and for `jaxaccel.load`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from jaxaccel.errors import InputError
from jaxaccel.inputs import prompts
from jaxaccel.inputs.tokenizer import Encoded, TextTokenizer
from jaxaccel.parallel.sharding import Layout
from jaxaccel.runtime.classify import Classifier
from jaxaccel.runtime.embed import Embedder
from jaxaccel.runtime.generate import Generator
from jaxaccel.runtime.sampling import GREEDY, Sampling
from jaxaccel.startup.loader import ModelPlan
from jaxaccel.startup.start import Started, start


def start_embedder(path: str | pathlib.Path, layout: Layout | None = None,
                   dtype: str | None = None, *, shapes: list[tuple[int, int]] | None = None,
                   rows: int = 8, tokens: int = 128, batch_size: int = 32,
                   max_length: int | None = None, microbatches: int | None = None,
                   **start_args) -> Started:
    """Restore `path` and compile the embed forward for its buckets (concurrently unless
    `overlap=False`; other `start_args` as `start` takes them).

    `shapes` are the (rows, length) buckets to precompile (see `Embedder.shapes`; default:
    the bucket of `rows` inputs of `tokens` tokens). Returns an Embedder whose calls of those
    buckets run at once.
    """
    def prepare(plan: ModelPlan):
        embedder = Embedder(plan, batch_size=batch_size, max_length=max_length,
                            microbatches=microbatches)
        buckets = list(shapes or embedder.shapes([tokens] * rows))
        return embedder, lambda: embedder.compile(buckets)

    return start(path, layout, dtype, task="embed", prepare=prepare, **start_args)


def start_generator(path: str | pathlib.Path, layout: Layout | None = None,
                    dtype: str | None = None, *, prompt_lengths: Sequence[int],
                    max_new_tokens: int, sampling: Sampling = GREEDY,
                    microbatches: int | None = None, packed_weights: bool | None = None,
                    loop: str = "device", **start_args) -> Started:
    """Restore a decoder and compile prefill + decode (`loop` "device", or "host" for
    streaming) for the bucket of these prompts; returns a Generator ready for them."""
    def prepare(plan: ModelPlan):
        generator = Generator.from_plan(plan, microbatches=microbatches,
                                        packed_weights=packed_weights)
        return generator, lambda: generator.compile(prompt_lengths, max_new_tokens, sampling,
                                                    loop)

    return start(path, layout, dtype, task="generate", prepare=prepare,
                 max_new_tokens=max_new_tokens, batch=max(1, len(prompt_lengths)),
                 **start_args)


def start_classifier(path: str | pathlib.Path, layout: Layout | None = None,
                     dtype: str | None = None, *, images: int, batch_size: int = 32,
                     verify_checksums: bool = False, **start_args) -> Started:
    """Restore an image classifier and compile its forward for the batches that classify
    `images` images (`batch_size` per call: a full batch and the remainder); returns a
    Classifier whose calls of those batches run at once."""
    def prepare(plan: ModelPlan):
        classifier = Classifier(plan, batch_size=batch_size)

        def compile_all():  # one executable per distinct padded batch
            by_bucket = {classifier.bucket(rows): rows for rows in classifier.call_rows(images)}
            for rows in by_bucket.values():
                classifier.compile(rows)
        return classifier, compile_all

    return start(path, layout, dtype, task="classify", prepare=prepare,
                 batch=min(batch_size, max(1, images)), verify_checksums=verify_checksums,
                 **start_args)


def tokenizer_for(plan: ModelPlan) -> TextTokenizer | None:
    """The checkpoint's tokenizer.json, read before its weights (None if it ships none)."""
    return TextTokenizer(plan.tokenizer_path) if plan.tokenizer_path else None


def start_for_texts(path, texts: list[str], layout: Layout | None, dtype: str | None, *,
                    batch_size: int = 32, max_length: int | None = None, truncate: bool = True,
                    microbatches: int | None = None, prompt_name: str | None = None,
                    **start_args) -> tuple[Started, Encoded]:
    """Tokenise first (bad input fails before a byte is read), then restore the weights while
    XLA compiles the forward for exactly the buckets these texts need. Each text gets the
    model's sentence-transformers prompt (`prompt_name`, else its default)."""
    encoded: list[Encoded] = []

    def prepare(plan: ModelPlan):
        tokenizer = tokenizer_for(plan)
        if tokenizer is None:
            raise InputError(f"{path}: embed needs a checkpoint with a tokenizer.json")
        embedder = Embedder(plan, batch_size=batch_size, max_length=max_length,
                            microbatches=microbatches)
        prompted = prompts.apply(prompts.settings_of(plan.manifest), texts, prompt_name)
        encoded.append(tokenizer.encode(prompted, embedder.max_length, truncate=truncate))
        shapes = embedder.shapes([len(ids) for ids in encoded[0].ids])
        return embedder, lambda: embedder.compile(shapes)

    started = start(path, layout, dtype, task="embed", prepare=prepare,
                    batch=min(batch_size, len(texts)), seq=max_length, **start_args)
    return started, encoded[0]
