"""Load a checkpoint as a ready-to-run, sharded NNX model state.

`load_model` is the one entry point the CLI, benchmarks and notebooks use: read the manifest,
build the abstract model, compute every parameter's sharding from the layout's rule table,
and stream the arrays onto their devices (checkpoint.restore).

Weight-only quantization (`jaxaccel.models.quantization`): a quantized checkpoint restores its
values and scales as stored; `quantize=Scheme` on a full-precision one quantizes each slice on
the host as it streams in (quantize on load), so its weights reach the devices quantized.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxaccel.models import quantization
from jaxaccel.parallel import distributed
from jaxaccel.utils import progress
from jaxaccel.utils.files import writable_cache_dir
from jaxaccel.checkpoint import chunk_cache, storage
from jaxaccel.checkpoint.broadcast import restore_checkpoint
from jaxaccel.checkpoint.manifest import CheckpointError, Manifest, check_member_name
from jaxaccel.checkpoint.restore import (
    DEFAULT_HOST_MEMORY_BUDGET,
    HostTransform,
    Output,
    RestoreStats,
    Target,
)
from jaxaccel.conversion.hf_checkpoint import open_checkpoint
from jaxaccel.errors import UsageError
from jaxaccel.models import config_from_dict, family_spec
from jaxaccel.models.state import abstract_model
from jaxaccel.parallel.params import fill_state, param_specs
from jaxaccel.runtime.loaded import LoadedModel
from jaxaccel.runtime.programs import place_param, quantized_param_spec
from jaxaccel.parallel.sharding import Layout

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """Everything known before reading a byte: the abstract, already-sharded model."""

    manifest: Manifest
    config: object
    graphdef: nnx.GraphDef
    abstract_state: nnx.State  # leaves are ShapeDtypeStructs carrying their shardings
    targets: dict[str, Target]
    layout: Layout
    dtype: str
    path: pathlib.Path
    # Weight-only quantization in effect: {"scheme", "head", ["group_size"], "on_load"} or {}.
    quantization: dict = dataclasses.field(default_factory=dict)

    @property
    def tokenizer_path(self) -> pathlib.Path | None:
        return _tokenizer_path(self.manifest, self.path)


def _tokenizer_path(manifest: Manifest, path) -> pathlib.Path | None:
    """tokenizer.json's local path; a remote checkpoint's is downloaded once into the cache
    directory (keyed by the manifest's identity)."""
    if "tokenizer.json" not in manifest.tokenizer_files:
        return None
    if not isinstance(path, storage.RemotePath):
        return path / "tokenizer.json"
    # Optional like every cache: an unwritable directory falls back to a temporary one, warned.
    files = writable_cache_dir(chunk_cache.default_dir().parent / "files", "file cache",
                               "$JAXACCEL_CACHE_DIR (or $XDG_CACHE_HOME)")
    return storage.local_copy(path / "tokenizer.json",
                              files / manifest.identity / "tokenizer.json")


def compute_dtype_name(manifest: Manifest, dtype: str | None) -> str:
    name = dtype or ("bfloat16" if manifest.dtype == "bfloat16" else "float32")
    if name not in COMPUTE_DTYPES:
        raise UsageError(f"--dtype must be one of {sorted(COMPUTE_DTYPES)}, got {name!r}")
    return name


def plan_model(path: str | pathlib.Path, layout: Layout | None = None,
               dtype: str | None = None,
               quantize: quantization.Scheme | str | None = None) -> ModelPlan:
    """The abstract, sharded model of a checkpoint; `quantize` (a Scheme or its name) plans a
    quantize-on-load restore of a full-precision checkpoint (UsageError on a quantized one
    with another scheme, or fp8 off GPU/TPU)."""
    path = storage.checkpoint_path(path)
    manifest = open_checkpoint(path)  # a jaxaccel checkpoint or a Hugging Face directory
    for name in manifest.tokenizer_files:
        check_member_name(name, path / "jaxaccel.json")
    dtype = compute_dtype_name(manifest, dtype)
    layout = layout or Layout.create()
    try:
        config = config_from_dict(manifest.family, manifest.config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path / 'jaxaccel.json'}: {err}") from None
    scheme = quantization.Scheme.parse(quantize) if isinstance(quantize, str) else quantize
    stored, on_load, info = _quantization(manifest, scheme, path)
    # A tied head quantized: the model holds it as its own parameter, a copy of the table.
    copies = (quantization.manifest_head_copy(manifest) if stored
              else quantization.tied_head(family_spec(manifest.family), config, scheme))
    graphdef, abstract = abstract_model(manifest.family, config, COMPUTE_DTYPES[dtype],
                                        head_copy=bool(copies))
    if copies and not stored:
        info["head_copy"] = copies
    quantization.check_platform(scheme, layout.mesh.devices.flat[0].platform)
    quantization.check_stored_platform(stored, layout.mesh.devices.flat[0].platform, path)
    if stored:
        abstract = quantization.apply_specs(abstract, stored)
    elif scheme is not None:
        abstract, on_load = quantization.quantize_abstract(
            abstract, family_spec(manifest.family), scheme)
    targets, held = {}, {}
    for name, spec in param_specs(abstract).items():
        weight = name.rpartition(".")[0]
        if weight in on_load:
            if name.endswith(".values"):
                targets[weight], held_values, held_scales = _quantized_target(
                    weight, spec, on_load[weight], layout, copies.get(weight))
                held[name], held[quantization.scales_name(weight)] = held_values, held_scales
            continue
        # NAME.perm (rows held reordered) is a plain int32 array; the rest are quantized parts.
        quant = None if name.endswith(".perm") else stored.get(weight)
        # Zero points are laid out as their scales, stored as the values are.
        targets[name] = target = _target(spec, layout, quant, name.endswith((".scales", ".zeros")))
        if quant is not None and name.endswith((".values", ".zeros")):
            target = dataclasses.replace(target, dtype=np.dtype(quant.stored_dtype))
            if np.dtype(spec.dtype) != target.dtype:
                targets[name] = dataclasses.replace(target, held_dtype=np.dtype(spec.dtype))
        held[name] = jax.ShapeDtypeStruct(target.shape, spec.dtype, sharding=target.sharding)
    sharded = fill_state(abstract, held)
    return ModelPlan(manifest, config, graphdef, sharded, targets, layout, dtype, path, info)


def _quantization(manifest: Manifest, scheme, path) -> tuple[dict, dict, dict]:
    """(stored specs, {} for on-load specs to fill, what the plan reports)."""
    stored = quantization.manifest_specs(manifest)
    name = quantization.manifest_scheme(manifest)
    if stored and scheme is not None and scheme.name != name:
        raise UsageError(f"{path}: the checkpoint is already quantized ({name}); "
                         f"--quantize {scheme.name} cannot re-quantize it")
    if stored:
        return stored, {}, {**manifest.quantization, "on_load": False, "weights": len(stored)}
    if scheme is not None:
        return {}, {}, {**scheme.to_json(), "on_load": True}
    return {}, {}, {}


def _quantized_target(weight: str, spec, quant, layout: Layout, source: str | None = None):
    """Quantize on load: (Target of the float32 source, held values, held scales); `source`
    names the checkpoint array it reads when that is not the weight itself (a tied head).
    The restore reads blocks of whole quantization tiles and quantizes each on the host
    (`quantization.quantize_block`), placing each device's part of NAME.values/NAME.scales."""
    shape, values, scales = quantized_param_spec(spec.axes, spec.shape, quant.tiles, layout)
    values_sh = jax.sharding.NamedSharding(layout.mesh, values)
    scales_sh = jax.sharding.NamedSharding(layout.mesh, scales)
    values_name, scales_name = quantization.quantized_names(weight)
    held_values = jax.ShapeDtypeStruct(shape, np.dtype(jnp.dtype(quant.qtype)), sharding=values_sh)
    held_scales = jax.ShapeDtypeStruct(quant.scale_shape(shape), np.float32, sharding=scales_sh)
    transform = HostTransform(
        apply=functools.partial(quantization.quantize_block, spec=quant), tiles=quant.tiles,
        outputs=(Output(values_name, shape, held_values.dtype, values_sh, (1,) * len(shape)),
                 Output(scales_name, held_scales.shape, held_scales.dtype, scales_sh,
                        quant.tiles)))
    target = Target(shape, np.dtype("float32"), values_sh,
                    stored_shape=spec.shape if shape != spec.shape else None,
                    transform=transform, source=source)
    return target, held_values, held_scales


def _target(spec, layout: Layout, quant=None, scales: bool = False) -> Target:
    """Where restore puts an array: its held shape and sharding (`runtime.place_param`; a
    stored quantized weight's values/scales: `runtime.quantized_param_spec`)."""
    if quant is not None:
        values_shape = spec.shape if not scales else tuple(
            d * t for d, t in zip(spec.shape, quant.tiles))
        held, values, scale_spec = quantized_param_spec(spec.axes, values_shape, quant.tiles,
                                                         layout)
        shape = held if not scales else quant.scale_shape(held)
        sharding = jax.sharding.NamedSharding(layout.mesh, scale_spec if scales else values)
        return Target(shape, spec.dtype, sharding,
                      stored_shape=spec.shape if shape != spec.shape else None)
    shape, sharding = place_param(spec.axes, spec.shape, layout)
    return Target(shape, spec.dtype, sharding,
                  stored_shape=spec.shape if shape != spec.shape else None)


def restore_plan(plan: ModelPlan, path: str | pathlib.Path, *,
                 host_memory_budget: int = DEFAULT_HOST_MEMORY_BUDGET,
                 quiet: bool = False, verify_checksums: bool = True,
                 threads: int | None = None, restore_mode: str | None = None) -> LoadedModel:
    """Restore `plan`'s arrays from `path`. `restore_mode`: read-all, broadcast or auto
    (default: the CLI's --restore-mode; see checkpoint.restore_mode)."""
    path = storage.checkpoint_path(path)
    stats = RestoreStats()
    for note in plan.quantization.get("notes", ()):  # e.g. a W8A8 checkpoint run weight-only
        progress.say(note, quiet)
    total = sum(int(np.prod(t.checkpoint_shape)) * np.dtype(t.dtype).itemsize
                for t in plan.targets.values())
    with progress.byte_progress(total, f"restore {path.name}", enabled=not quiet) as advance:
        arrays = restore_checkpoint(path, plan.manifest, plan.targets, mode=restore_mode,
                                    status=lambda line: progress.say(line, quiet),
                                    host_memory_budget=host_memory_budget, on_bytes=advance,
                                    stats=stats, verify_chunks=verify_checksums, threads=threads)
    progress.say(f"restored {path.name}: {stats.bytes_read / 1e9:.3f} GB in {stats.seconds:.2f} s "
                 f"({stats.gb_per_s:.2f} GB/s) onto {plan.layout.describe()}", quiet)
    if isinstance(path, storage.RemotePath):
        network_rate = stats.bytes_from_network / stats.seconds / 1e9 if stats.seconds else 0.0
        progress.say(f"  from {path}: {stats.bytes_from_network / 1e9:.3f} GB over the network "
                     f"in {stats.network_requests} requests ({network_rate:.2f} GB/s), "
                     f"{stats.bytes_from_cache / 1e9:.3f} GB from the chunk cache", quiet)
    if distributed.active():  # a barrier: every process must have restored before running
        report = distributed.restore_report(stats, total)
        progress.say(report, quiet or not distributed.is_output_process())
    state = fill_state(plan.abstract_state, arrays)
    return LoadedModel(plan.manifest, plan.manifest.family, plan.config, plan.graphdef, state,
                       plan.layout, plan.dtype, path, stats, plan.quantization,
                       plan.tokenizer_path)


def load_model(path: str | pathlib.Path, layout: Layout | None = None, dtype: str | None = None,
               *, host_memory_budget: int = DEFAULT_HOST_MEMORY_BUDGET,
               quiet: bool = True, verify_checksums: bool = True,
               restore_mode: str | None = None,
               quantize: quantization.Scheme | str | None = None) -> LoadedModel:
    """Restore a checkpoint onto `layout` (default: one device) in the compute `dtype`.

    Always checked (~1% of restore time): every array and chunk present, chunk lengths.
    `verify_checksums` (default True; the CLI's `--no-verify` and `jaxaccel.load(verify=False)`
    turn it off) checks every chunk's crc32c as it is read, in the read threads on each piece
    still in cache; a mismatch raises IntegrityError naming the array and chunk. Its cost is
    what `jaxaccel bench restore` reports as `verify_on_over_off` (numbers in
    checkpoint/direct.py). `jaxaccel verify` checks everything against the manifest.
    """
    plan = plan_model(path, layout, dtype, quantize)
    return restore_plan(plan, path, host_memory_budget=host_memory_budget, quiet=quiet,
                        verify_checksums=verify_checksums, restore_mode=restore_mode)
