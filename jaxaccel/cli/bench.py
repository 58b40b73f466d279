"""`jaxaccel bench ...`: benchmarks. Each sub-command prints a table and can write JSON."""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Optional

import typer

# Benchmark modules under jaxaccel/bench/ that add a sub-command via `register(bench_app)`.
BENCH_MODULES = ("embed", "restore", "coldstart", "generate", "pipeline", "classify",
                 "roofline", "quality", "throughput", "serve")


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
    bench_app.callback()(_bench_options)
    app.add_typer(bench_app, name="bench")


def _bench_options(
    timeout: Optional[float] = typer.Option(
        None, "--timeout", min=1, metavar="SECONDS", help="Limit of each contender's run; "
        "one past it is a TIMED OUT row and the others still print (default: 900 s, or 10x "
        "the slowest run so far if longer). Before the benchmark: `bench --timeout 60 embed`."),
) -> None:
    """Options of every benchmark."""
    # deferred: the harness loads only when a benchmark runs, not for `jaxaccel --help`
    from jaxaccel.bench import runner

    runner.set_timeout(timeout)


def _clean_errors(callback):
    """A benchmark that cannot run (a worker failed: its stderr tail is in the message) ends
    with `error: ...` on stderr and exit code 1 instead of a traceback of the harness; one
    whose contenders partly failed prints the others (the failed ones as marked rows), then
    one `error:` line naming the failed ones, and exits 1."""
    @functools.wraps(callback)
    def run(*args, **kwargs):
        # deferred: the harness loads only when a benchmark runs, not for `jaxaccel --help`
        from jaxaccel.bench import runner
        from jaxaccel.errors import FAILURE_EXIT

        runner.reset()
        try:
            result = callback(*args, **kwargs)
        except runner.BenchError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(FAILURE_EXIT) from None
        except Exception as err:  # a table that needed a contender that failed
            if not runner.failures():
                raise
            print(f"error: {_failed(runner.failures())}; the results could not be tabulated "
                  f"without them ({type(err).__name__}: {err})", file=sys.stderr)
            raise SystemExit(FAILURE_EXIT) from None
        if runner.failures():
            print(f"error: {_failed(runner.failures())}", file=sys.stderr)
            raise SystemExit(FAILURE_EXIT)
        return result
    return run


def _failed(failures: dict[str, str]) -> str:
    return (f"{len(failures)} contender(s) failed: "
            + "; ".join(f"{name}: {why}" for name, why in failures.items()))
