"""`jaxaccel bench ...`: benchmarks. Each sub-command prints a table and can write JSON."""

from __future__ import annotations

import functools
import importlib
import sys

import typer

# Benchmark modules under jaxaccel/bench/ that add a sub-command via `register(bench_app)`.
BENCH_MODULES = ("embed", "restore", "coldstart", "generate", "pipeline", "classify",
                 "roofline", "quality", "throughput")


def register(app: typer.Typer) -> None:
    bench_app = typer.Typer(help="Benchmarks: each prints a table, writes JSON with --json FILE, "
                            "and measures its baseline in the same run.", no_args_is_help=True)
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(f"jaxaccel.bench.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"jaxaccel.bench.{name}":
                raise
            continue
        module.register(bench_app)
    for command in bench_app.registered_commands:
        command.callback = _clean_errors(command.callback)
    app.add_typer(bench_app, name="bench")


def _clean_errors(callback):
    """A benchmark that cannot run (a worker failed: its stderr tail is in the message) ends
    with `error: ...` on stderr and exit code 1 instead of a traceback of the harness."""
    @functools.wraps(callback)
    def run(*args, **kwargs):
        # deferred: the harness loads only when a benchmark runs, not for `jaxaccel --help`
        from jaxaccel.bench.runner import BenchError
        from jaxaccel.errors import FAILURE_EXIT

        try:
            return callback(*args, **kwargs)
        except BenchError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(FAILURE_EXIT) from None
    return run
