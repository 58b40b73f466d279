"""The end-of-restore table of a multi-host run: each process's bytes and GB/s, and the slowest.

One slow host (a cold disk, a throttled NIC, a noisy neighbour) holds every other host at
the first collective, so process 0 names it and says by how much it was slower than the
median. Pure formatting: distributed.restore_report gathers the rows.
"""

from __future__ import annotations

import statistics


def row(stats, host: str) -> dict:
    """This process's entry (JSON-able) from its checkpoint.restore.RestoreStats."""
    return {"host": host, "bytes": stats.bytes_read, "storage": stats.bytes_from_storage,
            "received": getattr(stats, "bytes_broadcast", 0), "seconds": stats.seconds}


def _rate(entry: dict) -> float:
    """GB/s of this process's own reads (bytes it asked storage for, over its restore time)."""
    return entry["bytes"] / entry["seconds"] / 1e9 if entry["seconds"] else 0.0


def table(rows: dict[int, dict], total_bytes: int) -> str:
    """One line per process (`process P: ...`, in process order) and a `slowest:` line.

    `rows`: {process id: row(...)}; `total_bytes`: the checkpoint's bytes, for each share.
    """
    lines = []
    for pid, entry in sorted(rows.items()):
        received = (f", {entry['received'] / 1e6:.1f} MB received from replicas"
                    if entry.get("received") else "")
        lines.append(
            f"process {pid}: {entry['bytes'] / 1e6:.1f} MB "
            f"({100 * entry['bytes'] / max(total_bytes, 1):.1f}% of the checkpoint) read on "
            f"{entry.get('host', '?')}, {entry.get('storage', entry['bytes']) / 1e6:.1f} MB "
            f"from storage{received}, in {entry['seconds']:.2f} s, {_rate(entry):.2f} GB/s")
    if len(rows) > 1:
        lines.append(slowest(rows))
    return "\n".join(lines)


def slowest(rows: dict[int, dict]) -> str:
    """`slowest: process P (host) took S s, X.XXx the median M s (+D s)`."""
    pid = max(rows, key=lambda p: (rows[p]["seconds"], -p))
    worst = rows[pid]["seconds"]
    median = statistics.median(entry["seconds"] for entry in rows.values())
    ratio = worst / median if median else float("inf")
    return (f"slowest: process {pid} ({rows[pid].get('host', '?')}) took {worst:.2f} s, "
            f"{ratio:.2f}x the median {median:.2f} s (+{worst - median:.2f} s)")
