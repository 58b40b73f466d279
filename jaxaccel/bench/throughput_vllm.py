"""The vLLM contender of `jaxaccel bench throughput`, run as a script by a Python that has
vLLM installed (often its own virtual environment, without jax):

    VLLM_PYTHON throughput_vllm.py '{"hf_source": DIR, "workload": FILE, "dtype": "float32"}'

It imports no jaxaccel module (the package imports jax), only the standard library and
vLLM. `LLM.generate` runs every request with its own `max_tokens`, EOS ignored, greedy, on
token-id prompts; only that call is timed (after a two-request warm-up). Time to first token
and per output token come from vLLM's per-request metrics where it records them. Prints one
JSON object, the last line of stdout.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    ordered = sorted(values)
    return {"p50": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def latencies(outputs) -> tuple[list[float], list[float]]:
    """(TTFT, TPOT) seconds per request from vLLM's RequestOutput.metrics, where present."""
    ttft, tpot = [], []
    for out in outputs:
        metrics = getattr(out, "metrics", None)
        first = getattr(metrics, "first_token_ts", None) or getattr(
            metrics, "first_token_time", None)
        arrival = getattr(metrics, "arrival_time", None)
        last = getattr(metrics, "last_token_ts", None) or getattr(
            metrics, "last_token_time", None)
        if first and arrival:
            ttft.append(first - arrival)
        n = len(out.outputs[0].token_ids)
        if first and last and n > 1:
            tpot.append((last - first) / (n - 1))
    return ttft, tpot


def main(hf_source: str, workload: str, dtype: str = "float32", kv_cache_gib: int = 1,
         memory_fraction: float = 0.2) -> dict:
    """`kv_cache_gib`: vLLM CPU's KV cache (VLLM_CPU_KVCACHE_SPACE; 1 GiB, the engine's
    default pool); `memory_fraction`: its gpu_memory_utilization, which on CPU is the share
    of host memory it requires free at start (its 0.92 default refuses a shared host)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    # deferred: vLLM reads VLLM_CPU_KVCACHE_SPACE when it loads
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(workload) as f:
        work = json.load(f)
    clock = time.perf_counter()
    llm = LLM(model=hf_source, dtype=dtype, skip_tokenizer_init=True, seed=0,
              gpu_memory_utilization=memory_fraction)  # otherwise its defaults
    cold = time.perf_counter() - clock
    prompts = [TokensPrompt(prompt_token_ids=w["prompt_ids"]) for w in work]
    params = [SamplingParams(max_tokens=w["max_new_tokens"], ignore_eos=True, temperature=0.0,
                             detokenize=False) for w in work]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    ttft, tpot = latencies(outs)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": seconds, "tokens": tokens, "output_tok_s": tokens / seconds,
            "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot), "cold_s": cold,
            "token_ids": [list(o.outputs[0].token_ids) for o in outs], "prefill_tokens":
            sum(len(w["prompt_ids"]) for w in work)}


if __name__ == "__main__":  # vLLM starts worker processes that re-import this file
    print(json.dumps(main(**json.loads(sys.argv[1]))), flush=True)
