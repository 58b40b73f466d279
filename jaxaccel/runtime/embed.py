"""Sentence embeddings from an encoder checkpoint: tokenise, bucket, run jitted, un-pad.

A thin user of `jaxaccel.runtime.programs`: the runtime owns the buckets, shardings and the jitted
program (the model state is an argument, not a closure constant, so the same executable
serves new weights and the HLO stays small). An `Embedder` can be built from a `ModelPlan`
before any weight is read (to compile while restoring, or for the planner's memory
analysis) and given its weights later with `attach`.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxaccel import backends, models
from jaxaccel.parallel import distributed
from jaxaccel.errors import InputError
from jaxaccel.runtime.programs import Buckets, Runtime, placed_shardings
from jaxaccel.inputs.tokenizer import TextTokenizer


class Embedder:
    def __init__(self, model, batch_size: int = 32, max_length: int | None = None,
                 microbatches: int | None = None, compiler_options: dict | None = None,
                 platform: str | None = None):
        """`model` is a `LoadedModel` (weights restored) or a `ModelPlan` (none yet: `attach`
        them before embedding). Batches hold `batch_size` texts of at most `max_length`
        tokens (default: the model's own default, e.g. sentence-transformers' limit).
        `platform` ("cuda", "tpu", ...) builds the program for another platform's backend,
        to export it (`jax.export`); default: the platform of the layout's devices."""
        if models.task(model.manifest.family) != "embed":
            raise InputError(f"embed needs an encoder checkpoint; {model.path} "
                             f"is {model.manifest.family}")
        self.loaded = model
        self.config = model.config
        self.batch_size = batch_size
        self.max_length = min(max_length or self.config.default_length, self.config.max_length)
        self.state = getattr(model, "state", None)  # a plan has only abstract_state
        self.runtime = Runtime(model.graphdef, self.config, model.layout, model.dtype,
                               microbatches=microbatches, compiler_options=compiler_options,
                               backend=backends.for_platform(platform) if platform else None)
        self.buckets = Buckets(min_batch=1)
        state = self.state if self.state is not None else model.abstract_state
        batch = self.runtime.batch_sharding()
        self.forward = self.runtime.program(
            ("embed",), self._forward, in_shardings=(placed_shardings(state), batch, batch),
            out_shardings=batch)
        self.tokenizer = TextTokenizer(model.tokenizer_path) if model.tokenizer_path else None
        self.pad_id = self.config.pad_token_id

    def _forward(self, state, ids_bt, mask_bt):
        """Float32 embeddings [b, d]."""
        return self.runtime.model(state).embed(ids_bt, mask_bt)

    def attach(self, loaded) -> "Embedder":
        """Give a plan-built Embedder the restored weights (same layout and dtype)."""
        self.loaded, self.state = loaded, loaded.state
        if self.tokenizer is None and loaded.tokenizer_path:
            self.tokenizer = TextTokenizer(loaded.tokenizer_path)
        return self

    # Buckets --------------------------------------------------------------------------------

    def batches(self, token_counts: list[int]) -> list[tuple[list[int], tuple[int, int]]]:
        """(input indices, padded (rows, length)) of each call: inputs sorted by length, so
        each batch pads to a tight bucket, `batch_size` per call."""
        order = sorted(range(len(token_counts)), key=lambda i: token_counts[i])
        out = []
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            out.append((rows, self.bucket(len(rows), token_counts[rows[-1]])))
        return out

    def bucket(self, rows: int, longest: int) -> tuple[int, int]:
        """The padded (rows, length) of one call of `rows` inputs, the longest `longest`."""
        return (self.buckets.batch(rows, self.runtime.batch_divisor, self.batch_size),
                self.buckets.length(longest, self.max_length))

    def shapes(self, token_counts: list[int]) -> list[tuple[int, int]]:
        """The distinct padded (rows, length) shapes inputs of these token counts run in."""
        return list(dict.fromkeys(shape for _, shape in self.batches(token_counts)))

    def batch_arrays(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Pad to (batch bucket, length bucket): ids and attention mask, int32."""
        rows, length = self.bucket(len(ids), max(map(len, ids)))
        ids_bt = np.full((rows, length), self.pad_id, np.int32)
        mask_bt = np.zeros((rows, length), np.int32)
        for r, row in enumerate(ids):
            ids_bt[r, :len(row)] = row
            mask_bt[r, :len(row)] = 1
        return ids_bt, mask_bt

    # Compiling ------------------------------------------------------------------------------

    def abstract_args(self, shape: tuple[int, int]):
        ids = jax.ShapeDtypeStruct(shape, np.int32, sharding=self.runtime.batch_sharding())
        state = self.state if self.state is not None else self.loaded.abstract_state
        return state, ids, ids

    def compile(self, shapes: list[tuple[int, int]]) -> None:
        """Compile the forward for these (rows, length) shapes ahead of time."""
        for shape in shapes:
            self.forward.compile(*self.abstract_args(shape))

    def memory_analysis(self, rows: int, length: int):
        """XLA's memory analysis of the forward at the bucket of `rows` x `length` tokens."""
        return self.forward.memory_analysis(*self.abstract_args(self.bucket(rows, length)))

    # Embedding ------------------------------------------------------------------------------

    def embed_texts(self, texts: list[str], truncate: bool = True) -> tuple[np.ndarray, list[int]]:
        """Embeddings [n, d] float32 in input order, and the indices of truncated inputs."""
        if self.tokenizer is None:
            raise InputError(f"{self.loaded.path}: checkpoint has no tokenizer.json")
        encoded = self.tokenizer.encode(texts, self.max_length, truncate=truncate)
        return self.embed_ids(encoded.ids), encoded.truncated

    def embed_ids(self, ids: list[list[int]]) -> np.ndarray:
        """Embeddings [n, d] float32 of token-id rows, in input order."""
        if self.state is None:
            raise RuntimeError("this Embedder was built from a plan: attach() the weights first")
        out = np.zeros((len(ids), self.config.embedding_dim), np.float32)
        for rows, _ in self.batches([len(row) for row in ids]):
            out[rows] = self._run_batch([ids[i] for i in rows])
        return out

    def _run_batch(self, ids: list[list[int]]) -> np.ndarray:
        ids_bt, mask_bt = self.batch_arrays(ids)
        out = self.forward(self.state, ids_bt, mask_bt)
        return distributed.host_array(out)[:len(ids)]
