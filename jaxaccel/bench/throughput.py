"""`jaxaccel bench throughput CKPT`: output tokens/s of a seeded request workload.

The workload (`throughput_workload`): `--requests` prompts of log-normal lengths (8-512
tokens, median `--prompt-len`) asking for log-normal output lengths (8-256, median
`--output-len`), EOS ignored; or `--workload FILE` (JSONL). Contenders, each in fresh
processes, alternating: the engine (continuous batching over a paged KV cache), today's
static `Generator` (one left-padded batch decoding to the longest request), and vLLM's
`LLM.generate` on the checkpoint's Hugging Face source when vllm is installed (the benchmark
installs nothing: a missing contender is reported as missing). Each contender runs the
workload once to compile (`cold s`) and once timed; only each request's own tokens count.
Reported: output tok/s, time to first token and per output token (p50/p99), KV pages used
(peak of the pool), preemptions, prefix-cache hit pages and prefill tokens computed.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import tempfile
from typing import Optional

import typer

from jaxaccel.bench import runner
from jaxaccel.bench import throughput_workload as workloads
from jaxaccel.bench.runner import Worker

WORKER = "jaxaccel.bench.throughput_worker"
COLUMNS = ("contender", "output tok/s", "x static", "TTFT p50/p99 s", "TPOT p50/p99 ms",
           "cold s", "KV pages peak/pool", "preemptions", "prefix hit pages", "prefill tokens")


def contenders(ckpt: pathlib.Path, workload_file: str, dtype: str, engine_args: dict
               ) -> tuple[dict[str, Worker], list[str]]:
    """(workers to run, names of contenders that are missing here)."""
    shared = {"ckpt": str(ckpt), "workload": workload_file, "dtype": dtype}
    found = {"engine": Worker(WORKER, {**shared, "contender": "engine",
                                       "engine_args": engine_args}),
             "static": Worker(WORKER, {**shared, "contender": "static"})}
    missing = []
    source = runner.hf_source(ckpt)
    if importlib.util.find_spec("vllm") is None:
        missing.append("vllm (not installed)")
    elif source is None:
        missing.append("vllm (no Hugging Face source)")
    else:
        found["vllm"] = Worker(WORKER, {**shared, "contender": "vllm",
                                        "hf_source": str(source)})
    return found, missing


def _pair(entry: dict, field: str, scale: float = 1.0) -> str:
    values = entry.get(field) or {}
    if values.get("p50") is None:
        return "n/a"
    return f"{scale * values['p50']:.3g} / {scale * values['p99']:.3g}"


def table_rows(summary: dict, missing: list[str]) -> list[tuple]:
    base = summary.get("static", {}).get("output_tok_s")
    rows = []
    for name, entry in summary.items():
        pages = (f"{entry['kv_pages_peak']} / {entry['kv_pages']}" if "kv_pages" in entry
                 else "n/a")
        rows.append((name, entry["output_tok_s"], runner.ratio(entry["output_tok_s"], base),
                     _pair(entry, "ttft_s"), _pair(entry, "tpot_s", 1e3),
                     entry.get("cold_s", "n/a"), pages, entry.get("preemptions", "n/a"),
                     entry.get("prefix_hit_pages", "n/a"), entry.get("prefill_tokens", "n/a")))
    rows += [(name, "missing", *["n/a"] * (len(COLUMNS) - 2)) for name in missing]
    return rows


def summarize(runs: dict[str, list[dict]]) -> dict:
    """The median run (by output tok/s) of each contender, with the spread of tok/s."""
    summary = {}
    for name, results in runs.items():
        ordered = sorted(results, key=lambda r: r["output_tok_s"])
        entry = dict(ordered[len(ordered) // 2])
        entry["output_tok_s_runs"] = runner.summarize([r["output_tok_s"] for r in results])
        summary[name] = entry
    return summary


def vocab_of(ckpt: pathlib.Path) -> int:
    # deferred: the parent's imports stay light (no jax before workers start)
    from jaxaccel.checkpoint.manifest import Manifest

    return int(Manifest.load(ckpt).config["vocab_size"])


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("throughput")
    def bench_throughput(
        ckpt: pathlib.Path = typer.Argument(..., help="Decoder checkpoint."),
        requests: int = typer.Option(64, "--requests", help="Requests in the workload."),
        prompt_len: int = typer.Option(125, "--prompt-len", help="Median prompt tokens."),
        output_len: int = typer.Option(62, "--output-len", help="Median new tokens."),
        workload: Optional[pathlib.Path] = typer.Option(
            None, "--workload", help="JSONL of requests (prompt_ids or prompt_len, and "
            "max_new_tokens) instead of the synthetic workload."),
        seed: int = typer.Option(0, "--seed", help="Seed of the synthetic workload."),
        dtype: str = typer.Option("float32", "--dtype", help="Compute dtype."),
        max_num_seqs: int = typer.Option(64, "--max-num-seqs"),
        max_num_batched_tokens: int = typer.Option(512, "--max-num-batched-tokens"),
        page_size: int = typer.Option(16, "--page-size", help="Tokens per KV page."),
        repeats: int = typer.Option(1, "--repeats", help="Fresh processes per contender."),
        json_out: Optional[pathlib.Path] = typer.Option(None, "--json", help="Write results."),
    ) -> None:
        """Output tokens/s, TTFT and TPOT of the engine vs static batching (and vLLM when
        installed) on one seeded workload."""
        vocab = vocab_of(ckpt)
        work = (workloads.from_file(workload, vocab, seed) if workload
                else workloads.synthetic(requests, prompt_len, output_len, vocab, seed))
        engine_args = {"max_num_seqs": max_num_seqs, "page_size": page_size,
                       "max_num_batched_tokens": max_num_batched_tokens}
        with tempfile.TemporaryDirectory() as tmp:
            work_file = pathlib.Path(tmp) / "workload.json"
            work_file.write_text(json.dumps(work))
            found, missing = contenders(ckpt, str(work_file), dtype, engine_args)
            summary = summarize(runner.alternate(found, repeats))
        prompt_tokens = sum(len(w["prompt_ids"]) for w in work)
        output_tokens = sum(w["max_new_tokens"] for w in work)
        runner.print_table(
            f"{len(work)} requests, {prompt_tokens} prompt and {output_tokens} output tokens, "
            f"{dtype} ({repeats} fresh process(es) each)", COLUMNS, table_rows(summary, missing))
        runner.write_json(json_out, {"benchmark": "throughput", "requests": len(work),
                                     "prompt_tokens": prompt_tokens,
                                     "output_tokens": output_tokens, "dtype": dtype,
                                     "engine_args": engine_args, "results": summary,
                                     "missing": missing})
