"""Multi-host runs on JAX's own multi-controller runtime (`jax.distributed`).

Every process runs the same command; `initialize` connects it to the coordinator (process 0
hosts the coordination service), after which `jax.devices()` lists the devices of all
processes and a mesh spans them. Restore then reads only the slices this process's devices
hold (see checkpoint.restore), and output comes from process 0 alone.

Every blocking step has a deadline and, when it passes, fails naming the processes that did
not arrive: `initialize` (connect), `gather` (a barrier that also exchanges small JSON
values, e.g. restore statistics) and `shutdown`. Barriers poll the coordinator's key-value
store rather than calling `wait_at_barrier`, so that a timeout can say *who* is missing.
If the coordinator itself (process 0) dies, jaxlib's coordination client ends the survivors
at once, non-zero, with its own message ("the leader task ... died").
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time

import numpy as np

from jaxaccel.parallel import cluster as environments
from jaxaccel.parallel import straggler
from jaxaccel.utils import progress
from jaxaccel.errors import USAGE_EXIT, DistributedError  # noqa: F401  (re-exported)

DEFAULT_TIMEOUT_S = 120.0
_POLL_S = 0.05
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed.initialize itself
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_TIMEOUT = "JAXACCEL_DISTRIBUTED_TIMEOUT"




@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process joins. None fields are left to jax's own cluster detection
    (`jax.distributed.initialize` without them) and filled in once joined."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    timeout_s: float = DEFAULT_TIMEOUT_S
    environment: str = "flags"  # what told us: flags, JAX_* variables, slurm, open mpi, ...

    def describe(self) -> str:
        who = ("this process" if self.process_id is None
               else f"process {self.process_id}/{self.num_processes}")
        return f"{who} (coordinator {self.coordinator or 'from the ' + self.environment + ' environment'})"


_cluster: Cluster | None = None
_barrier_counts: dict[str, int] = {}


def cluster_from(coordinator: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None, timeout_s: float | None = None,
                 environ=os.environ, mode: str = "auto") -> Cluster | None:
    """How to join: flags first, then the JAX_* variables, then (`mode` auto) a cluster
    environment jax detects itself (SLURM, Open MPI, TPU pod, Kubernetes; see jaxaccel.parallel.cluster).
    None for a single-process run (always with `mode` off). Raises ValueError naming the flag."""
    if mode not in environments.MODES:
        raise ValueError(f"--distributed must be one of {environments.MODES}, got {mode!r}")
    flags = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}
    if mode == "off":
        given = [flag for flag, v in flags.items() if v is not None]
        if given:
            raise ValueError(f"--distributed off contradicts {', '.join(given)}: drop one")
        return None
    found = environments.detect(environ)
    coordinator = coordinator or environ.get(ENV_COORDINATOR)
    if num_processes is None:
        num_processes = environments.env_int(environ, ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = environments.env_int(environ, ENV_PROCESS_ID)
    if timeout_s is None:
        timeout_s = float(environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S))
    given = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}
    source = "flags" if any(v is not None for v in flags.values()) else (
        found.name if found else "JAX_* variables")
    if all(v is None for v in given.values()):
        if found is None or not found.joins:
            return None
        return Cluster(None, None, None, timeout_s, found.name)  # jax detects the rest
    missing = [flag for flag, v in given.items() if v is None]
    if missing and (found is None or found.name == "JAX_* variables"):
        raise ValueError(f"multi-host runs need --coordinator, --num-processes and --process-id "
                         f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); "
                         f"missing {', '.join(missing)}")
    if coordinator is not None and ":" not in coordinator:
        raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if None not in (process_id, num_processes) and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    return Cluster(coordinator, num_processes, process_id, timeout_s, source)


def initialize(cluster: Cluster | None) -> None:
    """Connect to the coordinator (a no-op for None); within the timeout or fail naming it.

    Fields of `cluster` left None are found by jax's own detection; the first status line
    says which environment was detected and what this process is."""
    global _cluster
    if cluster is None or _cluster is not None:
        return
    import jax  # deferred: jax starts after --host-devices set XLA's flags

    # CPU collectives across processes need gloo; the flag only affects the CPU backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _keep_stdout_for_results()
    timeout = max(1, int(cluster.timeout_s))
    try:
        jax.distributed.initialize(
            cluster.coordinator, cluster.num_processes, cluster.process_id,
            initialization_timeout=timeout, heartbeat_timeout_seconds=max(timeout, 10),
            shutdown_timeout_seconds=timeout)
    except Exception as err:  # jaxlib raises XlaRuntimeError/ValueError with a long status text
        raise DistributedError(
            f"{cluster.describe()}: could not join the {cluster.environment} cluster within "
            f"{timeout} s ({_first_line(err)}); is every process started, and is the "
            f"coordinator (process 0) listening on {_client_address() or cluster.coordinator}?"
        ) from None
    _cluster = dataclasses.replace(
        cluster, coordinator=_client_address() or cluster.coordinator,
        num_processes=jax.process_count(), process_id=jax.process_index())
    client().key_value_set(f"jaxaccel/who/{_cluster.process_id}",
                            f"{socket.gethostname()} pid {os.getpid()}")
    progress.say(f"distributed: {_cluster.environment} detected; connected as process "
                 f"{_cluster.process_id}/{_cluster.num_processes} on host "
                 f"{socket.gethostname()}, {jax.local_device_count()} local devices "
                 f"({jax.device_count()} in all; coordinator {_cluster.coordinator})")


def _client_address() -> str | None:
    """The coordinator address jax settled on (its own detection may have chosen it)."""
    from jax._src import (
        distributed as jax_distributed,  # deferred: jax (see initialize)
    )

    return jax_distributed.global_state.coordinator_address


def _keep_stdout_for_results() -> None:
    """Send native writes to fd 1 (gloo's "[Gloo] Rank 0 is connected..." chatter, from
    several threads at once) to stderr, keeping Python's sys.stdout on the real stdout so
    `--json` output stays parseable."""
    try:
        sys.stdout.flush()
        results = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = os.fdopen(results, "w", buffering=1, encoding=sys.stdout.encoding or "utf-8")
    except (OSError, ValueError, AttributeError):  # no real fds (e.g. captured by a notebook)
        pass


def active() -> Cluster | None:
    return _cluster


def process_index() -> int:
    return _cluster.process_id if _cluster else 0


def is_output_process() -> bool:
    """Whether this process prints results (process 0 of a cluster; always when alone)."""
    return process_index() == 0


def client():
    """jax's coordination-service client (key-value store, barriers) of the joined cluster."""
    from jax._src import (
        distributed as jax_distributed,  # deferred: jax (see initialize)
    )

    return jax_distributed.global_state.client


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def gather(name: str, value=None, timeout_s: float | None = None) -> dict[int, object]:
    """Barrier that also exchanges one JSON value per process: {process_id: value}.

    Fails after `timeout_s` with a DistributedError naming every process that did not arrive.
    A single-process run returns {0: value} at once.
    """
    if _cluster is None:
        return {0: value}
    timeout_s = _cluster.timeout_s if timeout_s is None else timeout_s
    _barrier_counts[name] = _barrier_counts.get(name, 0) + 1
    prefix = f"jaxaccel/gather/{name}/{_barrier_counts[name]}/"
    kv = client()
    deadline = time.monotonic() + timeout_s
    try:
        kv.key_value_set(prefix + str(_cluster.process_id), json.dumps(value))
        while True:
            entries = dict(kv.key_value_dir_get(prefix))
            arrived = {int(key.rsplit("/", 1)[1]): json.loads(v) for key, v in entries.items()}
            if len(arrived) == _cluster.num_processes:
                return dict(sorted(arrived.items()))
            if time.monotonic() > deadline:
                missing = sorted(set(range(_cluster.num_processes)) - set(arrived))
                raise DistributedError(
                    f"{_cluster.describe()}: timed out after {timeout_s:g} s at {name!r}: "
                    f"{name_processes(missing)} did not arrive")
            time.sleep(_POLL_S)
    except DistributedError:
        raise
    except Exception as err:  # the coordinator itself is gone (process 0 died)
        raise DistributedError(
            f"{_cluster.describe()}: lost the coordinator, process 0 at {_cluster.coordinator}, "
            f"at {name!r} ({_first_line(err)})") from None


def name_processes(ids: list[int]) -> str:
    """`process 1 (host pid 123), ...`: each process with what it registered on joining."""
    names = []
    for pid in ids:
        try:
            who = client().key_value_try_get(f"jaxaccel/who/{pid}")
        except Exception:
            who = None
        names.append(f"process {pid}" + (f" ({who})" if who else ""))
    return ", ".join(names)


def barrier(name: str, timeout_s: float | None = None) -> None:
    gather(name, None, timeout_s)


def shutdown() -> None:
    """Leave the cluster cleanly (itself a barrier, bounded by the shutdown timeout)."""
    global _cluster
    if _cluster is None:
        return
    import jax  # deferred: jax starts after --host-devices set XLA's flags

    try:
        jax.distributed.shutdown()
    finally:
        _cluster = None


# How long a process that fails with a usage error waits for its peers before exiting
# (`exit_after_error`): a usage error (a refused --mesh) fails on every process at once, and
# they leave together in well under a second; a peer that did not fail costs this much, once.
ERROR_EXIT_WAIT_S = 3.0
# How long process 0, which hosts the coordination service, stays after that barrier: a peer
# whose service vanishes before its own exit is aborted by jax's client (SIGABRT, not `code`).
_SERVICE_GRACE_S = 0.5


def exit_after_error(code: int) -> None:
    """Exit with `code` after a failed command, without killing peers that fail the same way.

    After a usage error (exit code 2: the same bad flags on every process), the processes that
    reach this within `ERROR_EXIT_WAIT_S` leave together, process 0 last; any other failure
    (often a dead peer, already waited for) exits at once (jax's own shutdown barrier would
    wait its full timeout, or forever)."""
    if _cluster is not None and code == USAGE_EXIT:
        try:
            gather("error-exit", code, ERROR_EXIT_WAIT_S)
        except DistributedError:
            pass
        else:
            if _cluster.process_id == 0:
                time.sleep(_SERVICE_GRACE_S)
    exit_now(code)


def exit_now(code: int) -> None:
    """Exit at once, skipping jax's exit-time shutdown barrier that a dead peer never reaches."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def host_array(x):
    """A jax.Array as one numpy array on every process, gathering other processes' shards."""

    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils  # deferred: jax (see initialize)

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def restore_report(stats, total_bytes: int) -> str:
    """Every process's restore bytes, share of the checkpoint, GB/s and the slowest process
    (a gather; see jaxaccel.parallel.straggler)."""
    rows = gather("restore", straggler.row(stats, socket.gethostname()))
    return straggler.table(rows, total_bytes)
