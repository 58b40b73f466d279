"""What the front ends call: `run_requests` for `Model.generate` / `jaxaccel generate --input`,
and `request_from_record` for one JSONL line of `--input`.

Front ends turn their inputs into `Request`s (per-request settings over the caller's
defaults), run them through one `LLMEngine` and get `RequestOutput`s back in input order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from jaxaccel.engine.engine import LLMEngine
from jaxaccel.engine.requests import Request, RequestOutput, SamplingParams
from jaxaccel.errors import InputError

# JSONL fields of `generate --input` -> SamplingParams fields (max_new_tokens is ours).
RECORD_FIELDS = {"max_new_tokens": "max_tokens", "temperature": "temperature",
                 "top_k": "top_k", "top_p": "top_p", "seed": "seed", "stop": "stop",
                 "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos"}
PROMPT_FIELDS = ("prompt", "prompt_ids")


def engine_for(generator, *, eos_token_ids: Sequence[int] = (),
               detokenize: Callable | None = None, **engine_args) -> LLMEngine:
    """An `LLMEngine` on a `Generator`'s runtime and placed weights (its compiled programs
    are cached on that runtime, so engines built again on it compile nothing new)."""
    return LLMEngine(generator, eos_token_ids=eos_token_ids, detokenize=detokenize,
                     **engine_args)


def run_requests(generator, requests: Sequence[Request], *, engine: LLMEngine | None = None,
                 on_output: Callable[[RequestOutput], None] | None = None,
                 **engine_args) -> list[RequestOutput]:
    """Run `requests` through `engine` (default: a new one from `engine_for(generator,
    **engine_args)`); their outputs in input order. Raises InputError, naming the request,
    for a request the model cannot run, before any compute."""
    engine = engine or engine_for(generator, **engine_args)
    for request in requests:
        engine.check(request)
    return engine.generate(requests, on_output=on_output)


def request_from_record(record, line: int, defaults: SamplingParams,
                        encode: Callable[[str], list[int]] | None) -> Request:
    """The Request of one `--input` JSONL line (already parsed; `line` is 1-based): a
    `prompt` (text, needs `encode`) or `prompt_ids`, plus optional per-line settings over
    `defaults`. InputError naming the line and field for anything else."""
    where = f"line {line}"
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = set(record) - set(RECORD_FIELDS) - set(PROMPT_FIELDS)
    if unknown:
        raise InputError(f"{where}: unknown field(s) {sorted(unknown)}; expected prompt or "
                         f"prompt_ids and optional {', '.join(RECORD_FIELDS)}")
    if ("prompt" in record) == ("prompt_ids" in record):
        raise InputError(f"{where}: give exactly one of 'prompt' (text) or 'prompt_ids'")
    ids = _prompt_ids(record, where, encode)
    settings = {RECORD_FIELDS[k]: v for k, v in record.items() if k in RECORD_FIELDS}
    try:
        params = dataclasses.replace(defaults, **settings)
        return Request(line, ids, params)
    except (InputError, TypeError) as err:
        raise InputError(f"{where}: {err}") from None


def _prompt_ids(record: dict, where: str, encode) -> list[int]:
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"]:
            raise InputError(f"{where}: 'prompt' must be a non-empty string")
        if encode is None:
            raise InputError(f"{where}: a text 'prompt' needs the checkpoint's tokenizer; "
                             f"give 'prompt_ids'")
        return list(encode(record["prompt"]))
    ids = record["prompt_ids"]
    if not isinstance(ids, list) or not ids or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise InputError(f"{where}: 'prompt_ids' must be a non-empty list of ints")
    return ids
