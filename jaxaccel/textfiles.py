"""Input and output files of the CLI: text inputs (`embed --input`, `generate --input`,
`classify --input`: UTF-8, one item a line) and `.npy` outputs (`--out`)."""

from __future__ import annotations

import os
import pathlib

import numpy as np

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


def save_npy_atomically(path: pathlib.Path, array) -> None:
    """Write `array` to `path` (.npy) so that a reader never sees a partial file."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)
