"""Compile a C++ source shipped with jaxaccel into a shared library, once, on the user's machine.

Libraries are built for the CPU they run on (the caller's flags, e.g. `-march=native`), so they
are compiled at first use, not shipped. Each is cached under the kernel build cache
(`$XDG_CACHE_HOME/jaxaccel/kernels`) by a hash of the source, the headers beside it, the
compiler's version, the flags, the CPU's features and whatever else the caller names; a build
writes a temporary file renamed into place, so concurrent first uses never load a
half-written library.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

from jaxaccel.errors import KernelBuildError
from jaxaccel.utils.files import user_cache_dir, writable_cache_dir

COMPILE_TIMEOUT_S = 300


def cache_dir() -> pathlib.Path:
    """The kernel build cache; where it cannot be written, a temporary directory for this run
    (one warning): libraries are rebuilt next time, never lost."""
    return writable_cache_dir(user_cache_dir("kernels"), "kernel build cache", "$XDG_CACHE_HOME")


def compiler() -> str | None:
    """The C++ compiler ($CXX, else `c++` on PATH), or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


def cpu_features() -> str:
    """The flags line of /proc/cpuinfo (what -march=native compiles for), else the machine."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def library_path(source: pathlib.Path, cxx: str, flags: tuple[str, ...],
                 key_parts: tuple[bytes, ...] = ()) -> pathlib.Path:
    """Where the build of `source` with `cxx` and `flags` is cached."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    for part in (source.read_bytes(), headers, version.encode(), " ".join(flags).encode(),
                 cpu_features().encode(), *key_parts):
        key.update(part)
    return cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"


def compile_shared(source: pathlib.Path, flags: tuple[str, ...],
                   key_parts: tuple[bytes, ...] = ()) -> pathlib.Path:
    """The shared library built from `source` with `flags` (`-shared -fPIC` added), compiled
    unless a cached build exists. `key_parts` are further bytes the build depends on (an
    include directory's version). Raises KernelBuildError without a compiler or when
    compiling fails (the compiler's last output in the message)."""
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError(f"no C++ compiler found (tried $CXX or 'c++') to build {source.name}")
    flags = ("-shared", "-fPIC", *flags)
    library = library_path(source, cxx, flags, key_parts)
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        partial = pathlib.Path(scratch) / library.name
        try:
            done = subprocess.run([cxx, *flags, str(source), "-o", str(partial)],
                                  capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            raise KernelBuildError(f"compiling {source.name} took over {COMPILE_TIMEOUT_S} s"
                                   ) from err
        if done.returncode != 0:
            raise KernelBuildError(f"compiling {source.name} failed:\n{done.stderr[-2000:]}")
        os.replace(partial, library)
    return library
