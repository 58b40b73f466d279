"""The engine's decode step with the CPU attention kernel reading pages in place, against the
plain-XLA version that gathers each row's pages (the default on every platform).

    python scripts/bench_paged_decode.py                    # GPT-2 124M shape, 16 and 64 rows
    python scripts/bench_paged_decode.py --rows 16 --context 512 --dtype bfloat16
    python scripts/bench_paged_decode.py --rows 4 --chunk 64      # prefill chunks instead

A random-weight GPT-2 124M-shaped decoder (12 layers, 12 heads of 64, vocab 50257); a pool of
pages (16 slots each) in which every row has `--context` cached tokens on its own pages; the
engine's jitted ragged step (`jaxaccel.engine.step`) over `rows` sequences of `--chunk` tokens,
once with the CPU backend (kernel) and once with its attention kernel off (gather path),
warmed up, then timed `--reps` times alternating step by step so that a shared machine's load
hits both alike. Prints the median and best wall time per step and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxaccel import models
from jaxaccel.backends import cpu
from jaxaccel.backends.cpu import isa
from jaxaccel.engine.page_pool import KVPages
from jaxaccel.engine.step import StepInputs, StepPrograms, bucket
from jaxaccel.runtime.generate import Generator

PAGE = 16


def gpt2_124m(dtype):
    config = models.family_spec("gpt2").config(
        vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
        intermediate_size=3072, max_position_embeddings=1024, eos_token_id=50256)
    model = models.family_spec("gpt2").model(config, dtype=dtype, rngs=nnx.Rngs(0))
    return model, config


def step_inputs(rows: int, context: int, pages_per_row: int, chunk: int
                ) -> tuple[StepInputs, bool]:
    """A ragged step: `rows` sequences of `chunk` new tokens each after `context` cached."""
    step = bucket([chunk] * rows, rows)
    t, s = step.tokens, step.seqs
    table = 1 + np.arange(rows * pages_per_row, dtype=np.int32).reshape(rows, pages_per_row)
    positions = np.tile(np.arange(context, context + chunk, dtype=np.int32), rows)
    seq = np.repeat(np.arange(rows), chunk)
    pad = lambda x, fill=0: np.concatenate([x, np.full(t - len(x), fill, x.dtype)])  # noqa: E731
    cu = np.arange(s + 1, dtype=np.int32) * chunk
    return StepInputs(
        ids_t=np.full(t, 11, np.int32), positions_t=pad(positions),
        page_t=pad(table[seq, positions // PAGE]), slot_t=pad(positions % PAGE),
        kv_lens_s=np.full(s, context + chunk, np.int32), cu_q_lens_s=cu,
        num_seqs=np.array([rows], np.int32), last_s=cu[1:] - 1, table_sw=table,
        temperature_s=np.zeros(s, np.float32), top_k_s=np.zeros(s, np.int32),
        top_p_s=np.ones(s, np.float32), seed_s=np.zeros(s, np.uint32),
        nth_s=np.zeros(s, np.int32), logprobs_s=np.zeros(s, bool)), step.decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--context", type=int, default=256, help="cached tokens per row")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk", type=int, default=1,
                        help="new tokens per row (1: decode; e.g. 16: a prefill chunk)")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    model, config = gpt2_124m(dtype)
    graphdef, state = nnx.split(model)
    print(isa.describe_build())
    print(f"GPT-2 124M shape, {args.dtype}, {args.context} cached tokens per row, "
          f"{args.chunk} new per row, pages of {PAGE}")
    print("| rows | gather (XLA) median ms (best) | kernel median ms (best) | speed-up |")
    print("|---|---|---|---|")
    for rows in args.rows:
        pages_per_row = -(-(args.context + args.chunk) // PAGE)
        shape = (config.num_layers, 1 + rows * pages_per_row, config.num_kv_heads, PAGE,
                 config.head_dim)
        inputs, decode = step_inputs(rows, args.context, pages_per_row, args.chunk)
        runs = {}
        for label, backend in (("gather", cpu.CpuBackend(fused_attention=False)),
                               ("kernel", cpu.backend())):
            gen = Generator(graphdef, state, config, dtype=dtype, packed_weights=False)
            gen.runtime.backend = backend  # traced with it (`backends.use`)
            programs = StepPrograms(gen.runtime, gen.state_shardings)
            storage = backend.cache_storage_dtype(dtype)
            key = jax.random.key(0)
            pages = KVPages(*(jax.random.normal(k, shape, jnp.float32).astype(storage)
                              for k in jax.random.split(key)))
            runs[label] = [gen.state, pages, programs, []]
        for _ in range(args.reps + 2):  # the first two: compile and warm-up
            for label, run in runs.items():
                start = time.perf_counter()
                run[1], tokens = run[2].run(run[0], run[1], inputs, decode)
                jax.block_until_ready(tokens)
                run[3].append(time.perf_counter() - start)
        g, k = (sorted(runs[x][3][2:]) for x in ("gather", "kernel"))
        gm, km = statistics.median(g) * 1e3, statistics.median(k) * 1e3
        print(f"| {rows} | {gm:.1f} ({g[0] * 1e3:.1f}) | {km:.1f} ({k[0] * 1e3:.1f}) | "
              f"{gm / km:.2f}x |")


if __name__ == "__main__":
    main()
