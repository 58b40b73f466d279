"""Convert a Hugging Face-layout model directory into a jaxaccel checkpoint.

Every source tensor is checked against the model before any array is written: a missing
tensor, an unexpected one, a shape that disagrees with config.json, or a redundant tied head
that differs from what it is tied to is an error naming the file and tensor. Arrays then
stream one at a time into the checkpoint writer; a value the stored dtype cannot hold
(float16 overflow, NaN/inf in the source) stops the convert, naming the tensor.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import warnings
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np

from jaxaccel.checkpoint import storage, writer
from jaxaccel.checkpoint.layout import DEFAULT_CHUNK_BYTES, ChunkRule
from jaxaccel.checkpoint.manifest import Manifest
from jaxaccel.conversion import sentence_transformers
from jaxaccel.conversion.generation import generation_settings
from jaxaccel.conversion.safetensors_source import (
    ConvertError,
    SafetensorsSource,
    read_hf_config,
    choose_weight_files,
    read_index,
)
from jaxaccel.errors import UsageError
from jaxaccel.models import (
    FamilySpec,
    UnknownFamilyError,
    family_for_model_type,
    family_spec,
    known_families,
)
from jaxaccel.models.state import abstract_model
from jaxaccel.models.weights import WeightRule
from jaxaccel.parallel import sharding as ax
from jaxaccel.parallel.params import param_specs

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Chunks follow the rule tables: one per pipeline stage's layer and one per expert, and dims
# a table shards over `model` cut in aligned pieces, so each device reads only the chunks it
# holds.
CHUNK_RULE = ChunkRule(per_index=ax.axes_sharded_over("stage") | ax.axes_sharded_over("expert"),
                       split=ax.axes_sharded_over("model"))


@dataclasses.dataclass(frozen=True)
class PlannedArray:
    """One target parameter and the source tensor names it is built from."""

    rule: WeightRule
    sources: tuple[tuple[str, ...], ...]  # one group (source, *extra), or one per layer
    axes: tuple


def resolve_family(hf_config: dict, family: str, config_path: pathlib.Path,
                   force: bool = False) -> str:
    """The family converting a source: config.json's model_type decides (`auto`); a --family
    must agree with it (its model's weights would load into the wrong architecture and run
    with wrong numbers, silently). ConvertError naming both, unless `force` (then a warning)."""
    if family != "auto":
        if family not in known_families():  # a flag value: a usage error
            raise UsageError(f"--family must be auto or one of {', '.join(known_families())}, "
                             f"got {family!r}")
        _check_family_agrees(hf_config, family, config_path, force)
        return family
    try:
        return family_for_model_type(hf_config["model_type"])
    except UnknownFamilyError as err:
        raise ConvertError(f"{config_path}: {err}; supported families: "
                           f"{', '.join(known_families())}") from None


def _check_family_agrees(hf_config: dict, family: str, config_path: pathlib.Path,
                         force: bool) -> None:
    model_type = hf_config.get("model_type")
    if model_type is None or model_type in family_spec(family).hf_model_types:
        return
    message = (f"{config_path}: model_type {model_type!r} is not a {family} model (the {family} "
               f"family converts model_type {', '.join(family_spec(family).hf_model_types)})")
    if not force:
        raise ConvertError(f"{message}; --force-family converts it as {family} anyway")
    warnings.warn(f"{message}; converting as {family} because of --force-family: check its "
                  "outputs against the original", stacklevel=3)


def _candidates(name: str, aliases) -> list[str]:
    """`name` and its legacy spellings (the family's source_aliases: suffix -> old suffix)."""
    return [name] + [name[:-len(new)] + old for new, old in aliases if name.endswith(new)]


def _source_name(name: str, available: set[str], spec: FamilySpec) -> str | None:
    for prefix in spec.source_prefixes:
        for candidate in _candidates(name, spec.source_aliases):
            if prefix + candidate in available:
                return prefix + candidate
    return None


def _is_ignored(name: str, spec: FamilySpec) -> bool:
    """Whether a source tensor is one the family ignores, under any of its prefixes."""
    bare = [name.removeprefix(p) for p in spec.source_prefixes if name.startswith(p)]
    return any(re.search(pattern, n) for pattern in spec.ignored_source_weights for n in bare)


def _zero_view(shape, dtype) -> np.ndarray:
    """A shape-only stand-in (zero strides, one element of memory) to check transforms."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape))


@dataclasses.dataclass
class SourcePlan:
    """Which source tensors build which parameters, and which were deliberately ignored."""

    arrays: list[PlannedArray]
    ignored: list[str]


def plan_arrays(spec: FamilySpec, cfg, source: SafetensorsSource, specs,
                rules: list[WeightRule] | None = None) -> SourcePlan:
    """Match rules (default: the family's Hugging Face rules) to source tensors and check
    every shape, before reading any data."""
    available, layers = source.names(), cfg.num_layers
    plan, missing, used = [], [], set()
    for rule in spec.weight_rules(cfg) if rules is None else rules:
        rule = _spelling(rule, available, spec, layers)
        groups = _groups(rule, layers)
        resolved = [tuple(_source_name(n, available, spec) for n in g) for g in groups]
        missing += [n for g, r in zip(groups, resolved) for n, m in zip(g, r) if m is None]
        if any(None in group for group in resolved):
            continue
        used.update(name for group in resolved for name in group)
        for name in (n for group in resolved for n in group):
            source.check_dtype(name)  # an unreadable dtype stops here, before any write
        target = specs[rule.target]
        _check_shape(rule, resolved, source, target.shape)
        plan.append(PlannedArray(rule, tuple(resolved), target.axes))
    tied = _check_tied(spec, cfg, source)
    ignored = _check_coverage(plan, missing, available - used - set(tied), specs, spec, source)
    return SourcePlan(plan, sorted(ignored + tied + source.dropped))


def _groups(rule: WeightRule, layers: int) -> list[tuple[str, ...]]:
    """The source name groups a rule reads: one per stacked layer, or one."""
    if rule.per_layer:
        return [rule.source_names(i) for i in rule.layer_indices(layers)]
    return [rule.source_names()]


def _spelling(rule: WeightRule, available: set[str], spec: FamilySpec,
              layers: int) -> WeightRule:
    """`rule`, or its fallback spelling where the source has only the fallback's tensors
    (a missing tensor is then reported under the rule's own, published name)."""
    def complete(r: WeightRule) -> bool:
        return all(_source_name(n, available, spec) for g in _groups(r, layers) for n in g)

    if rule.fallback is None or complete(rule) or not complete(rule.fallback):
        return rule
    return rule.fallback


def _check_tied(spec: FamilySpec, cfg, source: SafetensorsSource) -> list[str]:
    """Redundant copies of tied tensors present in the source, each checked to be equal to
    the tensor it is tied to; ConvertError naming both when one differs."""
    redundant = []
    for copy, canonical in spec.tied_weights(cfg):
        copy_name = _source_name(copy, source.names(), spec)
        canonical_name = _source_name(canonical, source.names(), spec)
        if copy_name is None or canonical_name is None:
            continue
        a, b = source.read(copy_name), source.read(canonical_name)
        if a.shape != b.shape or not np.array_equal(a, b):
            raise ConvertError(
                f"{source.file_of[copy_name]}: config.json ties the head to the embedding "
                f"(tie_word_embeddings), but tensor {copy_name!r} differs from "
                f"{canonical_name!r}; set tie_word_embeddings to false to use the own head")
        redundant.append(copy_name)
    return redundant


def _check_shape(rule: WeightRule, groups, source: SafetensorsSource, target_shape) -> None:
    for group in groups:
        name = group[0]
        try:
            shape = rule.transform(*(_zero_view(source.shape(n), np.float32) for n in group)).shape
        except ValueError:
            shape = None
        expected = target_shape[1:] if rule.per_layer else target_shape
        if shape != tuple(expected):
            raise ConvertError(
                f"{source.file_of[name]}: tensor {name!r} has shape {source.shape(name)}, which "
                f"does not fit parameter {rule.target!r} of shape {tuple(expected)} "
                "implied by config.json")


def _check_coverage(plan, missing, unused, specs, spec: FamilySpec, source) -> None:
    if missing:
        files = sorted({str(f) for f in source.file_of.values()}) or ["<no files>"]
        raise ConvertError(f"{files[0]}: missing tensors {sorted(missing)[:8]}"
                           + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    unexpected = sorted(n for n in unused if not _is_ignored(n, spec))
    if unexpected:
        path = source.file_of[unexpected[0]]
        raise ConvertError(f"{path}: tensors that this {spec.name} model does not use: "
                           f"{unexpected[:8]} (refusing to drop weights silently)")
    uncovered = set(specs) - {p.rule.target for p in plan}
    if uncovered:
        raise ConvertError(f"internal: parameters without a weight rule: {sorted(uncovered)}")
    return sorted(set(unused) - set(unexpected))


def read_planned(plan: list[PlannedArray], source: SafetensorsSource, dtype,
                 allow_overflow: bool = False) -> Iterator:
    """Yield (name, array, axes), one parameter at a time, transformed and cast. ConvertError
    for NaN/inf in a source tensor or a value beyond the stored dtype's range, unless
    `allow_overflow`."""
    for item in plan:
        parts = []
        for group in item.sources:
            part = item.rule.transform(*map(source.read, group))
            if not allow_overflow:
                _check_range(part, dtype, group[0], source.file_of[group[0]])
            parts.append(part)
        array = np.stack(parts) if item.rule.per_layer else parts[0]
        with np.errstate(over="ignore"):  # overflow was refused above unless allowed
            stored = np.ascontiguousarray(array.astype(dtype, copy=False))
        yield item.rule.target, stored, item.axes


def _check_range(array: np.ndarray, dtype, name: str, path) -> None:
    """Refuse NaN/inf in the source and finite values the stored dtype turns into inf."""
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
            or array.dtype == ml_dtypes.bfloat16):
        return
    wide = array.astype(np.float32, copy=False)
    if not np.isfinite(wide).all():
        raise ConvertError(f"{path}: tensor {name!r} holds NaN or inf values in the source "
                           "(--allow-overflow converts it anyway)")
    largest = float(np.abs(wide).max(initial=0.0))
    limit = float(ml_dtypes.finfo(dtype).max)
    if largest > limit:
        raise ConvertError(f"{path}: tensor {name!r} has values up to {largest:.6g}, beyond "
                           f"{np.dtype(dtype).name}'s largest {limit:.6g} (they would become "
                           "inf); convert to float32 or bfloat16, or pass --allow-overflow")


def source_layout(spec: FamilySpec, layout: str):
    """A family's foreign `SourceLayout` by name (None for Hugging Face's own layout)."""
    if layout == "hf":
        return None
    layouts = spec.source_layouts
    if layout not in layouts:
        raise UsageError(f"--layout {layout!r}: the {spec.name} family converts from "
                         f"{', '.join(['hf', *layouts])}")
    return layouts[layout]


def source_family(src: pathlib.Path, family: str, layout: str,
                  force_family: bool = False) -> FamilySpec:
    """The spec of the family converting `src`: from config.json's model_type (Hugging Face's
    layout; a --family must agree unless `force_family`) or from --family (required for a
    foreign `layout`, checked before any read)."""
    if layout == "hf":
        return family_spec(resolve_family(read_hf_config(src), family, src / "config.json",
                                          force_family))
    if family == "auto":
        raise UsageError(f"--layout {layout} needs --family (the source has no model_type)")
    spec = family_spec(resolve_family({}, family, src / "config.json"))
    source_layout(spec, layout)  # a bad --layout fails here
    return spec


def source_config(src: pathlib.Path, spec: FamilySpec, layout: str, source: SafetensorsSource):
    """(HF-style config dict, SourceLayout or None) of a source directory: Hugging Face's
    layout reads config.json; a foreign layout infers the architecture from the tensor
    shapes, taking labels from a config.json if there is one."""
    if layout == "hf":
        return read_hf_config(src), None
    foreign = source_layout(spec, layout)
    shapes = {name: source.shape(name) for name in source.names()}
    try:
        inferred = foreign.config_from_shapes(shapes)
    except (KeyError, ValueError) as err:
        raise ConvertError(f"{src}: {err}") from None
    found = read_hf_config(src) if (src / "config.json").is_file() else {}
    return {"model_type": layout, **found, **inferred}, foreign


def convert(src: str | pathlib.Path, dest: str | pathlib.Path, *, dtype: str = "float32",
            family: str = "auto", layout: str = "hf",
            chunk_bytes: int | None = DEFAULT_CHUNK_BYTES, codec: str = "none",
            overwrite: bool = False, allow_overflow: bool = False, force_family: bool = False,
            on_array: Callable[[str, int], None] = lambda name, nbytes: None) -> Manifest:
    """Convert SRC (config.json + safetensors, or a family's foreign `layout` of safetensors)
    into a jaxaccel checkpoint at DEST.

    Raises ConvertError (naming the file, tensor or config key) for anything it cannot
    convert faithfully, before DEST exists (a `family` other than config.json's model_type
    is one, unless `force_family`: then a warning); the manifest's `source.ignored_tensors` lists the
    source tensors deliberately left out (pooler/MLM heads, redundant tied heads, ...)."""
    src, dest = pathlib.Path(src), storage.checkpoint_path(dest)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    spec = source_family(src, family, layout, force_family)
    extras, extra_files = spec.read_extra_sources(src)
    files, ignored_files = choose_weight_files(src)
    with SafetensorsSource(files + list(extra_files), read_index(src), extra_files) as source:
        hf_config, foreign = source_config(src, spec, layout, source)
        cfg = _family_config(spec, {**hf_config, **extras}, src)
        _, abstract = abstract_model(spec.name, cfg, DTYPES[dtype])
        rules = foreign.weight_rules(cfg) if foreign else None
        plan = plan_arrays(spec, cfg, source, param_specs(abstract), rules)
        manifest = Manifest(family=spec.name, config=dataclasses.asdict(cfg), dtype=dtype,
                            arrays={}, source={"path": str(src.absolute()),
                                               "model_type": hf_config["model_type"],
                                               "layout": layout,
                                               "ignored_tensors": plan.ignored,
                                               "ignored_files": ignored_files,
                                               **_sentence_settings(spec, src),
                                               **spec.conversion_notes},
                            generation=_generation(spec, src, hf_config))
        extras = {name: src / name for name in spec.preprocessing_files
                  if (src / name).is_file()}
        arrays = read_planned(plan.arrays, source, DTYPES[dtype], allow_overflow)
        return writer.write_checkpoint(dest, manifest, arrays, extras, chunk_bytes=chunk_bytes,
                                       codec=codec, overwrite=overwrite, on_array=on_array,
                                       chunk_rule=CHUNK_RULE)


def _sentence_settings(spec: FamilySpec, src: pathlib.Path) -> dict:
    """An encoder's sentence-transformers text settings (prompts, lower-casing), if any."""
    if spec.task != "embed":
        return {}
    settings = sentence_transformers.text_settings(src)
    return {"sentence_transformers": settings} if settings else {}


def _family_config(spec: FamilySpec, hf_config: dict, src: pathlib.Path):
    try:
        return spec.config.from_hf(hf_config)
    except (KeyError, ValueError, TypeError) as err:
        raise ConvertError(f"{src / 'config.json'}: cannot build a {spec.name} config "
                           f"({type(err).__name__}: {err})") from None


def _generation(spec: FamilySpec, src: pathlib.Path, hf_config: dict) -> dict:
    """EOS/BOS/PAD and sampling defaults for decoders; {} for encoders."""
    return generation_settings(src, hf_config) if spec.task == "generate" else {}
