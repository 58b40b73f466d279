"""Progress bars for long work (restore, convert, verify), on stderr so stdout stays data."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

stderr = Console(stderr=True)


@contextlib.contextmanager
def byte_progress(total: int, description: str, enabled: bool = True
                  ) -> Iterator[Callable[[int], None]]:
    """Yield an `advance(nbytes)` callback; draws a bar (bytes, GB/s, ETA) on a terminal or
    in a Jupyter notebook (rich renders it there as a live output cell)."""
    if not enabled or not (sys.stderr.isatty() or stderr.is_jupyter):
        yield lambda nbytes: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda nbytes: progress.advance(task, nbytes)


def say(message: str, quiet: bool = False) -> None:
    """One human-readable status line on stderr."""
    if not quiet:
        stderr.print(message, highlight=False, soft_wrap=True)
