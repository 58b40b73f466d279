"""Benchmark: jaxaccel's weight-only int8 / int4 matmul kernel against the packed bf16 kernel
and XLA's dequantize-then-dot, on the GPT-2 124M matmul shapes.

    python scripts/bench_quantized_matmul.py [--rows 1 8] [--repeats 3] [--contenders ...]
                                             [--json FILE]

Each shape is a scan over 12 stacked weights (the model's layers), y = x . W per layer, x
bfloat16 of `rows` rows. Contenders (`jaxaccel.bench.quantized_matmul_worker`), each in
fresh processes, alternated: `bf16`, `int8`, `int4` (group 128), and XLA's `int8_xla` /
`int4_xla` / `qwix_int8` / `qwix_int4`. Prints the CPU model and its ISA flags, GB/s of
weight bytes read (min/median/max of the processes' best times) and speed-ups (bf16 time /
contender time, from medians).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from jaxaccel.bench import runner
from jaxaccel.bench.quantized_matmul_worker import CONTENDERS, LAYERS, SHAPES
from jaxaccel.bench.runner import Worker

ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_line() -> str:
    """The CPU model and which of ISA_FLAGS it has (from /proc/cpuinfo)."""
    model, flags = "unknown CPU", set()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return model + ": " + " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in ISA_FLAGS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per contender")
    parser.add_argument("--contenders", nargs="+", default=["bf16", "int8", "int4"],
                        choices=CONTENDERS)
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    args = parser.parse_args()
    print(cpu_line())
    runs = runner.alternate({c: Worker("jaxaccel.bench.quantized_matmul_worker",
                                       {"contender": c, "rows": args.rows})
                             for c in args.contenders}, args.repeats)
    table, results = [], {}
    for k, n in SHAPES:
        for rows in args.rows:
            key = f"{k}x{n}/{rows}"
            per = {c: [r["results"][key] for r in runs[c]] for c in args.contenders}
            gbs = {c: runner.summarize([p["gb_per_s"] for p in v]) for c, v in per.items()}
            secs = {c: runner.summarize([p["seconds"] for p in v]) for c, v in per.items()}
            results[key] = {"gb_per_s": gbs, "seconds": secs}
            for c in args.contenders:
                speedup = (f"{secs['bf16']['median'] / secs[c]['median']:.2f}"
                           if "bf16" in secs else "")
                table.append((f"[{k}, {n}]", rows, c, gbs[c]["min"], gbs[c]["median"],
                              gbs[c]["max"], speedup))
    runner.print_table(f"x . W over {LAYERS} stacked weights per shape, GB/s of weight bytes "
                       f"read ({args.repeats} fresh processes each, alternated)",
                       ("shape", "rows", "contender", "min", "median", "max",
                        "speed-up vs bf16 (time)"), table)
    runner.write_json(args.json, {"benchmark": "quantized_matmul", "cpu": cpu_line(),
                                  "layers": LAYERS, "repeats": args.repeats,
                                  "results": results})


if __name__ == "__main__":
    sys.exit(main())
