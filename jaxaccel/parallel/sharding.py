"""Meshes, logical-axis rule tables, and the shardings they produce.

Models name their array axes with *logical* names (below). A rule table maps each logical
name to a *mesh* axis (`data`, `model`, `stage`) or to None (replicated). Models never name
mesh axes, so the same model runs data-, tensor- or pipeline-parallel by swapping the table.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxaccel.errors import MeshSpecError  # noqa: F401  (re-exported)

# Logical axis names: each is stated once here and used by every model.
BATCH = "batch"
SEQUENCE = "sequence"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
VOCAB = "vocab"
LAYERS = "layers"
CHANNELS_IN = "channels_in"
CHANNELS = "channels"
EXPERTS = "experts"  # a mixture-of-experts layer's experts (`jaxaccel.models.moe`)
LOGICAL_AXES = (BATCH, SEQUENCE, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, LAYERS,
                CHANNELS_IN, CHANNELS, EXPERTS)

MESH_AXES = ("data", "model", "stage", "expert")
# Axes a mesh description leaves out at size 1 (`format_mesh`): only MoE runs name them.
_QUIET_AXES = ("expert",)

Rules = Mapping[str, str | None]

_TENSOR_PARALLEL = {HEADS: "model", KV_HEADS: "model", MLP: "model", VOCAB: "model",
                    CHANNELS: "model"}
# Every table shards the batch over `data` (a size-1 axis costs nothing), so tensor
# parallelism on a `data=2,model=4` mesh still splits the batch: `tp` and `dp_tp` are one table.
_DATA_TENSOR_PARALLEL = {BATCH: "data", **_TENSOR_PARALLEL}

# Built-in rule tables, by the names users pass (`--rules`); `tp` is an alias of `dp_tp`.
RULE_TABLES: dict[str, dict[str, str | None]] = {
    "replicated": {},
    "dp": {BATCH: "data"},
    "tp": _DATA_TENSOR_PARALLEL,
    "dp_tp": _DATA_TENSOR_PARALLEL,
    "pp": {BATCH: "data", LAYERS: "stage"},
    "dp_tp_pp": {BATCH: "data", LAYERS: "stage", **_TENSOR_PARALLEL},
    # Expert parallelism: each device of `expert` holds a share of every MoE layer's experts
    # (a model without experts runs as under `dp` / `dp_tp`); `ep` is an alias of `dp_ep`.
    "ep": {BATCH: "data", EXPERTS: "expert"},
    "dp_ep": {BATCH: "data", EXPERTS: "expert"},
    "tp_ep": {**_DATA_TENSOR_PARALLEL, EXPERTS: "expert"},
}


def axes_sharded_over(mesh_axis: str) -> frozenset[str]:
    """The logical axes some built-in rule table maps to `mesh_axis` (e.g. "model": heads,
    kv_heads, mlp, vocab, channels): where a checkpoint's chunks are cut, so that a device
    reads only the chunks it holds under any table."""
    return frozenset(logical for table in RULE_TABLES.values()
                     for logical, axis in table.items() if axis == mesh_axis)


def parse_mesh(text: str | None) -> dict[str, int]:
    """Parse `data=2,model=4` into {'data': 2, 'model': 4, 'stage': 1}; -1 means 'the rest'."""
    sizes = {axis: 1 for axis in MESH_AXES}
    if not text:
        return sizes
    seen = set()
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise MeshSpecError(
                f"--mesh: expected comma-separated AXIS=SIZE with AXIS in {MESH_AXES}, got {item!r}")
        if name in seen:
            raise MeshSpecError(f"--mesh: axis {name!r} given twice")
        seen.add(name)
        try:
            size = int(value)
        except ValueError:
            raise MeshSpecError(f"--mesh: size of {name!r} must be an integer, got {value!r}") from None
        if size == 0 or size < -1:
            raise MeshSpecError(f"--mesh: size of {name!r} must be >= 1 or -1 (the rest), got {size}")
        sizes[name] = size
    if list(sizes.values()).count(-1) > 1:
        raise MeshSpecError("--mesh: at most one axis may be -1")
    return sizes


def resolve_mesh_sizes(sizes: Mapping[str, int], device_count: int) -> dict[str, int]:
    """Replace -1 by the remaining device count and check the product divides the devices."""
    known = math.prod(s for s in sizes.values() if s != -1)
    resolved = dict(sizes)
    for name, size in sizes.items():
        if size == -1:
            if device_count % known:
                raise MeshSpecError(
                    f"--mesh: {device_count} devices are not divisible by {known} for {name}=-1")
            resolved[name] = device_count // known
    total = math.prod(resolved.values())
    if total > device_count or device_count % total:
        hint = (f"; on the CPU, simulate them with `jaxaccel --host-devices {total} ...` (or "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={total})"
                if jax.default_backend() == "cpu" else "")
        raise MeshSpecError(
            f"--mesh {format_mesh(resolved)} needs {total} devices; {device_count} are available "
            f"(the product must divide the device count){hint}")
    return resolved


def format_mesh(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{axis}={sizes.get(axis, 1)}" for axis in MESH_AXES
                    if axis not in _QUIET_AXES or sizes.get(axis, 1) != 1)


def make_mesh(text_or_sizes: str | Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a (data, model, stage, expert) mesh over the first prod(sizes) devices."""
    sizes = parse_mesh(text_or_sizes) if not isinstance(text_or_sizes, Mapping) else {
        **{axis: 1 for axis in MESH_AXES}, **text_or_sizes}
    everything = devices is None
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_sizes(sizes, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    grid = np.array(devices[: math.prod(shape)], dtype=object).reshape(shape)
    if everything:
        _check_spans_processes(sizes, grid, devices)
    return Mesh(grid, MESH_AXES)


def _check_spans_processes(sizes: Mapping[str, int], grid: np.ndarray, devices: list) -> None:
    """Refuse a mesh that leaves processes of a multi-host run out: they would hold nothing,
    and the run would silently be the size of the processes it does span."""
    processes = {d.process_index for d in devices}
    used = {d.process_index for d in grid.flat}
    if len(used) == len(processes):
        return
    per_process = len(devices) // len(processes)
    raise MeshSpecError(
        f"--mesh {format_mesh(sizes)} uses {grid.size} devices on {len(used)} of the cluster's "
        f"{len(processes)} processes ({per_process} devices each); a multi-host mesh must use "
        f"all {len(devices)} devices: make the axes multiply to {len(devices)}, e.g. --mesh "
        f"data={len(devices) // max(1, grid.size // sizes['data'])},model={sizes['model']},"
        f"stage={sizes['stage']} (or data=-1), or run with --distributed off")


def resolve_rules(name_or_rules: str | Rules | None, overrides: str | None = None) -> dict:
    """A rule table by name (default `dp_tp`), optionally overridden by `heads=None,mlp=model`."""
    if name_or_rules is None:
        name_or_rules = "dp_tp"
    if isinstance(name_or_rules, str):
        if name_or_rules not in RULE_TABLES:
            raise MeshSpecError(
                f"--rules: unknown rule table {name_or_rules!r}; choose one of {sorted(RULE_TABLES)}")
        rules = dict(RULE_TABLES[name_or_rules])
    else:
        rules = dict(name_or_rules)
    for item in filter(None, (overrides or "").split(",")):
        logical, sep, mesh_axis = (part.strip() for part in item.partition("="))
        if not sep or logical not in LOGICAL_AXES:
            raise MeshSpecError(f"--rules override {item!r}: expected LOGICAL=MESH_AXIS with "
                                f"LOGICAL in {LOGICAL_AXES}")
        if mesh_axis not in (*MESH_AXES, "None"):
            raise MeshSpecError(f"--rules override {item!r}: mesh axis must be one of "
                                f"{MESH_AXES} or None")
        rules[logical] = None if mesh_axis == "None" else mesh_axis
    return rules


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules) -> PartitionSpec:
    """PartitionSpec for an array whose dims carry logical names `axes`.

    A dim whose mesh axis does not divide it, or whose mesh axis an earlier dim already used,
    stays replicated: e.g. MiniLM's 12 heads on `model=8` replicate the attention while its
    1536-wide MLP still splits eight ways.
    """
    used: set[str] = set()
    spec = []
    for logical, dim in zip(axes, shape, strict=True):
        mesh_axis = rules.get(logical) if logical else None
        if (mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1
                or dim % mesh.shape[mesh_axis]):
            spec.append(None)
            continue
        used.add(mesh_axis)
        spec.append(mesh_axis)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def named_sharding(axes, shape, mesh: Mesh, rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a run places its arrays: a mesh plus the rule table that maps onto it."""

    mesh: Mesh
    rules: dict

    @classmethod
    def create(cls, mesh: str | Mapping[str, int] | None = None, rules: str | Rules | None = None,
               rule_overrides: str | None = None) -> "Layout":
        return cls(make_mesh(mesh), resolve_rules(rules, rule_overrides))

    def sharding(self, axes, shape) -> NamedSharding:
        return named_sharding(axes, shape, self.mesh, self.rules)

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """Shard dim 0 (the batch) over the rule for BATCH; replicate the rest."""
        return NamedSharding(self.mesh, PartitionSpec(self.rules.get(BATCH)))

    @property
    def batch_divisor(self) -> int:
        """Batches are padded to a multiple of this so the data axis divides them."""
        axis = self.rules.get(BATCH)
        return self.mesh.shape[axis] if axis else 1

    def describe(self) -> str:
        return format_mesh(dict(self.mesh.shape))


# The layout of the program being traced (`use_layout`): what a layer that maps its own
# devices (a mixture-of-experts dispatch, `jaxaccel.models.moe`) reads; None outside a runtime.
_CURRENT_LAYOUT: contextvars.ContextVar = contextvars.ContextVar("layout", default=None)


@contextlib.contextmanager
def use_layout(layout: Layout | None):
    """Within the block, `current_layout()` is `layout` (the runtime sets it while tracing)."""
    token = _CURRENT_LAYOUT.set(layout)
    try:
        yield
    finally:
        _CURRENT_LAYOUT.reset(token)


def current_layout() -> Layout | None:
    return _CURRENT_LAYOUT.get()
