"""Model families. Each family module exposes the same small protocol:

  FAMILY, HF_MODEL_TYPES, SOURCE_PREFIXES, IGNORED_SOURCE_WEIGHTS
  Config (frozen dataclass, `Config.from_hf(dict)`), Model(config, dtype=, rngs=)
  weight_rules(config) -> list[WeightRule]
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

_FAMILY_MODULES = {
    "bert": "jaxaccel.models.bert",
    "gpt2": "jaxaccel.models.gpt2",
    "llama": "jaxaccel.models.llama",
}


class UnknownFamilyError(ValueError):
    pass


def known_families() -> list[str]:
    return sorted(_FAMILY_MODULES)


def family_module(family: str) -> ModuleType:
    if family not in _FAMILY_MODULES:
        raise UnknownFamilyError(
            f"unknown model family {family!r}; known families: {', '.join(known_families())}")
    return importlib.import_module(_FAMILY_MODULES[family])


def family_for_model_type(model_type: str) -> str:
    """Map a Hugging Face `model_type` to a family name."""
    for family in _FAMILY_MODULES:
        try:
            module = family_module(family)
        except ModuleNotFoundError:  # a family whose module is not written yet
            continue
        if model_type in module.HF_MODEL_TYPES:
            return family
    raise UnknownFamilyError(f"unsupported model_type {model_type!r}")


def config_from_dict(family: str, values: dict):
    """Rebuild a family's Config from the manifest's JSON (unknown keys are an error)."""
    config_cls = family_module(family).Config
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{family} config has unknown keys {sorted(unknown)}")
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
