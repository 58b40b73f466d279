"""A model's parameters as a flat {dotted.path: array} mapping, and back.

Checkpoints, converters, the restore engine, the planner and the backends all speak in dotted
paths ("blocks.wq_dnh") and the logical axes each parameter carries (what rule tables shard);
NNX speaks in `State` pytrees. These helpers translate, for any model: they know no family. A
weight-only quantized parameter (a qwix QArray) is two arrays, NAME.values and NAME.scales,
both carrying the parameter's logical axes (plus NAME.zeros with zero points). One held with
its input rows in another order (`Permuted`) adds NAME.perm, split only along a layers axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
import qwix
from flax import nnx, struct


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
PERM = "perm"


@struct.dataclass
class Permuted:
    """A quantized weight held with its contraction rows in another order: `inner` (a qwix
    QArray [*lead, *k, *n], or a backend's packed form of it) holds row `perm[j]` of the
    weight it stands for at row j of its flattened k, and x . weight = x[..., perm] . inner.

    This is how a GPTQ checkpoint quantized with `desc_act` (groups of rows that are not
    consecutive, `g_idx`) is held as stored: its rows sorted by group, so each group is
    consecutive and the values, scales and zero points are the stored ones.
    `perm`: int32 [*lead, K] (lead: the layers axis of a stacked weight, else none), K the
    product of the k dims. `models.layers.matmul` gathers the activations.
    """

    inner: object
    perm: jax.Array

    shape = property(lambda self: self.inner.shape)

    def __getitem__(self, index):  # `variable[...]` in model code: the weight itself
        if index is not Ellipsis:
            raise TypeError("a Permuted weight is read whole (`[...]`)")
        return self


nnx.register_data_type(Permuted)


def perm_axes(axes: tuple[str | None, ...], lead: int) -> tuple[str | None, ...]:
    """The logical axes of NAME.perm of a weight with `axes` and `lead` leading (layers)
    axes: the leading axes kept (a pipeline splits layers), K replicated (every device
    gathers whole activation rows)."""
    return (*axes[:lead], None)


def path_name(path) -> str:
    """The dotted name ("blocks.wq_dnh", "blocks.wq_dnh.values") of a pytree path into an
    NNX State (Variable `value` hops dropped, QArray fields renamed)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey) and key.name in ("value", "raw_value",
                                                                       "inner"):
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
        if isinstance(value, Permuted):
            lead = value.perm.ndim - 1
            specs[f"{name}.{PERM}"] = ParamSpec(tuple(value.perm.shape),
                                                 np.dtype(value.perm.dtype), perm_axes(axes, lead))
            value = value.inner
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
