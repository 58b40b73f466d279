"""Benchmark plumbing shared by every `jaxaccel bench` command.

Each measurement runs in a fresh subprocess (no warm caches or allocator state carried over),
contenders alternate round by round (so drift hits all of them alike), and results are
reported as min/median/max with ratios against a named baseline.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import subprocess
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table


class WorkerFailed(RuntimeError):
    pass


def run_worker(argv: Sequence[str], timeout: float = 900, env: dict | None = None) -> dict:
    """Run `python ARGV...` in a fresh process; its last stdout line must be a JSON object."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise WorkerFailed(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternate(contenders: dict[str, Sequence[str]], repeats: int,
              env: dict | None = None) -> dict[str, list[dict]]:
    """Run every contender `repeats` times, round-robin; collect each run's JSON."""
    results = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, argv in contenders.items():
            results[name].append(run_worker(argv, env=env))
    return results


def summarize(values: Sequence[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "runs": list(values)}


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence]) -> None:
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row])
    console = Console()
    if not console.is_terminal:  # a log file: rich's 80-column default would wrap every name
        console = Console(width=160)
    console.print(table)


def write_json(path: pathlib.Path | None, payload: dict) -> None:
    if path is not None:
        pathlib.Path(path).write_text(json.dumps(payload, indent=1) + "\n")
