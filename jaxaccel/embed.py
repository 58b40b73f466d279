"""Sentence embeddings from an encoder checkpoint: tokenise, bucket, run jitted, un-pad.

The jitted forward takes the model state as an argument (not a closure constant), so the
same executable serves new weights and the HLO stays small; in/out shardings are explicit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxaccel import distributed, pipeline
from jaxaccel.loader import LoadedModel
from jaxaccel.models import layers
from jaxaccel.tokenizer import InputError, TextTokenizer, bucket_batch, bucket_length


def state_shardings(state):
    return jax.tree.map(lambda leaf: leaf.sharding, state)


def make_embed_fn(graphdef, state_sharding, batch_sharding: NamedSharding, runner=None):
    """jit(state, ids, mask) -> float32 [b, d] embeddings, with explicit shardings.

    `runner` replaces the plain layer scan, e.g. a `pipeline.Pipeline` for `stage` meshes.
    """

    def forward(state, ids_bt, mask_bt):
        with layers.use_layer_runner(runner):
            return nnx.merge(graphdef, state).embed(ids_bt, mask_bt)

    return jax.jit(forward, in_shardings=(state_sharding, batch_sharding, batch_sharding),
                   out_shardings=batch_sharding)


class Embedder:
    def __init__(self, loaded: LoadedModel, batch_size: int = 32, max_length: int | None = None,
                 microbatches: int | None = None):
        if loaded.family != "bert":
            raise InputError(f"embed needs an encoder checkpoint; {loaded.path} is {loaded.family}")
        self.loaded = loaded
        self.batch_size = batch_size
        self.max_length = min(max_length or loaded.config.default_length, loaded.config.max_length)
        self.layout = loaded.layout
        # On a `stage` mesh the layers run as a pipeline of `microbatches` (default: stages).
        self.pipeline = pipeline.for_layout(self.layout, loaded.config.num_layers, microbatches)
        self.batch_divisor = self.layout.batch_divisor * (
            self.pipeline.microbatches if self.pipeline else 1)
        self.fn = make_embed_fn(loaded.graphdef, state_shardings(loaded.state),
                                self.layout.batch_sharding(2), self.pipeline)
        self.tokenizer = TextTokenizer(loaded.tokenizer_path) if loaded.tokenizer_path else None
        self.pad_id = loaded.config.pad_token_id

    def embed_texts(self, texts: list[str], truncate: bool = True) -> tuple[np.ndarray, list[int]]:
        """Embeddings [n, d] float32 in input order, and the indices of truncated inputs."""
        if self.tokenizer is None:
            raise InputError(f"{self.loaded.path}: checkpoint has no tokenizer.json")
        encoded = self.tokenizer.encode(texts, self.max_length, truncate=truncate)
        return self.embed_ids(encoded.ids), encoded.truncated

    def embed_ids(self, ids: list[list[int]]) -> np.ndarray:
        # Sort by length so each batch pads to a tight bucket; restore order at the end.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.zeros((len(ids), self.loaded.config.hidden_size), np.float32)
        for start in range(0, len(ids), self.batch_size):
            rows = order[start:start + self.batch_size]
            out[rows] = self._run_batch([ids[i] for i in rows])
        return out

    def batch_arrays(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Pad to (batch bucket, length bucket): ids and attention mask, int32."""
        rows = bucket_batch(len(ids), self.batch_size, self.batch_divisor)
        length = bucket_length(max(map(len, ids)), self.max_length)
        ids_bt = np.full((rows, length), self.pad_id, np.int32)
        mask_bt = np.zeros((rows, length), np.int32)
        for r, row in enumerate(ids):
            ids_bt[r, :len(row)] = row
            mask_bt[r, :len(row)] = 1
        return ids_bt, mask_bt

    def _run_batch(self, ids: list[list[int]]) -> np.ndarray:
        ids_bt, mask_bt = self.batch_arrays(ids)
        out = self.fn(self.loaded.state, ids_bt, mask_bt)
        return distributed.host_array(out)[:len(ids)]
