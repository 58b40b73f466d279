"""Model families and their registry.

A family is one module (one file) that builds its `FamilySpec` once, as `SPEC` (the
contract: `jaxaccel.models.family`), plus one `register` line below. Shared building blocks
live beside the families: `layers` (matmuls, norms, activations, the layer scan),
`attention`, `rotary`, `blocks` (the decoder layer), `kv_cache`, `weights` (weight rules).

Nothing outside this package tests which family it is: callers ask the registry for a
family's spec (`family_spec`) and read its fields; everything else comes from the config and
the parameters' logical axes.
"""

from __future__ import annotations

import dataclasses
import importlib

from jaxaccel.errors import UnknownFamilyError
from jaxaccel.models.family import TASKS, ActivationShape, FamilySpec  # noqa: F401

# family name -> its spec, or the import path of the module that builds it (imported lazily,
# so that `import jaxaccel.models` stays light)
_FAMILIES: dict[str, FamilySpec | str] = {}


def register(family: str, module: str) -> None:
    """Make `family` known; `module` is the import path of its one file, which defines
    `SPEC`, a FamilySpec named `family` (imported on first use)."""
    _FAMILIES[family] = module


def register_spec(spec: FamilySpec) -> None:
    """Make an already built family known (one defined outside this package)."""
    _FAMILIES[spec.name] = spec


register("bert", "jaxaccel.models.bert")
register("gemma2", "jaxaccel.models.gemma2")
register("gemma3", "jaxaccel.models.gemma3")
register("gpt2", "jaxaccel.models.gpt2")
register("llama", "jaxaccel.models.llama")
register("mixtral", "jaxaccel.models.mixtral")
register("phi3", "jaxaccel.models.phi3")
register("qwen2_moe", "jaxaccel.models.qwen2_moe")
register("qwen3_moe", "jaxaccel.models.qwen3_moe")
register("qwen3", "jaxaccel.models.qwen3")
register("resnet", "jaxaccel.models.resnet")


def known_families() -> list[str]:
    return sorted(_FAMILIES)


def family_spec(family: str) -> FamilySpec:
    """The registered spec of `family`; UnknownFamilyError naming the known ones."""
    if family not in _FAMILIES:
        raise UnknownFamilyError(
            f"unknown model family {family!r}; known families: {', '.join(known_families())}")
    entry = _FAMILIES[family]
    if isinstance(entry, str):
        spec = importlib.import_module(entry).SPEC
        if spec.name != family:
            raise UnknownFamilyError(f"{entry} defines family {spec.name!r}, registered as "
                                     f"{family!r}")
        _FAMILIES[family] = entry = spec
    return entry


def task(family: str) -> str:
    """What a family's checkpoints are run for: "embed" (encoders), "generate" (decoders) or
    "classify" (image classifiers)."""
    return family_spec(family).task


def families_for(task_name: str) -> list[str]:
    """The known families whose task is `task_name`, sorted."""
    return [f for f in known_families() if task(f) == task_name]


def family_for_model_type(model_type: str) -> str:
    """Map a Hugging Face `model_type` to a family name."""
    for family in known_families():
        if model_type in family_spec(family).hf_model_types:
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
    config_cls = family_spec(family).config
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{family} config has unknown keys {sorted(unknown)}")
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
