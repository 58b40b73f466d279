"""Generation settings as Hugging Face repositories ship them, read once at convert time.

EOS, BOS and PAD ids live in `config.json` and, often only there or only partly,
`generation_config.json` (Llama 3 lists `eos_token_id: [128001, 128009]`; chat models add
their end-of-turn id in `generation_config.json` alone). transformers' `generate` stops on
any id of the generation config's list when it has one, and on config.json's otherwise; the
manifest records the ids it would use, every one, plus the default sampling settings.
"""

from __future__ import annotations

import pathlib

from jaxaccel.errors import ConvertError
from jaxaccel.utils.files import read_json

GENERATION_CONFIG = "generation_config.json"
ID_KEYS = ("bos_token_id", "pad_token_id")
SAMPLING_KEYS = {"do_sample": bool, "temperature": float, "top_k": int, "top_p": float}


def read_generation_config(src: pathlib.Path) -> dict:
    """`generation_config.json` as a dict ({} when absent); ConvertError if malformed."""
    return read_json(src / GENERATION_CONFIG) or {}


def token_ids(value, key: str, path: pathlib.Path) -> list[int]:
    """An id field (null, an int, or a list of ints) as a list; ConvertError naming the key."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConvertError(f"{path}: {key} must be a token id or a list of token ids, "
                           f"got {value!r}")
    return list(dict.fromkeys(values))  # ordered, without repeats


def generation_settings(src: pathlib.Path, hf_config: dict) -> dict:
    """{"eos_token_ids": [...], "bos_token_id", "pad_token_id", sampling defaults} from
    config.json overlaid by generation_config.json (its non-null values win)."""
    generation = read_generation_config(src)
    merged = {**hf_config, **{k: v for k, v in generation.items() if v is not None}}
    path = src / (GENERATION_CONFIG if generation else "config.json")
    out = {"eos_token_ids": token_ids(merged.get("eos_token_id"), "eos_token_id", path)}
    for key in ID_KEYS:
        ids = token_ids(merged.get(key), key, path)
        out[key] = ids[0] if ids else None
    for key, kind in SAMPLING_KEYS.items():
        if key in generation:
            out[key] = _typed(generation[key], kind, key, src / GENERATION_CONFIG)
    return out


def _typed(value, kind, key: str, path: pathlib.Path):
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, int | float):
        raise ConvertError(f"{path}: {key} must be a {kind.__name__}, got {value!r}")
    return kind(value)
