"""Start N local processes of one command as a jax.distributed cluster, for tests and users.

Each process gets the standard variables that `jaxaccel` (and `jax.distributed.initialize`)
read: JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES, JAX_PROCESS_ID,
plus XLA_FLAGS to simulate `host_devices` CPU devices each. Process 0's stdout passes through
(so `--json` output stays machine-readable); every stderr line, and the other processes'
stdout, goes to stderr prefixed `[pI]` and to `LOG_DIR/process-I.log`. The launch fails if any
process fails; survivors get `grace_s` to exit on their own (their barriers name the missing
process) before they are terminated.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from jaxaccel.parallel import distributed

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(process_id: int, processes: int, port: int, host_devices: int | None = None,
                timeout_s: float | None = None, base=None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update({distributed.ENV_COORDINATOR: f"127.0.0.1:{port}",
                distributed.ENV_NUM_PROCESSES: str(processes),
                distributed.ENV_PROCESS_ID: str(process_id)})
    if timeout_s is not None:
        env[distributed.ENV_TIMEOUT] = str(timeout_s)
    if host_devices is not None:
        flags = re.sub(rf"{_DEVICE_FLAG}=\d+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={host_devices}".strip()
    return env


@dataclasses.dataclass
class Result:
    codes: list[int]
    log_dir: pathlib.Path
    seconds: float

    @property
    def ok(self) -> bool:
        return not any(self.codes)

    @property
    def exit_code(self) -> int:
        """The first failing process's status; a process killed by signal N gives 128 + N,
        as a shell reports it (so a child's SIGINT still exits 130)."""
        code = next((c for c in self.codes if c), 0)
        return 128 - code if code < 0 else code


def describe_status(code: int) -> str:
    """`exited with status 3` or `was killed by SIGKILL` (Popen's negative codes)."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


# Lines gloo's CPU collectives print while connecting ("[Gloo] Rank 0 is connected to 1 peer
# ranks..."): noise for a user, kept in the per-process logs, shown with `verbose`.
_CHATTER = ("[Gloo]", "gloo/")


def resolve_command(command: list[str]) -> list[str]:
    """`jaxaccel ...` runs this installation's CLI (`python -m jaxaccel.cli.main`), so a launch
    works without an activated virtualenv or `jaxaccel` on PATH."""
    if command and command[0] == "jaxaccel":
        return [sys.executable, "-m", "jaxaccel.cli.main", *command[1:]]
    return list(command)


def launch_local(command: list[str], processes: int, *, host_devices: int | None = None,
                 port: int | None = None, timeout_s: float | None = None,
                 grace_s: float | None = None, log_dir: str | pathlib.Path | None = None,
                 stdout=None, stderr=None, verbose: bool = False) -> Result:
    """Run `command` as `processes` cooperating processes; wait for all of them.

    Each process's output goes to `log_dir/process-I.log` and, tagged `[pI]`, to the
    terminal (process 0's stdout to stdout); gloo's connection chatter only with `verbose`.
    """
    if not command:
        raise ValueError("launch: no command given (put it after `--`)")
    command = resolve_command(command)
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    port = port or free_port()
    log_dir = pathlib.Path(log_dir or tempfile.mkdtemp(prefix="jaxaccel-launch-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    grace_s = grace_s if grace_s is not None else (timeout_s or distributed.DEFAULT_TIMEOUT_S) + 10
    start = time.monotonic()
    procs, pumps, logs = [], [], []
    lock = threading.Lock()
    for i in range(processes):
        log = open(log_dir / f"process-{i}.log", "w", encoding="utf-8")
        logs.append(log)
        proc = subprocess.Popen(command, env=process_env(i, processes, port, host_devices, timeout_s),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                errors="replace")
        procs.append(proc)
        out_sink = stdout if i == 0 else stderr
        pumps += [_pump(proc.stdout, log, out_sink, f"[p{i}] " if i else "", lock, verbose),
                  _pump(proc.stderr, log, stderr, f"[p{i}] ", lock, verbose)]
    try:
        codes = _wait(procs, grace_s, stderr, lock)
    except KeyboardInterrupt:  # Ctrl-C: no process outlives the launch
        _stop(procs)
        raise
    finally:
        for log in logs:
            log.flush()
    for pump in pumps:
        pump.join()
    for log in logs:
        log.close()
    for i, code in enumerate(codes):
        if code:
            with lock:
                print(f"launch: process {i} {describe_status(code)} "
                      f"(log: {log_dir}/process-{i}.log)", file=stderr, flush=True)
    return Result(codes, log_dir, time.monotonic() - start)


def _pump(pipe, log, sink, prefix: str, lock, verbose: bool) -> threading.Thread:
    def run():
        for line in pipe:
            with lock:
                log.write(line)
                log.flush()
                if verbose or not any(mark in line for mark in _CHATTER):
                    sink.write(prefix + line)
                    sink.flush()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait(procs, grace_s: float, stderr, lock) -> list[int]:
    """Wait for all; once one fails, the rest get `grace_s` before they are terminated."""
    failed_at = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if failed_at is None and any(c for c in codes if c is not None):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for i, proc in enumerate(procs):
                if proc.poll() is None:
                    with lock:
                        print(f"launch: terminating process {i} ({grace_s:g} s after a failure)",
                              file=stderr, flush=True)
                    proc.terminate()
            return [p.wait() for p in procs]
        time.sleep(0.05)


def _stop(procs, grace_s: float = 5.0) -> None:
    """Interrupt every live process as a terminal's Ctrl-C would, then kill what is left
    after `grace_s`."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
