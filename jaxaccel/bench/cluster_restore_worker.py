"""One process of a multi-process restore measurement (`bench restore --processes N`).

    python -m jaxaccel.bench.cluster_restore_worker '{"source": CKPT, "mesh": "data=4,model=2",
        "rules": "dp_tp", "mode": "broadcast"}'

Started N times by `jaxaccel.launcher.launch_local` (the JAX_* variables join the processes).
Plans outside the clock, meets the others at a barrier, restores with `mode` (read-all or
broadcast), and process 0 prints one JSON line: the slowest process's restore seconds (the
cluster is ready when its last process is), every process's bytes read from storage and
seconds, and the checkpoint's bytes.
"""

from __future__ import annotations

import socket

from jaxaccel.bench.worker import serve


def main(source: str, mesh: str, rules: str, mode: str, dtype: str = "default") -> dict:
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    from jaxaccel import distributed
    from jaxaccel.loader import plan_model, restore_plan
    from jaxaccel.sharding import Layout

    distributed.initialize(distributed.cluster_from())
    plan = plan_model(source, Layout.create(mesh, rules), None if dtype == "default" else dtype)
    distributed.barrier("bench-start")
    loaded = restore_plan(plan, source, quiet=True, restore_mode=mode)
    stats = loaded.stats
    rows = distributed.gather("bench-restore", {
        "host": socket.gethostname(), "seconds": stats.seconds, "storage": stats.bytes_from_storage,
        "received": stats.bytes_broadcast})
    result = {"mode": mode, "seconds": max(r["seconds"] for r in rows.values()),
              "storage": sum(r["storage"] for r in rows.values()),
              "total_bytes": plan.manifest.total_bytes, "processes": rows}
    output = distributed.is_output_process()
    distributed.shutdown()
    return result if output else {}


if __name__ == "__main__":
    serve(main)
