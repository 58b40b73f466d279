"""What sentence-transformers does to each text before tokenising it: put the chosen prompt
in front (`prompts[prompt_name]`, by default the model's `default_prompt_name`), then
lower-case the whole text when the model was trained so (`do_lower_case`). The settings come
from the checkpoint's manifest (`source.sentence_transformers`, read at convert time)."""

from __future__ import annotations

from collections.abc import Sequence

from jaxaccel.errors import UsageError


def settings_of(manifest) -> dict:
    """The checkpoint's sentence-transformers text settings ({} when it has none)."""
    return manifest.source.get("sentence_transformers") or {}


def apply(settings: dict, texts: Sequence[str], prompt_name: str | None = None) -> list[str]:
    """`texts` as sentence-transformers tokenises them. `prompt_name` picks a prompt (None:
    the model's default, if any); UsageError naming the available prompts for another."""
    prompts = settings.get("prompts") or {}
    if prompt_name is not None and not isinstance(prompt_name, str):
        raise UsageError(f"prompt_name must be a string, got {type(prompt_name).__name__}")
    if prompt_name is not None and prompt_name not in prompts:
        raise UsageError(f"--prompt-name {prompt_name!r}: this model's prompts are "
                         f"{sorted(prompts) or 'none'} (config_sentence_transformers.json)")
    name = prompt_name if prompt_name is not None else settings.get("default_prompt_name")
    prefix = prompts.get(name, "") if name is not None else ""
    texts = [prefix + text for text in texts]
    return [text.lower() for text in texts] if settings.get("do_lower_case") else texts
