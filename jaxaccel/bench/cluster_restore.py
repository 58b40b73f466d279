"""`jaxaccel bench restore CKPT --processes N`: read-all vs broadcast restore across N processes.

Each run launches N fresh local processes (jaxaccel.parallel.launcher, gloo on CPU) of
jaxaccel.bench.cluster_restore_worker restoring onto one global mesh; the two modes alternate
round by round. Reported per mode: the cluster's restore seconds (its slowest process), the
bytes all processes read from storage together (and as a multiple of the checkpoint), and
ratios against read-all. On one machine the "storage" is the page cache, so seconds measure
the collective's cost more than a bucket's; the bytes are what a remote source would serve.
From a bucket (`--source s3://...`, each process with its own cold chunk cache) the table
adds the bytes fetched over the network: the chunk ranges' response bodies as every process's
remote reader counted them (the client side; the OCDBT index and manifests, read by every
process, are not in it).
"""

from __future__ import annotations

import io
import json
import sys

from jaxaccel.bench import runner

WORKER = "jaxaccel.bench.cluster_restore_worker"
MODES = ("read-all", "broadcast")
COLUMNS = ("mode", "min s", "median s", "max s", "MB from storage", "x checkpoint",
           "read-all s / this", "storage / read-all")
REMOTE_COLUMNS = (*COLUMNS, "MB over the network", "network x checkpoint")


def run_once(kwargs: dict, processes: int, devices_each: int, timeout_s: float = 600) -> dict:
    """One launch of `processes` workers; process 0's JSON result."""
    # deferred: the parent's imports stay light (the launcher imports jaxaccel.parallel.distributed)
    from jaxaccel.parallel.launcher import launch_local

    out, err = io.StringIO(), io.StringIO()
    argv = [sys.executable, "-m", WORKER, json.dumps(kwargs)]
    result = launch_local(argv, processes, host_devices=devices_each, timeout_s=timeout_s,
                          stdout=out, stderr=err)
    if not result.ok:
        raise runner.WorkerFailed(f"restore with {kwargs['mode']} on {processes} processes "
                                  f"failed (logs: {result.log_dir}); stderr ends:\n"
                                  f"{err.getvalue()[-runner.STDERR_TAIL:]}")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def measure(source: str, mesh: str, rules: str, dtype: str, processes: int,
            repeats: int) -> dict[str, list[dict]]:
    """{mode: [result, ...]}, the modes alternating round by round."""
    devices = runner.mesh_devices(mesh)
    if devices % processes:
        raise runner.BenchError(f"--mesh {mesh} has {devices} devices, not a multiple of "
                                f"--processes {processes}")
    runs = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:
            kwargs = {"source": source, "mesh": mesh, "rules": rules, "mode": mode,
                      "dtype": dtype}
            runs[mode].append(run_once(kwargs, processes, devices // processes))
    return runs


def table_rows(runs: dict[str, list[dict]], remote: bool = False) -> tuple[list, dict]:
    """Rows of COLUMNS (REMOTE_COLUMNS when `remote`: network bytes of the first launch of
    each mode) and the JSON summary."""
    seconds = runner.summarize_each(runs, "seconds")
    storage = {mode: results[0]["storage"] for mode, results in runs.items()}
    network = {mode: results[0].get("network", 0) for mode, results in runs.items()}
    total = next(iter(runs.values()))[0]["total_bytes"]
    base_s, base_bytes = seconds["read-all"]["median"], storage["read-all"]
    rows, summary = [], {}
    for mode, s in seconds.items():
        row = (mode, s["min"], s["median"], s["max"], storage[mode] / 1e6,
               storage[mode] / total, runner.ratio(base_s, s["median"]),
               runner.ratio(storage[mode], base_bytes))
        rows.append((*row, network[mode] / 1e6, network[mode] / total) if remote else row)
        summary[mode] = {"seconds": s, "bytes_from_storage": storage[mode],
                         "bytes_from_network": network[mode],
                         "checkpoint_bytes": total,
                         "per_process": [r["processes"] for r in runs[mode]]}
    return rows, summary
