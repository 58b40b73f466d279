"""Convert a Hugging Face-layout model directory into a jaxaccel checkpoint.

Every source tensor is checked against the model before any array is written: a missing
tensor, an unexpected one, or a shape that disagrees with config.json is an error naming the
file and tensor. Arrays then stream one at a time into the checkpoint writer.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np

from jaxaccel.checkpoint import writer
from jaxaccel.checkpoint.layout import DEFAULT_CHUNK_BYTES
from jaxaccel.checkpoint.manifest import Manifest
from jaxaccel.conversion.safetensors_source import (
    ConvertError,
    SafetensorsSource,
    read_hf_config,
    weight_files,
)
from jaxaccel.errors import UsageError
from jaxaccel.models import (
    UnknownFamilyError,
    family_for_model_type,
    family_module,
    known_families,
)
from jaxaccel.models.state import abstract_model, param_specs
from jaxaccel.models.weights import WeightRule

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


@dataclasses.dataclass(frozen=True)
class PlannedArray:
    """One target parameter and the source tensor names it is built from."""

    rule: WeightRule
    sources: tuple[tuple[str, ...], ...]  # one group (source, *extra), or one per layer
    axes: tuple


def sentence_transformers_limits(src: pathlib.Path) -> dict:
    """`max_seq_length` from a sentence-transformers export, where its pipeline truncates."""
    path = src / "sentence_bert_config.json"
    if not path.is_file():
        return {}
    try:
        limit = json.loads(path.read_text()).get("max_seq_length")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise ConvertError(f"{path}: not a JSON object ({err})") from None
    return {"max_seq_length": int(limit)} if limit else {}


def image_preprocessor(src: pathlib.Path) -> dict:
    """An image model's `preprocessor_config.json`, whole, under "preprocessor" (its Config
    keeps what it needs: resize, crop, rescale and normalisation)."""
    path = src / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConvertError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise ConvertError(f"{path}: not a JSON object")
    return {"preprocessor": values}


def resolve_family(hf_config: dict, family: str, config_path: pathlib.Path) -> str:
    if family != "auto":
        if family not in known_families():  # a flag value: a usage error
            raise UsageError(f"--family must be auto or one of {', '.join(known_families())}, "
                             f"got {family!r}")
        return family
    try:
        return family_for_model_type(hf_config["model_type"])
    except UnknownFamilyError as err:
        raise ConvertError(f"{config_path}: {err}; supported families: "
                           f"{', '.join(known_families())}") from None


def _source_name(name: str, available: set[str], prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if prefix + name in available:
            return prefix + name
    return None


def _zero_view(shape, dtype) -> np.ndarray:
    """A shape-only stand-in (zero strides, one element of memory) to check transforms."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape))


def plan_arrays(module, cfg, source: SafetensorsSource, specs,
                rules: list[WeightRule] | None = None) -> list[PlannedArray]:
    """Match rules (default: the family's Hugging Face rules) to source tensors and check
    every shape, before reading any data."""
    available = source.names()
    prefixes, layers = module.SOURCE_PREFIXES, cfg.num_layers
    plan, missing, used = [], [], set()
    for rule in module.weight_rules(cfg) if rules is None else rules:
        groups = ([rule.source_names(i) for i in range(layers)] if rule.per_layer
                  else [rule.source_names()])
        resolved = [tuple(_source_name(n, available, prefixes) for n in g) for g in groups]
        missing += [n for g, r in zip(groups, resolved) for n, m in zip(g, r) if m is None]
        if any(None in group for group in resolved):
            continue
        used.update(name for group in resolved for name in group)
        spec = specs[rule.target]
        _check_shape(rule, resolved, source, spec.shape)
        plan.append(PlannedArray(rule, tuple(resolved), spec.axes))
    _check_coverage(plan, missing, available - used, specs, module, source)
    return plan


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


def _check_coverage(plan, missing, unused, specs, module, source) -> None:
    if missing:
        files = sorted({str(f) for f in source.file_of.values()}) or ["<no files>"]
        raise ConvertError(f"{files[0]}: missing tensors {sorted(missing)[:8]}"
                           + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    ignored = [re.compile(p) for p in module.IGNORED_SOURCE_WEIGHTS]
    unexpected = sorted(n for n in unused if not any(p.search(n) for p in ignored))
    if unexpected:
        path = source.file_of[unexpected[0]]
        raise ConvertError(f"{path}: tensors that this {module.FAMILY} model does not use: "
                           f"{unexpected[:8]} (refusing to drop weights silently)")
    uncovered = set(specs) - {p.rule.target for p in plan}
    if uncovered:
        raise ConvertError(f"internal: parameters without a weight rule: {sorted(uncovered)}")


def read_planned(plan: list[PlannedArray], source: SafetensorsSource, dtype) -> Iterator:
    """Yield (name, array, axes), one parameter at a time, transformed and cast."""
    for item in plan:
        parts = [item.rule.transform(*map(source.read, group)) for group in item.sources]
        array = np.stack(parts) if item.rule.per_layer else parts[0]
        yield item.rule.target, np.ascontiguousarray(array.astype(dtype, copy=False)), item.axes


def source_layout(module, layout: str):
    """A family's foreign `SourceLayout` by name (None for Hugging Face's own layout)."""
    if layout == "hf":
        return None
    layouts = getattr(module, "SOURCE_LAYOUTS", {})
    if layout not in layouts:
        raise UsageError(f"--layout {layout!r}: the {module.FAMILY} family converts from "
                         f"{', '.join(['hf', *layouts])}")
    return layouts[layout]


def source_config(src: pathlib.Path, family: str, layout: str, source: SafetensorsSource):
    """(family module, HF-style config dict, SourceLayout or None) of a source directory.

    Hugging Face's layout needs config.json; a foreign layout (`--family F --layout L`)
    infers the architecture from the tensor shapes, taking labels from a config.json if any.
    """
    if layout == "hf":
        hf_config = read_hf_config(src)
        module = family_module(resolve_family(hf_config, family, src / "config.json"))
        foreign = None
    else:
        if family == "auto":
            raise UsageError(f"--layout {layout} needs --family (the source has no model_type)")
        module = family_module(resolve_family({}, family, src / "config.json"))
        foreign = source_layout(module, layout)
        shapes = {name: source.shape(name) for name in source.names()}
        try:
            inferred = foreign.config_from_shapes(shapes)
        except (KeyError, ValueError) as err:
            raise ConvertError(f"{src}: {err}") from None
        found = read_hf_config(src) if (src / "config.json").is_file() else {}
        hf_config = {"model_type": layout, **found, **inferred}
    return module, {**hf_config, **sentence_transformers_limits(src),
                    **image_preprocessor(src)}, foreign


def convert(src: str | pathlib.Path, dest: str | pathlib.Path, *, dtype: str = "float32",
            family: str = "auto", layout: str = "hf",
            chunk_bytes: int | None = DEFAULT_CHUNK_BYTES, codec: str = "none",
            overwrite: bool = False,
            on_array: Callable[[str, int], None] = lambda name, nbytes: None) -> Manifest:
    """Convert SRC (config.json + safetensors, or a family's foreign `layout` of
    safetensors) into a jaxaccel checkpoint at DEST."""
    src, dest = pathlib.Path(src), pathlib.Path(dest)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if layout != "hf" and family != "auto":  # a bad flag before any file is read
        source_layout(family_module(resolve_family({}, family, src / "config.json")), layout)
    with SafetensorsSource(weight_files(src)) as source:
        module, hf_config, foreign = source_config(src, family, layout, source)
        try:
            cfg = module.Config.from_hf(hf_config)
        except (KeyError, ValueError, TypeError) as err:
            raise ConvertError(f"{src / 'config.json'}: cannot build a {module.FAMILY} config "
                               f"({err})") from None
        _, abstract = abstract_model(module.FAMILY, cfg, DTYPES[dtype])
        rules = foreign.weight_rules(cfg) if foreign else None
        plan = plan_arrays(module, cfg, source, param_specs(abstract), rules)
        manifest = Manifest(family=module.FAMILY, config=dataclasses.asdict(cfg), dtype=dtype,
                            arrays={}, source={"path": str(src.absolute()),
                                               "model_type": hf_config["model_type"],
                                               "layout": layout,
                                               **getattr(module, "CONVERSION_NOTES", {})})
        extras = {name: src / name for name in TOKENIZER_FILES if (src / name).is_file()}
        return writer.write_checkpoint(dest, manifest, read_planned(plan, source, DTYPES[dtype]),
                                       extras, chunk_bytes=chunk_bytes, codec=codec,
                                       overwrite=overwrite, on_array=on_array)
