"""GPipe-style pipeline parallelism over the `stage` mesh axis.

A model's transformer blocks are stacked (leading `layers` axis, see `layers.make_param`) and,
under the `pp` / `dp_tp_pp` rule tables, that axis is sharded over `stage`: stage s holds
layers [s·L/S, (s+1)·L/S). `Pipeline` is a drop-in *layer runner* for `layers.scan_layers`:

    with layers.use_layer_runner(Pipeline(mesh, num_layers=6, microbatches=4)):
        out = model(ids_bt, mask_bt)          # the model still calls scan_layers

The batch is split into M microbatches and pushed through the stages in M + S − 1 steps of one
`shard_map` over `stage` (inside one jitted program); after each step every stage hands its
activations to the next with `jax.lax.ppermute`. Only `stage` is manual inside the shard_map:
`data` and `model` stay automatic, so batch and tensor sharding keep working within a stage.

Contract with the model (what makes a scan body pipelinable):
  * every leaf of `carry` has the batch on axis 0 ([b, ...]);
  * every leaf of `xs` and of the body's per-layer outputs `ys` is [l, b, ...] (layer, then
    batch), e.g. a KV cache: each stage owns the cache of its own layers;
  * the body may close over batch-independent values only (weights, a decode position).

Uneven stages: when S does not divide the stacked layer count, the stack is padded to a
multiple of S (the loader pads at restore time, see `padded_layers`; otherwise it is padded
here) and layers with index >= `num_layers` are identities: their output is discarded.

Shape legend: m microbatches, c rows per microbatch (b = c·m), l layers (local to a stage).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxaccel.parallel import sharding as ax
from jaxaccel.errors import PipelineError  # noqa: F401  (re-exported)

STAGE = "stage"


def stage_count(layout) -> int:
    """Pipeline stages of a Layout: the mesh size of the axis that LAYERS maps to (else 1)."""
    axis = layout.rules.get(ax.LAYERS)
    return layout.mesh.shape[axis] if axis == STAGE else 1


def padded_layers(num_layers: int, stages: int) -> int:
    """The stacked layer count stored for `stages` stages: the next multiple of `stages`."""
    return math.ceil(num_layers / stages) * stages




@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A `scan_layers` replacement that runs the stacked layers as an S-stage pipeline."""

    mesh: Mesh
    num_layers: int  # real layers; a longer stack is padded with identities
    microbatches: int = 1
    axis: str = STAGE

    @property
    def stages(self) -> int:
        return self.mesh.shape[self.axis]

    @property
    def steps(self) -> int:
        return self.microbatches + self.stages - 1

    def bubble_fraction(self) -> float:
        """Idle share of the schedule: (S − 1) / (M + S − 1)."""
        return (self.stages - 1) / self.steps

    def __call__(self, blocks: nnx.Module, carry, body, xs=None):
        graphdef, params = nnx.split(blocks)
        stacked = _leading_dim(params)
        batch = _leading_dim(carry)
        m = self.microbatches
        if batch % m:
            raise PipelineError(f"batch of {batch} rows does not split into {m} microbatches")
        padded = padded_layers(stacked, self.stages)
        params = _pad_layers(params, padded)
        xs_cm = None if xs is None else jax.tree.map(
            lambda a: _split_batch(a, m, axis=1), _pad_layers(xs, padded))
        carry_cm = jax.tree.map(lambda a: _split_batch(a, m, axis=0), carry)
        run = self._schedule(graphdef, body)
        out_cm, ys_cm = run(params, carry_cm, xs_cm)
        carry = jax.tree.map(lambda a: _merge_batch(a[-1], axis=0), out_cm)
        # Per-layer outputs keep the caller's layer count (that of xs, else of the stack).
        out_layers = stacked if xs is None else _leading_dim(xs)
        ys = jax.tree.map(lambda a: _merge_batch(a, axis=1)[:out_layers], ys_cm)
        return carry, ys

    def _schedule(self, graphdef, body):
        stages, steps, num_layers = self.stages, self.steps, self.num_layers
        shift = [(s, s + 1) for s in range(stages - 1)]  # stage 0 reads fresh input instead

        def run_stage(params_l, carry_c, xs_lc, stage):
            """This stage's layers on one microbatch; padded layers pass the carry through."""
            local = _leading_dim(params_l)
            first = stage * local

            def step(carry, inputs):
                layer_params, x, index = inputs
                new, y = body(nnx.merge(graphdef, layer_params), carry, x)
                keep = first + index < num_layers
                new = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, carry)
                return new, y

            return jax.lax.scan(step, carry_c, (params_l, xs_lc, jnp.arange(local)))

        def per_stage(params_l, carry_cm, xs_lcm):
            """One stage's view: carry leaves [c, m, ...], xs leaves [l, c, m, ...]."""
            stage = jax.lax.axis_index(self.axis)
            m = jax.tree.leaves(carry_cm)[0].shape[1]
            take = lambda tree, i, axis: jax.tree.map(  # noqa: E731
                lambda a: jax.lax.dynamic_index_in_dim(a, i, axis, keepdims=False), tree)
            first_in = take(carry_cm, 0, 1)
            _, ys_shape = jax.eval_shape(
                run_stage, params_l, first_in,
                None if xs_lcm is None else take(xs_lcm, 0, 2), stage)
            ys_lcm = jax.tree.map(
                lambda s: jnp.zeros((*s.shape[:2], m, *s.shape[2:]), s.dtype), ys_shape)

            def tick(t, state):
                received, outputs, ys = state
                mb = t - stage  # the microbatch this stage works on at step t
                valid = (mb >= 0) & (mb < m)
                mb = jnp.clip(mb, 0, m - 1)
                fresh = take(carry_cm, jnp.minimum(t, m - 1), 1)
                x_in = jax.tree.map(lambda a, b: jnp.where(stage == 0, a, b), fresh, received)
                xs_l = None if xs_lcm is None else take(xs_lcm, mb, 2)
                x_out, y_l = run_stage(params_l, x_in, xs_l, stage)
                # Only the last stage's outputs are read, and its writes are all valid but the
                # warm-up ones, which the valid write of microbatch 0 later replaces.
                outputs = jax.tree.map(
                    lambda buf, v: jax.lax.dynamic_update_index_in_dim(buf, v, mb, 1),
                    outputs, x_out)
                ys = jax.tree.map(lambda buf, v: _masked_update(buf, v, mb, valid), ys, y_l)
                received = jax.tree.map(lambda a: jax.lax.ppermute(a, self.axis, shift), x_out)
                return received, outputs, ys

            state = (jax.tree.map(jnp.zeros_like, first_in), jax.tree.map(jnp.zeros_like, carry_cm),
                     ys_lcm)
            _, outputs, ys = jax.lax.fori_loop(0, steps, tick, state)
            return jax.tree.map(lambda a: a[None], outputs), ys

        stage_spec = P(self.axis)
        mapped = jax.shard_map(
            per_stage, mesh=self.mesh, axis_names=frozenset({self.axis}),
            in_specs=(stage_spec, P(), stage_spec), out_specs=(stage_spec, stage_spec),
            check_vma=False)
        return jax.jit(mapped)  # also when called eagerly: partial-manual needs a jit


def _leading_dim(tree) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise PipelineError("nothing to pipeline: an empty pytree")
    return leaves[0].shape[0]


def _pad_layers(tree, size: int):
    """Zero-pad the leading (layers) axis of every leaf to `size`."""
    def pad(a):
        extra = size - a.shape[0]
        return a if extra == 0 else jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1))

    return jax.tree.map(pad, tree)


def _split_batch(a, m: int, axis: int):
    """[.., b, ...] -> [.., c, m, ...] with c = b/m: row r goes to microbatch r % m.

    A reshape, so free (no copy of e.g. a KV cache per decode step); and strided rather than
    contiguous microbatches, so a batch sharded over `data` stays sharded (on c) within each.
    """
    return a.reshape(*a.shape[:axis], a.shape[axis] // m, m, *a.shape[axis + 1:])


def _merge_batch(a, axis: int):
    return a.reshape(*a.shape[:axis], a.shape[axis] * a.shape[axis + 1], *a.shape[axis + 2:])


def _masked_update(buf_lcm, value_lc, mb, valid):
    """buf[:, :, mb] = value where `valid`, else unchanged."""
    old = jax.lax.dynamic_index_in_dim(buf_lcm, mb, 2, keepdims=False)
    new = jnp.where(valid, value_lc, old)
    return jax.lax.dynamic_update_index_in_dim(buf_lcm, new, mb, 2)


def for_layout(layout, num_layers: int, microbatches: int | None = None) -> Pipeline | None:
    """The runner a Layout implies: a Pipeline when layers are sharded over >1 stage, else None."""
    stages = stage_count(layout)
    if stages == 1:
        return None
    return Pipeline(layout.mesh, num_layers, microbatches or stages)


def pad_stacked(state, stages: int):
    """Zero-pad every stacked parameter (leading `layers` axis) of an nnx State to a multiple
    of `stages`, as the loader does at restore; the pipeline skips the padded layers."""
    def pad(variable):
        axes = variable.get_metadata().get("axes", ())
        value = variable.get_value()
        if axes[:1] != (ax.LAYERS,) or value.shape[0] % stages == 0:
            return variable
        layers = padded_layers(value.shape[0], stages)  # a quantized QArray: values and scales
        return variable.replace(jax.tree.map(lambda x: _pad_layers(x, layers), value))

    return jax.tree.map(pad, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
