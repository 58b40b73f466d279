"""The HTTP load generator of `jaxaccel bench serve`, for any OpenAI-compatible server.

Requests (the throughput benchmark's workload: token-id prompts, `max_tokens` each, EOS
ignored, greedy) are sent as streamed /v1/completions, open-loop at Poisson arrivals of
`rate` requests/s (inf: all at once), at most `max_concurrency` in flight. Per request:
time to first token (first chunk with text or tokens), time per output token after it
((end - first) / (tokens - 1)), output tokens (the final usage chunk, else chunks counted).
No jax here.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import numpy as np


async def _one(http, url: str, model: str, work: dict) -> dict:
    body = {"model": model, "prompt": work["prompt_ids"], "max_tokens": work["max_new_tokens"],
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, chunks, usage = time.perf_counter(), None, 0, None
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                first = first or time.perf_counter()
                chunks += 1
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    tokens = (usage or {}).get("completion_tokens") or chunks
    return {"ttft_s": (first or end) - start, "latency_s": end - start, "tokens": tokens,
            "tpot_s": (end - first) / (tokens - 1) if first and tokens > 1 else None}


async def _run(url: str, model: str, work: list[dict], rate: float, max_concurrency: int | None,
               seed: int, api_key: str | None) -> tuple[list[dict], float]:
    import httpx  # deferred: only this benchmark needs it

    rng = np.random.default_rng(seed)
    limit = asyncio.Semaphore(max_concurrency or len(work))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def gated(http, w):
        async with limit:
            return await _one(http, url, model, w)

    async with httpx.AsyncClient(timeout=None, headers=headers,
                                 limits=httpx.Limits(max_connections=None)) as http:
        start = time.perf_counter()
        tasks = []
        for w in work:
            tasks.append(asyncio.create_task(gated(http, w)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.exponential(1.0 / rate))
        results = await asyncio.gather(*tasks, return_exceptions=True)
    duration = time.perf_counter() - start
    return [r if isinstance(r, dict) else {"error": repr(r)} for r in results], duration


def _percentiles(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def measure(url: str, model: str, work: list[dict], rate: float = math.inf,
            max_concurrency: int | None = None, seed: int = 0,
            api_key: str | None = None) -> dict:
    """One run of `work` against `url`: request throughput, output tok/s, TTFT and TPOT
    p50/p90/p99 (seconds), and the failed requests' count and first error."""
    results, duration = asyncio.run(_run(url.rstrip("/"), model, work, rate, max_concurrency,
                                         seed, api_key))
    done = [r for r in results if "error" not in r]
    failed = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in done)
    return {"request_rate": rate, "max_concurrency": max_concurrency, "requests": len(work),
            "completed": len(done), "failed": len(failed), "first_error": failed[0] if failed
            else None, "duration_s": duration, "request_throughput": len(done) / duration,
            "output_tok_s": tokens / duration, "output_tokens": tokens,
            "ttft_s": _percentiles(r["ttft_s"] for r in done),
            "tpot_s": _percentiles(r["tpot_s"] for r in done)}
