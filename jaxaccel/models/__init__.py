"""Model families and their registry.

A family is one module (one file) plus one `register` line below. The module exposes:

  FAMILY, TASK ("embed", "generate" or "classify"), HF_MODEL_TYPES, SOURCE_PREFIXES,
  IGNORED_SOURCE_WEIGHTS; optionally CONVERSION_NOTES (a dict the converter records in the
  manifest's "source", e.g. that batch norms were folded away)
  Config: frozen dataclass with `Config.from_hf(dict)`, `num_layers`, `max_length` (the hard
      input limit) and `default_length` (where inputs are truncated by default)
  Model(config, dtype=, rngs=): a Flax NNX module whose parameters carry logical axes
  weight_rules(config) -> list[WeightRule]
  Optional: SOURCE_ALIASES (legacy name suffixes, e.g. LayerNorm.gamma for .weight),
  tied_weights(config) -> [(redundant source, canonical source)] (a redundant tied head must
  equal the tensor it is tied to), sentence_transformers_config(src) (encoders),
  QUANTIZED_WEIGHTS / QUANTIZED_HEAD / TIED_HEAD (weight-only quantization, see
  `jaxaccel.models.quantization`; a family with TIED_HEAD takes Model(..., head_copy=True))

Nothing outside a family's module tests which family it is: the runtime asks the registry
for the family's task, and everything else comes from the config and the parameters' axes.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

from jaxaccel.errors import UnknownFamilyError

TASKS = ("embed", "generate", "classify")
_FAMILY_MODULES: dict[str, str] = {}


def register(family: str, module: str) -> None:
    """Make `family` known; `module` is the import path of its one file (imported lazily)."""
    _FAMILY_MODULES[family] = module


register("bert", "jaxaccel.models.bert")
register("gpt2", "jaxaccel.models.gpt2")
register("llama", "jaxaccel.models.llama")
register("resnet", "jaxaccel.models.resnet")


def known_families() -> list[str]:
    return sorted(_FAMILY_MODULES)


def family_module(family: str) -> ModuleType:
    if family not in _FAMILY_MODULES:
        raise UnknownFamilyError(
            f"unknown model family {family!r}; known families: {', '.join(known_families())}")
    return importlib.import_module(_FAMILY_MODULES[family])


def task(family: str) -> str:
    """What a family's checkpoints are run for: "embed" (encoders), "generate" (decoders) or
    "classify" (image classifiers)."""
    return family_module(family).TASK


def families_for(task_name: str) -> list[str]:
    """The known families whose task is `task_name`, sorted."""
    return [f for f in known_families() if task(f) == task_name]


def family_for_model_type(model_type: str) -> str:
    """Map a Hugging Face `model_type` to a family name."""
    for family in _FAMILY_MODULES:
        if model_type in family_module(family).HF_MODEL_TYPES:
            return family
    raise UnknownFamilyError(f"unsupported model_type {model_type!r}")


def first_token_id(value) -> int | None:
    """A config's id field (None, an id, or a list of ids, as Llama 3 writes EOS) -> the first
    id or None. Generation stops on every EOS id: convert records them all in the manifest."""
    if isinstance(value, list | tuple):
        return value[0] if value else None
    return value


def config_from_dict(family: str, values: dict):
    """Rebuild a family's Config from the manifest's JSON (unknown keys are an error)."""
    config_cls = family_module(family).Config
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{family} config has unknown keys {sorted(unknown)}")
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
