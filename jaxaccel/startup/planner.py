"""Will it fit? Per-device and per-process memory of a run, known before reading a byte.

Per device: parameter bytes (exact: the shard each device holds under the layout's rule
table), KV cache bytes for decoders (exact, same arithmetic), and an activation estimate from
XLA's own memory analysis of the compiled forward (`compiled.memory_analysis()`: temporaries
plus outputs), falling back to the family's own formula (`FamilySpec.activation_bytes`)
where compiling is not possible.
Per process: the bytes its restore reads (only slices its devices hold) and the peak host
memory held by reads in flight under the restore budget (the restore's own admission rule).

Parameter and cache arithmetic runs on mesh *sizes* alone (a fake mesh), so the planner can
also search for a mesh that fits without building one (`suggest_mesh`).

Every task is planned: embed (batch x tokens), generate (prompt + new tokens) and classify
(batch x the checkpoint's square image; `seq` is then the image side).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import types
from collections.abc import Mapping

import jax
import numpy as np

from jaxaccel import models
from jaxaccel.parallel import pipeline
from jaxaccel.parallel import sharding as ax
from jaxaccel.checkpoint.restore import DEFAULT_HOST_MEMORY_BUDGET, plan_reads
from jaxaccel.engine import page_pool
from jaxaccel.runtime.classify import Classifier
from jaxaccel.runtime.embed import Embedder
from jaxaccel.errors import PlanError, UsageError  # noqa: F401  (PlanError re-exported)
from jaxaccel.runtime.generate import Generator
from jaxaccel.startup.loader import plan_model
from jaxaccel.models.kv_cache import CACHE_AXES
from jaxaccel.parallel.params import flat_arrays, param_specs
from jaxaccel.runtime.programs import Buckets, param_spec
from jaxaccel.utils.units import format_bytes

LARGEST_SHOWN = 3
SEARCH_DEVICE_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclasses.dataclass
class MemoryPlan:
    ckpt: str
    family: str
    mesh: dict[str, int]
    rules: dict
    dtype: str
    batch: int
    seq: int  # tokens per row; classify: the image side (pixels)
    max_new_tokens: int
    slots: int  # KV cache slots per row (decoders; 0 for encoders)
    param_bytes: int  # per device (every device of a NamedSharding holds an equal share)
    kv_cache_bytes: int
    activation_bytes: int
    activation_source: str  # "xla" (compiled memory analysis), "formula" or "none"
    read_bytes: int  # per process
    peak_host_bytes: int  # per process: bound on restore reads in flight
    host_budget: int
    device_memory: int | None
    param_bytes_by_array: dict[str, int]
    warnings: list[str] = dataclasses.field(default_factory=list)
    specs: Mapping = dataclasses.field(default_factory=dict, repr=False)  # for suggest_mesh
    config: object = dataclasses.field(default=None, repr=False)
    task: str = "embed"  # "embed", "generate" or "classify"
    quantization: dict = dataclasses.field(default_factory=dict)  # scheme in effect, or {}
    # A decoder with sliding-window layers: the window, how many layers use it, and whether
    # the KV cache is bounded by it ({} without windows; see `sliding_window_report`).
    sliding_window: dict = dataclasses.field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.kv_cache_bytes + self.activation_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total_bytes <= self.device_memory

    def largest_arrays(self, n: int = LARGEST_SHOWN) -> list[tuple[str, int]]:
        return sorted(self.param_bytes_by_array.items(), key=lambda kv: -kv[1])[:n]

    def to_json(self) -> dict:
        return {
            "ckpt": self.ckpt, "family": self.family, "task": self.task, "mesh": self.mesh,
            "dtype": self.dtype,
            "batch": self.batch, "seq": self.seq, "max_new_tokens": self.max_new_tokens,
            "kv_cache_slots": self.slots,
            "per_device": {"param_bytes": self.param_bytes, "kv_cache_bytes": self.kv_cache_bytes,
                           "activation_bytes": self.activation_bytes,
                           "activation_source": self.activation_source,
                           "total_bytes": self.total_bytes, "device_memory": self.device_memory,
                           "fits": self.fits},
            "per_process": {"read_bytes": self.read_bytes, "peak_host_bytes": self.peak_host_bytes,
                            "host_memory_budget": self.host_budget},
            "largest_arrays": dict(self.largest_arrays(8)),
            "warnings": self.warnings,
            **({"quantization": self.quantization} if self.quantization else {}),
            **({"sliding_window": self.sliding_window} if self.sliding_window else {}),
        }


def sliding_window_report(config, itemsize: int,
                          page_size: int = page_pool.DEFAULT_PAGE_SIZE) -> dict:
    """{window, windowed_layers, layers, kv_cache_bounded, note} of a decoder config with
    sliding-window layers (its `sliding_window` and `windowed_layers`), else {}; when the
    cache is bounded, also pages_per_sequence and bytes_per_sequence (all layers, keys and
    values, `itemsize` bytes a value): what one decoding sequence holds at most in the
    engine's pool of `page_size`-token pages.

    The engine's block table serves every layer, so only a model whose every layer is
    windowed frees the pages that fall behind the window (`engine.page_pool.cache_window`);
    a global layer reads the whole history. The static path (pipeline `stage` meshes) keeps
    one [l, b, k, s, h] stack with a slot per position either way."""
    window = getattr(config, "sliding_window", None)
    windowed = sum(getattr(config, "windowed_layers", ()))
    if not window or not windowed:
        return {}
    report = {"window": int(window), "windowed_layers": int(windowed),
              "layers": int(config.num_layers)}
    if page_pool.cache_window(config) is None:
        return {**report, "kv_cache_bounded": False,
                "note": "global layers read the whole history through the block table "
                        "every layer shares: the KV cache is not bounded by the window"}
    pages = page_pool.window_pages(int(window), page_size)
    one = page_pool.page_bytes(config.num_layers, config.num_kv_heads, page_size,
                               config.head_dim, itemsize)
    return {**report, "kv_cache_bounded": True, "pages_per_sequence": pages,
            "bytes_per_sequence": pages * one,
            "note": "every layer is windowed: the engine frees a sequence's pages once they "
                    "fall out of the window; the static path of pipeline `stage` meshes "
                    "keeps a slot per position"}


# ---------------------------------------------------------------- arithmetic on mesh sizes

def _fake_layout(sizes: Mapping[str, int], rules: Mapping):
    """Just enough of a Layout for the sharding arithmetic: mesh sizes and rules."""
    return types.SimpleNamespace(mesh=types.SimpleNamespace(shape=dict(sizes)), rules=dict(rules))


def shard_bytes(shape, axes, itemsize: int, sizes: Mapping[str, int], rules: Mapping) -> int:
    """Bytes one device holds of an array with logical `axes` (layer stacks padded to stages)."""
    shape, spec = param_spec(axes, shape, _fake_layout(sizes, rules))
    shard = list(shape)
    for i, mesh_axis in enumerate(spec):
        if mesh_axis is not None:
            shard[i] //= sizes[mesh_axis]
    return math.prod(shard) * itemsize


def param_bytes(specs: Mapping, sizes, rules) -> dict[str, int]:
    """Per-device bytes of every parameter; `specs` maps names to parallel.params.ParamSpec."""
    return {name: shard_bytes(s.shape, s.axes, np.dtype(s.dtype).itemsize, sizes, rules)
            for name, s in specs.items()}


def kv_cache_bytes(config, batch: int, slots: int, itemsize: int, sizes, rules) -> int:
    """Keys plus values, [l, b, k, s, h] each, for a decoder (0 slots: an encoder)."""
    if slots <= 0:
        return 0
    shape = (config.num_layers, batch, config.num_kv_heads, slots, config.head_dim)
    return 2 * shard_bytes(shape, CACHE_AXES, itemsize, sizes, rules)


# ---------------------------------------------------------------- the plan

PLANNED_TASKS = ("embed", "generate", "classify")  # the tasks whose memory plan models


def plan(ckpt: str | pathlib.Path, layout=None, dtype: str | None = None, *, batch: int = 1,
         seq: int | None = None, max_new_tokens: int = 0, host_budget: int | None = None,
         device_memory: int | None = None, compile_activations: bool = True,
         quantize=None) -> MemoryPlan:
    """Memory plan of running `ckpt` on `layout`: reads only the manifest (and tokenizer).
    `quantize`: a quantize-on-load scheme (`quantization.Scheme` or name)."""
    return memory_plan(plan_model(ckpt, layout, dtype, quantize), batch=batch, seq=seq,
                       max_new_tokens=max_new_tokens, host_budget=host_budget,
                       device_memory=device_memory, compile_activations=compile_activations,
                       ckpt=ckpt)


def memory_plan(model_plan, *, batch: int = 1, seq: int | None = None,
                max_new_tokens: int = 0, host_budget: int | None = None,
                device_memory: int | None = None,
                compile_activations: bool = True, ckpt=None) -> MemoryPlan:
    """The memory plan of a run of an already built `ModelPlan` (no second manifest read);
    `ckpt`: the path as the user gave it (default: the plan's)."""
    ckpt = model_plan.path if ckpt is None else ckpt
    task = models.task(model_plan.manifest.family)
    if task not in PLANNED_TASKS:
        raise UsageError(f"{ckpt}: plan covers {', '.join(PLANNED_TASKS)} checkpoints; this "
                         f"one is a {model_plan.manifest.family} model ({task})")
    layout, config = model_plan.layout, model_plan.config
    sizes, rules = dict(layout.mesh.shape), layout.rules
    seq = _sequence(model_plan, task, seq)
    itemsize = _itemsize(model_plan.dtype)
    specs = param_specs(model_plan.abstract_state)
    by_array = {**param_bytes(specs, sizes, rules), **_quantized_bytes(model_plan.abstract_state)}
    batch_rows, seq, slots = _buckets(model_plan, batch, seq, max_new_tokens)
    kv = kv_cache_bytes(config, batch_rows, slots, itemsize, sizes, rules)
    act, source = _activations(model_plan, batch_rows, seq, slots, itemsize,
                               compile_activations)
    reads = [r.nbytes for r in plan_reads(model_plan.targets)]
    host_budget = host_budget or DEFAULT_HOST_MEMORY_BUDGET
    result = MemoryPlan(
        ckpt=str(ckpt), family=model_plan.manifest.family, mesh=sizes, rules=rules,
        dtype=model_plan.dtype, batch=batch_rows, seq=seq, max_new_tokens=max_new_tokens,
        slots=slots, param_bytes=sum(by_array.values()), kv_cache_bytes=kv, activation_bytes=act,
        activation_source=source, read_bytes=sum(reads),
        peak_host_bytes=peak_in_flight(reads, host_budget), host_budget=host_budget,
        device_memory=device_memory if device_memory is not None else detected_device_memory(),
        param_bytes_by_array=by_array, warnings=divisibility_warnings(specs, sizes, rules),
        specs=specs, config=config, task=task,
        quantization=model_plan.quantization,
        sliding_window=sliding_window_report(config, itemsize))
    return result


def _sequence(model_plan, task: str, seq: int | None) -> int:
    """Tokens per row (at most the model's limit); classify: the checkpoint's image side,
    the only input size its program runs (its `max_length`: images are resized and cropped
    to that side)."""
    config = model_plan.config
    if task != "classify":
        return min(seq or config.default_length, config.max_length)
    if seq not in (None, config.max_length):
        raise UsageError(f"{model_plan.path}: a classifier runs at its image size "
                         f"{config.max_length}; --seq {seq} does not apply (leave it out)")
    return config.max_length


def _quantized_bytes(abstract_state) -> dict[str, int]:
    """Per-device bytes of quantized values/scales, from the shardings restore will use
    (`runtime.quantized_param_spec`: int4 groups may keep a dim replicated)."""
    out = {}
    for name, leaf in flat_arrays(abstract_state).items():
        if name.endswith((".values", ".scales", ".zeros")):
            shard = leaf.sharding.shard_shape(leaf.shape)
            out[name] = math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return out


def _itemsize(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else np.dtype(dtype).itemsize


def _buckets(model_plan, batch: int, seq: int, max_new_tokens: int) -> tuple[int, int, int]:
    """(rows, tokens, cache slots) as the run pads them: its shapes, hence its memory."""
    divisor = model_plan.layout.batch_divisor
    if not _is_decoder(model_plan):
        return Buckets().batch(max(1, batch), divisor, max_rows=batch), seq, 0
    buckets = Generator.from_plan(model_plan, packed_weights=False).buckets
    prompt = buckets.length(seq)
    return buckets.batch(batch, divisor), prompt, buckets.slots(prompt, max_new_tokens)


def _is_decoder(model_plan) -> bool:
    return models.task(model_plan.manifest.family) == "generate"


def _is_classifier(model_plan) -> bool:
    return models.task(model_plan.manifest.family) == "classify"


def peak_in_flight(reads: list[int], budget: int) -> int:
    """Bound on host bytes held by restore reads in flight: the restore admits a read while
    the bytes in flight stay within the budget, and a read larger than the budget alone."""
    if not reads:
        return 0
    return max(max(reads), min(budget, sum(reads)))


def detected_device_memory() -> int | None:
    """The first local device's memory limit where the backend reports one (not on CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def _activations(model_plan, batch: int, seq: int, slots: int, itemsize: int,
                 compile_: bool) -> tuple[int, str]:
    if compile_:
        try:
            return _compiled_activations(model_plan, batch, seq, slots), "xla"
        except Exception:  # noqa: BLE001 - an estimate must not fail the plan; say so instead
            pass
    return _formula_activations(model_plan, batch, seq, itemsize), "formula"


def _formula_activations(model_plan, batch: int, seq: int, itemsize: int) -> int:
    """The family's own estimate (`FamilySpec.activation_bytes`), split as the layout's rules
    split each logical axis."""
    sizes, rules = dict(model_plan.layout.mesh.shape), model_plan.layout.rules

    def split(logical: str) -> int:
        axis = rules.get(logical)
        return sizes.get(axis, 1) if axis else 1

    shape = models.ActivationShape(batch=batch, seq=seq, itemsize=itemsize, split=split)
    spec = models.family_spec(model_plan.manifest.family)
    return spec.activation_bytes(model_plan.config, shape)


def _compiled_activations(model_plan, batch: int, seq: int, slots: int) -> int:
    """Temporaries + outputs of the exact program the run compiles, from XLA's memory
    analysis (the runtime's). For decoders, the prefill (its peak: a decode step handles
    one token), with the KV cache counted on its own."""
    if _is_classifier(model_plan):
        stats = Classifier(model_plan, batch_size=batch).memory_analysis(batch)
        return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)
    if not _is_decoder(model_plan):
        stats = Embedder(model_plan, batch_size=batch, max_length=seq).memory_analysis(batch, seq)
        return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)
    if pipeline.stage_count(model_plan.layout) > 1:
        raise NotImplementedError("pipelined prefill: the formula estimates it")
    generator = Generator.from_plan(model_plan, packed_weights=False)
    stats = generator.prefill_memory_analysis(batch, seq, slots)
    layout = model_plan.layout
    cache = kv_cache_bytes(model_plan.config, batch, slots, generator.dtype.itemsize,
                           dict(layout.mesh.shape), layout.rules)
    return int(stats.temp_size_in_bytes + max(0, stats.output_size_in_bytes - cache))


def divisibility_warnings(specs: Mapping, sizes, rules) -> list[str]:
    """Sharded logical dims that the mesh does not divide: those weights stay replicated."""
    dims = {}
    for spec in specs.values():
        for logical, dim in zip(spec.axes, spec.shape):
            if logical not in (ax.LAYERS, ax.EMBED, ax.HEAD_DIM, None):
                dims.setdefault(logical, dim)
    out = []
    for logical, dim in dims.items():
        axis = rules.get(logical)
        if dim and axis and sizes.get(axis, 1) > 1 and dim % sizes[axis]:
            out.append(f"{axis}={sizes[axis]} does not divide {logical} ({dim}): those weights "
                       f"are replicated on every {axis} shard")
    return out


# ---------------------------------------------------------------- refusing and suggesting

def suggest_mesh(plan_: MemoryPlan, device_count: int) -> tuple[dict[str, int], str, int] | None:
    """Smallest model/stage split (rest `data`) whose per-device bytes fit; tries more devices
    when none of this machine's meshes fits. Activations are scaled by batch per device."""
    config, budget = plan_.config, plan_.device_memory
    per_row = plan_.activation_bytes * plan_.mesh.get("data", 1) / max(plan_.batch, 1)
    stacked = has_layer_stacks(plan_.specs)
    for devices in [device_count] + [n for n in SEARCH_DEVICE_COUNTS if n > device_count]:
        for rules_name, model, stage in _candidates(devices, config, stacked):
            sizes = {"data": devices // (model * stage), "model": model, "stage": stage}
            rules = ax.RULE_TABLES[rules_name]
            params = sum(param_bytes(plan_.specs, sizes, rules).values())
            kv = kv_cache_bytes(config, plan_.batch, plan_.slots,
                                _itemsize(plan_.dtype), sizes, rules)
            act = per_row * math.ceil(plan_.batch / sizes["data"])
            total = int(params + kv + act)
            if total <= budget:
                return sizes, rules_name, total
    return None


def has_layer_stacks(specs: Mapping) -> bool:
    """Whether any parameter is a stack of layers: only those split over `stage` (ResNet's
    stages differ in width, so it has none and pipelines never help it)."""
    return any(tuple(s.axes[:1]) == (ax.LAYERS,) for s in specs.values())


def _candidates(devices: int, config, stacked: bool = True):
    """(rules, model, stage) by increasing model-parallel degree; pipelines last (and only
    for models with layer stacks)."""
    out = []
    for model in _divisors(devices):
        for stage in _divisors(devices // model):
            if stage > (config.num_layers if stacked else 1):
                continue
            out.append(("dp_tp" if stage == 1 else "dp_tp_pp", model, stage))
    return sorted(out, key=lambda c: (c[1] * c[2], c[2]))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_fits(plan_: MemoryPlan, device_count: int = 1) -> None:
    """Raise PlanError (largest arrays, a mesh that fits) when a device would overflow."""
    if plan_.fits is not False:
        return
    largest = ", ".join(f"{name} {format_bytes(n)}" for name, n in plan_.largest_arrays())
    hint = ""
    if plan_.config is not None:
        found = suggest_mesh(plan_, device_count)
        if found:
            sizes, rules_name, total = found
            mesh = ax.format_mesh(sizes)
            need = math.prod(sizes.values())
            where = "" if need <= device_count else f" on {need} devices"
            hint = (f"; try --mesh {mesh} --rules {rules_name}{where} "
                    f"({format_bytes(total)} per device)")
        else:
            hint = "; no mesh of up to 1024 devices fits: use --dtype bfloat16 or a smaller batch"
    raise PlanError(
        f"plan: each device would need {format_bytes(plan_.total_bytes)} (parameters "
        f"{format_bytes(plan_.param_bytes)}, KV cache {format_bytes(plan_.kv_cache_bytes)}, "
        f"activations {format_bytes(plan_.activation_bytes)}) but has "
        f"{format_bytes(plan_.device_memory)} on mesh {ax.format_mesh(plan_.mesh)}; largest "
        f"arrays per device: {largest}{hint}")


def refuse_if_too_big(model_plan, *, batch: int = 1, seq: int | None = None,
                      max_new_tokens: int = 0,
                      device_memory: int | None = None) -> MemoryPlan | None:
    """The pre-flight check every start runs on its `ModelPlan` before restoring anything:
    PlanError (see `check_fits`) when a device would overflow.

    Skipped (None) when no device memory is known: CPU without `--device-memory`.
    """
    if device_memory is None and detected_device_memory() is None:
        return None
    plan_ = memory_plan(model_plan, batch=batch, seq=seq, max_new_tokens=max_new_tokens,
                        device_memory=device_memory)
    check_fits(plan_, len(jax.devices()))
    return plan_
