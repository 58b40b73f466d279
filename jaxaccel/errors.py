"""Turn the project's known error types into one-line messages and exit codes.

Exit codes: 0 ok, 1 a problem with a file/checkpoint/runtime, 2 a usage error (bad flag
value or input), as command-line users and scripts expect.
"""

from __future__ import annotations

import sys

USAGE_EXIT = 2
FAILURE_EXIT = 1


def _known_errors():
    from jaxaccel.checkpoint.manifest import CheckpointError
    from jaxaccel.convert.safetensors_source import ConvertError
    from jaxaccel.distributed import DistributedError
    from jaxaccel.models import UnknownFamilyError
    from jaxaccel.planner import PlanError
    from jaxaccel.sharding import MeshSpecError
    from jaxaccel.tokenizer import InputError

    usage = (MeshSpecError, InputError, UsageError)
    failure = (CheckpointError, ConvertError, UnknownFamilyError, DistributedError,
               PlanError)
    return usage, failure


class UsageError(ValueError):
    """A flag value that cannot be used (exit code 2)."""


def run_with_clean_errors(app) -> int:
    """Run the typer app; known errors become `error: ...` on stderr and an exit code."""
    try:
        app(standalone_mode=False)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else FAILURE_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        return _report(err)
    return 0


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(ClickException, Abort) classes of click and of the copy newer typers vendor."""
    import click

    exceptions, aborts = [click.exceptions.ClickException], [click.exceptions.Abort]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        pass
    else:
        exceptions.append(vendored.ClickException)
        aborts += [vendored.Abort] if hasattr(vendored, "Abort") else []
    return tuple(exceptions), tuple(aborts)


def _report(err: Exception) -> int:
    click_exceptions, aborts = _click_errors()
    if isinstance(err, click_exceptions):  # bad flags, from typer/click
        err.show()
        return err.exit_code
    if isinstance(err, aborts):
        return FAILURE_EXIT
    usage, failure = _known_errors()
    if isinstance(err, usage + failure):
        print(f"error: {err}", file=sys.stderr)
        return USAGE_EXIT if isinstance(err, usage) else FAILURE_EXIT
    raise err
