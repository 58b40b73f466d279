"""Image classification from a classifier checkpoint: pad to a batch bucket, run jitted, un-pad.

A thin user of `jaxaccel.runtime`, like `Embedder`: the runtime owns the buckets, shardings
and the jitted program (the model state is an argument). Inputs here are already
preprocessed pixels, float32 [n, s, s, channels] (`jaxaccel.images` makes them).
"""

from __future__ import annotations

import jax
import numpy as np

from jaxaccel import distributed, models
from jaxaccel.errors import InputError
from jaxaccel.runtime import Buckets, Runtime, placed_shardings


class Classifier:
    def __init__(self, model, batch_size: int = 32, compiler_options: dict | None = None):
        """`model` is a `LoadedModel` of a family whose task is "classify"."""
        if models.task(model.manifest.family) != "classify":
            raise InputError(f"classify needs an image classifier checkpoint; {model.path} "
                             f"is {model.manifest.family}")
        self.loaded, self.config, self.state = model, model.config, model.state
        self.batch_size = batch_size
        self.runtime = Runtime(model.graphdef, self.config, model.layout, model.dtype,
                               compiler_options=compiler_options)
        self.buckets = Buckets(min_batch=1)
        batch = self.runtime.batch_sharding()
        self.forward = self.runtime.program(
            ("classify",), self._forward, in_shardings=(placed_shardings(self.state), batch),
            out_shardings=batch)

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
        out = np.zeros((rows, *self.input_shape), np.float32)
        out[:len(pixels_bhwc)] = pixels_bhwc
        return out

    def put(self, pixels_bhwc: np.ndarray) -> jax.Array:
        """A padded host batch onto the devices, split along the batch as the program wants."""
        return jax.device_put(self.pad(pixels_bhwc), self.runtime.batch_sharding())

    def run(self, placed_bhwc) -> jax.Array:
        """Logits of a placed batch (asynchronous: the devices compute while the host works)."""
        return self.forward(self.state, placed_bhwc)

    def compile(self, rows: int) -> None:
        shape = (self.bucket(rows), *self.input_shape)
        self.forward.compile(self.state, jax.ShapeDtypeStruct(
            shape, np.float32, sharding=self.runtime.batch_sharding()))

    def logits(self, pixels_bhwc: np.ndarray) -> np.ndarray:
        """Float32 logits [n, labels] of preprocessed pixels [n, s, s, c], in input order."""
        out = np.zeros((len(pixels_bhwc), self.config.num_labels), np.float32)
        for start in range(0, len(pixels_bhwc), self.batch_size):
            chunk = pixels_bhwc[start:start + self.batch_size]
            out[start:start + len(chunk)] = distributed.host_array(self.run(self.put(chunk)))[
                :len(chunk)]
        return out
