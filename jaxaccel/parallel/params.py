"""A model's parameters as a flat {dotted.path: array} mapping, and back.

Checkpoints, converters, the restore engine, the planner and the backends all speak in dotted
paths ("blocks.wq_dnh") and the logical axes each parameter carries (what rule tables shard);
NNX speaks in `State` pytrees. These helpers translate, for any model: they know no family. A
weight-only quantized parameter (a qwix QArray) is two arrays, NAME.values and NAME.scales,
both carrying the parameter's logical axes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
import qwix
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype: np.dtype
    axes: tuple[str | None, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


# QArray fields -> jaxaccel's own names for them (qwix's pytree layout is not ours to store).
_QARRAY_FIELDS = {"qvalue": "values", "scale": "scales", "zero_point": "zeros"}


def path_name(path) -> str:
    """The dotted name ("blocks.wq_dnh", "blocks.wq_dnh.values") of a pytree path into an
    NNX State (Variable `value` hops dropped, QArray fields renamed)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey) and key.name in ("value", "raw_value"):
            continue
        if isinstance(key, jax.tree_util.GetAttrKey) and key.name in _QARRAY_FIELDS:
            parts.append(_QARRAY_FIELDS[key.name])
            continue
        parts.append(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))))
    return ".".join(parts)


def param_specs(state: nnx.State) -> dict[str, ParamSpec]:
    """Dotted path -> shape, dtype and logical axes of every parameter in `state`."""
    specs = {}
    for path, variable in nnx.to_flat_state(state):
        value = variable.get_value() if hasattr(variable, "get_value") else variable.value
        axes = tuple(variable.get_metadata().get("axes", (None,) * len(value.shape)))
        name = ".".join(map(str, path))
        if isinstance(value, qwix.QArray):
            for field, part in (("values", value.qvalue), ("scales", value.scale),
                                ("zeros", value.zero_point)):
                if part is None:  # symmetric: no zero points
                    continue
                specs[f"{name}.{field}"] = ParamSpec(tuple(part.shape), np.dtype(part.dtype), axes)
            continue
        specs[name] = ParamSpec(tuple(value.shape), np.dtype(value.dtype), axes)
    return specs


def fill_state(state: nnx.State, arrays: Mapping[str, jax.Array]) -> nnx.State:
    """A copy of `state` whose leaves are taken from `arrays` by dotted path."""
    def pick(path, leaf):
        return arrays[path_name(path)]

    return jax.tree_util.tree_map_with_path(pick, state)


def flat_arrays(state: nnx.State) -> dict[str, jax.Array]:
    """Dotted path -> leaf of every array in `state` (QArrays as NAME.values/NAME.scales)."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {path_name(path): leaf for path, leaf in leaves}
