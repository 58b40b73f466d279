"""`jaxaccel bench coldstart CKPT`: process start -> first output, with and without compiling
during the restore, with a cold and a warm persistent compile cache.

Each run is a fresh process (jaxaccel.bench.coldstart_worker); contenders alternate. Goals
(issue 3): overlapped `ready` <= 1.1 x max(restore alone, compile alone), and with a warm
cache `ready` <= 1.1 x restore alone, both taken from the sequential, uncached runs.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from typing import Optional

import typer

from jaxaccel.bench import runner
from jaxaccel.bench.runner import Worker

# name -> (mode, cache): cache "none", "cold" (a fresh empty directory) or "warm" (filled)
CONTENDERS = {
    "sequential, no cache": ("sequential", "none"),
    "overlap, no cache": ("overlap", "none"),
    "overlap, cold cache": ("overlap", "cold"),
    "overlap, warm cache": ("overlap", "warm"),
}
PHASES = ("to_first_output", "imports", "plan", "restore", "compile", "ready", "first_call")


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("coldstart")
    def bench_coldstart(
        ckpt: pathlib.Path = typer.Argument(..., help="Encoder (bert-family) checkpoint."),
        mesh: str = typer.Option("data=2,model=4", "--mesh", help="Device mesh."),
        rules: str = typer.Option("dp_tp", "--rules", help="Rule table."),
        rows: int = typer.Option(2, "--rows", help="Batch rows of the first call."),
        length: int = typer.Option(16, "--length", help="Tokens per row of the first call."),
        repeats: int = typer.Option(3, "--repeats", min=1, help="Fresh processes per contender."),
        json_out: Optional[pathlib.Path] = typer.Option(None, "--json", help="Write results here."),
    ) -> None:
        """Cold-start time with/without overlapped compile, cold vs warm compile cache."""
        with tempfile.TemporaryDirectory(prefix="jaxaccel-coldstart-") as tmp:
            runs = run_all(ckpt, mesh, rules, rows, length, repeats, pathlib.Path(tmp))
        summary = summarize(runs)
        rows_ = [(name, s["to_first_output"]["min"], s["to_first_output"]["median"],
                  s["to_first_output"]["max"], *(s[p]["median"] for p in PHASES[1:]))
                 for name, s in summary.items()]
        runner.print_table(f"cold start {ckpt.name} on {mesh} ({rules}), first call {rows}x"
                           f"{length}; seconds, {repeats} fresh processes each",
                           ("contender", "min total", "median total", "max total", "imports",
                            "plan", "restore", "compile", "ready", "first call"), rows_)
        goals = goal_lines(summary)
        for line in goals:
            print(line)
        runner.write_json(json_out, {"benchmark": "coldstart", "ckpt": str(ckpt), "mesh": mesh,
                                     "rules": rules, "rows": rows, "length": length,
                                     "results": summary, "goals": goals})


def run_all(ckpt, mesh, rules, rows, length, repeats, tmp: pathlib.Path) -> dict:
    """Fill a warm compile cache, then alternate the contenders; a cold cache starts empty."""
    warm, cold = tmp / "warm", tmp / "cold"

    def worker(mode: str, cache: str) -> Worker:
        return Worker("jaxaccel.bench.coldstart_worker",
                      {"ckpt": str(ckpt), "mesh": mesh, "rules": rules, "mode": mode,
                       "cache": cache, "rows": rows, "length": length},
                      runner.mesh_devices(mesh))

    directories = {"none": "none", "warm": str(warm), "cold": str(cold)}
    runner.run_worker("fill the warm cache", worker("sequential", str(warm)))

    def empty_cold_cache(name: str) -> None:
        if CONTENDERS[name][1] == "cold":
            shutil.rmtree(cold, ignore_errors=True)

    return runner.alternate({name: worker(mode, directories[cache])
                             for name, (mode, cache) in CONTENDERS.items()}, repeats,
                            before_run=empty_cold_cache)


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per contender: min/median/max of every phase (s), the compile-cache hits of each run,
    and whether every first call ran the precompiled executable."""
    phases = {phase: runner.summarize_each(runs, phase) for phase in PHASES}
    return {name: {phase: phases[phase][name] for phase in PHASES}
            | {"cache_hits": [r["cache_hits"] for r in results],
               "precompiled_used": all(r["precompiled_used"] for r in results)}
            for name, results in runs.items()}


def goal_lines(summary: dict) -> list[str]:
    seq = summary["sequential, no cache"]
    restore, compile_ = seq["restore"]["median"], seq["compile"]["median"]
    overlap = summary["overlap, no cache"]["ready"]["median"]
    warm = summary["overlap, warm cache"]["ready"]["median"]
    bound = max(restore, compile_)
    return [
        f"overlap: ready {overlap:.2f} s vs max(restore {restore:.2f}, compile {compile_:.2f}) "
        f"= {bound:.2f} s: {overlap / bound:.2f}x (goal <= 1.10x)",
        f"warm cache: ready {warm:.2f} s vs restore {restore:.2f} s: {warm / restore:.2f}x "
        "(goal <= 1.10x)",
    ]
