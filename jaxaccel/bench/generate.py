"""`jaxaccel bench generate CKPT`: decoder prefill and decode speed, jaxaccel vs transformers.

Per dtype (float32, bfloat16): prefill latency of one 512-token prompt, decode tokens/s at
batch 1 and 8, and at batch 1 the memory-bandwidth utilisation: parameter bytes x decode
tokens/s / this machine's memory read bandwidth, measured in the same run. transformers'
`generate` on the same weights (the checkpoint's Hugging Face source,
`jaxaccel_reference.generate_transformers`) is the baseline of each dtype and runs in the same
run when torch and transformers are installed, and so does jaxaccel bfloat16 on XLA's own dots
(`xla-dots`, without the packed-weight kernel) where the kernel applies. Every contender runs
in fresh processes, alternating round by round (see `runner`). The memory bandwidth is
measured at the start of every round, since it drifts on shared machines (here: 35-68 GB/s
from one fresh process to the next); utilisation is reported against its median and, in
brackets, against the fastest round. Prefill is also printed as matmul GFLOP/s and as a
fraction of this CPU's matmul peak in its dtype (`roofline.limits`).

`--quantize int8 --quantize int4` adds weight-only quantized contenders (bfloat16 compute,
weights quantized while they restore) to the same alternated run, and a second table of
their speed against jaxaccel bfloat16 with the bytes each decode step reads; `--quantize-head`
adds each of them again with its LM head quantized too (`int8+head`: a tied head as a
quantized copy of the embedding), and a contender may also be named by its label
(`--quantize int4+head=int4`: the head in int4 rather than the default int8).
`--prequantized DIR` adds a pre-quantized Hugging Face directory of the same model (AWQ,
GPTQ, compressed-tensors: loaded as stored) as one more quantized contender, so its decode
speed stands beside `--quantize int4`'s in the same run.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import List, Optional

import typer

from jaxaccel.bench import roofline, runner
from jaxaccel.bench.runner import Worker

DTYPES = ("float32", "bfloat16")
METRICS = ("prefill_ms", "decode_b1_tok_s", "decode_b8_tok_s")
WORKER = "jaxaccel.bench.generate_worker"


def contenders(ckpt: pathlib.Path, source: Optional[pathlib.Path], prefill_len: int,
               new_tokens: int, quantize: Sequence[str] = (),
               group_size: int = 128, quantize_head: bool = False,
               prequantized: Sequence[pathlib.Path] = ()) -> dict[str, Worker]:
    shape = {"prefill_len": prefill_len, "new_tokens": new_tokens}
    found = {f"jaxaccel {d}": Worker(WORKER, {"ckpt": str(ckpt), "dtype": d, **shape})
             for d in DTYPES}
    for scheme in runner.quantized_labels(quantize, quantize_head):
        found[quantized_name(scheme)] = Worker(WORKER, {
            "ckpt": str(ckpt), "dtype": "bfloat16", **shape, "quantize": scheme,
            "group_size": group_size})
    for directory in prequantized:  # loaded as stored, bfloat16 compute
        found[quantized_name(f"stored {directory.name}")] = Worker(WORKER, {
            "ckpt": str(directory), "dtype": "bfloat16", **shape})
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    from jaxaccel.backends.cpu import packed

    if packed.kernel_available():
        found["jaxaccel bfloat16 xla-dots"] = Worker(
            WORKER, {"ckpt": str(ckpt), "dtype": "bfloat16", **shape, "xla_dots": True})
    if source is not None and runner.reference_available():
        for d in DTYPES:
            found[baseline(d)] = Worker("jaxaccel_reference.generate_transformers",
                                        {"src": str(source), "dtype": d, **shape})
    return found


def quantized_name(scheme: str) -> str:
    return f"jaxaccel bfloat16 {scheme}"


QUANT_COLUMNS = ("contender", "bytes/token (b1)", "prefill x bf16", "b1 x bf16", "b8 x bf16")


def quantized_rows(summary: dict) -> list[tuple]:
    """Each quantized contender against jaxaccel bfloat16 (prefill: bf16 time / its time)."""
    base = summary.get("jaxaccel bfloat16")
    rows = []
    for name, entry in summary.items():
        if base is None or not name.startswith("jaxaccel bfloat16 ") or "xla-dots" in name:
            continue
        cells = [runner.ratio(base[m]["median"], entry[m]["median"]) if m == "prefill_ms"
                 else runner.ratio(entry[m]["median"], base[m]["median"]) for m in METRICS]
        rows.append((name, entry["param_bytes"], *cells))
    return rows


def baseline(dtype: str) -> str:
    """The contender each dtype is compared with."""
    return f"transformers {dtype}"


def summarize(runs: dict[str, list[dict]], bandwidth: float, peak_bandwidth: float) -> dict:
    """Median (and min/max) of every metric per contender, plus batch-1 bandwidth use
    against the median (`bandwidth`) and the fastest (`peak_bandwidth`) measurement."""
    summary = {}
    for name, results in runs.items():
        entry = {metric: runner.summarize([r[metric] for r in results]) for metric in METRICS}
        entry["param_bytes"] = results[0]["param_bytes"]
        entry["bandwidth_utilisation_b1"] = (entry["param_bytes"]
                                             * entry["decode_b1_tok_s"]["median"] / bandwidth)
        # Against the fastest round's bandwidth: the conservative reading on a machine whose
        # measured bandwidth moves between rounds.
        entry["bandwidth_utilisation_b1_vs_max"] = (
            entry["param_bytes"] * entry["decode_b1_tok_s"]["median"] / peak_bandwidth)
        if "grouped_matmul_share_b1" in results[0]:  # a mixture of experts
            entry["grouped_matmul_share_b1"] = runner.summarize(
                [r["grouped_matmul_share_b1"] for r in results])
        summary[name] = entry
    return summary


def grouped_matmul_note(summary: dict) -> str | None:
    """A mixture of experts: its grouped matmuls' time and share of a batch-1 decode step."""
    parts = [f"{name}: {100 * e['grouped_matmul_share_b1']['median']:.0f}%"
             for name, e in summary.items() if "grouped_matmul_share_b1" in e]
    return ("expert grouped matmuls' share of a batch-1 decode step (by ablation): "
            + "; ".join(parts)) if parts else None


def ratio(summary: dict, name: str, metric: str) -> float | str:
    """jaxaccel / transformers for the same dtype (prefill: transformers time / ours)."""
    base = summary.get(baseline(name.split()[1]))
    if base is None or name.startswith("transformers"):
        return "n/a"
    ours, theirs = summary[name][metric]["median"], base[metric]["median"]
    return runner.ratio(theirs, ours) if metric == "prefill_ms" else runner.ratio(ours, theirs)


COLUMNS = ("contender", "prefill ms", "x tf", "b1 tok/s", "x tf", "b1 bw use (vs fastest)",
           "b8 tok/s", "x tf", "prefill GFLOP/s (x peak)")


def add_prefill_flops(summary: dict, prefill_flops: int, peaks: dict) -> None:
    """Each entry gains `prefill_gflops` (median) and `prefill_fraction_of_peak` (against
    the roofline's matmul peak of its dtype; "n/a" without one)."""
    for name, entry in summary.items():
        gflops = prefill_flops / (entry["prefill_ms"]["median"] / 1e3) / 1e9
        entry["prefill_gflops"] = gflops
        entry["prefill_fraction_of_peak"] = roofline.fraction(gflops, peaks.get(name.split()[1]))


def table_rows(summary: dict) -> list[tuple]:
    rows = []
    for name, entry in summary.items():
        cells = [(entry[m]["median"], ratio(summary, name, m)) for m in METRICS]
        use = (f"{100 * entry['bandwidth_utilisation_b1']:.0f}% "
               f"({100 * entry['bandwidth_utilisation_b1_vs_max']:.0f}%)")
        row = (name, *cells[0], *cells[1], use, *cells[2])
        if "prefill_gflops" in entry:
            fraction = entry["prefill_fraction_of_peak"]
            row += (f"{entry['prefill_gflops']:.0f} ("
                    + (f"{fraction:.2f})" if isinstance(fraction, float) else "n/a)"),)
        rows.append(row)
    return rows


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("generate", epilog=runner.KERNEL_BUILD_HELP)
    def bench_generate(
        ckpt: pathlib.Path = typer.Argument(..., help="Decoder checkpoint (e.g. DEST/ckpt of "
                                            "`python -m jaxaccel_reference.random_decoder "
                                            "DEST`)."),
        prefill_len: int = typer.Option(512, "--prefill-len", help="Prompt tokens for prefill."),
        new_tokens: int = typer.Option(32, "--new-tokens", help="Decode tokens timed per run."),
        repeats: int = typer.Option(1, "--repeats", help="Fresh processes per contender."),
        quantize: Optional[List[str]] = typer.Option(None, "--quantize", help="Add a "
                                                     "weight-only quantized contender (int8, "
                                                     "int4; repeatable), bfloat16 compute; "
                                                     "also a label such as int4+head=int4."),
        group_size: int = typer.Option(128, "--group-size", help="int4 group size."),
        quantize_head: bool = typer.Option(False, "--quantize-head", help="Also each "
                                           "--quantize scheme with its LM head quantized "
                                           "(tied: a quantized copy of the embedding)."),
        prequantized: Optional[List[pathlib.Path]] = typer.Option(
            None, "--prequantized", help="Add a pre-quantized Hugging Face directory of the "
            "same model (AWQ, GPTQ, compressed-tensors) as a contender, loaded as stored "
            "(repeatable)."),
        json_out: Optional[pathlib.Path] = typer.Option(None, "--json", help="Write results here."),
        with_roofline: bool = typer.Option(
            True, "--roofline/--no-roofline", help="Prefill as a fraction of this CPU's matmul "
            "peak: cached `bench roofline`, else measured in this run (else: n/a)."),
    ) -> None:
        """Prefill and decode speed of jaxaccel (fp32, bf16, and quantized with --quantize)
        against transformers `generate` (fp32, bf16, when installed) on the same weights,
        with memory-bandwidth use."""
        found = {"bandwidth": Worker("jaxaccel.bench.bandwidth_worker"),
                 **contenders(ckpt, runner.hf_source(ckpt), prefill_len, new_tokens,
                              quantize or (), group_size, quantize_head, prequantized or ())}
        runs = runner.alternate(found, repeats)
        bandwidths = runner.summarize([r["read_bytes_per_s"] for r in runs.pop("bandwidth")])
        bandwidth = bandwidths["median"]
        summary = summarize(runs, bandwidth, bandwidths["max"])
        peaks, source = roofline.limits() if with_roofline else ({}, "not measured")
        add_prefill_flops(summary, roofline.forward_flops(ckpt, prefill_len), peaks)
        runner.print_table(
            f"{prefill_len}-token prefill and decode ({repeats} fresh process(es) each); memory "
            f"read bandwidth {bandwidth / 1e9:.1f} GB/s (median; "
            f"{bandwidths['min'] / 1e9:.1f}-{bandwidths['max'] / 1e9:.1f}); peaks: {source}; "
            f"{runner.kernel_build_note()}",
            COLUMNS, table_rows(summary))
        note = grouped_matmul_note(summary)
        if note:
            typer.echo(note)
        if quantize or prequantized:
            runner.print_table("weight-only quantized vs jaxaccel bfloat16 (same run)",
                               QUANT_COLUMNS, quantized_rows(summary))
        runner.write_json(json_out, {"benchmark": "generate", "prefill_len": prefill_len,
                                     "new_tokens": new_tokens, "repeats": repeats,
                                     "kernels": runner.kernel_build_note(),
                                     "read_bytes_per_s": bandwidth,
                                     "read_bytes_per_s_runs": bandwidths, "results": summary,
                                     "roofline": {"peaks": peaks, "source": source}})
