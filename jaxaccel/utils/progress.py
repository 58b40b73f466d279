"""Progress bars for long work (restore, convert, verify, generate), on stderr so stdout stays data."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

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


class _TokenSpeed(ProgressColumn):
    """Generated tokens per second of the whole run so far."""

    def render(self, task):
        elapsed = task.elapsed or 0.0
        tokens = task.fields.get("tokens", 0)
        return Text(f"{tokens / elapsed:.1f} tok/s" if elapsed > 0 else "- tok/s")


@contextlib.contextmanager
def request_progress(total: int, description: str = "generating", enabled: bool = True
                     ) -> Iterator[Callable[[int, int], None]]:
    """Yield an `update(requests_done, tokens_generated)` callback; draws a bar (requests
    done of `total`, generated tokens/s, ETA) on a terminal or in a Jupyter notebook."""
    if not enabled or not (sys.stderr.isatty() or stderr.is_jupyter):
        yield lambda done, tokens: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("requests"), _TokenSpeed(), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task(description, total=total, tokens=0)
        yield lambda done, tokens: progress.update(task, completed=done, tokens=tokens)


def say(message: str, quiet: bool = False) -> None:
    """One human-readable status line on stderr."""
    if not quiet:
        stderr.print(message, highlight=False, soft_wrap=True)
