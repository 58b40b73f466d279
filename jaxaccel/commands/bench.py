"""`jaxaccel bench ...`: benchmarks. Each sub-command prints a table and can write JSON."""

from __future__ import annotations

import importlib

import typer

# Benchmark modules under jaxaccel/bench/ that add a sub-command via `register(bench_app)`.
BENCH_MODULES = ("embed", "restore", "coldstart", "generate", "pipeline")


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
    app.add_typer(bench_app, name="bench")
