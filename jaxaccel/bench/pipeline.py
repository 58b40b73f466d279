"""`jaxaccel bench pipeline`: the pipeline bubble, measured.

For each stage count S, a BERT-shaped encoder with random weights runs on S devices three
ways: as an S-stage pipeline (`stage=S`) with M = 1, 2S and 4S microbatches; with S=1 at the
same device count (`data=S`, no pipeline); and on one device. GPipe needs M + S − 1 steps for
M microbatches, so its ideal speedup over one device is S·M/(S+M−1) and, against `data=S`
(which has no bubble), M/(S+M−1). Each measurement runs in a fresh process
(jaxaccel.bench.pipeline_worker) on S simulated devices; the contenders of one S alternate.

On simulated CPU devices (`--xla_force_host_platform_device_count`) all "devices" share the
machine's cores, so the speedup over one device is capped by the core count; the bubble still
shows, because every stage computes during every step (bubble steps on padding).
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional

import typer

from jaxaccel.bench import runner
from jaxaccel.bench.runner import Worker


def contenders(stages: int, spec: dict) -> dict[str, Worker]:
    """Label -> worker for one stage count; every one runs on `stages` devices."""
    def worker(mesh: str, microbatches: int | None) -> Worker:
        return Worker("jaxaccel.bench.pipeline_worker",
                      {**spec, "mesh": mesh, "microbatches": microbatches}, stages)

    runs = {"1 device": worker("data=1", None), f"data={stages}": worker(f"data={stages}", None)}
    for m in (1, 2 * stages, 4 * stages):
        runs[f"stage={stages} M={m}"] = worker(f"stage={stages}", m)
    return runs


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("pipeline")
    def bench_pipeline(
        stages: str = typer.Option("2,4", "--stages", help="Stage counts S to try, e.g. 2,4,8."),
        layers: int = typer.Option(8, "--layers", min=1, help="Encoder layers."),
        hidden: int = typer.Option(256, "--hidden", min=64, help="Model width (multiple of 64)."),
        batch: int = typer.Option(32, "--batch", help="Sequences per call (divisible by 4S)."),
        length: int = typer.Option(64, "--length", help="Tokens per sequence."),
        iters: int = typer.Option(5, "--iters", min=1, help="Timed calls per process."),
        repeats: int = typer.Option(1, "--repeats", min=1, help="Fresh processes per contender."),
        json_out: Optional[pathlib.Path] = typer.Option(None, "--json", help="Write results here."),
    ) -> None:
        """Throughput of stage=S (M = 1, 2S, 4S microbatches) vs S=1 at the same device count,
        with the ideal S·M/(S+M−1); every run in a fresh process."""
        spec = {"layers": layers, "hidden": hidden, "batch": batch, "length": length,
                "iters": iters}
        counts = [int(x) for x in stages.split(",")]
        for s in counts:  # before any run: a bad S would otherwise fail after the others ran
            if batch % (4 * s):
                raise typer.BadParameter(f"--batch {batch} must be divisible by 4*S = {4 * s}")
        rows, payload = [], []
        for s in counts:
            results = runner.summarize_each(runner.alternate(contenders(s, spec), repeats),
                                            "sequences_per_s")
            rows += table_rows(s, results)
            payload.append({"stages": s, "results": results})
        runner.print_table(
            f"pipeline bubble: {layers} layers x {hidden} wide, batch {batch} x {length} tokens "
            f"(median sequences/s of {repeats} fresh process(es); {os.cpu_count()} CPU cores)",
            ("S", "M", "stage=S", "data=S", "1 dev", "stage/data", "ideal M/(S+M-1)",
             "stage/1 dev", "ideal SM/(S+M-1)"), rows)
        runner.write_json(json_out, {"benchmark": "pipeline", **spec, "runs": payload})


def table_rows(s: int, results: dict) -> list[tuple]:
    data, single = results[f"data={s}"]["median"], results["1 device"]["median"]
    rows = []
    for m in (1, 2 * s, 4 * s):
        pp = results[f"stage={s} M={m}"]["median"]
        rows.append((s, m, f"{pp:.0f}", f"{data:.0f}", f"{single:.0f}", f"{pp / data:.2f}",
                     f"{m / (s + m - 1):.2f}", f"{pp / single:.2f}", f"{s * m / (s + m - 1):.2f}"))
    return rows

