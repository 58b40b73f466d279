"""The runtime under every front end (`Embedder`, `Generator`, the planner, benchmarks).

It owns, once for all of them:
  * `Buckets`: the padded batch and sequence shapes (fewer shapes, fewer compilations);
  * `place_param` / `state_shardings`: where each parameter lives on a layout (layer stacks
    padded to the pipeline's stages, then the rule table);
  * `Runtime`: one model's jitted programs on one layout: the backend for the mesh's platform
    and the pipeline runner installed while tracing, explicit in/out shardings, donation,
    a per-program jit cache with ahead-of-time executables (`Program`) for compiling while
    the weights restore, trace counts, and XLA's memory analysis for the planner.

Model code never sees any of this: it is traced inside `Runtime.jit`'s wrapper.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxaccel import backends
from jaxaccel.parallel import pipeline
from jaxaccel.parallel import sharding as ax
from jaxaccel.parallel.params import Permuted, perm_axes
from jaxaccel.models import layers
from jaxaccel.utils.units import round_up


def next_power_of_two(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Padded shapes, the one bucketing rule of every program: powers of two.

    batch: rows -> a power of two >= `min_batch` (capped at `max_rows` when given, never
    below the rows themselves), then a multiple of the layout's batch divisor.
    length: tokens -> a power of two >= `min_length`, capped at the model's limit if given.
    slots: KV cache slots (prompt bucket + new tokens) -> a multiple of `slot_multiple`.
    """

    min_length: int = 16
    slot_multiple: int = 64
    min_batch: int = 1

    def batch(self, rows: int, divisor: int = 1, max_rows: int | None = None) -> int:
        size = max(next_power_of_two(rows), self.min_batch)
        if max_rows is not None:
            size = min(size, max(max_rows, rows))
        return round_up(size, divisor)

    def length(self, tokens: int, max_length: int | None = None) -> int:
        size = next_power_of_two(tokens, self.min_length)
        return size if max_length is None else min(size, max_length)

    def slots(self, length_bucket: int, max_new_tokens: int) -> int:
        return round_up(length_bucket + max_new_tokens, self.slot_multiple)


def param_spec(axes: Sequence[str | None], shape: Sequence[int],
               layout) -> tuple[tuple[int, ...], PartitionSpec]:
    """(shape as held, PartitionSpec) of a parameter with logical `axes` on `layout`: the one
    rule for where parameters live (the planner calls it with mesh sizes alone).

    A layer stack that the pipeline's stages do not divide is held padded (with zero layers
    the pipeline skips) to a multiple of them, so each stage holds and reads only its own.
    """
    shape = tuple(shape)
    stages = pipeline.stage_count(layout)
    if tuple(axes[:1]) == (ax.LAYERS,) and shape[0] % stages:
        shape = (pipeline.padded_layers(shape[0], stages), *shape[1:])
    return shape, ax.logical_to_spec(axes, shape, layout.mesh, layout.rules)


def place_param(axes: Sequence[str | None], shape: Sequence[int],
                layout: ax.Layout) -> tuple[tuple[int, ...], NamedSharding]:
    """(shape as held, NamedSharding) of a parameter on a real layout (see `param_spec`)."""
    shape, spec = param_spec(axes, shape, layout)
    return shape, NamedSharding(layout.mesh, spec)


def quantized_param_spec(axes: Sequence[str | None], shape: Sequence[int], tiles: Sequence[int],
                         layout) -> tuple[tuple[int, ...], PartitionSpec, PartitionSpec]:
    """(held shape, values spec, scales spec) of a weight-only quantized parameter whose scales
    cover `tiles` (`quantization.QuantSpec`): scales shard with their values. A dim split into
    groups (1 < tile < dim) stays split only where each device holds whole groups (else both
    replicate it, like a dim the mesh does not divide); a dim one scale spans (tile = dim, the
    contraction axes of per-channel scales) may split the values while its scale dim, 1, does
    not."""
    held, spec = param_spec(axes, shape, layout)
    entries = list(spec) + [None] * (len(held) - len(spec))
    scale_entries = []
    for i, (dim, tile) in enumerate(zip(held, tiles)):
        entry = entries[i]
        if entry is not None and 1 < tile < dim and (dim // layout.mesh.shape[entry]) % tile:
            entries[i] = entry = None
        scale_entries.append(None if tile == dim and dim > 1 else entry)
    return held, PartitionSpec(*entries), PartitionSpec(*scale_entries)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, layout: ax.Layout):
    """A NamedSharding per parameter of an (abstract or concrete) state, from its axes."""
    def held(value, axes):
        if isinstance(value, Permuted):
            lead = value.perm.ndim - 1
            perm = place_param(perm_axes(axes, lead), value.perm.shape, layout)[1]
            return Permuted(held(value.inner, axes), perm)
        if isinstance(value, qwix.QArray):
            _, values, scales = quantized_param_spec(axes, value.shape, value.scale_tile_shape,
                                                     layout)
            zeros = None if value.zero_point is None else NamedSharding(layout.mesh, scales)
            return dataclasses.replace(
                value, qvalue=NamedSharding(layout.mesh, values),
                scale=NamedSharding(layout.mesh, scales), zero_point=zeros)
        return place_param(axes, value.shape, layout)[1]

    def sharding(variable):
        value = held(variable.get_value(), variable.get_metadata()["axes"])
        return value if isinstance(value, NamedSharding) else variable.replace(value=value)

    return jax.tree.map(sharding, state, is_leaf=_is_variable)


def placed_shardings(state):
    """The shardings a placed state's arrays already have (for states a backend rewrote)."""
    return jax.tree.map(lambda leaf: leaf.sharding, state)


def param_dtype(state) -> jnp.dtype:
    """The compute dtype of a state: its first floating parameter that is not quantized."""
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, qwix.QArray))
    return next(x.dtype for x in leaves
                if not isinstance(x, qwix.QArray) and jnp.issubdtype(x.dtype, jnp.floating))


def cast_state(state, dtype):
    """Floating parameters in `dtype`; others (and quantized values, even float8) unchanged."""
    def cast(x):
        if isinstance(x, qwix.QArray):
            return x
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x

    return jax.tree.map(cast, state, is_leaf=lambda x: isinstance(x, qwix.QArray))


def global_inputs(args, in_shardings) -> tuple:
    """Multi-host: host (numpy) arguments become global jax.Arrays on their shardings.

    Every process runs the same command on the same inputs, so each holds the whole host
    array and gives each of its devices its slice; jit refuses numpy inputs whose sharding
    spans processes (e.g. a batch split over a `data` axis across hosts)."""
    out = list(args)
    for i, (arg, sharding) in enumerate(zip(args, in_shardings)):
        if (isinstance(arg, np.ndarray) and isinstance(sharding, jax.sharding.Sharding)
                and not sharding.is_fully_addressable):
            out[i] = jax.make_array_from_callback(arg.shape, sharding, arg.__getitem__)
    return tuple(out)


def _shape_key(args) -> tuple:
    return tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(args)
                 if hasattr(x, "shape"))


# jax < 0.12 on CPU: arrays of int4 (quantized weights) are held one value per byte while an
# ahead-of-time executable expects them packed and refuses them; such calls go through
# `jax.jit`, which compiles for the arrays' own layout (jax 0.12 packs both).
_INT4_UNPACKED_ARRAYS = tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 12)


def _has_int4(args) -> bool:
    return any(getattr(x, "dtype", None) == jnp.int4 for x in jax.tree.leaves(args))


class Program:
    """One jitted function plus the executables compiled ahead of time for it.

    A call whose argument shapes were compiled ahead of time (`compile`) runs that
    executable; any other call goes through `jax.jit` (which traces and compiles once per
    shape). `lower` and `memory_analysis` take abstract arguments (ShapeDtypeStructs).
    """

    def __init__(self, jitted, in_shardings=None):
        self.jitted = jitted
        self.in_shardings = in_shardings
        self._executables: dict[tuple, object] = {}

    def __call__(self, *args):
        if self.in_shardings is not None and jax.process_count() > 1:
            args = global_inputs(args, self.in_shardings)
        executable = self._executables.get(_shape_key(args))
        return (executable or self.jitted)(*args)

    def lower(self, *abstract_args):
        return self.jitted.lower(*abstract_args)

    def compile(self, *abstract_args):
        """Compile for these argument shapes now, so a later call of them runs at once."""
        executable = self.lower(*abstract_args).compile()
        if not (_INT4_UNPACKED_ARRAYS and _has_int4(abstract_args)):
            self._executables[_shape_key(abstract_args)] = executable
        return executable

    def memory_analysis(self, *abstract_args):
        """XLA's compiled memory analysis (bytes of arguments, outputs, temporaries)."""
        return self.lower(*abstract_args).compile().memory_analysis()


class Runtime:
    """One model's programs on one layout; `Embedder` and `Generator` are thin users."""

    def __init__(self, graphdef, config, layout: ax.Layout | None = None, dtype=jnp.float32,
                 *, microbatches: int | None = None, compiler_options: dict | None = None,
                 backend: backends.Backend | None = None):
        """`compiler_options` go to every `jax.jit` (tests lower XLA's optimisation level,
        which compiles ~2x faster on CPU). `backend` defaults to the mesh's platform's."""
        self.graphdef, self.config = graphdef, config
        self.layout = layout or ax.Layout.create("data=1,model=1", "replicated")
        self.dtype = jnp.dtype(dtype)
        # On a `stage` mesh the layers run as a GPipe pipeline of `microbatches` (default: the
        # stage count); the batch must then split into them.
        self.pipeline = pipeline.for_layout(self.layout, config.num_layers, microbatches)
        self.backend = (backend or backends.for_mesh(self.layout.mesh)).for_layout(
            self.single_device)
        self.stages = pipeline.stage_count(self.layout)
        self.batch_divisor = self.layout.batch_divisor * (
            self.pipeline.microbatches if self.pipeline else 1)
        self.traces: collections.Counter = collections.Counter()  # per program, while tracing
        self.programs: dict[tuple, Program] = {}  # by (name, bucket...): read-only for callers
        # The backend's per-CPU choices first, the caller's options over them.
        self._compiler_options = {**self.backend.compiler_options(), **(compiler_options or {})}

    @property
    def single_device(self) -> bool:
        return self.layout.mesh.size == 1 and self.pipeline is None

    def sharding(self, axes, shape) -> NamedSharding:
        return self.layout.sharding(axes, shape)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.layout.mesh, PartitionSpec())

    def batch_sharding(self) -> NamedSharding:
        return self.layout.batch_sharding(2)

    def model(self, state) -> nnx.Module:
        return nnx.merge(self.graphdef, state)

    def program(self, key: tuple, fn: Callable, *, in_shardings, out_shardings,
                donate_argnums: tuple[int, ...] = ()) -> Program:
        """The Program for `key`, jitted on first request: `fn` traced with this runtime's
        backend and pipeline installed, counted in `traces[key[0]]`."""
        if key not in self.programs:
            def traced(*args):
                self.traces[key[0]] += 1
                with (backends.use(self.backend), layers.use_layer_runner(self.pipeline),
                      ax.use_layout(self.layout)):
                    return fn(*args)

            jitted = jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings,
                             donate_argnums=donate_argnums,
                             compiler_options=self._compiler_options or None)
            self.programs[key] = Program(jitted, in_shardings)
        return self.programs[key]
