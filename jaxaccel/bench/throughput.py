"""`jaxaccel bench throughput CKPT`: output tokens/s of a seeded request workload.

The workload (`throughput_workload`): `--requests` prompts of log-normal lengths (8-512
tokens, median `--prompt-len`) asking for log-normal output lengths (8-256, median
`--output-len`), EOS ignored, greedy; or `--workload FILE` (JSONL). Contenders, each in
fresh processes, alternating:

* `engine (generate CLI)`: the engine as a user runs it, `jaxaccel generate --input FILE
  --output FILE`, timed from process start to exit (imports, restore and compile included,
  an empty compile cache);
* `engine (warm)`: the engine in one process, the workload run once to compile (`cold s`)
  and once timed, with its latencies and counters;
* `static`: the static `Generator` (one left-padded batch decoding to the longest request),
  the baseline of the `x static` column;
* `vllm`: vLLM's `LLM.generate` alone on the checkpoint's Hugging Face source, run by an
  interpreter that has vLLM (`--vllm-python`, default this one); the benchmark installs
  nothing: a missing contender is reported as missing.

Only each request's own tokens count. Reported: output tok/s, time to first token and per
output token (p50/p99), KV pages used (peak of the pool), preemptions, prefix-cache hit pages,
prefill tokens computed, and how many requests' greedy tokens equal vLLM's. Then the
prefix-cache scenario (`throughput_worker.prefix_scenario`): prefill tokens computed for 32
requests sharing a 384-token prefix, against one prefix plus the suffixes, and the time to
first token of the later requests against the first's.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
import tempfile
from typing import Optional

import typer

from jaxaccel.bench import runner
from jaxaccel.bench import throughput_workload as workloads
from jaxaccel.bench.runner import Worker

WORKER = "jaxaccel.bench.throughput_worker"
COLUMNS = ("contender", "output tok/s", "x static", "x vllm", "TTFT p50/p99 s",
           "TPOT p50/p99 ms", "cold s", "KV pages peak/pool", "preemptions", "prefix hit pages",
           "prefill tokens", "tokens = vLLM's")
PREFIX_COLUMNS = ("requests", "prefix + suffix tokens", "prefill tokens computed",
                  "x one prefix + suffixes", "prefix hit pages", "TTFT first s",
                  "TTFT later p50 s", "later / first")


VLLM_SCRIPT = pathlib.Path(__file__).with_name("throughput_vllm.py")


def has_vllm(python: str | None) -> bool:
    """Whether `python` (default: this interpreter) can import vllm."""
    if python is None:
        return importlib.util.find_spec("vllm") is not None
    probe = [python, "-c", "import importlib.util, sys; "
             "sys.exit(importlib.util.find_spec('vllm') is None)"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def contenders(ckpt: pathlib.Path, workload_file: str, dtype: str, engine_args: dict,
               vllm_python: str | None = None) -> tuple[dict[str, Worker], list[str]]:
    """(workers to run, names of contenders that are missing here)."""
    shared = {"ckpt": str(ckpt), "workload": workload_file, "dtype": dtype}
    found = {"engine (generate CLI)": Worker(WORKER, {**shared, "contender": "engine_cli",
                                                      "engine_args": engine_args}),
             "engine (warm)": Worker(WORKER, {**shared, "contender": "engine",
                                              "engine_args": engine_args}),
             "static": Worker(WORKER, {**shared, "contender": "static"})}
    missing = []
    source = runner.hf_source(ckpt)
    if not has_vllm(vllm_python):
        missing.append(f"vllm (not installed for {vllm_python or sys.executable})")
    elif source is None:
        missing.append("vllm (no Hugging Face source)")
    else:
        found["vllm"] = Worker("vllm", {"hf_source": str(source), "workload": workload_file,
                                        "dtype": dtype},
                               python=vllm_python, script=str(VLLM_SCRIPT))
    return found, missing


def agreement(summary: dict) -> dict[str, str]:
    """Per contender with token ids: how many requests' greedy tokens equal vLLM's (the
    ids are dropped from the summary)."""
    reference = summary.get("vllm", {}).get("token_ids")
    agree = {}
    for name, entry in summary.items():
        ids = entry.pop("token_ids", None)
        if reference is not None and ids is not None and name != "vllm":
            same = sum(list(a) == list(b) for a, b in zip(ids, reference))
            agree[name] = f"{same}/{len(reference)}"
    return agree


def _pair(entry: dict, field: str, scale: float = 1.0) -> str:
    values = entry.get(field) or {}
    if values.get("p50") is None:
        return "n/a"
    return f"{scale * values['p50']:.3g} / {scale * values['p99']:.3g}"


def table_rows(summary: dict, missing: list[str], agree: dict | None = None) -> list[tuple]:
    base = summary.get("static", {}).get("output_tok_s")
    vllm = summary.get("vllm", {}).get("output_tok_s")
    agree = agree or {}
    rows = []
    for name, entry in summary.items():
        pages = (f"{entry['kv_pages_peak']} / {entry['kv_pages']}" if "kv_pages" in entry
                 else "n/a")
        rows.append((name, entry["output_tok_s"], runner.ratio(entry["output_tok_s"], base),
                     runner.ratio(entry["output_tok_s"], vllm),
                     _pair(entry, "ttft_s"), _pair(entry, "tpot_s", 1e3),
                     entry.get("cold_s", "n/a"), pages, entry.get("preemptions", "n/a"),
                     entry.get("prefix_hit_pages", "n/a"), entry.get("prefill_tokens", "n/a"),
                     agree.get(name, "n/a")))
    rows += [(name, "missing", *["n/a"] * (len(COLUMNS) - 2)) for name in missing]
    return rows


def prefix_row(s: dict) -> tuple:
    return (s["requests"], f"{s['prefix_len']} + {s['suffix_len']}", s["prefill_tokens"],
            s["prefill_ratio"], s["prefix_hit_pages"], s["ttft_first_s"],
            s["ttft_later_p50_s"], s["ttft_ratio"])


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
        vllm_python: Optional[str] = typer.Option(
            None, "--vllm-python", help="Interpreter with vLLM installed (e.g. a virtual "
            "environment's bin/python) for the vLLM contender; default: this one."),
        prefix: bool = typer.Option(True, "--prefix/--no-prefix", help="Also run the "
                                    "prefix-cache scenario (32 requests, 384-token prefix)."),
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
            found, missing = contenders(ckpt, str(work_file), dtype, engine_args, vllm_python)
            summary = summarize(runner.alternate(found, repeats))
            scenario = (runner.run_worker("prefix", Worker(WORKER, {
                "ckpt": str(ckpt), "contender": "prefix", "workload": str(work_file),
                "dtype": dtype})) if prefix else None)
        agree = agreement(summary)
        prompt_tokens = sum(len(w["prompt_ids"]) for w in work)
        output_tokens = sum(w["max_new_tokens"] for w in work)
        print(f"CPU: {runner.cpu_model()}")
        runner.print_table(
            f"{len(work)} requests, {prompt_tokens} prompt and {output_tokens} output tokens, "
            f"{dtype} ({repeats} fresh process(es) each)", COLUMNS,
            table_rows(summary, missing, agree))
        if scenario is not None:
            runner.print_table("prefix cache: requests sharing a prefix", PREFIX_COLUMNS,
                               [prefix_row(scenario)])
        runner.write_json(json_out, {"benchmark": "throughput", "requests": len(work),
                                     "prompt_tokens": prompt_tokens,
                                     "output_tokens": output_tokens, "dtype": dtype,
                                     "engine_args": engine_args, "results": summary,
                                     "tokens_equal_vllm": agree, "prefix_cache": scenario,
                                     "missing": missing})
