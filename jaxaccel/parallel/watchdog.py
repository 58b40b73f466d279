"""Name a peer that died inside a collective, instead of hanging until jaxlib aborts.

A collective (gloo on CPU, NCCL on GPU) whose peer process was killed does not fail: the
survivors wait. jax's coordination service notices the missing heartbeats only after its
heartbeat timeout and then aborts every survivor with a stack trace that does not say who
died (measured: 7-8 s after a kill with a 10 s heartbeat timeout, i.e. sooner than a barrier
of the same length would name it). Around work with collectives, `watch` makes every process
beat (a counter in the coordinator's key-value store, every 0.25 s) and check the others'
beats; a peer silent for 40% of the heartbeat timeout that has not finished is named in one
`error:` line and this process exits 1 at once (nothing half-written: the restore had not
returned). A slow peer that is alive keeps beating, so a straggler is not mistaken for dead.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

from jaxaccel.parallel import distributed

_BEAT_S = 0.25  # beat interval up to 8 processes; more processes beat less often (below)


def beat_interval(processes: int, timeout_s: float) -> float:
    """Every process reads every beat, so the coordinator serves processes^2 reads per beat:
    beat less often as the cluster grows (8 s at 256 processes), but at least 4 times within
    the staleness limit."""
    return min(stale_after(timeout_s) / 4, _BEAT_S * max(1.0, processes / 8))


def stale_after(timeout_s: float) -> float:
    """Seconds of silence after which a peer counts as dead: 40% of jax's heartbeat timeout
    (distributed.initialize sets it to max(timeout, 10)), so this fires first."""
    return max(2.0, 0.4 * max(timeout_s, 10.0))


@contextlib.contextmanager
def watch(what: str):
    """Inside: a dead peer ends this process with one error line naming it (see module)."""
    cluster = distributed.active()
    if cluster is None:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=_run, args=(cluster, what, stop), daemon=True,
                              name="jaxaccel-watchdog")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):  # the coordinator may be gone: nothing to tell
            distributed.client().key_value_set(_key(what, cluster.process_id), "done",
                                               allow_overwrite=True)


def _key(what: str, pid: int) -> str:
    return f"jaxaccel/alive/{what}/{pid}"


def _run(cluster, what: str, stop: threading.Event) -> None:
    client = distributed.client()
    limit = stale_after(cluster.timeout_s)
    interval = beat_interval(cluster.num_processes, cluster.timeout_s)
    seen: dict[int, tuple[str, float]] = {}
    beat = 0
    start = time.monotonic()
    while not stop.wait(interval):
        beat += 1
        try:
            client.key_value_set(_key(what, cluster.process_id), str(beat), allow_overwrite=True)
            values = dict(client.key_value_dir_get(f"jaxaccel/alive/{what}/"))
        except Exception:  # the coordinator died: jaxlib ends this process with its own message
            return
        now = time.monotonic()
        for pid in range(cluster.num_processes):
            value = values.get(_key(what, pid))
            if pid == cluster.process_id or value == "done":
                continue
            if pid not in seen or seen[pid][0] != value:  # a new beat (or the first look)
                seen[pid] = (value, now if value is not None else start)
            if now - seen[pid][1] > limit:
                _die(cluster, what, pid, now - seen[pid][1])


def _die(cluster, what: str, pid: int, silent_s: float) -> None:
    print(f"error: {cluster.describe()}: {what}: {distributed.name_processes([pid])} stopped "
          f"responding (no heartbeat for {silent_s:.1f} s); it probably died: see its log",
          file=sys.stderr, flush=True)
    distributed.exit_now(1)
