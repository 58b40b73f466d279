"""sentence-transformers' text settings of a source directory, read at convert time.

The module pipeline (Pooling, Dense, Normalize) belongs to the family (`models/bert.py`);
this module reads what sentence-transformers does to the *text* before tokenising it:
`config_sentence_transformers.json`'s `prompts` and `default_prompt_name` (a prefix put
before every input), and the Transformer module's `do_lower_case` (in its
`sentence_*_config.json`, named after the architecture). Settings that would
change the output and that jaxaccel does not apply are refused, one line naming the file and
the key, rather than silently giving other embeddings.
"""

from __future__ import annotations

import pathlib

from jaxaccel.errors import ConvertError
from jaxaccel.utils.files import read_json

ST_CONFIG = "config_sentence_transformers.json"
# The Transformer module's settings: sentence-transformers names the file after the
# architecture ("sentence_<arch>_config.json").
MODULE_CONFIG_GLOB = "sentence_*_config.json"
# Keys that do not change the embeddings (bookkeeping, and the similarity function a caller
# may use afterwards) or that this module applies.
_ST_KEYS = {"__version__", "similarity_fn_name", "model_type", "prompts", "default_prompt_name"}
_MODULE_KEYS = {"max_seq_length", "do_lower_case"}


def text_settings(src: pathlib.Path) -> dict:
    """{"prompts": {name: prefix}, "default_prompt_name": name | None, "do_lower_case": bool}
    of a sentence-transformers export ({} for a plain transformers directory). ConvertError
    naming the file and key for a malformed or unsupported setting."""
    config = read_json(src / ST_CONFIG) or {}
    _refuse_unknown(src / ST_CONFIG, config, _ST_KEYS)
    module_config = {}
    for path in sorted(src.glob(MODULE_CONFIG_GLOB)):
        module_config = read_json(path) or {}
        _refuse_unknown(path, module_config, _MODULE_KEYS)
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise ConvertError(f"{src / ST_CONFIG}: 'prompts' must map prompt names to strings")
    default = config.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ConvertError(f"{src / ST_CONFIG}: default_prompt_name {default!r} is not one of "
                           f"its prompts {sorted(prompts)}")
    _check_pooling_includes_prompt(src)
    settings = {"prompts": prompts, "default_prompt_name": default,
                "do_lower_case": bool(module_config.get("do_lower_case", False))}
    return settings if (prompts or settings["do_lower_case"]) else {}


def _refuse_unknown(path: pathlib.Path, values: dict, known: set[str]) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConvertError(f"{path}: setting {unknown[0]!r} is not supported by jaxaccel "
                           f"(supported: {', '.join(sorted(known))}); it would change the "
                           "embeddings")


def _check_pooling_includes_prompt(src: pathlib.Path) -> None:
    """Pooling's `include_prompt: false` (prompt tokens left out of the pooled mean) is not
    implemented: refused rather than pooled over the prompt."""
    for module in read_json(src / "modules.json", list) or []:
        if isinstance(module, dict) and str(module.get("type", "")).endswith("Pooling"):
            path = src / str(module.get("path", "")) / "config.json"
            if (read_json(path) or {}).get("include_prompt", True) is False:
                raise ConvertError(f"{path}: include_prompt false (pooling without the "
                                   "prompt's tokens) is not supported by jaxaccel")
