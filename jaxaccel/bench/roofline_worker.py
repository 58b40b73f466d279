"""One fresh process of `jaxaccel bench roofline`: XLA's matmul GFLOP/s at given shapes.

    python -m jaxaccel.bench.roofline_worker '{"shapes": [{"name": "sq2048", "batch": 1,
        "m": 2048, "k": 2048, "n": 2048}], "dtypes": ["float32", "bfloat16"],
        "min_seconds": 0.2}'

Each shape is a (batched) matmul [batch, m, k] x [batch, k, n] written as the models write
it: bfloat16 inputs accumulate in float32 (`preferred_element_type`) and the result is cast
back to bfloat16. Prints one JSON line: {"gflops": {dtype: {shape name: GFLOP/s}}}.
`jaxaccel_reference.matmul_torch` measures PyTorch the same way (`time_matmul`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from jaxaccel.bench.worker import serve


def flops(shape: dict) -> int:
    """Multiply-adds x 2 of one [batch, m, k] x [batch, k, n] matmul."""
    return 2 * shape["batch"] * shape["m"] * shape["k"] * shape["n"]


def time_matmul(call: Callable[[], object], wait: Callable[[object], object],
                min_seconds: float, rounds: int = 3) -> float:
    """Seconds per call: the best of `rounds` loops of back-to-back calls, each loop at
    least `min_seconds` long (short shapes repeat often enough to be timed), after a warm-up."""
    wait(call())
    count, best = 1, float("inf")
    for _ in range(rounds):
        while True:
            start = time.perf_counter()
            for _ in range(count):
                out = call()
            wait(out)
            seconds = time.perf_counter() - start
            if seconds >= min_seconds:
                break
            count = max(count * 2, int(count * min_seconds / max(seconds, 1e-6)) + 1)
        best = min(best, seconds / count)
    return best


def _xla_matmul(shape: dict, dtype: str):
    """A jitted matmul of `shape` in `dtype` and its two inputs."""
    # deferred: jax loads in the worker process only, not in `jaxaccel bench`
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    b, m, k, n = shape["batch"], shape["m"], shape["k"], shape["n"]
    x = jnp.asarray(rng.standard_normal((b, m, k), np.float32), dtype)
    w = jnp.asarray(rng.standard_normal((b, k, n), np.float32), dtype)

    @jax.jit
    def matmul(x, w):
        out = jnp.einsum("bmk,bkn->bmn", x, w, preferred_element_type=jnp.float32)
        return out.astype(dtype)

    return lambda: matmul(x, w)


def main(shapes: list[dict], dtypes: list[str], min_seconds: float = 0.2) -> dict:
    gflops = {}
    for dtype in dtypes:
        gflops[dtype] = {}
        for shape in shapes:
            seconds = time_matmul(_xla_matmul(shape, dtype), lambda out: out.block_until_ready(),
                                  min_seconds)
            gflops[dtype][shape["name"]] = flops(shape) / seconds / 1e9
    return {"gflops": gflops}


if __name__ == "__main__":
    serve(main)
