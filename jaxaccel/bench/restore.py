"""`jaxaccel bench restore CKPT`: jaxaccel's restore vs orbax's vs a raw read of the same bytes.

Every run is a fresh process (jaxaccel.bench.restore_worker) that plans outside the clock,
pre-touches memory, then times one restore onto the mesh; contenders alternate round by round.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Optional

import typer

from jaxaccel.bench import runner

BASELINE = "orbax"


def contenders(ckpt: pathlib.Path, mesh: str, rules: str, dtype: str,
               orbax_default: Optional[pathlib.Path], engines: bool) -> dict[str, list[str]]:
    args = [mesh, rules, dtype]
    worker = ["-m", "jaxaccel.bench.restore_worker"]
    found = {"jaxaccel": [*worker, "jaxaccel", str(ckpt), *args],
             "jaxaccel + crc32c check": [*worker, "jaxaccel-crc", str(ckpt), *args]}
    if engines:
        found["jaxaccel (tensorstore engine)"] = [*worker, "jaxaccel-tensorstore", str(ckpt), *args]
    found["orbax (same checkpoint)"] = [*worker, "orbax", str(ckpt), *args]
    if orbax_default is not None:
        found["orbax (orbax default format)"] = [*worker, "orbax", str(orbax_default), *args]
    found["raw read (page cache)"] = [*worker, "raw", str(ckpt), *args]
    return found


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("restore")
    def bench_restore(
        ckpt: pathlib.Path = typer.Argument(..., help="jaxaccel checkpoint (e.g. from "
                                            "scripts/make_synthetic_checkpoint.py)."),
        mesh: str = typer.Option("data=2,model=4", "--mesh", help="Device mesh to restore onto."),
        rules: str = typer.Option("dp_tp", "--rules", help="Rule table."),
        dtype: str = typer.Option("default", "--dtype", help="Compute dtype (default: the "
                                  "checkpoint's)."),
        orbax_default: Optional[pathlib.Path] = typer.Option(
            None, "--orbax-default", help="The same tree saved with orbax's defaults "
            "(make_synthetic_checkpoint.py --orbax-default): also time orbax on its own format."),
        engines: bool = typer.Option(False, "--engines", help="Also time jaxaccel with every "
                                     "array read through tensorstore."),
        cold: bool = typer.Option(False, "--cold", help="Drop the page cache before every run "
                                  "(needs root): cold-disk figures."),
        repeats: int = typer.Option(3, "--repeats", min=1, help="Fresh processes per contender."),
        json_out: Optional[pathlib.Path] = typer.Option(None, "--json", help="Write results here."),
    ) -> None:
        """Restore time, GB/s and peak host-memory overhead of jaxaccel vs orbax vs raw read."""
        env = {**worker_env(mesh), "MANIFEST_FROM": str(ckpt)}
        found = contenders(ckpt, mesh, rules, dtype, orbax_default, engines)
        runs = {name: [] for name in found}
        for _ in range(repeats):
            for name, argv in found.items():
                if cold:
                    drop_page_cache()
                runs[name].append(runner.run_worker(argv, env=env))
        rows, summary = table_rows(runs)
        where = "cold page cache" if cold else "page cache warm, memory pre-touched"
        runner.print_table(f"restore {ckpt.name} onto {mesh} ({rules}, dtype {dtype}); {where}; "
                           f"{repeats} fresh processes each", COLUMNS, rows)
        runner.write_json(json_out, {"benchmark": "restore", "ckpt": str(ckpt), "mesh": mesh,
                                     "rules": rules, "dtype": dtype, "cold": cold,
                                     "results": summary})


def worker_env(mesh: str) -> dict:
    """Environment for a worker: as many simulated CPU devices as the mesh needs (8 when an
    axis is -1, 'the rest')."""
    from jaxaccel.sharding import parse_mesh

    sizes = parse_mesh(mesh).values()
    devices = 8 if -1 in sizes else math.prod(sizes)
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


COLUMNS = ("contender", "min s", "median s", "max s", "GB/s (median)", "peak RSS overhead MB",
           "orbax / this", "this / raw")


def table_rows(runs: dict[str, list[dict]]) -> tuple[list, dict]:
    summary = {}
    for name, results in runs.items():
        seconds = runner.summarize([r["seconds"] for r in results])
        overhead = runner.summarize([r["overhead"] for r in results])
        summary[name] = {"seconds": seconds, "overhead_bytes": overhead,
                         "bytes": results[0]["bytes"]}
    orbax = next((s["seconds"]["median"] for n, s in summary.items() if n.startswith(BASELINE)),
                 None)
    raw = next((s["seconds"]["median"] for n, s in summary.items() if n.startswith("raw")), None)
    rows = []
    for name, s in summary.items():
        t = s["seconds"]
        rows.append((name, t["min"], t["median"], t["max"], s["bytes"] / t["median"] / 1e9,
                     s["overhead_bytes"]["median"] / 1e6,
                     orbax / t["median"] if orbax else "n/a", t["median"] / raw if raw else "n/a"))
    return rows, summary


def drop_page_cache() -> None:
    os.sync()
    try:
        pathlib.Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        raise SystemExit(f"--cold needs root to drop the page cache ({err.strerror})") from None
