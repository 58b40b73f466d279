"""One fresh process of `jaxaccel bench throughput`: run the workload on one contender.

    python -m jaxaccel.bench.throughput_worker '{"ckpt": CKPT, "contender": "engine",
        "workload": WORKLOAD_JSON_FILE, "dtype": "float32", "engine_args": {...}}'

Contenders: "engine" (`jaxaccel.engine`, continuous batching over pages, in this process),
"engine_cli" (the engine as a user runs it: `jaxaccel generate --input FILE --output FILE`
timed from process start to exit, imports, restore and compile included), "static" (the
static `Generator`: every request in one left-padded batch, max_new_tokens the longest
request's), and "prefix" (the prefix-cache scenario, `prefix_scenario`). The in-process
contenders run the workload twice, the first run compiling (reported as `cold_s`), the second
timed; only each request's own tokens count. vLLM runs from `throughput_vllm` (its own
interpreter). Prints one JSON line.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

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
            "token_ids": [o.token_ids for o in outputs],
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


def run_engine_cli(ckpt: str, work: list[dict], dtype: str, engine_args: dict) -> dict:
    """`jaxaccel generate --input --output` in a fresh process, timed from its start to its
    exit; tokens counted from its --output file."""
    flags = ["--max-num-seqs", str(engine_args.get("max_num_seqs", 64)),
             "--max-num-batched-tokens", str(engine_args.get("max_num_batched_tokens", 512))]
    with tempfile.TemporaryDirectory() as tmp:
        source, out = pathlib.Path(tmp) / "in.jsonl", pathlib.Path(tmp) / "out.jsonl"
        source.write_text("".join(json.dumps({"prompt_ids": w["prompt_ids"], "max_new_tokens":
                                              w["max_new_tokens"]}) + "\n" for w in work))
        argv = [sys.executable, "-m", "jaxaccel.cli.main", "generate", ckpt, "--input",
                str(source), "--output", str(out), "--greedy", "--ignore-eos", "--dtype",
                dtype, "-q", "--compile-cache", str(pathlib.Path(tmp) / "xla"), *flags]
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"jaxaccel generate failed: {proc.stderr[-2000:]}")
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {"seconds": seconds, "tokens": sum(len(r["token_ids"]) for r in rows),
            "token_ids": [r["token_ids"] for r in rows], "ttft_s": percentiles([]),
            "tpot_s": percentiles([])}


def prefix_scenario(generator, requests: int = 32, prefix_len: int = 384,
                    suffix_len: int = 16, new: int = 4, vocab: int = 1000) -> dict:
    """`requests` prompts sharing a `prefix_len`-token prefix, each with its own suffix:
    all arriving together (prefill tokens computed, against one prefix plus every suffix),
    then one at a time on a fresh engine (time to first token of the first, which computes
    the prefix, and of the later ones, which find it cached)."""
    # deferred: jax and the engine load in the worker process only
    from jaxaccel.engine.frontend import engine_for
    from jaxaccel.engine.requests import Request, SamplingParams

    rng = np.random.default_rng(1)
    prefix = rng.integers(0, vocab, prefix_len).tolist()
    prompts = [prefix + rng.integers(0, vocab, suffix_len).tolist() for _ in range(requests)]
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    warm = engine_for(generator)  # compiles the step programs the runs below use
    warm.generate([Request(i, p, params) for i, p in enumerate(prompts)])
    warm.generate([Request(0, [7] + prompts[0], params)])
    together = engine_for(generator)
    together.generate([Request(i, p, params) for i, p in enumerate(prompts)])
    one_by_one, ttft = engine_for(generator), []
    for i, prompt in enumerate(prompts):
        (out,) = one_by_one.generate([Request(i, prompt, params)])
        ttft.append(out.first_token_s - out.arrival_s)
    ideal = prefix_len + requests * suffix_len
    stats = together.stats()
    return {"requests": requests, "prefix_len": prefix_len, "suffix_len": suffix_len,
            "prefill_tokens": stats["prefill_tokens"], "ideal_prefill_tokens": ideal,
            "prefill_ratio": stats["prefill_tokens"] / ideal,
            "prefix_hit_pages": stats["prefix_hit_pages"], "ttft_first_s": ttft[0],
            "ttft_later_p50_s": statistics.median(ttft[1:]),
            "ttft_ratio": statistics.median(ttft[1:]) / ttft[0]}


def main(ckpt: str, contender: str, workload: str, dtype: str = "float32",
         engine_args: dict | None = None) -> dict:
    with open(workload) as f:
        work = json.load(f)
    if contender == "engine_cli":
        result = run_engine_cli(ckpt, work, dtype, engine_args or {})
    else:
        # deferred: jax and the runtime load in the worker process only
        from jaxaccel.runtime.generate import Generator
        from jaxaccel.startup.loader import load_model

        loaded = load_model(ckpt, dtype=dtype)
        generator = Generator(loaded.graphdef, loaded.state, loaded.config, dtype=dtype)
        if contender == "prefix":
            return prefix_scenario(generator, vocab=loaded.config.vocab_size)
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
