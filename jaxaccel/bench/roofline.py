"""`jaxaccel bench roofline`: what this CPU can do, so every other benchmark can say how
close it comes.

Prints the CPU model and its ISA flags (`jaxaccel.backends.cpu.isa`), XLA's and PyTorch's
matmul GFLOP/s at the shapes jaxaccel's models run (MiniLM at batch 32 x 128 tokens, GPT-2
124M at a 512-token prefill and at decode batches 1 and 8, attention's batched matmuls) plus
a square 2048 one, in float32 and bfloat16, and the memory read bandwidth. Each contender is a
fresh process (`roofline_worker`, `jaxaccel_reference.matmul_torch`, `bandwidth_worker`),
alternated round by round.

The result is also kept in the user's cache (`cached`), keyed by CPU and jax version, where
`bench embed` and `bench generate` read it to print their figures as fractions of these
limits (`peaks`); without it they measure `PEAK_SHAPES` in their own run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib

import typer

from jaxaccel.bench import runner
from jaxaccel.bench.runner import Worker
from jaxaccel.utils.files import user_cache_dir, writable_cache_dir

DTYPES = ("float32", "bfloat16")
XLA_WORKER = "jaxaccel.bench.roofline_worker"
TORCH_WORKER = "jaxaccel_reference.matmul_torch"


def _shape(name: str, m: int, k: int, n: int, batch: int = 1) -> dict:
    return {"name": name, "batch": batch, "m": m, "k": k, "n": n}


# [batch, m, k] x [batch, k, n]: the matmuls of each model as it runs them.
SHAPES = (
    _shape("minilm qkv/out 4096x384x384", 4096, 384, 384),
    _shape("minilm mlp-in 4096x384x1536", 4096, 384, 1536),
    _shape("minilm mlp-out 4096x1536x384", 4096, 1536, 384),
    _shape("minilm scores 384x[128x32x128]", 128, 32, 128, batch=384),
    _shape("minilm probs.v 384x[128x128x32]", 128, 128, 32, batch=384),
    _shape("gpt2 qkv 512x768x2304", 512, 768, 2304),
    _shape("gpt2 out 512x768x768", 512, 768, 768),
    _shape("gpt2 mlp-in 512x768x3072", 512, 768, 3072),
    _shape("gpt2 mlp-out 512x3072x768", 512, 3072, 768),
    _shape("gpt2 scores 12x[512x64x512]", 512, 64, 512, batch=12),
    _shape("gpt2 probs.v 12x[512x512x64]", 512, 512, 64, batch=12),
    _shape("gpt2 decode b1 mlp-in 1x768x3072", 1, 768, 3072),
    _shape("gpt2 decode b8 mlp-in 8x768x3072", 8, 768, 3072),
    _shape("gpt2 decode b8 mlp-out 8x3072x768", 8, 3072, 768),
    _shape("square 2048", 2048, 2048, 2048),
)
# What `bench embed`/`generate` measure when no cached roofline exists: the shapes that set
# the peaks here (MiniLM's MLP and the square one).
PEAK_SHAPES = tuple(s for s in SHAPES if s["name"].startswith(("minilm mlp", "square")))
COLUMNS = ("shape", "xla fp32", "pytorch fp32", "xla bf16", "pytorch bf16",
           "xla/pytorch bf16")


def contenders(shapes, dtypes, min_seconds: float, bandwidth: bool) -> dict[str, Worker]:
    args = {"shapes": list(shapes), "dtypes": list(dtypes), "min_seconds": min_seconds}
    found = {"xla": Worker(XLA_WORKER, args)}
    if runner.reference_available():
        found["pytorch"] = Worker(TORCH_WORKER, args)
    if bandwidth:
        found["bandwidth"] = Worker("jaxaccel.bench.bandwidth_worker")
    return found


def measure(shapes, dtypes=DTYPES, repeats: int = 1, min_seconds: float = 0.2,
            bandwidth: bool = True) -> dict:
    """Run the contenders; the roofline JSON payload (see `register` for its fields)."""
    # deferred: CPU detection is backend code, loaded only when a benchmark runs
    from jaxaccel.backends.cpu import isa

    runs = runner.alternate(contenders(shapes, dtypes, min_seconds, bandwidth), repeats)
    matmul = []
    for shape in shapes:
        for dtype in dtypes:
            for name in ("xla", "pytorch"):
                if name in runs:
                    values = [r["gflops"][dtype][shape["name"]] for r in runs[name]]
                    matmul.append({**shape, "dtype": dtype, "contender": name,
                                   "gflops": runner.summarize(values)})
    payload = {"benchmark": "roofline", "cpu": isa.detect().as_json(), "jax": _jax_version(),
               "repeats": repeats, "matmul": matmul}
    if "bandwidth" in runs:
        payload["read_bytes_per_s"] = runner.summarize(
            [r["read_bytes_per_s"] for r in runs["bandwidth"]])
    payload["peaks"] = peaks(payload)
    return payload


def peaks(payload: dict) -> dict:
    """Per dtype, the fastest median matmul of any shape and contender:
    {dtype: {"gflops", "shape", "contender"}}, plus "read_bytes_per_s" (median) if measured."""
    best: dict = {}
    for row in payload["matmul"]:
        value = row["gflops"]["median"]
        if value > best.get(row["dtype"], {}).get("gflops", 0.0):
            best[row["dtype"]] = {"gflops": value, "shape": row["name"],
                                  "contender": row["contender"]}
    if "read_bytes_per_s" in payload:
        best["read_bytes_per_s"] = payload["read_bytes_per_s"]["median"]
    return best


def forward_flops(ckpt: pathlib.Path, tokens: int) -> int:
    """FLOPs of one sequence of `tokens` through a checkpoint's layers, counted as the
    matmuls run them: 2 x tokens x every stacked `blocks.w*` weight (the projections and the
    MLP), plus per layer the two attention matmuls over all tokens x tokens (2 x 2 x t^2 x
    d; a causal prefill computes the full square too). Embedding lookups, norms and the
    output head are left out."""
    # deferred: the parent's imports stay light (no jax before workers start)
    from jaxaccel.checkpoint.manifest import Manifest

    manifest = Manifest.load(ckpt)
    cfg = manifest.config
    weights = sum(math.prod(a.shape) for name, a in manifest.arrays.items()
                  if name.startswith("blocks.w"))
    return 2 * tokens * weights + cfg["num_layers"] * 4 * tokens * tokens * cfg["hidden_size"]


def _jax_version() -> str:
    # deferred: the parent's imports stay light (no jax before workers start)
    from importlib.metadata import version

    return version("jax")


def cache_path() -> pathlib.Path:
    """Where this machine's roofline is kept: one file per CPU model, flags and jax version."""
    # deferred: CPU detection is backend code, loaded only when a benchmark runs
    from jaxaccel.backends.cpu import isa

    cpu = isa.detect()
    key = hashlib.sha256(" ".join([cpu.model, *sorted(cpu.flags), _jax_version()]).encode())
    return user_cache_dir("") / f"roofline-{key.hexdigest()[:16]}.json"


def cached() -> dict | None:
    """The last full `bench roofline` payload measured on this CPU and jax, if any."""
    try:
        return json.loads(cache_path().read_text())
    except (OSError, json.JSONDecodeError):
        return None


def limits() -> tuple[dict, str]:
    """(peaks, where they come from): the cached roofline's, or `PEAK_SHAPES` measured now."""
    payload = cached()
    if payload is not None:
        return payload["peaks"], f"roofline {cache_path()}"
    payload = measure(PEAK_SHAPES, bandwidth=False)
    return payload["peaks"], "peak shapes measured in this run"


def fraction(value: float, peak: dict | None) -> float | str:
    """value / peak["gflops"], or "n/a" without a peak."""
    return runner.ratio(value, peak["gflops"] if peak else None)


def table_rows(payload: dict) -> list[tuple]:
    by_key = {(r["name"], r["dtype"], r["contender"]): r["gflops"]["median"]
              for r in payload["matmul"]}
    rows = []
    for name in dict.fromkeys(r["name"] for r in payload["matmul"]):
        cells = [by_key.get((name, d, c), "n/a") for d in DTYPES for c in ("xla", "pytorch")]
        rows.append((name, *cells, runner.ratio(by_key.get((name, "bfloat16", "xla")),
                                                by_key.get((name, "bfloat16", "pytorch")))))
    return rows


def _parse_shape(text: str) -> dict:
    """`MxKxN` or `BxMxKxN` -> a shape dict (named by the text)."""
    try:
        dims = [int(d) for d in text.lower().split("x")]
    except ValueError:
        dims = []
    if len(dims) not in (3, 4) or min(dims) < 1:
        raise typer.BadParameter(f"--shape {text!r}: expected MxKxN or BxMxKxN, positive ints")
    batch, m, k, n = dims if len(dims) == 4 else (1, *dims)
    return _shape(text, m, k, n, batch)


def describe(payload: dict) -> str:
    cpu = payload["cpu"]
    flags = " ".join(name for name, present in cpu["features"].items() if present) or "none"
    line = (f"{cpu['model']} ({cpu['vendor']}, family {cpu['family']}, "
            f"{cpu['logical_cpus']} logical CPUs); ISA: {flags}; jax {payload['jax']}")
    if "read_bytes_per_s" in payload:
        bw = payload["read_bytes_per_s"]
        line += (f"\nmemory read bandwidth {bw['median'] / 1e9:.1f} GB/s (median; "
                 f"{bw['min'] / 1e9:.1f}-{bw['max'] / 1e9:.1f})")
    return line


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("roofline")
    def bench_roofline(
        shape: list[str] | None = typer.Option(
            None, "--shape", help="MxKxN or BxMxKxN to measure instead of the models' shapes "
            "(repeatable); such runs are not cached."),
        repeats: int = typer.Option(1, "--repeats", help="Fresh processes per contender."),
        min_seconds: float = typer.Option(0.2, "--min-seconds",
                                          help="Shortest timed loop per shape."),
        bandwidth: bool = typer.Option(True, "--bandwidth/--no-bandwidth",
                                       help="Also measure memory read bandwidth (1 GiB)."),
        json_out: pathlib.Path | None = typer.Option(None, "--json", help="Write results here."),
    ) -> None:
        """This CPU's model and ISA flags, XLA's and PyTorch's matmul GFLOP/s at the models'
        shapes (fp32, bf16), and memory read bandwidth: the limits other benchmarks cite."""
        shapes = [_parse_shape(s) for s in shape] if shape else list(SHAPES)
        payload = measure(shapes, repeats=repeats, min_seconds=min_seconds, bandwidth=bandwidth)
        print(describe(payload))
        runner.print_table(f"matmul GFLOP/s, median of {repeats} fresh process(es); peaks: "
                           + ", ".join(f"{d} {p['gflops']:.0f} ({p['contender']}, {p['shape']})"
                                       for d, p in payload["peaks"].items() if d in DTYPES),
                           COLUMNS, table_rows(payload))
        runner.write_json(json_out, payload)
        if not shape and bandwidth and writable_cache_dir(
                cache_path().parent, "roofline cache", "$XDG_CACHE_HOME", fallback=False):
            runner.write_json(cache_path(), payload)
