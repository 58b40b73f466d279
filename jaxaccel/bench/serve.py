"""`jaxaccel bench serve [CKPT]`: request throughput, output tok/s, TTFT and TPOT
(p50/p90/p99) of OpenAI-compatible servers under load (`serve_load`), one row per server and
request rate: a throughput and p99-TPOT curve against the rate.

Servers: `jaxaccel serve CKPT` started here on a free port, any `--base-url` already
running (`vllm serve`, SGLang, ...), and with `--vllm` also `vllm serve` on the
checkpoint's Hugging Face source, started here when vllm is installed (this benchmark
installs nothing: a missing contender is a `missing` row). Workload: the throughput
benchmark's (`throughput_workload`), run once untimed per server first (compiles).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import List, Optional

import typer

from jaxaccel.bench import runner, serve_load
from jaxaccel.bench import throughput_workload as workloads
from jaxaccel.errors import UsageError

COLUMNS = ("server", "rate req/s", "req/s", "output tok/s", "x jaxaccel", "TTFT p50/p90/p99 s",
           "TPOT p50/p90/p99 ms", "failed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started(command: list[str], url: str, timeout: float = 900, env: dict | None = None):
    """A server subprocess (`env`: variables added to ours), until its /health answers 200;
    SIGTERM at the end."""
    import httpx  # deferred: only this benchmark needs it

    proc = subprocess.Popen(command, stdout=sys.stderr,  # its log, for a failed start
                            env={**os.environ, **(env or {})})
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise runner.BenchError(f"{command[0]} exited with {proc.returncode} before "
                                        f"it was ready")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            if time.time() > deadline:
                raise runner.BenchError(f"{url} not ready after {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _jaxaccel(ckpt: pathlib.Path, port: int, engine_flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "jaxaccel.cli.main", "serve", str(ckpt), "--port", str(port),
            "--served-model-name", "bench", "--quiet", *engine_flags]


# vLLM's CPU build as the throughput benchmark starts it (`throughput_vllm`): a 1 GiB KV
# cache (the engine's default pool), and --gpu-memory-utilization (on CPU: the share of host
# memory it requires free at start) low enough for a shared host; its 0.92 default refuses
# to start beside anything else.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
VLLM_MEMORY_FRACTION = "0.2"


def _row(name: str, result: dict, base: dict | None) -> tuple:
    def three(field, scale=1.0):
        v = result[field]
        return "n/a" if v["p50"] is None else " / ".join(
            f"{scale * v[q]:.3g}" for q in ("p50", "p90", "p99"))
    ratio = runner.ratio(result["output_tok_s"], base and base["output_tok_s"])
    return (name, result["request_rate"], result["request_throughput"], result["output_tok_s"],
            ratio, three("ttft_s"), three("tpot_s", 1e3), result["failed"])


def run_all(targets: dict, work, rates, max_concurrency, seed, api_key) -> dict:
    """{server name: [result per rate]}; targets: name -> (context manager of url, model)."""
    results = {}
    for name, (context, model) in targets.items():
        try:
            with context as url:
                # Cold run: the whole workload at once compiles the shapes the timed runs
                # meet (a rate's smaller batches may still meet a new one).
                serve_load.measure(url, model, work, math.inf, max_concurrency, seed, api_key)
                results[name] = [serve_load.measure(url, model, work, rate, max_concurrency,
                                                    seed, api_key) for rate in rates]
        except runner.BenchError as err:  # a FAILED row; the other servers still print
            runner.record_failure(name, str(err))
    return results


def _has_vllm(python: pathlib.Path | None) -> bool:
    if python is None:
        return importlib.util.find_spec("vllm") is not None
    found = subprocess.run([str(python), "-c", "import importlib.util, sys; "
                            "sys.exit(importlib.util.find_spec('vllm') is None)"],
                           capture_output=True)
    return found.returncode == 0


def _vllm_target(ckpt, python, max_num_seqs: int, dtype: str | None, missing: list) -> dict:
    """`vllm serve` on CKPT's Hugging Face source, or a reason in `missing`."""
    source = runner.hf_source(ckpt) if ckpt else None
    if not _has_vllm(python):
        missing.append("vllm serve (not installed)")
        return {}
    if source is None:
        missing.append("vllm serve (no Hugging Face source)")
        return {}
    port = _free_port()
    # The API server module rather than the `vllm` script: the CPU build's distribution is
    # named vllm-cpu, and the script asks for the version of "vllm".
    command = [str(python or sys.executable), "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(source), "--port", str(port), "--served-model-name", "bench",
               "--max-num-seqs", str(max_num_seqs), "--gpu-memory-utilization",
               VLLM_MEMORY_FRACTION, "--dtype", dtype or "auto"]
    return {"vllm serve": (started(command, f"http://127.0.0.1:{port}", env=VLLM_ENV), "bench")}


def _targets(ckpt, base_urls, model: str, max_num_seqs: int,
             max_num_batched_tokens: int, dtype: str | None = None) -> dict:
    """name -> (context manager yielding the server's URL, model name): `jaxaccel serve CKPT`
    started here (when CKPT is given) and each --base-url (NAME=URL names its row)."""
    targets = {}
    if ckpt is not None:
        port = _free_port()
        flags = ["--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens",
                 str(max_num_batched_tokens), *(["--dtype", dtype] if dtype else [])]
        targets["jaxaccel"] = (started(_jaxaccel(ckpt, port, flags),
                                       f"http://127.0.0.1:{port}"), "bench")
    for entry in base_urls or []:
        name, _, url = entry.rpartition("=") if "=" in entry else ("", "", entry)
        targets[name or url] = (contextlib.nullcontext(url), model)
    return targets


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("serve")
    def bench_serve(
        ckpt: Optional[pathlib.Path] = typer.Argument(None, help="Decoder checkpoint to "
                                                      "serve with `jaxaccel serve` here."),
        base_url: Optional[List[str]] = typer.Option(
            None, "--base-url", help="An OpenAI-compatible server already running, e.g. "
            "http://127.0.0.1:8000 (repeatable); NAME=URL names its row."),
        model: str = typer.Option("bench", "--model", help="Model name sent to --base-url "
                                  "servers."),
        vllm: bool = typer.Option(False, "--vllm", help="Also start `vllm serve` on CKPT's "
                                  "Hugging Face source (a missing row when not installed)."),
        vllm_python: Optional[pathlib.Path] = typer.Option(
            None, "--vllm-python", help="With --vllm: the Python of an environment that has "
            "vllm (default: this one), e.g. a separate venv with vLLM's CPU build."),
        request_rate: Optional[List[float]] = typer.Option(
            None, "--request-rate", help="Poisson arrivals, requests/s (repeatable: a "
            "curve); default inf (all at once)."),
        max_concurrency: Optional[int] = typer.Option(None, "--max-concurrency", min=1,
                                                      help="Requests in flight at most."),
        requests: int = typer.Option(64, "--requests", help="Requests per rate."),
        prompt_len: int = typer.Option(125, "--prompt-len", help="Median prompt tokens."),
        output_len: int = typer.Option(62, "--output-len", help="Median new tokens."),
        vocab: Optional[int] = typer.Option(None, "--vocab", help="Token ids below this "
                                            "(default: CKPT's vocabulary, else 1000)."),
        seed: int = typer.Option(0, "--seed"),
        max_num_seqs: int = typer.Option(64, "--max-num-seqs"),
        max_num_batched_tokens: int = typer.Option(512, "--max-num-batched-tokens"),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype of the "
                                            "servers started here (default: the checkpoint's)."),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="JAXACCEL_API_KEY"),
        json_out: Optional[pathlib.Path] = typer.Option(None, "--json", help="Write results."),
    ) -> None:
        """Load OpenAI-compatible servers over HTTP (Poisson --request-rate or
        --max-concurrency): request throughput, output tok/s, TTFT/TPOT p50/p90/p99."""
        from jaxaccel.bench.throughput import vocab_of  # deferred: reads a manifest (orbax)

        if ckpt is None and not base_url:
            raise UsageError("give CKPT (served here) and/or --base-url URL")
        vocab = vocab or (vocab_of(ckpt) if ckpt else 1000)
        work = workloads.synthetic(requests, prompt_len, output_len, vocab, seed)
        missing = []
        targets = _targets(ckpt, base_url, model, max_num_seqs, max_num_batched_tokens, dtype)
        if vllm:
            targets.update(_vllm_target(ckpt, vllm_python, max_num_seqs, dtype, missing))
        rates = request_rate or [math.inf]
        results = run_all(targets, work, rates, max_concurrency, seed, api_key)
        base = results.get("jaxaccel", [None] * len(rates))
        rows = [_row(name, r, b) for name, rs in results.items() for r, b in zip(rs, base)]
        rows += [(name, "missing", *["n/a"] * (len(COLUMNS) - 2)) for name in missing]
        runner.print_table(f"{len(work)} requests per rate, max concurrency "
                           f"{max_concurrency or 'none'}; {runner.kernel_build_note()}",
                           COLUMNS, rows)
        runner.write_json(json_out, {"benchmark": "serve", "requests": len(work),
                                     "cpu": runner.kernel_build_note(),
                                     "results": results,
                                     "missing": missing})
