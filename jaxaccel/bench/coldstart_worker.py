"""One cold start in a fresh process (used by `bench coldstart`):

    python -m jaxaccel.bench.coldstart_worker '{"ckpt": CKPT, "mesh": "data=2,model=4",
        "rules": "dp_tp", "mode": "overlap", "cache": "none", "rows": 2, "length": 16}'

with mode `overlap` or `sequential` and cache a directory or `none`; it needs as many
(simulated) devices as the mesh has.

Times process start -> first embeddings of one (rows, length) batch of token ids, and the
phases: imports, plan, restore, compile, ready (restore and compile, overlapped or not), first
call, all in seconds. Prints one JSON line.
"""

from __future__ import annotations

import os
import time

from jaxaccel.bench.worker import serve


def process_start() -> float:
    """This process's start (wall clock, s), from /proc: includes interpreter start-up."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/self/stat") as handle:
        started = int(handle.read().rsplit(")", 1)[1].split()[19]) / ticks
    with open("/proc/stat") as handle:
        boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
    return boot + started


def start(ckpt: str, mesh: str, rules: str, cache: str, shape: tuple[int, int],
          overlap: bool):
    """The runtime's cold start (kept apart: its API is the runtime's to change)."""
    # deferred: the cold start's clock counts these imports
    from jaxaccel.runtime import compile_cache
    from jaxaccel.startup import coldstart
    from jaxaccel.parallel.sharding import Layout

    compile_cache.configure(None if cache == "none" else cache, enabled=cache != "none")
    layout = Layout.create(mesh, rules)
    return lambda: coldstart.start_embedder(ckpt, layout, shapes=[shape], batch_size=shape[0],
                                            overlap=overlap)


def main(ckpt: str, mesh: str, rules: str, mode: str, cache: str, rows: int,
         length: int) -> dict:
    clock = process_start()  # the clock includes interpreter start-up and every import
    # deferred: the cold start's clock counts these imports
    import jax
    import numpy as np

    # deferred: the cold start's clock counts these imports
    from jaxaccel.bench.restore_worker import pretouch
    from jaxaccel.checkpoint.manifest import Manifest

    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
    shape = (rows, length)
    start_embedder = start(ckpt, mesh, rules, cache, shape, overlap=mode == "overlap")
    imports = time.time() - clock
    # Pre-touch right before the restore, off the clock (see restore_worker): freed memory
    # left idle for ~2 s goes back to the hypervisor.
    paused = time.time()
    pretouch(int(Manifest.load(ckpt).total_bytes * 1.2))
    clock += time.time() - paused
    started = start_embedder()
    first = time.time()
    ids = np.random.default_rng(0).integers(1, 1000, size=shape).tolist()
    out = started.embedder.embed_ids(ids)
    assert np.isfinite(out).all()
    done = time.time()
    return {"mode": mode, "cache": cache != "none", "cache_hits": len(hits),
            "to_first_output": done - clock, "imports": imports,
            **started.timings, "first_call": done - first,
            "precompiled_used": started.embedder.forward.jitted._cache_size() == 0}


if __name__ == "__main__":
    serve(main)
