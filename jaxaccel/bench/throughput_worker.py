"""One fresh process of `jaxaccel bench throughput`: run the workload on one contender.

    python -m jaxaccel.bench.throughput_worker '{"ckpt": CKPT, "contender": "engine",
        "workload": WORKLOAD_JSON_FILE, "dtype": "float32", "engine_args": {...}}'

Contenders: "engine" (`jaxaccel.engine`, continuous batching over pages), "static" (today's
`Generator`: every request in one left-padded batch, max_new_tokens the longest request's),
"vllm" (`vllm.LLM.generate`, per-request max_tokens; only where vllm is installed). Each runs
the workload twice, the first run compiling (reported as `cold_s`), the second timed; only
each request's own tokens count. Prints one JSON line.
"""

from __future__ import annotations

import json
import statistics
import time

from jaxaccel.bench.worker import serve


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": statistics.median(ordered), "p99": at(0.99)}


def run_engine(loaded, generator, work: list[dict], engine_args: dict) -> dict:
    # deferred: jax and the engine load in the worker process only
    from jaxaccel.engine.frontend import engine_for
    from jaxaccel.engine.requests import Request, SamplingParams

    engine = engine_for(generator, **engine_args)
    requests = [Request(i, w["prompt_ids"], SamplingParams(max_tokens=w["max_new_tokens"],
                                                           ignore_eos=True))
                for i, w in enumerate(work)]
    start = time.perf_counter()
    outputs = engine.generate(requests)
    seconds = time.perf_counter() - start
    ttft = [o.first_token_s - start for o in outputs]
    tpot = [(o.finish_s - o.first_token_s) / (len(o.token_ids) - 1) for o in outputs
            if len(o.token_ids) > 1]
    stats = engine.stats()
    return {"seconds": seconds, "tokens": sum(len(o.token_ids) for o in outputs),
            "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
            "kv_pages_peak": stats["peak_pages_used"], "kv_pages": stats["num_pages"],
            "preemptions": stats["preemptions"], "prefix_hit_pages": stats["prefix_hit_pages"],
            "prefill_tokens": stats["prefill_tokens"],
            "programs": generator.traces.get("engine_step", 0), "steps": stats["steps"],
            "step_s": stats["step_s"], "device_wait_s": stats["device_wait_s"]}


def run_static(loaded, generator, work: list[dict], engine_args: dict) -> dict:
    prompts = [w["prompt_ids"] for w in work]
    longest = max(w["max_new_tokens"] for w in work)
    start = time.perf_counter()
    new = generator.generate(prompts, longest)
    seconds = time.perf_counter() - start
    first = generator.timings["first_token_s"]
    tokens = sum(min(len(n), w["max_new_tokens"]) for n, w in zip(new, work))
    return {"seconds": seconds, "tokens": tokens, "ttft_s": percentiles([first] * len(work)),
            "tpot_s": percentiles([(seconds - first) / max(longest - 1, 1)] * len(work))}


def run_vllm(ckpt_source: str, work: list[dict], dtype: str) -> dict:
    # deferred: vllm is optional and heavy; only this contender needs it
    from vllm import LLM, SamplingParams as VllmParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=ckpt_source, dtype=dtype)
    prompts = [TokensPrompt(prompt_token_ids=w["prompt_ids"]) for w in work]
    params = [VllmParams(max_tokens=w["max_new_tokens"], ignore_eos=True, temperature=0.0)
              for w in work]
    llm.generate(prompts[:2], params[:2])  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": seconds, "tokens": tokens, "ttft_s": percentiles([]),
            "tpot_s": percentiles([])}


def main(ckpt: str, contender: str, workload: str, dtype: str = "float32",
         engine_args: dict | None = None, hf_source: str | None = None) -> dict:
    with open(workload) as f:
        work = json.load(f)
    if contender == "vllm":
        result = run_vllm(hf_source, work, dtype)
    else:
        # deferred: jax and the runtime load in the worker process only
        from jaxaccel.runtime.generate import Generator
        from jaxaccel.startup.loader import load_model

        loaded = load_model(ckpt, dtype=dtype)
        generator = Generator(loaded.graphdef, loaded.state, loaded.config, dtype=dtype)
        run = run_engine if contender == "engine" else run_static
        start = time.perf_counter()
        run(loaded, generator, work, engine_args or {})  # compiles
        cold = time.perf_counter() - start
        result = run(loaded, generator, work, engine_args or {})
        result["cold_s"] = cold
    result["output_tok_s"] = result["tokens"] / result["seconds"]
    return result


if __name__ == "__main__":
    serve(main)
