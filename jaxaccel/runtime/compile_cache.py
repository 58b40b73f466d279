"""XLA's persistent compilation cache: a second start of the same model skips compiling.

jax keys each executable by its HLO, shardings, devices and compiler flags, so a stale entry
can never be used for a different program; the cache only ever costs disk space.
"""

from __future__ import annotations

import pathlib

import jax

from jaxaccel.utils.files import user_cache_dir, writable_cache_dir


def default_dir() -> pathlib.Path:
    """`$XDG_CACHE_HOME/jaxaccel/xla` (default `~/.cache/jaxaccel/xla`)."""
    return user_cache_dir("xla")


def enable(directory: str | pathlib.Path | None = None) -> pathlib.Path | None:
    """Cache every compiled executable under `directory` (default: `default_dir()`).

    jax's defaults skip executables that compiled in under a second or are small; a cold start
    wants all of them, so both thresholds go to zero. A directory that cannot be written is
    an optional cache lost: one warning, and this run compiles without it (returns None).
    """
    path = pathlib.Path(directory) if directory is not None else default_dir()
    path = writable_cache_dir(path, "compile cache", "--compile-cache DIR (or $XDG_CACHE_HOME)",
                              fallback=False)
    if path is None:
        disable()
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _reset_jax_cache_state()
    return path


def disable() -> None:
    jax.config.update("jax_compilation_cache_dir", None)
    _reset_jax_cache_state()


def configure(directory: str | pathlib.Path | None, enabled: bool = True) -> pathlib.Path | None:
    """What `--compile-cache DIR` / `--no-compile-cache` do; returns the directory in use."""
    if not enabled:
        disable()
        return None
    return enable(directory)


def _reset_jax_cache_state() -> None:
    # jax initialises its cache object once, at the first compile; a later directory change
    # needs it re-initialised (private API: tolerate its absence).
    try:
        from jax._src import compilation_cache  # deferred: private, may be absent

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        pass
