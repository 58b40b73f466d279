"""What a caller asks the engine for, and what it gets back (vLLM's names where they exist).

A `Request` is one prompt (token ids) with its own `SamplingParams`: every request of a batch
may differ in length limits, sampling and stop conditions; the step program takes them as
per-row arrays, so no combination compiles a program of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxaccel.errors import InputError

# finish_reason values: the model's EOS, a stop string or stop token id, or max_tokens.
FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings.

    max_tokens: new tokens at most (>= 1). temperature 0 means greedy (argmax); top_k 0 and
    top_p 1.0 mean no truncation. seed: the request's own random stream (its tokens do not
    depend on what else is batched with it); None: drawn from the engine's seed and the
    request's arrival number. stop: strings that end the request (the text is cut before
    the first; needs the engine's `detokenize`). stop_token_ids: ids that end it (kept in
    the output). ignore_eos: do not stop at the model's EOS ids. min_tokens: no stop
    condition (EOS, stop ids or strings) ends the request before it has this many tokens.
    logprobs: report each new token's log-probability and this many of the best (0-5;
    None: none).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "stop", _as_tuple(self.stop, str, "stop"))
        object.__setattr__(self, "stop_token_ids",
                           _as_tuple(self.stop_token_ids, int, "stop_token_ids"))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InputError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InputError(f"min_tokens must be an integer in [0, max_tokens], got "
                             f"{self.min_tokens!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int)
                                              and 0 <= self.logprobs <= 5):
            raise InputError(f"logprobs must be an integer in [0, 5], got {self.logprobs!r}")
        if not self.temperature >= 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise InputError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")


def _as_tuple(value, kind, name: str) -> tuple:
    if isinstance(value, str) and kind is str:
        values = (value,)
    elif value is None or isinstance(value, (list, tuple)):
        values = tuple(value or ())
    else:  # a bare number, a mapping, a set, bytes: not a list of `kind`s
        raise InputError(f"{name} must be a list of {kind.__name__}s, got {value!r}")
    if not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise InputError(f"{name} must be a list of {kind.__name__}s, got {value!r}")
    return values


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt for the engine: `request_id` names it in outputs (any hashable)."""

    request_id: object
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = SamplingParams()

    def __post_init__(self):
        ids = tuple(self.prompt_token_ids)
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InputError(f"request {self.request_id!r}: prompt_token_ids must be a "
                             f"non-empty list of ints")
        object.__setattr__(self, "prompt_token_ids", ids)


@dataclasses.dataclass
class RequestOutput:
    """A request's state as the engine reports it after a step: the new tokens so far (all
    of them, not a delta), `text` when the engine detokenizes, `finish_reason` once done."""

    request_id: object
    prompt_token_ids: tuple[int, ...]
    token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    # With SamplingParams.logprobs: per new token, (its log-probability, [(id, log-probability)
    # of the best `logprobs` tokens, best first]).
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    # Timestamps (time.perf_counter seconds) for the benchmark: arrival, first token, finish.
    arrival_s: float = 0.0
    first_token_s: float | None = None
    finish_s: float | None = None


def requests_from(prompts: Sequence[Sequence[int]],
                  params: SamplingParams | Sequence[SamplingParams]) -> list[Request]:
    """Requests numbered 0..n-1 from prompts and one params or one per prompt."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise InputError(f"{len(params)} sampling settings for {len(prompts)} prompts")
    return [Request(i, tuple(p), s) for i, (p, s) in enumerate(zip(prompts, params))]
