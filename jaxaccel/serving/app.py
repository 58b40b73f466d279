"""The HTTP face: a FastAPI app over an `OpenAIServer`, and `serve` that runs it under uvicorn.

The model loads on a thread after the socket is open, so `/health` answers 503 while weights
restore and programs compile, and 200 after. Every failure is OpenAI's error object: bad
JSON, wrong types and refused values are 400 naming the field (pydantic's `loc`), never a
500 with a traceback. SIGTERM (uvicorn's handler) stops accepting connections, lets running
requests finish for up to `drain_timeout` seconds, then the engine stops and `serve` returns.
"""

from __future__ import annotations

import contextlib
import hmac
import threading
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from jaxaccel.errors import InputError, UsageError
from jaxaccel.serving.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from jaxaccel.serving.server import ClientGone


class ServerState:
    """What the routes see: the server once loaded (None before), or the load's error."""

    def __init__(self, load: Callable[[], object], api_key: str | None = None):
        self.load, self.api_key = load, api_key
        self.server = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.on_failure: Callable[[], None] = lambda: None  # `serve` stops uvicorn

    def load_now(self) -> None:
        try:
            server = self.load()
            server.start()
            self.server = server
        except BaseException as err:  # noqa: BLE001 - /health and the command report it
            self.error = err
            self.on_failure()
        self.ready.set()

    def require(self):
        if self.server is None:
            message = (f"the model failed to load: {self.error}" if self.error
                       else "the model is still loading; poll GET /health")
            raise ApiError(503, message, type_="server_error")
        return self.server


def create_app(state: ServerState, load_in_background: bool = True) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        if load_in_background:
            threading.Thread(target=state.load_now, name="jaxaccel-load", daemon=True).start()
        yield
        if state.server is not None:  # uvicorn drained the connections already
            state.server.stop(drain=False, timeout=30)

    app = FastAPI(title="jaxaccel", lifespan=lifespan, docs_url=None, redoc_url=None)
    _errors(app)
    _auth(app, state)
    _routes(app, state)
    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(ClientGone)
    async def gone(request, err):
        return Response(status_code=499)  # nginx's "client closed request": no one reads it

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('msg')}", None)
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        field = loc[0] if loc else None
        where = ".".join(loc) or "body"
        return _error(400, f"{where}: {first.get('msg', 'invalid')}", field)

    @app.exception_handler(InputError)
    @app.exception_handler(UsageError)
    async def refused(request, err):
        return _error(400, str(err), None)

    @app.exception_handler(Exception)
    async def unexpected(request, err):
        return _error(500, f"{type(err).__name__}: {err}", None, "server_error")


def _error(status, message, param, type_="invalid_request_error") -> JSONResponse:
    return JSONResponse(ApiError(status, message, param, type_).body(), status_code=status)


def _auth(app: FastAPI, state: ServerState) -> None:
    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if state.api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                return _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                              None, "authentication_error")
        return await call_next(request)


def _routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        if state.server is None:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        server = state.require()
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return state.require().models()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        result = await state.require().completions(body, request.is_disconnected)
        return _respond(result)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        result = await state.require().chat(body, request.is_disconnected)
        return _respond(result)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        return await state.require().embeddings(body)


def _respond(result):
    if isinstance(result, dict):
        return result
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def serve(state: ServerState, host: str, port: int, drain_timeout: float = 30.0,
          log_level: str = "warning") -> None:
    """Run the app until SIGTERM/SIGINT, or until the model fails to load (then
    `state.error` says why); running requests get `drain_timeout` seconds."""
    import uvicorn  # deferred: only the serve command needs the server itself

    config = uvicorn.Config(create_app(state), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_timeout, access_log=False)
    server = uvicorn.Server(config)
    state.on_failure = lambda: setattr(server, "should_exit", True)
    server.run()
