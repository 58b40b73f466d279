"""OpenAI's batch file format through an `OpenAIServer`, no HTTP (`jaxaccel run-batch`).

Each input line: {"custom_id", "method": "POST", "url": "/v1/completions" |
"/v1/chat/completions" | "/v1/embeddings", "body": {...}}, as `vllm run-batch` reads it.
Each output line, in input order: {"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}. A line that is not a request (bad JSON, a missing field, an
unknown url) gets `response: null` and `error: {"code", "message"}`; a request the endpoint
refuses gets its status code and OpenAI's error object as the body. No line is lost.
All lines run concurrently, so the engine batches them.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from pydantic import ValidationError

from jaxaccel.serving.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)

ENDPOINTS = {"/v1/completions": ("completions", CompletionRequest),
             "/v1/chat/completions": ("chat", ChatCompletionRequest),
             "/v1/embeddings": ("embeddings", EmbeddingRequest)}


class LineError(Exception):
    """A line that is not a batch request."""


async def run_lines(server, lines: list[str]) -> list[dict]:
    """One output record per non-blank input line, in order."""
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    return list(await asyncio.gather(*(one_line(server, n, line) for n, line in numbered)))


async def one_line(server, number: int, line: str) -> dict:
    record_id = f"batch_req_{uuid.uuid4().hex}"
    custom_id = None
    try:
        record = _parse(number, line)
        custom_id = record.get("custom_id")
        _check(number, record)
        method, model_type = ENDPOINTS[record["url"]]
        body = _body(number, model_type, record["body"])
        result = await getattr(server, method)(body)
        return _output(record_id, custom_id, 200, result)
    except ApiError as err:
        return _output(record_id, custom_id, err.status, err.body())
    except LineError as err:
        return {"id": record_id, "custom_id": custom_id, "response": None,
                "error": {"code": "invalid_request", "message": str(err)}}


def _parse(number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except ValueError as err:
        raise LineError(f"line {number}: not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise LineError(f"line {number}: expected a JSON object")
    return record


def _check(number: int, record: dict) -> None:
    missing = [k for k in ("custom_id", "url", "body") if k not in record]
    if missing:
        raise LineError(f"line {number}: missing field(s) {missing}")
    if record.get("method", "POST") != "POST":
        raise LineError(f"line {number}: method must be POST, got {record['method']!r}")
    if record["url"] not in ENDPOINTS:
        raise LineError(f"line {number}: url must be one of {sorted(ENDPOINTS)}, got "
                        f"{record['url']!r}")


def _body(number: int, model_type, body):
    if not isinstance(body, dict):
        raise LineError(f"line {number}: body must be a JSON object")
    try:
        parsed = model_type.model_validate({**body, "stream": False} if
                                           "stream" in model_type.model_fields else body)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(x) for x in first["loc"]) or "body"
        raise ApiError(400, f"{field}: {first['msg']}", str(first["loc"][0])
                       if first["loc"] else None) from None
    return parsed


def _output(record_id: str, custom_id, status: int, body: dict) -> dict:
    return {"id": record_id, "custom_id": custom_id,
            "response": {"status_code": status, "request_id": record_id, "body": body},
            "error": None}
