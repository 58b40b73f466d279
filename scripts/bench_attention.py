"""The fused CPU attention kernel against XLA's attention (the plain backend's jnp code), alone.

    python scripts/bench_attention.py              # MiniLM b32x128 and GPT-2 512 prefill
    python scripts/bench_attention.py --reps 50

At the models' shapes (MiniLM: b32, 128 tokens, 12 heads of 32, padding mask; GPT-2 124M
prefill: b1, 512 tokens, 12 heads of 64, causal mask), in float32 and bfloat16, both
jitted, warmed up, then timed `--reps` times alternating rep by rep so that the load of a
shared machine hits both alike. Prints the best wall time, the median process CPU time
(all threads), and GFLOP/s of the full (unmasked) 4*b*n*t*s*h FLOPs at the best time.
End to end, see `jaxaccel bench embed` and `jaxaccel bench generate`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.backends import base
from jaxaccel.backends.cpu import attention as kernel

SHAPES = {"MiniLM b32x128": (32, 128, 12, 32, False), "GPT-2 prefill 512": (1, 512, 12, 64, True)}


def timed(fn, args, reps: int) -> tuple[list[float], list[float]]:
    wall, cpu = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    reps = parser.parse_args().reps
    plain = jax.jit(base.Backend().attention)
    fused = jax.jit(kernel.attention)
    print("| shape | dtype | XLA best ms (cpu ms) | kernel best ms (cpu ms) | speed-up | kernel GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for name, (b, t, n, h, causal) in SHAPES.items():
        mask = (jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, 0) if causal
                else jnp.ones((b, t, t), bool))
        for dtype in (jnp.float32, jnp.bfloat16):
            q, k, v = (jax.random.normal(key, (b, t, n, h), dtype)
                       for key in jax.random.split(jax.random.key(0), 3))
            runs = {"xla": ([], []), "kernel": ([], [])}
            for label, fn in (("xla", plain), ("kernel", fused)):
                jax.block_until_ready(fn(q, k, v, mask))
            for _ in range(reps):
                for label, fn in (("xla", plain), ("kernel", fused)):
                    wall, cpu = timed(fn, (q, k, v, mask), 1)
                    runs[label][0].extend(wall)
                    runs[label][1].extend(cpu)
            best = {label: min(w) for label, (w, _) in runs.items()}
            cpu = {label: np.median(c) for label, (_, c) in runs.items()}
            flops = 4 * b * n * t * t * h
            print(f"| {name} | {jnp.dtype(dtype).name} | {1e3 * best['xla']:.2f} "
                  f"({1e3 * cpu['xla']:.2f}) | {1e3 * best['kernel']:.2f} "
                  f"({1e3 * cpu['kernel']:.2f}) | {best['xla'] / best['kernel']:.2f}x | "
                  f"{flops / best['kernel'] / 1e9:.0f} |")


if __name__ == "__main__":
    main()
