"""`jaxaccel launch --processes N -- CMD...`: run CMD as N local jax.distributed processes."""

from __future__ import annotations

import os
import pathlib
import sys
from typing import List, Optional

import typer

from jaxaccel.parallel.launcher import describe_status, launch_local


def register(app: typer.Typer) -> None:
    @app.command("launch", context_settings={"allow_interspersed_args": False})
    def launch_cmd(
        command: List[str] = typer.Argument(..., help="The command each process runs, after "
                                            "`--`, e.g. `-- jaxaccel embed CKPT --mesh "
                                            "model=2,stage=4 --rules dp_tp_pp -t hi`."),
        processes: int = typer.Option(2, "--processes", "-n", min=1, help="How many processes."),
        devices_each: Optional[int] = typer.Option(
            None, "--devices-each", min=1, help="On CPU, simulate this many devices per process."),
        port: Optional[int] = typer.Option(None, "--port", help="Coordinator port on 127.0.0.1 "
                                           "(default: a free one)."),
        timeout: Optional[float] = typer.Option(
            None, "--timeout", min=1, metavar="SECONDS", help="Deadline of every blocking step "
            "in each process (sets $JAXACCEL_DISTRIBUTED_TIMEOUT)."),
        log_dir: Optional[pathlib.Path] = typer.Option(None, "--log-dir", help="Where each "
                                                       "process's log goes (default: a temp dir)."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show gloo's "
                                     "connection chatter (always in the logs)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="Show only process 0's "
                                   "stdout (the result); everything else stays in the logs."),
    ) -> None:
        """Start N local processes of one command as a jax.distributed cluster (process 0 is the
        coordinator), stream their logs (each line tagged with its process), and fail if any
        process fails. `jaxaccel` as CMD runs this same installation, activated or not."""
        with open(os.devnull, "w") as devnull:
            result = launch_local(command, processes, host_devices=devices_each, port=port,
                                  timeout_s=timeout, log_dir=log_dir, verbose=verbose,
                                  stderr=devnull if quiet else None)
        if not result.ok:  # the first failure, even with --quiet; its status is the exit code
            first = next(i for i, code in enumerate(result.codes) if code)
            print(f"error: launch: process {first} {describe_status(result.codes[first])} "
                  f"(log: {result.log_dir}/process-{first}.log)", file=sys.stderr, flush=True)
            raise typer.Exit(result.exit_code)
