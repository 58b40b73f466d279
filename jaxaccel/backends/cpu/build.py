"""Compile jaxaccel's C++ XLA:CPU kernels on first use and register them with XLA.

The kernels are built for the CPU they run on, so they are compiled on the user's machine, not
shipped. There are two builds (`isa.KERNEL_BUILDS`, chosen by `isa.kernel_build` from the ISA
record): "avx512" with `-march=native` and "avx2" with `-march=x86-64-v3`; each is compiled
once per (source, compiler, flags, CPU features, jaxlib headers), into
`$XDG_CACHE_HOME/jaxaccel/kernels` (default `~/.cache/jaxaccel/kernels`). A build writes to a
temporary file renamed into place, so concurrent first uses never load a half-written library.

Without a C++ compiler, on a CPU with no kernel build (aarch64, x86 without AVX2), or with
JAXACCEL_KERNELS=0, `target()` returns None and callers use plain XLA (one warning line says
why): the kernels make things faster, never possible.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import platform
import warnings

import jax

from jaxaccel.backends.cpu import isa
from jaxaccel.errors import KernelBuildError  # noqa: F401  (re-exported)
from jaxaccel.utils import native

SOURCE_DIR = pathlib.Path(__file__).parent
CXX_FLAGS = ("-O3", "-std=c++17")  # + the build's -march (utils.native adds -shared -fPIC)


def compile_library(source: pathlib.Path, extra_flags: tuple[str, ...] = (),
                    kernel_build: str = "avx512") -> pathlib.Path:
    """The shared library for `source` in `kernel_build` (a key of isa.KERNEL_BUILDS),
    compiling it unless a cached build exists (`utils.native`, keyed also by the jaxlib
    headers it includes).

    `extra_flags` follow the defaults, so e.g. `-mno-avx512bf16` builds a portable variant.
    Raises KernelBuildError without a compiler or when compiling fails.
    """
    flags = (*CXX_FLAGS, isa.KERNEL_BUILDS[kernel_build], *extra_flags,
             f"-I{jax.ffi.include_dir()}")
    return native.compile_shared(source, flags, (jax.__version__.encode(),))


@functools.cache
def _warn_no_build() -> None:
    """One line, once per process, saying why no kernel runs on this CPU."""
    reason = isa.no_kernel_reason(isa.detect(), platform.machine())
    warnings.warn(f"jaxaccel: CPU kernels off, XLA's dots run instead: {reason}", stacklevel=3)


@functools.cache
def target(source_name: str, symbol: str, extra_flags: tuple[str, ...] = (),
           kernel_build: str | None = None) -> str | None:
    """Register `symbol` from kernel `source_name` as an XLA:CPU FFI target; its name, or
    None when kernels are switched off or cannot be built (a warning says why).

    `kernel_build` (a key of isa.KERNEL_BUILDS) picks the build; by default
    `isa.running_build()`.
    """
    if os.environ.get("JAXACCEL_KERNELS", "1") == "0":
        return None
    kernel_build = kernel_build or isa.running_build()
    if kernel_build is None:
        _warn_no_build()
        return None
    try:
        library_path = compile_library(SOURCE_DIR / source_name, extra_flags, kernel_build)
        library = ctypes.cdll.LoadLibrary(str(library_path))
        handler = getattr(library, symbol)
    except (KernelBuildError, OSError, AttributeError) as err:
        warnings.warn(f"jaxaccel: falling back to plain XLA for {symbol}: {err}", stacklevel=2)
        return None
    name = f"jaxaccel_{symbol}_{library_path.stem.rsplit('-', 1)[-1]}"
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
    return name
