"""A read-through local cache of remote checkpoints' chunks, so a second restore on the same
machine reads at local-disk speed and never asks the bucket for a chunk it holds.

Layout: `<cache dir>/<checkpoint identity>/<chunk key, %-quoted>`, one file per chunk holding
the chunk's stored bytes exactly (values + their crc32c, as zarr's crc32c codec writes them),
plus `source.json` naming the URL. The identity is the sha256 of the checkpoint's manifest
(Manifest.identity), which records every chunk's crc32: a rewritten checkpoint gets new
entries, never stale ones.

Safety, by construction rather than by locks:
* every entry is verified (its crc32c) each time it is read; a bad one is deleted and fetched
  again, never served (checkpoint.remote);
* entries appear atomically: written to a `.tmp-*` file, then renamed; a process killed while
  filling leaves only a temp file, which no lookup ever opens and `prune` removes;
* two processes filling the same cache each write their own temp files; the last rename wins
  with identical bytes, and a reader holding the old file still reads a complete one;
* size: least recently used entries (mtime, refreshed on every hit) are deleted until the
  cache is under its limit, after every restore and on `jaxaccel cache prune`.

Settings come from the environment so that bench and launch subprocesses inherit them:
`JAXACCEL_CACHE_DIR` (default `$XDG_CACHE_HOME/jaxaccel/chunks`, i.e. ~/.cache/...),
`JAXACCEL_CACHE_SIZE` (default 50GiB), `JAXACCEL_NO_CACHE=1`; the CLI's `--cache-dir`,
`--cache-size` and `--no-cache` set them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import time
import urllib.parse

from jaxaccel.utils.files import user_cache_dir, writable_cache_dir, write_atomically
from jaxaccel.utils.units import parse_bytes

DEFAULT_SIZE = "50GiB"
SOURCE_FILE = "source.json"
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 600  # a temp file this old belongs to a fill that was killed


def default_dir() -> pathlib.Path:
    """$JAXACCEL_CACHE_DIR, else $XDG_CACHE_HOME/jaxaccel/chunks (~/.cache/... by default)."""
    if os.environ.get("JAXACCEL_CACHE_DIR"):
        return pathlib.Path(os.environ["JAXACCEL_CACHE_DIR"]).expanduser()
    return user_cache_dir("chunks")


def default_size() -> int:
    """$JAXACCEL_CACHE_SIZE (e.g. 50GiB) in bytes."""
    return parse_bytes(os.environ.get("JAXACCEL_CACHE_SIZE") or DEFAULT_SIZE, "--cache-size")


def enabled() -> bool:
    """Whether remote reads use the cache: not with $JAXACCEL_NO_CACHE, nor (one warning)
    where its directory cannot be written; the cache is optional, the restore goes on."""
    if os.environ.get("JAXACCEL_NO_CACHE", "").lower() in ("1", "true", "yes"):
        return False
    return writable_cache_dir(default_dir(), "chunk cache",
                              "--cache-dir (or $JAXACCEL_CACHE_DIR)", fallback=False) is not None


@dataclasses.dataclass
class CachedCheckpoint:
    """One checkpoint's entries in the cache (for `jaxaccel cache ls`)."""

    identity: str
    url: str
    entries: int
    bytes: int
    last_used: float  # unix seconds of the newest entry's mtime


class ChunkCache:
    """The cache under `root` holding at most `max_bytes`; `for_checkpoint` gives the view
    that remote reads use."""

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: int | None = None):
        self.root = pathlib.Path(root) if root is not None else default_dir()
        self.max_bytes = max_bytes if max_bytes is not None else default_size()

    def for_checkpoint(self, identity: str, url: str) -> "CheckpointCache":
        directory = self.root / identity
        directory.mkdir(parents=True, exist_ok=True)
        source = directory / SOURCE_FILE
        if not source.is_file():
            _atomic_write(source, json.dumps({"url": url}).encode())
        return CheckpointCache(directory)

    def checkpoints(self) -> list[CachedCheckpoint]:
        """Every cached checkpoint, most recently used first."""
        found = []
        for directory in self._directories():
            entries = list(_entries(directory))
            url = _source_url(directory)
            found.append(CachedCheckpoint(
                directory.name, url, len(entries), sum(s.st_size for _, s in entries),
                max((s.st_mtime for _, s in entries), default=directory.stat().st_mtime)))
        return sorted(found, key=lambda c: -c.last_used)

    def total_bytes(self) -> int:
        return sum(s.st_size for d in self._directories() for _, s in _entries(d))

    def prune(self, max_bytes: int | None = None) -> tuple[int, int]:
        """Delete stale temp files, then least recently used entries until the cache holds at
        most `max_bytes` (default: its size). Returns (entries deleted, bytes freed)."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        deleted = freed = 0
        entries = []
        for directory in self._directories():
            _remove_stale_temps(directory)
            entries.extend(_entries(directory))
        total = sum(s.st_size for _, s in entries)
        for path, stat in sorted(entries, key=lambda e: e[1].st_mtime):
            if total <= limit:
                break
            try:
                path.unlink()
            except FileNotFoundError:  # another process pruned it first
                continue
            total -= stat.st_size
            deleted, freed = deleted + 1, freed + stat.st_size
        for directory in self._directories():  # drop checkpoints left without entries
            if not any(_entries(directory)):
                shutil.rmtree(directory, ignore_errors=True)
        return deleted, freed

    def clear(self) -> int:
        """Delete everything in the cache; returns the bytes freed."""
        freed = self.total_bytes()
        for directory in self._directories():
            shutil.rmtree(directory, ignore_errors=True)
        return freed

    def _directories(self) -> list[pathlib.Path]:
        if not self.root.is_dir():
            return []
        return [d for d in self.root.iterdir() if d.is_dir() and (d / SOURCE_FILE).exists()]


class CheckpointCache:
    """The entries of one checkpoint: chunk key -> file of its stored bytes."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory

    def _file(self, key: str) -> pathlib.Path:
        return self.directory / urllib.parse.quote(key, safe="")

    def path(self, key: str) -> pathlib.Path | None:
        """The entry's file if the cache holds `key` (its bytes are verified by the reader)."""
        path = self._file(key)
        return path if path.is_file() else None

    def put(self, key: str, data: bytes) -> None:
        """Add an entry atomically (temp file + rename); a failure to write (disk full) only
        leaves the chunk uncached."""
        try:
            _atomic_write(self._file(key), data)
        except OSError:
            pass

    def touch(self, key: str) -> None:
        """Mark an entry used now (LRU order)."""
        try:
            os.utime(self._file(key))
        except OSError:
            pass

    def evict(self, key: str) -> None:
        try:
            self._file(key).unlink()
        except FileNotFoundError:
            pass


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    # No fsync: every entry is verified when read, so one torn by a crash is just fetched
    # again, and an fsync per chunk would stall the restore that fills the cache.
    write_atomically(path, data, temp_prefix=TEMP_PREFIX, durable=False)


def _entries(directory: pathlib.Path):
    """(path, stat) of every complete entry (temp files and source.json excluded)."""
    for path in directory.iterdir():
        if path.name == SOURCE_FILE or path.name.startswith(TEMP_PREFIX):
            continue
        try:
            yield path, path.stat()
        except FileNotFoundError:  # evicted or pruned by another process meanwhile
            continue


def _remove_stale_temps(directory: pathlib.Path) -> None:
    now = time.time()
    for path in directory.glob(f"{TEMP_PREFIX}*"):
        try:
            if now - path.stat().st_mtime > STALE_TEMP_SECONDS:
                path.unlink()
        except FileNotFoundError:
            continue


def _source_url(directory: pathlib.Path) -> str:
    try:
        return json.loads((directory / SOURCE_FILE).read_text()).get("url", "?")
    except (OSError, ValueError):
        return "?"
