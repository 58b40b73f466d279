"""Small files jaxaccel reads and writes: the CLI's text inputs (`embed --input`, `generate
--input`, `classify --input`: UTF-8, one item a line, a leading byte-order mark ignored), its
`.npy` outputs (`--out`), the JSON metadata files that ship beside a model's weights, and the
user cache directory that every optional cache lives under."""

from __future__ import annotations

import atexit
import codecs
import functools
import json
import os
import pathlib
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from typing import BinaryIO

import numpy as np

from jaxaccel.errors import ConvertError, InputError

_JSON_KINDS = {dict: "object", list: "array"}


# Byte-order marks of the encodings editors save in besides UTF-8 (longest first: UTF-32-LE's
# mark begins with UTF-16-LE's).
_OTHER_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32-LE"), (codecs.BOM_UTF32_BE, "UTF-32-BE"),
               (codecs.BOM_UTF16_LE, "UTF-16-LE"), (codecs.BOM_UTF16_BE, "UTF-16-BE"))


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 text of a file's bytes without the byte-order mark editors (Notepad, Excel's
    "UTF-8 CSV") put first. InputError naming `where` for another encoding: UTF-16/32 (named
    from their mark) or bytes that are not UTF-8 (line and byte of the first bad one)."""
    for bom, name in _OTHER_BOMS:
        if data.startswith(bom):
            raise InputError(f"{where}: encoded as {name}; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise InputError(f"{where}: not UTF-8 (line {line}, byte {err.start}); save it as "
                         "UTF-8") from None


def read_lines(path: pathlib.Path, flag: str = "--input") -> list[str]:
    """The file's lines; a one-line InputError naming `flag` and the file when it is missing,
    unreadable, empty or not UTF-8 (a UTF-8 byte-order mark is dropped, see `decode_text`)."""
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot be read ({err.strerror})") from None
    lines = decode_text(data, f"{flag} {path}").splitlines()
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
        value = json.loads(path.read_text(encoding="utf-8-sig"))  # editors may add a BOM
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConvertError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, kind):
        raise ConvertError(f"{path}: expected a JSON {_JSON_KINDS.get(kind, kind.__name__)}, "
                           f"got {type(value).__name__}")
    return value


def user_cache_dir(sub: str) -> pathlib.Path:
    """`$XDG_CACHE_HOME/jaxaccel/SUB` (default `~/.cache/jaxaccel/SUB`): where every optional
    cache lives (compiled XLA programs, C++ kernel builds, remote chunks, the roofline)."""
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "jaxaccel" / sub


def writable_cache_dir(path: pathlib.Path, what: str, moved_by: str,
                       fallback: bool = True) -> pathlib.Path | None:
    """`path`, created if needed, when files can be written there. Otherwise (a read-only
    HOME, a file in the way) one warning on stderr naming the directory and the flag or
    variable (`moved_by`) that moves it, and: a private temporary directory (`fallback`,
    for caches the run can refill) or None (the caller runs without the cache)."""
    path = pathlib.Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
        return path
    except OSError as err:
        return _unwritable(str(path), what, moved_by, fallback, err.strerror or str(err))


@functools.cache  # one warning per cache and directory, however often a run asks
def _unwritable(path: str, what: str, moved_by: str, fallback: bool,
                reason: str) -> pathlib.Path | None:
    instead = tempfile.mkdtemp(prefix=f"jaxaccel-{what.replace(' ', '-')}-") if fallback else None
    if instead:  # this run's private copy: gone when the process exits
        atexit.register(shutil.rmtree, instead, ignore_errors=True)
    print(f"warning: cannot write the {what} at {path} ({reason}); "
          + (f"using {instead} for this run" if instead else "running without it")
          + f"; {moved_by} moves it", file=sys.stderr, flush=True)
    return pathlib.Path(instead) if instead else None
