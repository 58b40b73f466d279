"""Text input files of the CLI (`embed --input`, `generate --input`): UTF-8, one item a line."""

from __future__ import annotations

import pathlib

from jaxaccel.errors import InputError


def read_lines(path: pathlib.Path, flag: str = "--input") -> list[str]:
    """The file's lines; a one-line InputError naming `flag` and the file when it is missing,
    unreadable, empty or not UTF-8 (with the line and byte of the first bad byte)."""
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot be read ({err.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise InputError(f"{flag} {path}: not UTF-8 (line {line}, byte {err.start})") from None
    lines = text.splitlines()
    if not lines:
        raise InputError(f"{flag} {path}: the file is empty; expected one item per line")
    return lines
