"""One validator of generation requests, shared by the Python API and the CLI.

`Model.generate`, `Model.stream` and `jaxaccel generate` turn their arguments into a
`Request` here, so the same settings are accepted or refused the same way, with the same
`UsageError` and message, whichever front end gives them. The rules (vLLM's and
transformers' where they agree, and strict where they would silently ignore a setting):

* `greedy=True` is argmax: no temperature, top_k or top_p beside it.
* Unset settings (`greedy=None`, no temperature) follow the checkpoint's
  generation_config.json as transformers does: its temperature/top_k/top_p when it says
  `do_sample`, else greedy.
* top_k/top_p choose among sampled tokens, so they need a temperature > 0 (given, or the
  checkpoint's); without one they would be ignored, and that is refused.
* max_new_tokens is an integer >= 1; stop strings are non-empty strings.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence

from jaxaccel.errors import UsageError
from jaxaccel.runtime import generate
from jaxaccel.runtime.sampling import Sampling


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked generation request (vLLM's SamplingParams, less what jaxaccel lacks)."""

    max_new_tokens: int
    sampling: Sampling
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


def request(max_new_tokens, *, greedy: bool | None = None, temperature: float | None = None,
            top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
            stop: str | Sequence[str] | None = None, ignore_eos: bool = False,
            defaults: Mapping | None = None) -> Request:
    """Check a request's settings; `defaults` are the checkpoint's generation settings (the
    manifest's `generation`: do_sample, temperature, top_k, top_p). Raises UsageError."""
    return Request(check_max_new_tokens(max_new_tokens),
                   sampling(greedy, temperature, top_k, top_p, seed, defaults),
                   check_stop(stop), bool(ignore_eos))


def sampling(greedy: bool | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             defaults: Mapping | None = None) -> Sampling:
    """The `Sampling` these settings ask for (see the module docstring for the rules)."""
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not math.isfinite(value)):
            raise UsageError(f"{name} must be a finite number, got {value!r}")
    for name, value in (("top_k", top_k), ("seed", seed)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise UsageError(f"{name} must be an integer, got {value!r}")
    if temperature is not None and temperature < 0:
        raise UsageError(f"temperature must be >= 0, got {temperature}")
    truncated = bool(top_k) or (top_p is not None and top_p != 1.0)
    if greedy and ((temperature or 0) > 0 or truncated):
        raise UsageError("greedy cannot be combined with temperature/top_k/top_p")
    if greedy is None and temperature is None:
        temperature, top_k, top_p = _checkpoint_defaults(defaults or {}, top_k, top_p)
    sampled = not greedy and temperature is not None and temperature > 0
    if truncated and not sampled:
        raise UsageError("top_k/top_p need a temperature > 0 (sampling); without one "
                         "decoding is greedy and they would be ignored")
    try:
        return Sampling(temperature=float(temperature) if sampled else 0.0,
                        top_k=int(top_k or 0) if sampled else 0,
                        top_p=float(1.0 if top_p is None else top_p) if sampled else 1.0,
                        seed=int(seed or 0))
    except ValueError as err:
        raise UsageError(str(err)) from None


def _checkpoint_defaults(settings: Mapping, top_k, top_p) -> tuple:
    """(temperature, top_k, top_p): the checkpoint's where the caller left them open and it
    samples by default (transformers' `do_sample`); the caller's own otherwise."""
    if not settings.get("do_sample"):
        return None, top_k, top_p
    return (settings.get("temperature", 1.0),
            top_k if top_k is not None else settings.get("top_k"),
            top_p if top_p is not None else settings.get("top_p"))


def check_max_new_tokens(value) -> int:
    """max_new_tokens as an int >= 1 (UsageError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UsageError(f"max_new_tokens (--max-new-tokens) must be an integer >= 1, "
                         f"got {value!r}")
    return int(value)


def check_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """Stop strings as a tuple: one string or a sequence of non-empty strings."""
    if isinstance(stop, str):
        stops = (stop,)
    elif stop is None or isinstance(stop, Sequence):
        stops = tuple(stop or ())
    else:  # a number, a mapping, a set: not an ordered list of strings
        stops = (stop,)
    if not all(isinstance(s, str) and s for s in stops):
        raise UsageError(f"stop must be a non-empty string or a sequence of them, got {stop!r}")
    return stops


def check_prompts(config, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """UsageError for prompts this decoder cannot run with `max_new_tokens` (empty, ids
    outside the vocabulary, prompt + max_new_tokens - 1 past the model's maximum length);
    needs only the config, so front ends check before reading a byte of weights."""
    try:
        generate.check_prompts(config, prompt_ids, check_max_new_tokens(max_new_tokens))
    except ValueError as err:
        raise UsageError(str(err)) from None
