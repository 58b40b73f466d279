"""Benchmark plumbing shared by every `jaxaccel bench` command: the parent side.

Each measurement runs in a fresh subprocess (no warm caches or allocator state carried over):
a `Worker` names a module and its keyword arguments (`python -m MODULE JSON`, see
`jaxaccel.bench.worker`) and the simulated device count it needs; `worker_env` is the one
place a worker's environment is built. Contenders alternate round by round (`alternate`, so
drift hits all of them alike), and results are reported as min/median/max (`summarize`) with
ratios against a baseline each benchmark names (`ratio`).

A contender that fails or runs past its limit does not throw the others' results away: it is
left out of the results (its later rounds are skipped), recorded in `failures()`, shown as a
marked row of every table and listed under "failed" in the JSON; `jaxaccel bench` then exits
1. A run's limit is `--timeout` (`set_timeout`), else it scales with the work: at least
`DEFAULT_TIMEOUT_S`, and `TIMEOUT_FACTOR` times the slowest run that finished so far.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from rich.console import Console
from rich.table import Table

STDERR_TAIL = 2000  # characters of a failed worker's stderr quoted in the error
DEFAULT_TIMEOUT_S = 900.0
TIMEOUT_FACTOR = 10.0
# This benchmark run's state: contenders that failed (name -> why), the longest finished
# run (seconds), and the --timeout override. One benchmark per process (the CLI).
_RUN = {"failed": {}, "longest_s": 0.0, "timeout_s": None}


class BenchError(RuntimeError):
    """A benchmark could not run; `jaxaccel bench` prints it as `error: ...` and exits 1."""


class WorkerFailed(BenchError):
    """A worker exited non-zero, timed out, or printed no JSON result."""


@dataclasses.dataclass(frozen=True)
class Worker:
    """One fresh-process measurement: `python -m module JSON(kwargs)` on `devices` simulated
    CPU devices (None: as many as this process was given)."""

    module: str
    kwargs: Mapping = dataclasses.field(default_factory=dict)
    devices: int | None = None
    python: str | None = None  # another interpreter (one with vLLM, say); default: this one
    script: str | None = None  # run this file instead of `-m module` (imports no jaxaccel)

    def argv(self) -> list[str]:
        target = [self.script] if self.script else ["-m", self.module]
        return [self.python or sys.executable, *target, json.dumps(dict(self.kwargs))]


def worker_env(devices: int | None = None, base: Mapping[str, str] | None = None) -> dict:
    """A worker's environment: `base` (default: this process's) with `devices` simulated CPU
    devices and without the multi-host variables (a worker is one process, not a cluster)."""
    # deferred: the parent's imports stay light (no jax before workers start)
    from jaxaccel.parallel import distributed
    from jaxaccel.parallel.launcher import process_env

    env = process_env(0, 1, 0, host_devices=devices, base=base)
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID):
        env.pop(name, None)
    return env


def mesh_devices(mesh: str) -> int:
    """Devices a `--mesh` needs (8 when an axis is -1, 'the rest')."""
    # deferred: the parent's imports stay light (no jax before workers start)
    import math

    # deferred: the parent's imports stay light (no jax before workers start)
    from jaxaccel.parallel.sharding import parse_mesh

    sizes = parse_mesh(mesh).values()
    return 8 if -1 in sizes else math.prod(sizes)


def set_timeout(seconds: float | None) -> None:
    """`jaxaccel bench --timeout S`: every worker run's limit (None: scaled, see module)."""
    _RUN["timeout_s"] = seconds


def timeout_s() -> float:
    """The limit of the next worker run."""
    if _RUN["timeout_s"] is not None:
        return _RUN["timeout_s"]
    return max(DEFAULT_TIMEOUT_S, TIMEOUT_FACTOR * _RUN["longest_s"])


def failures() -> dict[str, str]:
    """Contenders that failed or timed out in this run: name -> one-line reason."""
    return dict(_RUN["failed"])


def record_failure(name: str, why: str) -> None:
    """A contender that failed outside `run_worker` (e.g. a server that did not start)."""
    _RUN["failed"][name] = _first_line(why)


def reset() -> None:
    _RUN.update(failed={}, longest_s=0.0)


def run_worker(name: str, worker: Worker, timeout: float | None = None) -> dict:
    """Run contender `name`'s worker in a fresh process; return the JSON object it printed.
    WorkerFailed when it exits non-zero, prints no JSON, or runs past `timeout` (default:
    `timeout_s()`)."""
    argv = worker.argv()
    timeout = timeout_s() if timeout is None else timeout
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=worker_env(worker.devices))
    except subprocess.TimeoutExpired:
        raise WorkerFailed(f"contender {name!r}: no result after {timeout:.0f} s "
                           f"({_command(argv)}); `jaxaccel bench --timeout SECONDS` sets "
                           "the limit") from None
    _RUN["longest_s"] = max(_RUN["longest_s"], time.monotonic() - start)
    if proc.returncode != 0:
        raise WorkerFailed(f"contender {name!r} failed, exit code {proc.returncode} "
                           f"({_command(argv)}); stderr ends:\n{proc.stderr[-STDERR_TAIL:]}")
    result = last_json_object(proc.stdout)
    if result is None:
        raise WorkerFailed(f"contender {name!r} printed no JSON result ({_command(argv)}); "
                           f"stdout ends:\n{proc.stdout[-STDERR_TAIL:]}")
    return result


def last_json_object(stdout: str) -> dict | None:
    """The last line of `stdout` that is a JSON object (a contender's own libraries may log
    after its result: vLLM's shutdown messages go to stdout), or None."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                found = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(found, dict):
                return found
    return None


def _command(argv: Sequence[str]) -> str:
    """The worker's command line, quoted so that it can be pasted into a shell to rerun it."""
    return shlex.join(["python", *argv[1:]])


def alternate(contenders: Mapping[str, Worker], repeats: int,
              before_run: Callable[[str], None] | None = None) -> dict[str, list[dict]]:
    """Run every contender `repeats` times, round-robin (A B C A B C ...), each run in a fresh
    process; `before_run(name)` runs before each (e.g. to drop the page cache). A contender
    that fails is recorded (`failures()`), skipped from then on and left out of the result;
    BenchError only when every contender failed."""
    results = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, worker in contenders.items():
            if name in _RUN["failed"]:
                continue
            if before_run is not None:
                before_run(name)
            try:
                results[name].append(run_worker(name, worker))
            except WorkerFailed as err:
                _RUN["failed"][name] = _first_line(str(err))
                print(f"warning: {_first_line(str(err))}", file=sys.stderr, flush=True)
    done = {name: runs for name, runs in results.items() if name not in _RUN["failed"]}
    if contenders and not done:
        raise BenchError(f"every contender failed: {'; '.join(_RUN['failed'].values())}")
    return done


def _first_line(message: str) -> str:
    """A worker failure's summary (its stderr tail follows on later lines), plus the last
    line of that tail: usually the exception."""
    lines = [line for line in message.splitlines() if line.strip()]
    return lines[0] + (f" ... {lines[-1].strip()}" if len(lines) > 1 else "")


def summarize(values: Sequence[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "runs": list(values)}


def summarize_each(runs: Mapping[str, Sequence[dict]], field: str) -> dict[str, dict]:
    """Per contender, `summarize` of one field of its runs' results."""
    return {name: summarize([r[field] for r in results]) for name, results in runs.items()}


def ratio(numerator: float | None, denominator: float | None) -> float | str:
    """numerator / denominator, or "n/a" when either is missing (a baseline not in this run)."""
    if numerator is None or not denominator:
        return "n/a"
    return numerator / denominator


def reference_available() -> bool:
    """Whether the baselines in `jaxaccel_reference` can run: the package and the `reference`
    extra (torch, transformers) it needs are installed."""
    return all(importlib.util.find_spec(name)
               for name in ("jaxaccel_reference", "torch", "transformers"))


def hf_source(ckpt: pathlib.Path) -> pathlib.Path | None:
    """The Hugging Face directory `ckpt` was converted from, if it is still there."""
    # deferred: the parent's imports stay light (no jax before workers start)
    from jaxaccel.checkpoint.manifest import Manifest

    path = Manifest.load(ckpt).source.get("path")  # absent for synthetic checkpoints
    return pathlib.Path(path) if path and pathlib.Path(path).is_dir() else None


def quantized_labels(quantize: Sequence[str], quantize_head: bool) -> list[str]:
    """The quantized contenders' labels (`quantization.Scheme.label`): each --quantize, and
    with --quantize-head each plain scheme again with its head quantized."""
    labels = list(dict.fromkeys(quantize))
    if quantize_head:
        labels += [f"{q}+head" for q in labels if "+" not in q and f"{q}+head" not in labels]
    return labels


# `bench embed` / `bench generate --help`: how to measure each build of the CPU kernels.
KERNEL_BUILD_HELP = (
    "Kernel build: the CPU's own by default (avx512 on a CPU with AVX-512 F/BW/VL, else avx2). "
    "JAXACCEL_CPU_ISA=avx2 runs the AVX2 build on an AVX-512 machine (=none: XLA's dots "
    "only); restrict PyTorch the same way with ATEN_CPU_CAPABILITY=avx2 "
    "ONEDNN_MAX_CPU_ISA=AVX2, e.g. `JAXACCEL_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 "
    "ONEDNN_MAX_CPU_ISA=AVX2 jaxaccel bench embed CKPT`. The table's title names the build "
    "that ran.")


def kernel_build_note() -> str:
    """The CPU and the build of jaxaccel's CPU kernels the workers run (`isa.describe_build`:
    workers inherit this environment, $JAXACCEL_CPU_ISA included)."""
    # deferred: the parent's imports stay light (isa itself needs no jax)
    from jaxaccel.backends.cpu import isa

    return isa.describe_build()


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
    """The table, plus one marked row per contender that failed in this run."""
    table = Table(*columns, title=title)
    rows = list(rows) + [(name, "FAILED" if "no result" not in why else "TIMED OUT",
                          *[""] * (len(columns) - 2)) for name, why in _RUN["failed"].items()]
    for row in rows:
        table.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row])
    console = Console()
    if not console.is_terminal:  # a log file: rich's 80-column default would wrap every name
        console = Console(width=160)
    console.print(table)


def write_json(path: pathlib.Path | None, payload: dict) -> None:
    """The results, with the contenders that failed in this run under "failed"."""
    if path is not None:
        payload = {**payload, "failed": failures()}
        pathlib.Path(path).write_text(json.dumps(payload, indent=1) + "\n")


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo; else `platform.processor()`) and core count."""
    import os  # deferred: only the tables that name the CPU need these
    import platform

    name = platform.processor() or "unknown CPU"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical core(s)"
