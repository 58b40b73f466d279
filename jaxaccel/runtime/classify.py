"""Image classification from a classifier checkpoint: pad to a batch bucket, run jitted, un-pad.

A thin user of `jaxaccel.runtime.programs`, like `Embedder`: the runtime owns the buckets, shardings
and the jitted program (the model state is an argument). `logits` takes preprocessed pixels,
float32 [n, s, s, channels]; `classify` takes image files, PIL images or uint8 arrays and
runs them through `jaxaccel.inputs.batches` (decode on host threads, transfer one step
ahead of the compute) with the checkpoint's preprocessing (`jaxaccel.inputs.images`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from jaxaccel import backends, models
from jaxaccel.parallel import distributed
from jaxaccel.errors import InputError
from jaxaccel.inputs.images import Preprocessor, check_inputs, describe
from jaxaccel.inputs.batches import HostBatches, device_steps
from jaxaccel.runtime.loaded import LoadedModel
from jaxaccel.runtime.programs import Buckets, Runtime, placed_shardings


@dataclasses.dataclass
class Classification:
    """Logits of every input, in input order; a skipped input's row is NaN."""

    names: list[str]  # each input's path, or `<image N>`
    logits: np.ndarray  # float32 [n, labels]
    labels: tuple[str, ...]
    skipped: list[tuple[str, str]]  # (name, one-line reason) of inputs that failed to decode

    def top_k(self, k: int = 5) -> list[dict]:
        """Per classified input: {"image", "top_k": [{"id", "label", "score"}]}, where score
        is the softmax probability."""
        shifted = self.logits - self.logits.max(-1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
        out = []
        for name, row in zip(self.names, probs):
            if np.isnan(row).any():
                continue
            best = np.argsort(-row, kind="stable")[:k]
            out.append({"image": name, "top_k": [
                {"id": int(i), "label": self.labels[i], "score": float(row[i])} for i in best]})
        return out


class Classifier:
    def __init__(self, model, batch_size: int = 32, compiler_options: dict | None = None,
                 platform: str | None = None):
        """`model` is a `LoadedModel` of a family whose task is "classify", or its
        `ModelPlan` (no weights: to lower or export the program, e.g. for `platform`
        "cuda" or "tpu"; default: the platform of the layout's devices)."""
        if models.task(model.manifest.family) != "classify":
            raise InputError(f"classify needs an image classifier checkpoint; {model.path} "
                             f"is {model.manifest.family}")
        self.loaded, self.config = model, model.config
        self.state = getattr(model, "state", None)  # a plan has only abstract_state
        self.batch_size = batch_size
        self.runtime = Runtime(model.graphdef, self.config, model.layout, model.dtype,
                               compiler_options=compiler_options,
                               backend=backends.for_platform(platform) if platform else None)
        self.buckets = Buckets(min_batch=1)
        batch = self.runtime.batch_sharding()
        state = self.state if self.state is not None else model.abstract_state
        self.forward = self.runtime.program(
            ("classify",), self._forward, in_shardings=(placed_shardings(state), batch),
            out_shardings=batch)
        self.preprocess = Preprocessor.from_config(self.config)

    def _forward(self, state, pixels_bhwc):
        """Float32 logits [b, labels]."""
        return self.runtime.model(state).classify(pixels_bhwc)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        side = self.config.image_size
        return side, side, self.config.num_channels

    def bucket(self, rows: int) -> int:
        """The padded batch of one call of `rows` images."""
        return self.buckets.batch(rows, self.runtime.batch_divisor, self.batch_size)

    def pad(self, pixels_bhwc: np.ndarray) -> np.ndarray:
        """Zero rows appended up to the batch bucket."""
        rows = self.bucket(len(pixels_bhwc))
        out = np.zeros((rows, *pixels_bhwc.shape[1:]), np.float32)
        out[:len(pixels_bhwc)] = pixels_bhwc
        return out

    def put(self, pixels_bhwc: np.ndarray) -> jax.Array:
        """A padded host batch onto the devices, split along the batch as the program wants."""
        return jax.device_put(self.pad(pixels_bhwc), self.runtime.batch_sharding())

    def run(self, placed_bhwc) -> jax.Array:
        """Logits of a placed batch (asynchronous: the devices compute while the host works)."""
        return self.forward(self.state, placed_bhwc)

    def abstract_args(self, rows: int):
        """(state, pixels) as the program takes them, for `rows` images of the model's size."""
        state = self.state if self.state is not None else self.loaded.abstract_state
        pixels = jax.ShapeDtypeStruct((self.bucket(rows), *self.input_shape), np.float32,
                                      sharding=self.runtime.batch_sharding())
        return state, pixels

    def compile(self, rows: int) -> None:
        """Compile the forward for the bucket of `rows` images ahead of time."""
        self.forward.compile(*self.abstract_args(rows))

    def call_rows(self, count: int) -> list[int]:
        """The distinct row counts of the calls that classify `count` images."""
        full, rest = divmod(count, self.batch_size)
        return ([self.batch_size] if full else []) + ([rest] if rest else [])

    def memory_analysis(self, rows: int):
        """XLA's memory analysis of the forward at the bucket of `rows` images."""
        return self.forward.memory_analysis(*self.abstract_args(rows))

    def attach(self, loaded: LoadedModel) -> Classifier:
        """Give a plan-built Classifier the restored weights (same layout and dtype)."""
        self.loaded, self.state = loaded, loaded.state
        return self

    def logits(self, pixels_bhwc: np.ndarray) -> np.ndarray:
        """Float32 logits [n, labels] of preprocessed pixels [n, h, w, c], in input order
        (any h, w: the network is convolutional up to its global mean pool)."""
        out = np.zeros((len(pixels_bhwc), self.config.num_labels), np.float32)
        for start in range(0, len(pixels_bhwc), self.batch_size):
            chunk = pixels_bhwc[start:start + self.batch_size]
            out[start:start + len(chunk)] = distributed.host_array(self.run(self.put(chunk)))[
                :len(chunk)]
        return out

    def fetch(self, logits) -> np.ndarray:
        return distributed.host_array(logits)

    def classify(self, items: Sequence, *, skip_bad: bool = False, prefetch: bool = True,
                 workers: int | None = None) -> Classification:
        """Classify image files, PIL images or uint8 [h, w, 3] arrays, in input order.

        A file that does not decode is an `InputError` naming it, or with `skip_bad` is
        reported in `skipped` (its logits row NaN). `prefetch=False` runs decode, transfer
        and compute one after another (see `jaxaccel.inputs.batches`)."""
        check_inputs(items)
        out = np.full((len(items), self.config.num_labels), np.nan, np.float32)
        skipped = []
        batches = HostBatches(items, self.preprocess, self.batch_size, skip_bad=skip_bad,
                              workers=workers if prefetch else 0)
        try:
            for batch, logits in device_steps(batches, self.put, self.run, self.fetch,
                                              prefetch=prefetch):
                if batch.indices:
                    out[batch.indices] = logits[:len(batch.indices)]
                skipped += [(describe(items[i], i), reason) for i, reason in batch.failed]
        finally:  # an error or Ctrl-C here: stop the decode threads now, not at collection
            batches.close()
        return Classification([describe(x, i) for i, x in enumerate(items)], out,
                              self.config.labels, skipped)
