"""One cold start in a fresh process: `python -m jaxaccel.bench.coldstart_worker CKPT MESH RULES
MODE CACHE` with MODE `overlap` or `sequential` and CACHE a directory or `none`.

Times process start -> first embeddings of one (rows, length) batch of token ids, and the
phases: imports, plan, restore, compile, ready (restore and compile, overlapped or not), first
call. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time



def process_start() -> float:
    """This process's start (wall clock), from /proc: includes interpreter start-up."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/self/stat") as handle:
        started = int(handle.read().rsplit(")", 1)[1].split()[19]) / ticks
    with open("/proc/stat") as handle:
        boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
    return boot + started


def main(argv: list[str]) -> None:
    ckpt, mesh, rules, mode, cache, rows, length = argv
    clock = process_start()  # the clock includes interpreter start-up and every import
    import jax
    import numpy as np

    from jaxaccel import compile_cache, coldstart
    from jaxaccel.bench.restore_worker import pretouch
    from jaxaccel.checkpoint.manifest import Manifest
    from jaxaccel.sharding import Layout

    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
    compile_cache.configure(None if cache == "none" else cache, enabled=cache != "none")
    layout = Layout.create(mesh, rules)
    imports = time.time() - clock
    # Pre-touch right before the restore, off the clock (see restore_worker): freed memory
    # left idle for ~2 s goes back to the hypervisor.
    paused = time.time()
    pretouch(int(Manifest.load(ckpt).total_bytes * 1.2))
    clock += time.time() - paused
    shape = (int(rows), int(length))
    started = coldstart.start_embedder(ckpt, layout, shapes=[shape], batch_size=shape[0],
                                       overlap=mode == "overlap")
    first = time.time()
    ids = np.random.default_rng(0).integers(1, 1000, size=shape).tolist()
    out = started.embedder.embed_ids(ids)
    assert np.isfinite(out).all()
    done = time.time()
    print(json.dumps({"mode": mode, "cache": cache != "none", "cache_hits": len(hits),
                      "to_first_output": done - clock, "imports": imports,
                      **started.timings, "first_call": done - first,
                      "precompiled_used": started.embedder.fn.jitted._cache_size() == 0}))


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    main(sys.argv[1:])
