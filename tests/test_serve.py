"""`jaxaccel serve` driven by real clients: the official `openai` client (completions, chat,
streaming, embeddings) and raw httpx for the error cases, on a tiny random decoder with a
byte-level BPE tokenizer and the bundled MiniLM. References: `Model.generate` (the static
runtime, not the engine), the non-streamed answer for each stream, `Model.embed`."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from serving_fixture import CHAT_TEMPLATE, ThreadServer, free_port, write_decoder

from jaxaccel.serving.app import ServerState
from jaxaccel.serving.batch import run_lines
from jaxaccel.serving.load import open_server

openai = pytest.importorskip("openai")
NAME = "tiny"
PROMPTS = ["The quick brown", "héllo wörld", "JAX runs"]


@pytest.fixture(scope="module")
def decoder_ckpt(tmp_path_factory):
    return write_decoder(tmp_path_factory.mktemp("serve") / "decoder")


@pytest.fixture(scope="module")
def served(decoder_ckpt):
    state = ServerState(lambda: open_server(decoder_ckpt, served_model_name=NAME,
                                            engine_args={"max_num_seqs": 16}))
    server = ThreadServer(state)
    assert httpx.get(f"{server.url}/health").status_code in (200, 503)
    state.ready.wait(300)
    assert state.error is None and httpx.get(f"{server.url}/health").status_code == 200
    yield state, server.url
    server.stop()
    state.server.stop(drain=False, timeout=30)


def client(url, api_key="none"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, timeout=300, max_retries=0)


def state_url(served):
    return served[1]


def wait_idle(state, seconds=60):
    """Until the engine has nothing in flight (its pages are then all free)."""
    deadline = time.time() + seconds
    while time.time() < deadline and not state.server.loop.idle:
        time.sleep(0.05)
    return state.server.engine.pool.used_count


def test_greedy_completions_equal_model_generate(served):
    state, url = served
    result = client(url).completions.create(
        model=NAME, prompt=PROMPTS, max_tokens=6, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True})
    expected = state.server.model.generate(PROMPTS, max_new_tokens=6, greedy=True,
                                           ignore_eos=True)
    assert [c.index for c in result.choices] == [0, 1, 2]
    for choice, want in zip(result.choices, expected):
        assert choice.model_extra["token_ids"] == want.token_ids
        assert choice.model_extra["prompt_token_ids"] == want.prompt_token_ids
        assert choice.text == want.text and choice.finish_reason == "length"
    assert result.usage.completion_tokens == 18
    assert result.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    # token-id prompts answer the same, and echo puts the prompt's text first
    ids = expected[0].prompt_token_ids
    again = client(url).completions.create(model=NAME, prompt=ids, max_tokens=6,
                                           temperature=0, echo=True,
                                           extra_body={"ignore_eos": True})
    assert again.choices[0].text == PROMPTS[0] + expected[0].text


def test_chat_renders_the_checkpoint_template(served):
    import jinja2

    state, url = served
    messages = [{"role": "user", "content": "hi"}]  # short: prompt + reply fit one KV page
    reply = client(url).chat.completions.create(model=NAME, messages=messages, max_tokens=5,
                                                temperature=0, extra_body={"ignore_eos": True})
    text = jinja2.Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    tok = state.server.tokenizer
    ids = tok.encode([text], 1000, add_special_tokens=False).ids[0]
    # the rendered prompt as token ids through /v1/completions (which equals Model.generate)
    want = client(url).completions.create(model=NAME, prompt=ids, max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True}).choices
    assert reply.choices[0].message.content == want[0].text
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 5
    chunks = list(client(url).chat.completions.create(
        model=NAME, messages=messages, max_tokens=5, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == want[0].text and chunks[-1].usage.completion_tokens == 5


def test_64_concurrent_streams_equal_their_non_streamed_answers(served):
    state, url = served

    async def one(aclient, i):
        args = dict(model=NAME, prompt=PROMPTS[i % 3], max_tokens=5, temperature=1.0,
                    seed=i, extra_body={"ignore_eos": True})
        whole = await aclient.completions.create(**args)
        pieces = []
        async for chunk in await aclient.completions.create(stream=True, **args):
            pieces += [c.text for c in chunk.choices]
        return whole.choices[0].text, "".join(pieces), pieces

    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=300,
                                     max_retries=0)
        return await asyncio.gather(*(one(aclient, i) for i in range(64)))

    results = asyncio.run(main())
    assert all(whole == streamed for whole, streamed, _ in results)
    assert len({whole for whole, _, _ in results}) > 10  # seeds differ: answers differ
    # no delta ends inside a character (the decoder's U+FFFD) before the stream's end
    assert not any(p.endswith("\ufffd") for _, _, pieces in results for p in pieces[:-1])
    assert wait_idle(state) == 0


@pytest.mark.parametrize("body, param", [
    ("{not json", None),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "x", "model": "other"}, "model"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x", "max_tokens": 500}, "max_tokens"),
    ({"prompt": list(range(1, 200))}, "prompt"),
    ({"prompt": [5, 999]}, "prompt"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "logprobs": 9}, "logprobs"),
    ({"prompt": "x", "logprobs": 1, "echo": True}, "echo"),
    ({"max_tokens": 2}, "prompt"),
])
def test_bad_requests_are_400_naming_the_field(served, body, param):
    _, url = served
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{url}/v1/completions", content=content,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"]


def test_chat_without_a_template_names_the_fix(served):
    state, url = served
    template, state.server.template = state.server.template, None
    try:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}]})
    finally:
        state.server.template = template
    assert r.status_code == 400 and "--chat-template" in r.json()["error"]["message"]


def test_api_key_and_queue_limit(served):
    state, url = served
    state.api_key = "s3cret"
    try:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        models = client(url, api_key="s3cret").models.list()
        assert [m.id for m in models.data] == [NAME]
        assert httpx.get(f"{url}/health").status_code == 200  # health needs no key
    finally:
        state.api_key = None
    state.server.loop.max_waiting = 0
    try:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=60)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        state.server.loop.max_waiting = None


SLOW = [pytest.mark.slow,
        pytest.mark.skipif(not os.environ.get("JAXACCEL_SLOW"), reason="opt-in: JAXACCEL_SLOW=1")]


@pytest.mark.parametrize("requests", [60, pytest.param(500, marks=SLOW)])
def test_soak_with_disconnects_and_malformed_requests(served, requests):
    """Requests of random lengths (short: few compiled shapes), 10% hanging up mid-stream, 10%
    malformed, all at once: every good one answered (its stream equal to its non-streamed
    answer), every bad one a 4xx, no page held at the end, the metrics counted the tokens, and
    host memory within 10% of where it started (after a first round compiled the shapes).
    60 requests here; `JAXACCEL_SLOW=1 pytest -m slow` runs the issue's 500."""
    import psutil

    state, url = served
    rng = np.random.default_rng(1)

    async def good(http, i):
        body = {"model": NAME, "prompt": rng.integers(1, 300, int(rng.integers(1, 9))).tolist(),
                "max_tokens": int(rng.integers(1, 9)), "temperature": 1.0, "seed": i,
                "ignore_eos": True, "return_token_ids": True}
        whole = (await http.post("/v1/completions", json=body)).json()["choices"][0]
        ids = []
        async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"choices": [{' in line:
                    ids += json.loads(line[6:])["choices"][0]["token_ids"]
        return whole["token_ids"] == ids and len(ids) == body["max_tokens"]

    async def hang_up(http, i):
        body = {"prompt": [1, 2, 3], "max_tokens": 12, "stream": True, "ignore_eos": True}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    break  # leave mid-stream: the connection closes
        return True

    async def malformed(http, i):
        bad = ["{", json.dumps({"prompt": 3}), json.dumps({"prompt": "x", "top_p": 2})][i % 3]
        r = await http.post("/v1/completions", content=bad,
                            headers={"content-type": "application/json"})
        return 400 <= r.status_code < 500

    async def round_of(n):
        tenth = n // 10
        kinds = [hang_up] * tenth + [malformed] * tenth + [good] * (n - 2 * tenth)
        rng.shuffle(kinds)
        # No kept-alive connections: reusing one that uvicorn closes after its keep-alive
        # timeout fails on the client's side (a race real clients retry), not the server's.
        async with httpx.AsyncClient(base_url=url, timeout=300,
                                     limits=httpx.Limits(max_connections=64,
                                                         max_keepalive_connections=0)) as http:
            return await asyncio.gather(*(k(http, i) for i, k in enumerate(kinds)))

    assert all(asyncio.run(round_of(20)))  # compiles the shapes; memory counts from here
    assert wait_idle(state) == 0
    before = psutil.Process().memory_info().rss
    assert all(asyncio.run(round_of(requests)))
    assert wait_idle(state) == 0
    after = psutil.Process().memory_info().rss
    print(f"soak: {requests} requests, host memory {before / 2**20:.0f} -> "
          f"{after / 2**20:.0f} MiB")
    assert after <= 1.1 * before, (before, after)
    metrics = httpx.get(f"{url}/metrics").text
    assert "jaxaccel:kv_cache_pages_used 0.0" in metrics
    assert "jaxaccel:time_to_first_token_seconds_count" in metrics


def test_run_batch_lines_in_order_with_error_lines(served):
    state, _ = served
    lines = [json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                         "body": {"model": NAME, "prompt": "JAX runs", "max_tokens": 3,
                                  "temperature": 0, "ignore_eos": True}}),
             "{broken",
             json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/completions",
                         "body": {"model": NAME, "prompt": ""}}),
             json.dumps({"custom_id": "d", "method": "POST", "url": "/v1/nowhere", "body": {}}),
             json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 2}})]
    out = asyncio.run(run_lines(state.server, lines))
    assert [o["custom_id"] for o in out] == ["a", None, "c", "d", "e"]
    want = client(state_url(served)).completions.create(
        model=NAME, prompt="JAX runs", max_tokens=3, temperature=0,
        extra_body={"ignore_eos": True}).choices[0].text
    assert out[0]["response"]["status_code"] == 200
    assert out[0]["response"]["body"]["choices"][0]["text"] == want
    assert out[1]["response"] is None and "line 2" in out[1]["error"]["message"]
    assert out[2]["response"]["status_code"] == 400
    assert out[2]["response"]["body"]["error"]["param"] == "prompt"
    assert out[3]["error"]["code"] == "invalid_request"
    assert out[4]["response"]["body"]["usage"]["completion_tokens"] == 2


def test_embeddings_through_the_openai_client(minilm_ckpt):
    state = ServerState(lambda: open_server(minilm_ckpt, served_model_name="minilm"))
    server = ThreadServer(state)
    try:
        state.ready.wait(300)
        texts = ["A man is eating food.", "The new movie is awesome."]
        result = client(server.url).embeddings.create(model="minilm", input=texts)
        got = np.array([d.embedding for d in result.data])
        np.testing.assert_allclose(got, state.server.model.embed(texts), rtol=1e-5, atol=1e-6)
        assert result.usage.prompt_tokens > 0
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    finally:
        server.stop()
        state.server.stop()


def test_sigterm_drains_running_requests_and_exits_0(decoder_ckpt):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "jaxaccel.cli.main", "serve",
                             str(decoder_ckpt), "--port", str(port), "--drain-timeout", "60",
                             "--quiet"], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, seen = time.time() + 300, []
        while time.time() < deadline:
            try:
                seen.append(httpx.get(f"{url}/health").status_code)
                if seen[-1] == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        assert seen[0] == 503 and seen[-1] == 200  # listening while the model loads
        body = {"prompt": [1, 2, 3], "max_tokens": 28, "stream": True, "ignore_eos": True,
                "return_token_ids": True}  # 31 tokens: two KV pages, few compiled shapes
        ids = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"choices": [{' in line:
                    if not ids:
                        proc.send_signal(signal.SIGTERM)  # mid-stream
                    ids += json.loads(line[6:])["choices"][0]["token_ids"]
        assert len(ids) == 28  # the running request finished
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stop_token_ids_min_tokens_and_stop_strings(served):
    _, url = served
    base = dict(model=NAME, prompt=PROMPTS[0], max_tokens=6, temperature=0)
    first = client(url).completions.create(**base, extra_body={
        "ignore_eos": True, "return_token_ids": True}).choices[0]
    token = first.model_extra["token_ids"][0]
    stopped = client(url).completions.create(**base, extra_body={
        "stop_token_ids": [token], "return_token_ids": True}).choices[0]
    assert stopped.model_extra["token_ids"] == [token] and stopped.finish_reason == "stop"
    later = client(url).completions.create(**base, extra_body={
        "stop_token_ids": [token], "min_tokens": 3, "ignore_eos": True,
        "return_token_ids": True}).choices[0]
    assert len(later.model_extra["token_ids"]) >= 3
    if len(first.text) > 2:  # a stop string cuts the text before it
        stop = first.text[2:]
        cut = client(url).completions.create(**base, stop=[stop],
                                             extra_body={"ignore_eos": True}).choices[0]
        assert cut.text == first.text[:first.text.find(stop)] and cut.finish_reason == "stop"


def test_logprobs_in_completions_chat_and_streams(served):
    """The engine's logprobs (checked against torch in test_engine.py) in OpenAI's shapes:
    greedy tokens are their own best, streamed entries equal the whole answer's."""
    _, url = served
    args = dict(model=NAME, prompt=PROMPTS[1], max_tokens=4, temperature=0, logprobs=2,
                extra_body={"ignore_eos": True})
    lp = client(url).completions.create(**args).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 2 and value <= 0 and max(top.values()) == pytest.approx(value)
    streamed = [c.choices[0].logprobs for c in client(url).completions.create(
        stream=True, **args) if c.choices and c.choices[0].logprobs]
    assert sum((s.token_logprobs for s in streamed), []) == pytest.approx(lp.token_logprobs)
    chat = client(url).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        temperature=0, logprobs=True, top_logprobs=1, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 1 for c in content)
    assert all(c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)


def test_bench_serve_load_generator_counts_every_token(served):
    """`jaxaccel bench serve`'s load generator (`serve_load.measure`) against the server:
    Poisson arrivals and a concurrency cap; every request completes with exactly its
    max_tokens (EOS ignored), counted from the stream's usage chunk; percentiles ordered."""
    from jaxaccel.bench import serve_load, throughput_workload

    state, url = served
    work = throughput_workload.synthetic(8, 12, 5, vocab=300, seed=3)
    work = [{**w, "max_new_tokens": min(w["max_new_tokens"], 20)} for w in work]
    for rate, concurrency in ((40.0, None), (float("inf"), 3)):
        result = serve_load.measure(url, NAME, work, rate=rate, max_concurrency=concurrency)
        assert result["failed"] == 0, result["first_error"]
        assert result["completed"] == len(work)
        assert result["output_tokens"] == sum(w["max_new_tokens"] for w in work)
        assert result["output_tok_s"] == pytest.approx(result["output_tokens"]
                                                       / result["duration_s"])
        for field in ("ttft_s", "tpot_s"):
            p = result[field]
            assert 0 < p["p50"] <= p["p90"] <= p["p99"]
    wrong = serve_load.measure(url, "no-such-model", work[:2])
    assert wrong["failed"] == 2 and "HTTP 4" in wrong["first_error"]
    assert wait_idle(state) == 0
