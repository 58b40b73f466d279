"""Small files jaxaccel reads and writes: the CLI's text inputs (`embed --input`, `generate
--input`, `classify --input`: UTF-8, one item a line), its `.npy` outputs (`--out`), and the
JSON metadata files that ship beside a model's weights."""

from __future__ import annotations

import json
import os
import pathlib

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


def save_npy_atomically(path: pathlib.Path, array) -> None:
    """Write `array` to `path` (.npy) so that a reader never sees a partial file."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


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
