"""Request bodies of the OpenAI API as pydantic models (the fields vLLM accepts), and the
error object every failure answers with.

Validation is pydantic's: a wrong type names its field (`loc`), which `ApiError` carries as
OpenAI's `param`. Fields that are accepted for compatibility but not served (n > 1,
penalties, suffix, best_of, the prompt's logprobs with echo) are refused by `unsupported` with a 400 naming them, never
silently ignored; unknown extra fields are ignored, as OpenAI's server does.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

TokenIds = list[StrictInt]
Prompt = Union[str, list[str], TokenIds, list[TokenIds]]


class ApiError(Exception):
    """An error answered as OpenAI's error object: HTTP `status`, `message`, the offending
    request field (`param`), OpenAI's `type` and `code`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (
            status, message, param, type_, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: Optional[StrictBool] = True


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's and vLLM's extensions)."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[StrictInt] = None
    seed: Optional[StrictInt] = None
    stop: Optional[Union[str, list[str]]] = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    repetition_penalty: Optional[float] = None
    user: Optional[str] = None
    # vLLM's extensions
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = 0
    stop_token_ids: Optional[list[StrictInt]] = None
    return_token_ids: StrictBool = False


class CompletionRequest(_Sampling):
    prompt: Prompt
    echo: StrictBool = False
    logprobs: Optional[StrictInt] = None
    suffix: Optional[str] = None
    best_of: Optional[StrictInt] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool calls, names: passed to the template

    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[StrictInt] = None
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[StrictInt] = None
    user: Optional[str] = None


def unsupported(body: _Sampling) -> None:
    """ApiError 400 naming the first field asked for that this server does not serve."""
    if body.n != 1:
        raise ApiError(400, f"n must be 1 (got {body.n}): one choice per prompt is served",
                       "n")
    for field in ("presence_penalty", "frequency_penalty"):
        if getattr(body, field) not in (None, 0.0):
            raise ApiError(400, f"{field} is not supported; leave it at 0", field)
    if body.repetition_penalty not in (None, 1.0):
        raise ApiError(400, "repetition_penalty is not supported; leave it at 1",
                       "repetition_penalty")
    if isinstance(body, CompletionRequest):
        if body.logprobs is not None and not 0 <= body.logprobs <= 5:
            raise ApiError(400, f"logprobs must be in [0, 5], got {body.logprobs}", "logprobs")
        if body.logprobs is not None and body.echo:
            raise ApiError(400, "echo with logprobs (the prompt's log-probabilities) is not "
                           "supported; drop one", "echo")
        if body.suffix:
            raise ApiError(400, "suffix is not supported", "suffix")
        if body.best_of not in (None, 1):
            raise ApiError(400, "best_of must be 1", "best_of")
    if isinstance(body, ChatCompletionRequest) and body.top_logprobs is not None:
        if not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if not 0 <= body.top_logprobs <= 5:
            raise ApiError(400, f"top_logprobs must be in [0, 5], got {body.top_logprobs}",
                           "top_logprobs")
