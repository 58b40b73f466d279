"""How a foreign checkpoint's tensors map onto a jaxaccel model's parameters.

A model family lists `WeightRule`s as data; the converter applies them. A source name with
`{i}` is per layer: the converter reads it for i = 0..num_layers-1 and stacks the results on
a leading layers axis, matching the stacked parameters that `layers.scan_layers` iterates.
A rule whose parameter is computed from several tensors (a convolution with its batch norm
folded in) names the others in `extra`; its transform takes them after the main one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


def identity(w: np.ndarray) -> np.ndarray:
    return w


def transpose_to(w: np.ndarray) -> np.ndarray:
    """torch.nn.Linear stores [out, in]; jaxaccel contracts x @ w with w as [in, out]."""
    return w.T


def unstack_heads_out(num_heads: int, head_dim: int) -> Transform:
    """Linear [n*h, d] (torch layout) -> [d, n, h]."""
    return lambda w: w.T.reshape(w.shape[1], num_heads, head_dim)


def unstack_heads_in(num_heads: int, head_dim: int) -> Transform:
    """Linear [d, n*h] (torch layout) -> [n, h, d]."""
    return lambda w: w.T.reshape(num_heads, head_dim, w.shape[0])


@dataclasses.dataclass(frozen=True)
class WeightRule:
    target: str  # dotted parameter path in the model state, e.g. "blocks.wq_dnh"
    source: str  # source tensor name; "{i}" marks a per-layer tensor
    transform: Transform = identity
    extra: tuple[str, ...] = ()  # further source tensors, passed to `transform` after `source`
    # The source layers a per-layer rule stacks, in order (None: all of them): a model whose
    # layers differ in kind (dense and mixture-of-experts MLPs) holds one stack per kind.
    layers: tuple[int, ...] | None = None
    # The same parameter as another layout names it (transformers 5's fused experts), read
    # when the source has all of the fallback's tensors and not all of this rule's.
    fallback: WeightRule | None = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.source

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        """The source layers this per-layer rule reads, in stacking order."""
        return tuple(range(num_layers)) if self.layers is None else self.layers

    def source_names(self, layer: int | None = None) -> tuple[str, ...]:
        """(source, *extra), with `{i}` filled in for a per-layer rule."""
        return tuple(name.format(i=layer) for name in (self.source, *self.extra))


@dataclasses.dataclass(frozen=True)
class SourceLayout:
    """A foreign checkpoint layout a family converts from besides Hugging Face's (e.g.
    torchvision's): a family lists them by name in `FamilySpec.source_layouts`."""

    config_from_shapes: Callable[[dict], dict]  # tensor name -> shape  => HF-style config dict
    weight_rules: Callable[[object], list[WeightRule]]
