"""`jaxaccel bench embed CKPT`: sentences/s, jaxaccel fp32/bf16 vs PyTorch eager fp32/bf16.

Baseline: the faster PyTorch eager dtype ("best pytorch", `jaxaccel_reference.embed_torch`)
on the checkpoint's Hugging Face source, when the `reference` extra is installed. Each
contender's matmul GFLOP/s is also printed as a fraction of this CPU's matmul peak in its
dtype (`roofline.limits`: the cached `bench roofline`, or its peak shapes measured in this run).
`--quantize int8` (repeatable) adds jaxaccel with weight-only quantized matmul weights, per
dtype, to the same alternated run.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import List, Optional

import typer

from jaxaccel.bench import roofline, runner
from jaxaccel.bench.runner import Worker

DTYPES = ("float32", "bfloat16")
COLUMNS = ("contender", "min", "median", "max", "x best pytorch", "GFLOP/s", "x peak")


def contenders(ckpt: pathlib.Path, source: Optional[pathlib.Path], batch: int, length: int,
               iters: int, quantize: Sequence[str] = ()) -> dict[str, Worker]:
    shape = {"batch": batch, "length": length, "iters": iters}
    found = {f"jaxaccel {d}": Worker("jaxaccel.bench.embed_worker",
                                     {"ckpt": str(ckpt), "dtype": d, **shape}) for d in DTYPES}
    for scheme in quantize:
        for d in DTYPES:
            found[f"jaxaccel {d} {scheme}"] = Worker("jaxaccel.bench.embed_worker", {
                "ckpt": str(ckpt), "dtype": d, **shape, "quantize": scheme})
    if source is not None and runner.reference_available():
        for d in DTYPES:
            found[f"pytorch eager {d}"] = Worker("jaxaccel_reference.embed_torch",
                                                 {"src": str(source), "dtype": d, **shape})
    return found


def table_rows(summary: dict[str, dict], flops_per_sentence: float | None = None,
               peaks: dict | None = None) -> tuple[list[tuple], float | None]:
    """Rows of the table, and the baseline: the best PyTorch median (sentences/s). With
    `flops_per_sentence` and the roofline's `peaks`, each row also has its matmul GFLOP/s
    (median) and that as a fraction of the peak in its dtype."""
    best_torch = max((s["median"] for n, s in summary.items() if n.startswith("pytorch")),
                     default=None)
    rows = []
    for name, s in summary.items():
        row = (name, s["min"], s["median"], s["max"], runner.ratio(s["median"], best_torch))
        if flops_per_sentence is not None:
            gflops = s["median"] * flops_per_sentence / 1e9
            row += (gflops, roofline.fraction(gflops, (peaks or {}).get(name.split()[-1])))
        rows.append(row)
    return rows, best_torch


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("embed", epilog=runner.KERNEL_BUILD_HELP)
    def bench_embed(
        ckpt: pathlib.Path = typer.Argument(..., help="Encoder checkpoint (e.g. checkpoints/minilm)."),
        batch: int = typer.Option(32, "--batch", help="Sentences per batch."),
        length: int = typer.Option(128, "--length", help="Tokens per sentence."),
        iters: int = typer.Option(8, "--iters", help="Timed batches per process."),
        repeats: int = typer.Option(3, "--repeats", help="Fresh processes per contender."),
        quantize: Optional[List[str]] = typer.Option(None, "--quantize", help="Add jaxaccel "
                                                     "with weight-only quantized weights (int8, "
                                                     "int4; repeatable), per dtype."),
        json_out: Optional[pathlib.Path] = typer.Option(None, "--json", help="Write results here."),
        with_roofline: bool = typer.Option(
            True, "--roofline/--no-roofline", help="Also print GFLOP/s as a fraction of this "
            "CPU's matmul peak (cached `bench roofline`, else measured in this run)."),
    ) -> None:
        """Throughput of jaxaccel (fp32, bf16) against PyTorch eager (fp32, bf16, when torch and
        transformers are installed) on the same weights, batch and tokens, in one run."""
        found = contenders(ckpt, runner.hf_source(ckpt), batch, length, iters, quantize or ())
        runs = runner.alternate(found, repeats)
        summary = runner.summarize_each(runs, "sentences_per_s")
        flops = roofline.forward_flops(ckpt, length)
        peaks, source = roofline.limits() if with_roofline else ({}, "not measured")
        rows, best_torch = table_rows(summary, flops, peaks)
        columns = COLUMNS if with_roofline else COLUMNS[:-1]
        runner.print_table(f"sentences/s, batch {batch} x {length} tokens ({repeats} fresh "
                           f"processes each); peaks: {source}; {runner.kernel_build_note()}",
                           columns,
                           [r[:len(columns)] for r in rows])
        runner.write_json(json_out, {"benchmark": "embed", "batch": batch, "length": length,
                                     "iters": iters, "results": summary,
                                     "kernels": runner.kernel_build_note(),
                                     "best_pytorch_median": best_torch,
                                     "flops_per_sentence": flops,
                                     "roofline": {"peaks": peaks, "source": source,
                                                  "fraction_of_peak": {
                                                      r[0]: r[6] for r in rows}}})
