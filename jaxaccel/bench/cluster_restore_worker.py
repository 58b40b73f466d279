"""One process of a multi-process restore measurement (`bench restore --processes N`).

    python -m jaxaccel.bench.cluster_restore_worker '{"source": CKPT, "mesh": "data=4,model=2",
        "rules": "dp_tp", "mode": "broadcast"}'

Started N times by `jaxaccel.parallel.launcher.launch_local` (the JAX_* variables join the processes).
Plans outside the clock, meets the others at a barrier, restores with `mode` (read-all or
broadcast), and process 0 prints one JSON line: the slowest process's restore seconds (the
cluster is ready when its last process is), every process's bytes read from storage, bytes
fetched over the network (remote sources: the chunk ranges' response bodies, as the remote
reader counts them) and seconds, and the checkpoint's bytes.

From a bucket every process starts with its own empty chunk cache, as separate hosts would:
the local processes would otherwise share one cache directory, and every launch after the
first would read the chunks from local disk instead of the server.
"""

from __future__ import annotations

import os
import socket
import tempfile

from jaxaccel.bench.worker import serve


def main(source: str, mesh: str, rules: str, mode: str, dtype: str = "default") -> dict:
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    from jaxaccel.checkpoint import storage

    if storage.is_remote(source):
        with tempfile.TemporaryDirectory(prefix="jaxaccel-bench-cache-") as cache:
            os.environ["JAXACCEL_CACHE_DIR"] = cache
            os.environ.pop("JAXACCEL_NO_CACHE", None)
            return _measure(source, mesh, rules, mode, dtype)
    return _measure(source, mesh, rules, mode, dtype)


def _measure(source: str, mesh: str, rules: str, mode: str, dtype: str) -> dict:
    # deferred: as in main, jax loads in the worker process only
    from jaxaccel.parallel import distributed
    from jaxaccel.startup.loader import plan_model, restore_plan
    from jaxaccel.parallel.sharding import Layout

    distributed.initialize(distributed.cluster_from())
    plan = plan_model(source, Layout.create(mesh, rules), None if dtype == "default" else dtype)
    distributed.barrier("bench-start")
    loaded = restore_plan(plan, source, quiet=True, restore_mode=mode)
    stats = loaded.stats
    rows = distributed.gather("bench-restore", {
        "host": socket.gethostname(), "seconds": stats.seconds, "storage": stats.bytes_from_storage,
        "received": stats.bytes_broadcast, "network": stats.bytes_from_network})
    result = {"mode": mode, "seconds": max(r["seconds"] for r in rows.values()),
              "storage": sum(r["storage"] for r in rows.values()),
              "network": sum(r["network"] for r in rows.values()),
              "total_bytes": plan.manifest.total_bytes, "processes": rows}
    output = distributed.is_output_process()
    distributed.shutdown()
    return result if output else {}


if __name__ == "__main__":
    serve(main)
