"""`jaxaccel cache ls|prune|clear`: the local chunk cache of remote checkpoints."""

from __future__ import annotations

import json
from typing import Optional

import typer

from jaxaccel.utils import progress
from jaxaccel.checkpoint import chunk_cache
from jaxaccel.cli.options import JSON, QUIET
from jaxaccel.utils.units import format_bytes, parse_bytes


def register(app: typer.Typer) -> None:
    cache_app = typer.Typer(help="The local chunk cache of remote (gs://, s3://, https://) "
                            "checkpoints: list, shrink or empty it. Its directory and size "
                            "come from `jaxaccel --cache-dir/--cache-size` or "
                            "$JAXACCEL_CACHE_DIR/$JAXACCEL_CACHE_SIZE.", no_args_is_help=True)
    app.add_typer(cache_app, name="cache")

    @cache_app.command("ls")
    def ls_cmd(as_json: bool = JSON) -> None:
        """List cached checkpoints: URL, entries, bytes, last use (newest first)."""
        cache = chunk_cache.ChunkCache()
        rows = cache.checkpoints()
        if as_json:
            print(json.dumps({"dir": str(cache.root), "max_bytes": cache.max_bytes,
                              "total_bytes": sum(r.bytes for r in rows),
                              "checkpoints": [vars(r) for r in rows]}))
            return
        print(f"{cache.root}: {format_bytes(sum(r.bytes for r in rows))} of "
              f"{format_bytes(cache.max_bytes)}")
        for row in rows:
            print(f"  {row.identity[:12]}  {format_bytes(row.bytes):>10}  {row.entries:6d} chunks"
                  f"  {row.url}")

    @cache_app.command("prune")
    def prune_cmd(max_size: Optional[str] = typer.Option(
                      None, "--max-size", help="Shrink to this size (default: the cache "
                      "size, 50GiB unless --cache-size)."),
                  as_json: bool = JSON, quiet: bool = QUIET) -> None:
        """Delete least recently used chunks until the cache fits its size, and leftovers of
        interrupted fills."""
        cache = chunk_cache.ChunkCache()
        limit = parse_bytes(max_size, "--max-size") if max_size else None
        deleted, freed = cache.prune(limit)
        if as_json:
            print(json.dumps({"deleted_entries": deleted, "freed_bytes": freed,
                              "total_bytes": cache.total_bytes()}))
            return
        progress.say(f"pruned {deleted} chunk(s), freed {format_bytes(freed)}; "
                     f"{format_bytes(cache.total_bytes())} left in {cache.root}", quiet)

    @cache_app.command("clear")
    def clear_cmd(as_json: bool = JSON, quiet: bool = QUIET) -> None:
        """Delete every cached chunk."""
        cache = chunk_cache.ChunkCache()
        freed = cache.clear()
        if as_json:
            print(json.dumps({"freed_bytes": freed}))
            return
        progress.say(f"cleared {cache.root}: freed {format_bytes(freed)}", quiet)
