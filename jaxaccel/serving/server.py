"""The OpenAI endpoints' logic, without HTTP: what `app.py` routes to and `run-batch` calls.

`OpenAIServer` holds one model: a decoder behind an `EngineLoop` (completions, chat) or an
encoder (embeddings). Each handler checks its request completely (a 400 `ApiError` naming
the field) before anything runs, then returns a response dict, or for `stream: true` an
async iterator of server-sent-event lines ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np

from jaxaccel.engine.frontend import engine_for
from jaxaccel.engine.requests import FINISH_LENGTH, Request, SamplingParams
from jaxaccel.errors import InputError
from jaxaccel.serving import chat as chat_template
from jaxaccel.serving.engine_loop import EngineLoop, Update
from jaxaccel.serving.metrics import Metrics
from jaxaccel.serving.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    unsupported,
)
from jaxaccel.serving.text import ChoiceStream

Disconnected = Callable[[], Awaitable[bool]]


class ClientGone(Exception):
    """The client disconnected: its requests are aborted and nothing more is sent."""


class OpenAIServer:
    """`model`: a `jaxaccel.Model`; `generator`: its compiled Generator (decoders) or None.
    `engine_args`: LLMEngine settings (max_num_seqs, max_num_batched_tokens, ...)."""

    def __init__(self, model, generator=None, *, served_model_name: str,
                 chat_template_file=None, engine_args: dict | None = None,
                 max_waiting: int | None = None):
        self.model, self.name = model, served_model_name
        self.tokenizer = model.tokenizer
        self.metrics = Metrics()
        self.created = int(time.time())
        self.loop: EngineLoop | None = None
        self.template = None
        self._embed_lock = asyncio.Lock()
        if model.task == "generate":
            self.max_length = int(model.config.max_length)
            engine = engine_for(generator, eos_token_ids=model.eos_token_ids,
                                detokenize=self.tokenizer.decode if self.tokenizer else None,
                                **(engine_args or {}))
            self.loop = EngineLoop(engine, self.metrics, max_waiting)
            self.template = chat_template.load(chat_template_file, model.loaded.path)

    @property
    def engine(self):
        return self.loop.engine if self.loop else None

    def start(self) -> None:
        """Compile the engine's first programs (one short request), then start its thread."""
        if self.loop is not None:
            self.engine.generate([Request("warmup", (0,), SamplingParams(max_tokens=2))])
            self.loop.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        if self.loop is not None:
            self.loop.stop(drain, timeout)

    # /v1/models -------------------------------------------------------------------------------

    def models(self) -> dict:
        card = {"id": self.name, "object": "model", "created": self.created,
                "owned_by": "jaxaccel", "root": str(self.model.loaded.path)}
        if self.loop is not None:
            card["max_model_len"] = self.max_length
        return {"object": "list", "data": [card]}

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise ApiError(400, f"model {name!r} is not served here; this server serves "
                           f"{self.name!r}", "model", code="model_not_found")

    # /v1/completions --------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, disconnected: Disconnected | None = None):
        self._check_generation(body)
        prompts = self._completion_prompts(body.prompt)
        params = [self._params(body, len(p), body.max_tokens or 16, "max_tokens")
                  for p in prompts]
        job = _Job(self, "cmpl", prompts, params, body)
        if body.stream:
            return job.stream(disconnected, chat=False)
        return await job.response(disconnected, chat=False)

    def _completion_prompts(self, prompt) -> list[list[int]]:
        items = [prompt] if isinstance(prompt, str) or (
            prompt and isinstance(prompt[0], int)) else list(prompt)
        if not items:
            raise ApiError(400, "prompt is empty; give text or token ids", "prompt")
        return [self._prompt_ids(p, "prompt") for p in items]

    def _prompt_ids(self, item, field: str) -> list[int]:
        if isinstance(item, str):
            if not item:
                raise ApiError(400, f"{field} is an empty string", field)
            if self.tokenizer is None:
                raise ApiError(400, f"{field}: this checkpoint has no tokenizer.json; give "
                               f"token ids", field)
            ids = self.tokenizer.encode_one(item)
        else:
            ids = list(item)
        if not ids:
            raise ApiError(400, f"{field} has no tokens", field)
        if len(ids) > self.max_length:
            raise ApiError(400, f"{field} has {len(ids)} tokens; this model's maximum context "
                           f"length is {self.max_length}", field)
        vocab = int(self.model.config.vocab_size)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"{field}: token ids {bad[:5]} are outside the vocabulary "
                           f"[0, {vocab})", field)
        return ids

    # /v1/chat/completions ---------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, disconnected: Disconnected | None = None):
        self._check_generation(body)
        if self.template is None:
            raise ApiError(400, chat_template.NO_TEMPLATE, "messages")
        if self.tokenizer is None:
            raise ApiError(400, "chat needs the checkpoint's tokenizer.json", "messages")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            text = self.template.render(messages, body.add_generation_prompt,
                                        **(body.chat_template_kwargs or {}))
        except InputError as err:
            raise ApiError(400, str(err), "messages") from None
        # transformers' apply_chat_template(tokenize=True): the template holds the specials
        ids = self.tokenizer.encode([text], 1 << 30, add_special_tokens=False).ids[0]
        prompt = self._prompt_ids(ids, "messages")
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        limit = body.max_completion_tokens or body.max_tokens
        params = [self._params(body, len(prompt), limit or self.max_length - len(prompt) + 1,
                               field)]
        job = _Job(self, "chatcmpl", [prompt], params, body)
        if body.stream:
            return job.stream(disconnected, chat=True)
        return await job.response(disconnected, chat=True)

    # Shared checks ----------------------------------------------------------------------------

    def _check_generation(self, body) -> None:
        self.check_model(body.model)
        if self.loop is None:
            raise ApiError(400, f"{self.name} is an embedding model ({self.model.family}); "
                           f"use /v1/embeddings", "model")
        unsupported(body)

    def _params(self, body, prompt_len: int, max_tokens: int, field: str) -> SamplingParams:
        if body.stop and self.tokenizer is None:
            raise ApiError(400, "stop strings need the checkpoint's tokenizer.json; use "
                           "stop_token_ids", "stop")
        if max_tokens < 1:
            raise ApiError(400, f"{field} must be >= 1, got {max_tokens}", field)
        if prompt_len + max_tokens - 1 > self.max_length:
            raise ApiError(400, f"{field} = {max_tokens} with a prompt of {prompt_len} tokens "
                           f"exceeds this model's maximum context length {self.max_length} "
                           f"(prompt + {field} - 1 must be <= it)", field)
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_k=max(body.top_k or 0, 0), top_p=1.0 if body.top_p is None else body.top_p,
                seed=body.seed, stop=body.stop or (), stop_token_ids=body.stop_token_ids or (),
                ignore_eos=body.ignore_eos, min_tokens=body.min_tokens,
                logprobs=_logprobs_asked(body))
        except InputError as err:
            message = str(err)
            raise ApiError(400, message, message.split(" ", 1)[0]) from None

    # /v1/embeddings ---------------------------------------------------------------------------

    async def embeddings(self, body: EmbeddingRequest) -> dict:
        self.check_model(body.model)
        if self.model.task != "embed":
            raise ApiError(400, f"{self.name} is not an embedding model ({self.model.family}); "
                           f"use /v1/completions", "model")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts or not all(texts):
            raise ApiError(400, "input must be a non-empty string or list of non-empty "
                           "strings", "input")
        async with self._embed_lock:  # one embedding batch on the devices at a time
            vectors = await asyncio.to_thread(self.model.embed, texts)
        if body.dimensions is not None and body.dimensions != vectors.shape[1]:
            raise ApiError(400, f"dimensions must be {vectors.shape[1]} for this model",
                           "dimensions")
        tokens = sum(len(self.tokenizer.encode_one(t)) for t in texts)
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": self.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _logprobs_asked(body) -> int | None:
    """How many best tokens' logprobs a request asks for (None: no logprobs at all)."""
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def _first_by_text(pairs) -> dict:
    """{token text: logprob}, best first; ids that decode alike (partial bytes all show as
    U+FFFD) keep the best one's."""
    found: dict = {}
    for text, value in pairs:
        found.setdefault(text, value)
    return found


def _encode(vector: np.ndarray, encoding: str):
    if encoding == "base64":  # little-endian float32, as OpenAI's client decodes it
        return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()
    return vector.astype(float).tolist()


def _finish_reason(reason: str | None) -> str | None:
    """The engine's eos/stop/length as OpenAI's stop/length."""
    if reason is None:
        return None
    return "length" if reason == FINISH_LENGTH else "stop" if reason in ("eos", "stop") else reason


class _Job:
    """One HTTP request's prompts in the engine: submitted together, their updates merged."""

    def __init__(self, server: OpenAIServer, kind: str, prompts, params, body):
        self.server, self.prompts, self.params, self.body = server, prompts, params, body
        self.id = f"{kind}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        tokenizer = server.tokenizer
        self.choices = [ChoiceStream(tokenizer, p, s.stop) for p, s in zip(prompts, params)]
        self.reasons: list[str | None] = [None] * len(prompts)
        self.logprobs: list[list] = [[] for _ in prompts]  # per choice, per token
        self.queue: asyncio.Queue = asyncio.Queue()
        self._submit()

    def _submit(self) -> None:
        loop = asyncio.get_running_loop()
        submitted = []
        try:
            for i, (prompt, params) in enumerate(zip(self.prompts, self.params)):
                def sink(update, i=i):
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, update))
                self.server.loop.submit(Request(f"{self.id}-{i}", prompt, params), sink)
                submitted.append(i)
        except InputError as err:
            self.abort(submitted)
            raise ApiError(400, str(err), "prompt") from None
        except ApiError:
            self.abort(submitted)
            raise

    def abort(self, indices=None) -> None:
        for i in range(len(self.prompts)) if indices is None else indices:
            if self.reasons[i] is None:
                self.server.loop.abort(f"{self.id}-{i}")

    async def updates(self, disconnected: Disconnected | None) -> AsyncIterator[tuple]:
        """(choice index, new text, new ids, finish reason, new logprobs) until every choice
        finished;
        aborts the rest when the client goes away or the consumer stops early."""
        try:
            while any(r is None for r in self.reasons):
                i, update = await self._next(disconnected)
                if update.error is not None:
                    raise update.error
                text, ids = self.choices[i].update(update.token_ids, update.finished)
                lps = list(update.logprobs[len(self.logprobs[i]):])
                self.logprobs[i] += lps
                if update.finished:
                    self.reasons[i] = update.finish_reason or "abort"
                yield i, text, ids, _finish_reason(self.reasons[i]), lps
        finally:
            self.abort()

    async def _next(self, disconnected: Disconnected | None) -> tuple[int, Update]:
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), 0.25)
            except asyncio.TimeoutError:
                if disconnected is not None and await disconnected():
                    raise ClientGone from None

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _prompt_text(self, i: int) -> str:
        tok = self.server.tokenizer
        return tok.decode(self.prompts[i]) if tok is not None else ""

    # Whole responses ----------------------------------------------------------------------------

    async def response(self, disconnected, chat: bool) -> dict:
        texts = [""] * len(self.prompts)
        async for i, text, _, _, _ in self.updates(disconnected):
            texts[i] += text
        choices = []
        for i, text in enumerate(texts):
            reason = _finish_reason(self.reasons[i])
            lps = self._logprobs(self.choices[i].token_ids, self.logprobs[i], 0, chat)
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": text},
                          "logprobs": lps, "finish_reason": reason}
            else:
                echo = self._prompt_text(i) if self.body.echo else ""
                choice = {"index": i, "text": echo + text, "logprobs": lps,
                          "finish_reason": reason}
            if self.body.return_token_ids:
                choice["prompt_token_ids"] = list(self.prompts[i])
                choice["token_ids"] = list(self.choices[i].token_ids)
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion" if chat else "text_completion",
                "created": self.created, "model": self.server.name, "choices": choices,
                "usage": self.usage()}

    # Streams ------------------------------------------------------------------------------------

    async def stream(self, disconnected, chat: bool) -> AsyncIterator[str]:
        first = [True] * len(self.prompts)
        try:
            if chat:
                yield self._sse(self._chunk(0, {"role": "assistant", "content": ""}, None, [],
                                            chat, True))
                first[0] = False
            elif self.body.echo:
                for i in range(len(self.prompts)):
                    yield self._sse(self._chunk(i, self._prompt_text(i), None, [], chat, True))
                    first[i] = False
            sent = [0] * len(self.prompts)
            async for i, text, ids, reason, lps in self.updates(disconnected):
                # Without a tokenizer every token is a (text-less) chunk, so clients still
                # see tokens arrive.
                if text or reason or self.body.return_token_ids or lps or not \
                        self.server.tokenizer:
                    content = {"content": text} if chat and text else {} if chat else text
                    chunk = self._chunk(i, content, reason, ids, chat, first[i])
                    chunk["choices"][0]["logprobs"] = self._logprobs(ids, lps, sent[i], chat)
                    yield self._sse(chunk)
                    first[i] = False
                sent[i] += len(text)
            yield self._sse({"id": self.id, "object": self._object(chat),
                             "created": self.created, "model": self.server.name,
                             "choices": [], "usage": self.usage()})
        except ClientGone:
            return  # `updates` aborted them: no one reads the rest
        except ApiError as err:
            yield self._sse(err.body())
        yield "data: [DONE]\n\n"

    def _chunk(self, i, content, reason, ids, chat: bool, first: bool) -> dict:
        choice = {"index": i, "delta" if chat else "text": content, "logprobs": None,
                  "finish_reason": reason}
        if self.body.return_token_ids:
            if first:
                choice["prompt_token_ids"] = list(self.prompts[i])
            choice["token_ids"] = list(ids)
        return {"id": self.id, "object": self._object(chat), "created": self.created,
                "model": self.server.name, "choices": [choice]}

    def _logprobs(self, ids, entries, offset: int, chat: bool) -> dict | None:
        """OpenAI's logprobs object of tokens `ids` (completions: tokens, token_logprobs,
        top_logprobs, text_offset from `offset`; chat: content)."""
        if _logprobs_asked(self.body) is None:
            return None
        name = self._token_text
        if chat:
            return {"content": [
                {"token": name(t), "logprob": lp, "bytes": list(name(t).encode()),
                 "top_logprobs": [{"token": name(j), "logprob": v,
                                   "bytes": list(name(j).encode())} for j, v in top]}
                for t, (lp, top) in zip(ids, entries)]}
        tokens = [name(t) for t in ids]
        offsets = np.cumsum([offset] + [len(t) for t in tokens])[:-1].tolist()
        return {"tokens": tokens, "token_logprobs": [lp for lp, _ in entries],
                "top_logprobs": [_first_by_text((name(j), v) for j, v in top)
                                 for _, top in entries],
                "text_offset": offsets}

    def _token_text(self, token: int) -> str:
        tok = self.server.tokenizer
        return tok.decode([token]) if tok is not None else f"token_id:{token}"

    @staticmethod
    def _object(chat: bool) -> str:
        return "chat.completion.chunk" if chat else "text_completion"

    @staticmethod
    def _sse(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
