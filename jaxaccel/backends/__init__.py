"""Platform backends: the one place where platform-specific speed-ups live.

`for_platform("cpu")` imports `jaxaccel.backends.cpu` (XLA:CPU kernels, bitcasts, fences);
"tpu" and "cuda"/"gpu" get `Backend` with jax's own Pallas paged attention kernels
(`jaxaccel.backends.tpu`, `jaxaccel.backends.gpu`); every other platform gets `Backend`, plain
XLA. No platform imports or traces another's code. The
runtime installs a model's backend while tracing with `use(backend)`; model code reads it
with `current()` (default: plain XLA, so a model called outside the runtime is plain too).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib

from jaxaccel.backends.base import Backend

# Platforms (jax's names) whose backend lives in its own module; all others get `Backend`.
_PLATFORM_MODULES = {"cpu": "jaxaccel.backends.cpu", "tpu": "jaxaccel.backends.tpu",
                     "cuda": "jaxaccel.backends.gpu", "gpu": "jaxaccel.backends.gpu"}
_PLAIN = Backend()
_CURRENT: contextvars.ContextVar[Backend] = contextvars.ContextVar("jaxaccel_backend",
                                                                   default=_PLAIN)


def for_platform(platform: str) -> Backend:
    """The backend for a jax platform name ("cpu", "cuda"/"gpu", "rocm", "tpu")."""
    module = _PLATFORM_MODULES.get(platform)
    if module is None:
        return _PLAIN
    return importlib.import_module(module).backend()  # deferred: each platform's code on it


def for_mesh(mesh) -> Backend:
    """The backend for the platform of a mesh's devices."""
    return for_platform(mesh.devices.flat[0].platform)


def current() -> Backend:
    """The backend installed for the program being traced (plain XLA outside the runtime)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use(backend: Backend):
    """Trace the block with `backend` answering `current()`."""
    token = _CURRENT.set(backend)
    try:
        yield backend
    finally:
        _CURRENT.reset(token)
