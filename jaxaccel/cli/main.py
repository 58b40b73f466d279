"""The `jaxaccel` command line. Thin: parse, call a module, print.

jax is imported only inside commands, after the global `--host-devices` option has had the
chance to set XLA_FLAGS (XLA reads it once, when its CPU backend starts).
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_at_start(signum, frame) -> None:
    """Ctrl-C before any command runs (the imports take a second) has nothing to clean up."""
    print("error: interrupted", file=sys.stderr, flush=True)
    os._exit(130)


if __name__ == "__main__":  # `python -m jaxaccel.cli.main`: guard the imports below
    signal.signal(signal.SIGINT, _interrupted_at_start)

import importlib  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from typing import Optional  # noqa: E402

import click  # noqa: E402
import typer  # noqa: E402

from jaxaccel import __version__, errors  # noqa: E402
from jaxaccel.checkpoint import restore_mode as restore_mode_  # noqa: E402
from jaxaccel.parallel import distributed  # noqa: E402
from jaxaccel.utils import platform  # noqa: E402

app = typer.Typer(
    name="jaxaccel",
    help="Compiled, sharded, streaming-restore inference for Flax models on JAX/XLA.\n\n"
         "Convert a Hugging Face safetensors model into a jaxaccel checkpoint (orbax OCDBT + "
         "zarr3), inspect it, and run it jitted on a device mesh. Try `jaxaccel demo`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Ctrl-C: the shell's convention for a process ended by SIGINT (128 + 2).
INTERRUPTED_EXIT = 130
# Set when Ctrl-C (SIGINT) arrives while a command runs.
_INTERRUPTED = {"seen": False}
# Set by the global --debug option: unexpected errors then print their traceback.
_DEBUG = {"enabled": False}


def _version(value: bool) -> None:
    if value:
        print(f"jaxaccel {__version__}")
        raise typer.Exit()


_VERSION = typer.Option(False, "--version", callback=_version, is_eager=True,
    help="Print jaxaccel's version and exit.")
_HOST_DEVICES = typer.Option(
    None, "--host-devices", min=1,
    help="On CPU, simulate N devices (sets XLA's host device count before jax starts); "
    "use with --mesh to try data/tensor/pipeline parallel layouts on one machine.")
_COORDINATOR = typer.Option(
    None, "--coordinator", metavar="HOST:PORT",
    help="Multi-host: the coordinator's address (process 0 serves it). Also read from "
    "$JAX_COORDINATOR_ADDRESS. See `jaxaccel launch` to start local processes.")
_NUM_PROCESSES = typer.Option(
    None, "--num-processes", min=1, help="Multi-host: how many processes take part "
    "($JAX_NUM_PROCESSES).")
_PROCESS_ID = typer.Option(
    None, "--process-id", min=0, help="Multi-host: this process's index, 0..N-1 "
    "($JAX_PROCESS_ID). Only process 0 prints results.")
_DISTRIBUTED_TIMEOUT = typer.Option(
    None, "--distributed-timeout", min=1, metavar="SECONDS",
    help="Multi-host: deadline of every blocking step (connect, barriers); on expiry the "
    "error names the process that did not arrive. Default 120.")
_DISTRIBUTED_MODE = typer.Option(
    "auto", "--distributed", metavar="auto|off",
    help="Multi-host: auto joins the cluster this process was started in (srun, mpirun, "
    "a TPU pod slice, a Kubernetes indexed Job/JobSet, the JAX_* variables), as "
    "jax.distributed detects it; off runs alone even there.")
_RESTORE_MODE = typer.Option(
    "auto", "--restore-mode", metavar="auto|read-all|broadcast",
    help="Multi-host restore: read-all (every process reads the slices its devices "
    "hold), broadcast (each slice replicated across processes is read once and sent "
    "to the others over the devices), auto (broadcast when replicas span processes "
    "and the checkpoint is remote).")
_DEBUG_OPTION = typer.Option(
    False, "--debug", help="Print the full traceback of an unexpected error (without it: "
    "one line and exit code 1).")
_S3_ENDPOINT = typer.Option(
    None, "--s3-endpoint", metavar="URL", help="Remote checkpoints: endpoint of an "
    "S3-compatible store for s3:// paths (sets $AWS_ENDPOINT_URL).")
_CONCURRENCY = typer.Option(
    None, "--concurrency", min=1, help="Remote checkpoints: requests in flight per storage "
    "driver ($JAXACCEL_REMOTE_CONCURRENCY, default 32).")
_CACHE_DIR = typer.Option(
    None, "--cache-dir", help="Remote checkpoints: local chunk cache directory "
    "($JAXACCEL_CACHE_DIR, default ~/.cache/jaxaccel/chunks).")
_CACHE_SIZE = typer.Option(
    None, "--cache-size", help="Remote checkpoints: chunk cache limit, least recently used "
    "chunks are evicted beyond it ($JAXACCEL_CACHE_SIZE, default 50GiB).")
_NO_CACHE = typer.Option(
    False, "--no-cache", help="Remote checkpoints: read every chunk from the network, "
    "neither reading nor filling the chunk cache ($JAXACCEL_NO_CACHE=1).")


def _export_remote_settings(s3_endpoint, concurrency, cache_dir, cache_size, no_cache) -> None:
    """Remote-checkpoint options as environment variables, so that bench and launch
    subprocesses inherit them."""
    for name, value in (("AWS_ENDPOINT_URL", s3_endpoint), ("JAXACCEL_CACHE_DIR", cache_dir),
                        ("JAXACCEL_CACHE_SIZE", cache_size),
                        ("JAXACCEL_REMOTE_CONCURRENCY", concurrency and str(concurrency)),
                        ("JAXACCEL_NO_CACHE", "1" if no_cache else None)):
        if value:
            os.environ[name] = value


@app.callback()
def _global_options(
    version: bool = _VERSION,
    host_devices: Optional[int] = _HOST_DEVICES,
    coordinator: Optional[str] = _COORDINATOR,
    num_processes: Optional[int] = _NUM_PROCESSES,
    process_id: Optional[int] = _PROCESS_ID,
    distributed_timeout: Optional[float] = _DISTRIBUTED_TIMEOUT,
    distributed_mode: str = _DISTRIBUTED_MODE,
    restore_mode: str = _RESTORE_MODE,
    debug: bool = _DEBUG_OPTION,
    s3_endpoint: Optional[str] = _S3_ENDPOINT,
    concurrency: Optional[int] = _CONCURRENCY,
    cache_dir: Optional[str] = _CACHE_DIR,
    cache_size: Optional[str] = _CACHE_SIZE,
    no_cache: bool = _NO_CACHE,
) -> None:
    _DEBUG["enabled"] = debug
    _export_remote_settings(s3_endpoint, concurrency, cache_dir, cache_size, no_cache)
    platform.configure_host_devices(host_devices)
    try:
        cluster = distributed.cluster_from(coordinator, num_processes, process_id,
                                           distributed_timeout, mode=distributed_mode)
        restore_mode_.set_default(restore_mode)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    distributed.initialize(cluster)


# Command modules under jaxaccel/cli/, in --help order; each has `register(app)`.
COMMANDS = ("convert", "inspect", "embed", "generate", "classify", "demo", "plan", "verify", "launch", "bench",
            "cache", "serve", "run-batch")

for _name in COMMANDS:
    try:
        _module = importlib.import_module(f"jaxaccel.cli.{_name.replace('-', '_')}")
    except ModuleNotFoundError as _err:  # a command whose module is not part of this build
        if _err.name != f"jaxaccel.cli.{_name.replace('-', '_')}":
            raise
        continue
    _module.register(app)


# Options of the `jaxaccel` command itself, which click accepts only before the subcommand.
GLOBAL_OPTIONS = ("--host-devices", "--coordinator", "--num-processes", "--process-id",
                  "--distributed-timeout", "--distributed", "--restore-mode", "--debug",
                  "--s3-endpoint", "--concurrency", "--cache-dir", "--cache-size", "--no-cache")


def misplaced_global_option(argv: list[str]) -> str | None:
    """The first global option given after the subcommand (where click would not know it)."""
    command = next((i for i, arg in enumerate(argv) if arg in COMMANDS), None)
    if command is None or (len(argv) > 1 and argv[command] == "launch"):
        return None  # launch passes its own arguments on to the command it starts
    for arg in argv[command + 1:]:
        if arg == "--":
            return None
        if arg.split("=", 1)[0] in GLOBAL_OPTIONS:
            return arg.split("=", 1)[0]
    return None


def run_with_clean_errors(typer_app) -> int:
    """Run the typer app; every error becomes one `error: ...` line on stderr and an exit
    code (2 usage, 1 anything else); `--debug` adds the traceback of unexpected ones."""
    _DEBUG["enabled"] = False
    _INTERRUPTED["seen"] = False
    option = misplaced_global_option(sys.argv[1:])
    if option:
        print(f"error: {option} is an option of `jaxaccel` itself: put it before the "
              f"subcommand, e.g. `jaxaccel {option} ... embed CKPT ...`", file=sys.stderr)
        return errors.USAGE_EXIT
    code = _run(typer_app)
    if _INTERRUPTED["seen"] and code in (0, INTERRUPTED_EXIT):
        # typer turns Ctrl-C into a silent exit 130, and an interrupt that landed in a
        # callback (jax's gc hook) is swallowed while the command goes on: either way the
        # user pressed Ctrl-C, and hears so once.
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    return code


def _run(typer_app) -> int:
    try:
        # Without standalone mode click *returns* the code of a `typer.Exit(code)`: keep it,
        # or a command that failed that way (launch, bench) would exit 0.
        code = typer_app(standalone_mode=False)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else errors.FAILURE_EXIT
    except KeyboardInterrupt:
        _INTERRUPTED["seen"] = True
        return INTERRUPTED_EXIT
    except Exception as err:
        if _INTERRUPTED["seen"]:  # a library's error about the interrupt it was given
            return INTERRUPTED_EXIT
        return _report(err)
    return code if isinstance(code, int) else 0


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(ClickException, Abort) classes of click and of the copy newer typers vendor."""
    exceptions, aborts = [click.exceptions.ClickException], [click.exceptions.Abort]
    try:
        from typer._click import (
            exceptions as vendored,  # deferred: only newer typers have it
        )
    except ImportError:
        pass
    else:
        exceptions.append(vendored.ClickException)
        aborts += [vendored.Abort] if hasattr(vendored, "Abort") else []
    return tuple(exceptions), tuple(aborts)


def _report(err: Exception) -> int:
    click_exceptions, aborts = _click_errors()
    if isinstance(err, click_exceptions):  # bad flags, from typer/click: one line, as ours
        print(f"error: {_command_name()}: {_one_line(err.format_message())}", file=sys.stderr)
        return err.exit_code
    if isinstance(err, aborts):  # click turns Ctrl-C into Abort
        if isinstance(err.__context__, KeyboardInterrupt):
            _INTERRUPTED["seen"] = True
            return INTERRUPTED_EXIT
        return errors.FAILURE_EXIT
    code = errors.exit_code(err)
    if code is not None:
        print(f"error: {_one_line(str(err))}", file=sys.stderr)
        return code
    if _DEBUG["enabled"]:
        traceback.print_exception(err, file=sys.stderr)
    print(f"error: {_command_name()}: {type(err).__name__}: {_one_line(str(err))}"
          + ("" if _DEBUG["enabled"] else " (--debug shows the traceback)"), file=sys.stderr)
    return errors.FAILURE_EXIT


def _one_line(message: str) -> str:
    """Library messages may span lines; a command's error is one."""
    return " ".join(message.split()) or "(no message)"


def _command_name() -> str:
    """The command being run, from argv (the first word that names one)."""
    return next((arg for arg in sys.argv[1:] if arg in COMMANDS), "jaxaccel")


def _on_interrupt(signum, frame) -> None:
    """The first Ctrl-C interrupts the command; a second while it cleans up is ignored."""
    if _INTERRUPTED["seen"]:
        return
    if _inside_import(frame):
        # An exception escaping a native module's initialisation (jaxlib's) aborts the
        # process: ask again in 50 ms, when the import has finished.
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
        timer.daemon = True
        timer.start()
        return
    _INTERRUPTED["seen"] = True
    raise KeyboardInterrupt


def _inside_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _quiet_interrupts(hook):
    """An unraisable-exception hook without the "Exception ignored ... KeyboardInterrupt"
    traceback of an interrupt that landed in a callback (`_INTERRUPTED` still exits 130)."""
    def quiet(unraisable) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            hook(unraisable)
    return quiet


def main() -> None:
    # From here Ctrl-C raises KeyboardInterrupt, so that commands clean up (staging
    # directories, partial files, child processes) before the exit with 130.
    signal.signal(signal.SIGINT, _on_interrupt)
    sys.unraisablehook = _quiet_interrupts(sys.unraisablehook)
    code = run_with_clean_errors(app)
    # The command's work is done (or cleaned up): a Ctrl-C during the interpreter's shutdown
    # would only kill it with a traceback-free SIGINT status that hides `code`.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _INTERRUPTED["seen"]:
        # Cleanup ran in the command's `finally` blocks; interpreter shutdown with an
        # interrupted XLA runtime can crash or re-raise the interrupt, so skip it.
        distributed.exit_now(code)
    if distributed.active() is not None:
        if code:  # a peer may be gone: skip the exit-time shutdown barrier it would not reach
            distributed.exit_after_error(code)
        distributed.shutdown()
    sys.exit(code)


if __name__ == "__main__":
    main()
