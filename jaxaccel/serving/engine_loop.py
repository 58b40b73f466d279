"""The engine on a thread of its own, so HTTP never waits for a step and a step never waits
for HTTP.

Callers (the asyncio side) `submit` a request with a sink, a callable that the engine thread
calls with an `Update` each step the request gets a token, and `abort` it when the client
goes away. Both only queue: the engine thread applies them between steps (the engine is not
thread-safe), so an abort frees the request's pages before the next step runs. `stop`
finishes what runs (a drain) or aborts it all.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from jaxaccel.engine.requests import Request
from jaxaccel.errors import InputError
from jaxaccel.serving.protocol import ApiError


@dataclasses.dataclass(frozen=True)
class Update:
    """A request's state after a step: all its token ids so far; `error` if it failed."""

    token_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: str | None = None
    error: Exception | None = None
    logprobs: tuple = ()  # per token so far, as RequestOutput.logprobs (when asked)


Sink = Callable[[Update], None]


class EngineLoop:
    """`engine`: an LLMEngine. `max_waiting`: requests queued (not yet running) beyond which
    `submit` answers 429. `metrics`: a `serving.metrics.Metrics`."""

    def __init__(self, engine, metrics, max_waiting: int | None = None):
        self.engine, self.metrics, self.max_waiting = engine, metrics, max_waiting
        self._cond = threading.Condition()
        self._adds: list[tuple[Request, Sink]] = []
        self._aborts: list[object] = []
        self._sinks: dict[object, Sink] = {}  # engine thread only
        self._started: dict[object, tuple[float, float | None]] = {}  # arrival, first token
        self._stopping, self._drain = False, True
        self._thread = threading.Thread(target=self._run, name="jaxaccel-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request, sink: Sink) -> None:
        """Queue `request`; ApiError 429 when the queue is full or the server stops, 400
        when the engine refuses it (InputError, naming what is wrong)."""
        with self._cond:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", type_="server_error")
            waiting = len(self._adds) + self.engine.num_waiting
            if self.max_waiting is not None and waiting >= self.max_waiting:
                raise ApiError(429, f"too many requests waiting ({waiting}, the server's "
                               f"--max-waiting); retry later", type_="rate_limit_error",
                               code="rate_limit_exceeded")
            self.engine.check(request)
            self._adds.append((request, sink))
            self._cond.notify()

    def abort(self, request_id) -> None:
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Accept nothing more; finish the requests in flight (`drain`) or abort them; wait
        for the thread up to `timeout` seconds."""
        with self._cond:
            self._stopping, self._drain = True, drain
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def idle(self) -> bool:
        return not self._adds and not self.engine.has_unfinished

    # The engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._adds or self._aborts or self._stopping
                           or self.engine.has_unfinished):
                    self._cond.wait()
                if self._stopping and not self._drain:
                    self._aborts += list(self._sinks) + [r.request_id for r, _ in self._adds]
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
                if self._stopping and not adds and not self.engine.has_unfinished:
                    self._fail_all(adds, ApiError(503, "the server stopped"))
                    return
            self._apply(adds, aborts)
            if self.engine.has_unfinished:
                self._step()
            self.metrics.observe_engine(self.engine)

    def _apply(self, adds, aborts) -> None:
        for request_id in aborts:
            self.engine.abort_request(request_id)
            sink = self._sinks.pop(request_id, None)
            self._started.pop(request_id, None)
            if sink is not None:
                sink(Update((), True, "abort"))
        for request, sink in adds:
            if request.request_id in aborts:
                sink(Update((), True, "abort"))
                continue
            try:
                self.engine.add_request(request)
            except InputError as err:
                sink(Update((), True, None, ApiError(400, str(err))))
                continue
            self._sinks[request.request_id] = sink
            self._started[request.request_id] = (time.perf_counter(), None)
            self.metrics.prompt_tokens.inc(len(request.prompt_token_ids))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as err:  # noqa: BLE001 - every request hears it, the server lives
            failed = ApiError(500, f"the engine failed: {type(err).__name__}: {err}",
                              type_="server_error")
            for request_id in list(self._sinks):
                self.engine.abort_request(request_id)
            self._fail_all([], failed)
            return
        now = time.perf_counter()
        for out in outputs:
            self.metrics.generation_tokens.inc(1)
            self._timing(out, now)
            sink = self._sinks.get(out.request_id)
            if out.finished:
                self._sinks.pop(out.request_id, None)
                self.metrics.requests.labels(out.finish_reason).inc()
            if sink is not None:
                sink(Update(tuple(out.token_ids), out.finished, out.finish_reason,
                            logprobs=tuple(out.logprobs or ())))

    def _timing(self, out, now: float) -> None:
        arrival, first = self._started.get(out.request_id, (now, now))
        if first is None:
            self.metrics.ttft.observe(now - arrival)
            first = now
            self._started[out.request_id] = (arrival, first)
        if out.finished:
            self._started.pop(out.request_id, None)
            if len(out.token_ids) > 1:
                self.metrics.tpot.observe((now - first) / (len(out.token_ids) - 1))

    def _fail_all(self, adds, error: ApiError) -> None:
        for _, sink in adds:
            sink(Update((), True, None, error))
        for sink in self._sinks.values():
            sink(Update((), True, None, error))
        self._sinks.clear()
        self._started.clear()
