"""The worker side of every benchmark: one measurement in a fresh process.

A worker is a module with `main(**kwargs) -> dict` that ends with

    if __name__ == "__main__":
        serve(main)

It runs as `python -m MODULE '{"kwarg": value, ...}'` and prints its result as one JSON
object, the last line of its stdout (libraries may print before it). `runner.Worker` names
one and `runner.run_worker` starts it.

Only the standard library is imported here: `coldstart_worker` counts every import.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable


def serve(main: Callable[..., dict]) -> None:
    """Call `main(**kwargs)` with the JSON object in argv[1]; print its result as one line."""
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m {main.__module__} "
                         "'{\"keyword\": value, ...}' (the arguments of its main())")
    print(json.dumps(main(**json.loads(sys.argv[1]))), flush=True)


def best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` timed calls, after one untimed (compile, warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def loop_seconds(step: Callable[[], object], iters: int, warmup: int = 2,
                 wait: Callable[[object], object] = lambda out: out) -> float:
    """Seconds for `iters` back-to-back calls of `step`, after `warmup` untimed ones.

    `wait(output)` runs on the last output before the clock stops: jax dispatches
    asynchronously, so only a `block_until_ready` there times the work itself.
    """
    for _ in range(warmup):
        wait(step())
    start = time.perf_counter()
    for _ in range(iters):
        out = step()
    wait(out)
    return time.perf_counter() - start
