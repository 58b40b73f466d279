"""Small files jaxaccel reads and writes: the CLI's text inputs (`embed --input`, `generate
--input`, `classify --input`: UTF-8, one item a line), its `.npy` outputs (`--out`), and the
JSON metadata files that ship beside a model's weights."""

from __future__ import annotations

import json
import os
import pathlib
import uuid
from collections.abc import Callable
from typing import BinaryIO

import numpy as np

from jaxaccel.errors import ConvertError, InputError

_JSON_KINDS = {dict: "object", list: "array"}


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


def write_atomically(path: pathlib.Path, data: bytes | Callable[[BinaryIO], None], *,
                     temp_prefix: str | None = None, durable: bool = True) -> None:
    """Write `path` so that a reader sees the old file or the whole new one, never a part.

    `data` is the bytes, or a function that writes them to the open binary file. They go to
    a temp file in `path`'s directory (the same file system, so the rename is atomic), named
    `temp_prefix` (default `.NAME.partial-`) + a random suffix, are fsynced when `durable`
    (else a crash may leave a torn file under `path`: only for data verified on read) and
    renamed onto `path`. The temp file never outlives a failure. Raises OSError."""
    path = pathlib.Path(path)
    prefix = f".{path.name}.partial-" if temp_prefix is None else temp_prefix
    temp = path.parent / f"{prefix}{uuid.uuid4().hex[:16]}"
    try:
        # "x": never truncate a file someone else created; plain open keeps the umask's mode
        with open(temp, "xb") as handle:
            data(handle) if callable(data) else handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def save_npy_atomically(path: pathlib.Path, array) -> None:
    """Write `array` to `path` (.npy) so that a reader never sees a partial file."""
    write_atomically(path, lambda handle: np.save(handle, array))


def read_json(path: pathlib.Path, kind: type = dict):
    """A source directory's JSON file (`generation_config.json`, `modules.json`, ...) as a
    `kind` (dict or list), None when the file is absent. ConvertError naming the file when
    it is not valid JSON or not of that kind."""
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConvertError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, kind):
        raise ConvertError(f"{path}: expected a JSON {_JSON_KINDS.get(kind, kind.__name__)}, "
                           f"got {type(value).__name__}")
    return value
