"""Benchmark: jaxaccel's packed matmul kernels against XLA:CPU's own dot, bf16 or float32.

    python scripts/bench_bf16_matmul.py [--rows 1 2 8 64 512] [--dtype float32] [--repeats 3]
        [--json FILE]

The workload is a decoder's MLP input weights: a scan over 12 stacked [768, 3072] bf16
(57 MB) or float32 (113 MB) layers, y = x . W per layer, x of `rows` rows; XLA's dot reads
each layer as the scan slices it (copied out of the stack, as in a model's layer scan). Contenders, each in fresh processes,
alternated: the packed kernel (`jaxaccel.backends.cpu.packed`), XLA's dot on the plain [k, n]
weights, and (one row only) XLA's dot with the row padded to two, which is what XLA:CPU's
fast bf16 path (YNNPACK) needs. Prints GB/s of weights read (min/median/max of the
processes' best times) and kernel / XLA ratios. Each process runs
`jaxaccel.bench.bf16_matmul_worker`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from jaxaccel.bench import runner
from jaxaccel.bench.bf16_matmul_worker import CONTENDERS, K, LAYERS, N
from jaxaccel.bench.runner import Worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 64, 512])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per contender")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    args = parser.parse_args()
    table, results = [], {}
    for rows in args.rows:
        names = [c for c in CONTENDERS
                 if c != "xla_pad2" or (rows == 1 and args.dtype == "bfloat16")]
        runs = runner.alternate({c: Worker("jaxaccel.bench.bf16_matmul_worker",
                                           {"contender": c, "rows": rows, "dtype": args.dtype})
                                 for c in names},
                                args.repeats)
        summary = runner.summarize_each(runs, "gb_per_s")
        results[str(rows)] = summary
        best_xla = max(summary[c]["median"] for c in names if c != "kernel")
        for c in names:
            s = summary[c]
            ratio = f"{s['median'] / best_xla:.2f}" if c == "kernel" else ""
            table.append((rows, c, s["min"], s["median"], s["max"], ratio))
    runner.print_table(f"{args.dtype} x . W over {LAYERS} x [{K}, {N}] weights, GB/s of weights read "
                       f"({args.repeats} fresh processes each)",
                       ("rows", "contender", "min", "median", "max", "kernel / best XLA"), table)
    runner.write_json(args.json, {"benchmark": "bf16_matmul", "dtype": args.dtype, "layers": LAYERS, "k": K, "n": N,
                                  "repeats": args.repeats, "results": results})


if __name__ == "__main__":
    sys.exit(main())
