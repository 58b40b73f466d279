"""Benchmark: jaxaccel's packed bf16 matmul kernel against XLA:CPU's own bf16 dot.

    python scripts/bench_bf16_matmul.py [--rows 1 2 8 64 512] [--repeats 3] [--json FILE]

The workload is a decoder's MLP input weights: a scan over 12 stacked [768, 3072] bf16
layers (57 MB), y = x . W per layer, x of `rows` rows. Contenders, each in fresh processes,
alternated: the packed kernel (`jaxaccel.backends.cpu.packed`), XLA's dot on the plain [k, n]
weights, and (one row only) XLA's dot with the row padded to two, which is what XLA:CPU's
fast bf16 path (YNNPACK) needs. Prints GB/s of weights read (min/median/max of the
processes' best times) and kernel / XLA ratios.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

LAYERS, K, N = 12, 768, 3072
CONTENDERS = ("kernel", "xla", "xla_pad2")


def worker(contender: str, rows: int) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jaxaccel.backends.cpu import packed

    w = (0.02 * jax.random.normal(jax.random.key(0), (LAYERS, K, N))).astype(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (rows, K)).astype(jnp.bfloat16)
    if contender == "kernel":
        weights = packed.pack(w, 1, stacked=1)

        def layer(acc, index):
            y = packed.matmul(x, dataclasses.replace(weights, layer=index))
            return acc + y.sum(), None

        xs = jnp.arange(LAYERS)
    else:
        weights = jax.lax.bitcast_convert_type(w, jnp.uint16)  # sliced as uint16 (see layers)
        pad = contender == "xla_pad2"

        def layer(acc, w_u16):
            w_kn = jax.lax.bitcast_convert_type(w_u16, jnp.bfloat16)
            lhs = jnp.concatenate([x, jnp.zeros_like(x)]) if pad else x
            y = jnp.dot(lhs, w_kn, preferred_element_type=jnp.float32)[:rows]
            return acc + y.sum(), None

        xs = weights
    run = jax.jit(lambda xs: jax.lax.scan(layer, jnp.float32(0), xs)[0])
    run(xs).block_until_ready()  # compile, and touch every buffer before timing
    best = min(_timed(lambda: run(xs).block_until_ready()) for _ in range(10))
    return {"contender": contender, "rows": rows, "seconds": best,
            "gb_per_s": w.nbytes / best / 1e9}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 64, 512])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per contender")
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    parser.add_argument("--worker", nargs=2, metavar=("CONTENDER", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return

    from jaxaccel.bench import runner

    table, results = [], {}
    for rows in args.rows:
        names = [c for c in CONTENDERS if c != "xla_pad2" or rows == 1]
        runs = runner.alternate({c: [__file__, "--worker", c, str(rows)] for c in names},
                                args.repeats)
        summary = {c: runner.summarize([r["gb_per_s"] for r in runs[c]]) for c in names}
        results[str(rows)] = summary
        best_xla = max(summary[c]["median"] for c in names if c != "kernel")
        for c in names:
            s = summary[c]
            ratio = f"{s['median'] / best_xla:.2f}" if c == "kernel" else ""
            table.append((rows, c, s["min"], s["median"], s["max"], ratio))
    runner.print_table(f"bf16 x . W over {LAYERS} x [{K}, {N}] weights, GB/s of weights read "
                       f"({args.repeats} fresh processes each)",
                       ("rows", "contender", "min", "median", "max", "kernel / best XLA"), table)
    runner.write_json(args.json, {"benchmark": "bf16_matmul", "layers": LAYERS, "k": K, "n": N,
                                  "repeats": args.repeats, "results": results})


if __name__ == "__main__":
    sys.exit(main())
